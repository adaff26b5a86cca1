//! The ServiceExport status conditions Isthmus sets (`Valid`, `Conflict`), as the MCS API
//! defines them: a pure function of the export, the verdict on its Service and the time.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::mapping::{ROUTE, Verdict};

/// The condition saying whether the Service may be exported.
pub const VALID: &str = "Valid";
/// The condition saying whether the export conflicts with another.
pub const CONFLICT: &str = "Conflict";

/// What `Valid` and `Conflict` should say, without times.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    type_: &'static str,
    status: &'static str,
    reason: &'static str,
    message: String,
}

fn wanted(service: &str, verdict: Option<&Verdict>) -> [Wanted; 2] {
    let valid = |status, reason, message: String| Wanted {
        type_: VALID,
        status,
        reason,
        message,
    };
    let no_conflict = Wanted {
        type_: CONFLICT,
        status: "False",
        reason: "NoConflict",
        message: "no other Service claims these routes".into(),
    };
    match verdict {
        None => [
            valid(
                "False",
                "ServiceNotFound",
                format!("Service {service} does not exist"),
            ),
            no_conflict,
        ],
        Some(Verdict::NotAnnotated) => [
            valid(
                "False",
                "NotAnnotated",
                format!("Service {service} has no {ROUTE} annotation, so it is not a route"),
            ),
            no_conflict,
        ],
        Some(Verdict::Invalid(reason)) => [
            valid("False", "InvalidAnnotation", reason.clone()),
            no_conflict,
        ],
        Some(Verdict::Conflict(reason)) => [
            valid("True", "Valid", format!("Service {service} is a route")),
            Wanted {
                type_: CONFLICT,
                status: "True",
                reason: "RouteConflict",
                message: reason.clone(),
            },
        ],
        Some(Verdict::Routes) => [
            valid(
                "True",
                "Exported",
                format!("Service {service} is exported by Isthmus"),
            ),
            no_conflict,
        ],
    }
}

/// The conditions the export should have, or `None` when `current` already says it (so
/// that an unchanged status is never written again). Conditions of other types are kept;
/// `lastTransitionTime` changes only with a condition's status.
pub fn update(
    current: &[Condition],
    generation: Option<i64>,
    service: &str,
    verdict: Option<&Verdict>,
    now: &Time,
) -> Option<Vec<Condition>> {
    let mut next: Vec<Condition> = current
        .iter()
        .filter(|c| c.type_ != VALID && c.type_ != CONFLICT)
        .cloned()
        .collect();
    let mut changed = false;
    for want in wanted(service, verdict) {
        let old = current.iter().find(|c| c.type_ == want.type_);
        let same = old.is_some_and(|c| {
            c.status == want.status
                && c.reason == want.reason
                && c.message == want.message
                && c.observed_generation == generation
        });
        changed |= !same;
        let last_transition_time = match old {
            Some(c) if c.status == want.status => c.last_transition_time.clone(),
            _ => now.clone(),
        };
        next.push(Condition {
            type_: want.type_.to_string(),
            status: want.status.to_string(),
            reason: want.reason.to_string(),
            message: want.message,
            observed_generation: generation,
            last_transition_time,
        });
    }
    changed.then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn get<'a>(c: &'a [Condition], t: &str) -> &'a Condition {
        c.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn sets_valid_and_conflict_then_stays_quiet() {
        let first = update(&[], Some(1), "ns/a", Some(&Verdict::Routes), &at(10)).unwrap();
        assert_eq!(get(&first, VALID).status, "True");
        assert_eq!(get(&first, VALID).reason, "Exported");
        assert_eq!(get(&first, CONFLICT).status, "False");
        assert_eq!(get(&first, VALID).observed_generation, Some(1));
        // Nothing changed: nothing to write (no write loop).
        assert!(update(&first, Some(1), "ns/a", Some(&Verdict::Routes), &at(20)).is_none());
    }

    #[test]
    fn transition_time_kept_while_status_holds() {
        let first = update(&[], Some(1), "ns/a", None, &at(10)).unwrap();
        assert_eq!(get(&first, VALID).reason, "ServiceNotFound");
        let second = update(
            &first,
            Some(1),
            "ns/a",
            Some(&Verdict::NotAnnotated),
            &at(20),
        )
        .unwrap();
        // Still False: the time of the transition to False stays.
        assert_eq!(get(&second, VALID).reason, "NotAnnotated");
        assert_eq!(get(&second, VALID).last_transition_time, at(10));
        let third = update(&second, Some(2), "ns/a", Some(&Verdict::Routes), &at(30)).unwrap();
        assert_eq!(get(&third, VALID).last_transition_time, at(30));
        assert_eq!(get(&third, CONFLICT).last_transition_time, at(10));
        assert_eq!(get(&third, CONFLICT).observed_generation, Some(2));
    }

    #[test]
    fn conflict_and_invalid_and_foreign_conditions() {
        let foreign = Condition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "Other".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: at(1),
        };
        let c = update(
            std::slice::from_ref(&foreign),
            None,
            "ns/b",
            Some(&Verdict::Conflict("taken".into())),
            &at(5),
        )
        .unwrap();
        assert_eq!(get(&c, CONFLICT).status, "True");
        assert_eq!(get(&c, CONFLICT).message, "taken");
        assert_eq!(get(&c, "Ready"), &foreign);
        let i = update(
            &c,
            None,
            "ns/b",
            Some(&Verdict::Invalid("bad".into())),
            &at(6),
        )
        .unwrap();
        assert_eq!(get(&i, VALID).status, "False");
        assert_eq!(get(&i, VALID).reason, "InvalidAnnotation");
        assert_eq!(get(&i, CONFLICT).status, "False");
    }
}
