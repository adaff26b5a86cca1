//! The coordination.k8s.io/v1 Lease that elects the one route-sync replica that writes
//! (mirror Services, ServiceExport status). Both replicas read and serve; only the holder
//! writes, so a replica lost mid-write neither leaves duplicates nor stops the writing for
//! longer than the lease.
//!
//! - Acquire by create (409: someone else won) or, once the holder's claim has expired or
//!   was released, by replace at the observed resourceVersion (409: someone else won).
//! - Expiry is judged by this replica's clock only: a claim is expired when its
//!   resourceVersion has not changed for the lease's `leaseDurationSeconds` since this
//!   replica first saw it, so clock skew between replicas cannot shorten a claim.
//! - The holder renews every duration/3 and stops writing when its last successful renew
//!   is 2/3 of the duration old: before any other replica could see the claim expire.
//! - The other replica watches the Lease, so it sees each renewal as it happens, and tries
//!   to take the claim the moment it expires (besides polling every duration/3, in case the
//!   watch is down): a killed holder's writing is taken over one lease duration after its
//!   last renewal, so within the duration after it died.
//! - On a graceful stop the holder releases (empty holder), and the other acquires at its
//!   next attempt instead of waiting out the duration.
//!
//! [`decide`] is the pure decision; [`spawn`] runs the I/O.

use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Leadership;
use super::mirror::MirrorMetrics;

/// What the elector needs, as values.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// The Lease's namespace (`mirror.namespace`).
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's holderIdentity.
    pub identity: String,
    /// leaseDurationSeconds written; renewed every third of it.
    pub duration: Duration,
}

/// The last version of another holder's claim this replica saw, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The Lease's resourceVersion.
    pub resource_version: String,
    /// When this replica first saw that version.
    pub since: Instant,
}

/// What to do next with the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// No Lease exists: create it as holder.
    Create,
    /// Free (released or expired): take it over, replacing at this resourceVersion.
    Acquire(String),
    /// This replica holds it: renew at this resourceVersion.
    Renew(String),
    /// Another replica holds a live claim.
    Wait,
}

/// Decides the next step from the Lease as read (`None`: it does not exist), keeping
/// `observed` current. Pure.
pub fn decide(
    identity: &str,
    lease: Option<&Lease>,
    observed: &mut Option<Observed>,
    now: Instant,
) -> Step {
    let Some(lease) = lease else {
        *observed = None;
        return Step::Create;
    };
    let rv = lease.metadata.resource_version.clone().unwrap_or_default();
    let spec = lease.spec.as_ref();
    let holder = spec
        .and_then(|s| s.holder_identity.as_deref())
        .unwrap_or("");
    if holder == identity {
        *observed = None;
        return Step::Renew(rv);
    }
    if holder.is_empty() {
        return Step::Acquire(rv);
    }
    let duration = Duration::from_secs(
        spec.and_then(|s| s.lease_duration_seconds)
            .and_then(|d| u64::try_from(d).ok())
            .unwrap_or(0),
    );
    match observed {
        Some(seen) if seen.resource_version == rv => {
            if now.duration_since(seen.since) >= duration {
                Step::Acquire(rv)
            } else {
                Step::Wait
            }
        }
        _ => {
            *observed = Some(Observed {
                resource_version: rv,
                since: now,
            });
            Step::Wait
        }
    }
}

/// Records `lease` as seen at `now` (as [`decide`] does) and says when this replica may
/// next try to take it: at once for a released one, at the claim's expiry for another
/// holder's (this replica's clock, from when it first saw that version), `None` for its
/// own. Pure.
pub fn observe(
    identity: &str,
    lease: &Lease,
    observed: &mut Option<Observed>,
    now: Instant,
) -> Option<Instant> {
    let spec = lease.spec.as_ref();
    let holder = spec
        .and_then(|s| s.holder_identity.as_deref())
        .unwrap_or("");
    if holder == identity {
        return None;
    }
    if holder.is_empty() {
        return Some(now);
    }
    let rv = lease.metadata.resource_version.clone().unwrap_or_default();
    let duration = Duration::from_secs(
        spec.and_then(|s| s.lease_duration_seconds)
            .and_then(|d| u64::try_from(d).ok())
            .unwrap_or(0),
    );
    let seen = match observed {
        Some(seen) if seen.resource_version == rv => seen,
        _ => observed.insert(Observed {
            resource_version: rv,
            since: now,
        }),
    };
    Some(seen.since + duration)
}

/// The Lease as this replica writes it when it takes it (`previous` is what it replaces).
pub fn claim(settings: &LeaseSettings, previous: Option<&Lease>) -> Lease {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let transitions = previous
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.lease_transitions)
        .unwrap_or(0);
    let had_holder = previous
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.holder_identity.as_deref())
        .is_some_and(|h| !h.is_empty());
    Lease {
        metadata: ObjectMeta {
            name: Some(settings.name.clone()),
            namespace: Some(settings.namespace.clone()),
            resource_version: previous.and_then(|l| l.metadata.resource_version.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(settings.identity.clone()),
            lease_duration_seconds: Some(duration_seconds(settings.duration)),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(if previous.is_some() && had_holder {
                transitions.saturating_add(1)
            } else {
                transitions
            }),
            ..LeaseSpec::default()
        }),
    }
}

fn duration_seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// Runs the elector until `stop`, then releases a held Lease. Returns at once a
/// [`Leadership`] that follows it.
pub fn spawn(
    client: kube::Client,
    settings: LeaseSettings,
    metrics: MirrorMetrics,
    stop: CancellationToken,
) -> (Leadership, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(run(client, settings, tx, metrics, stop));
    (Leadership::from_receiver(rx), task)
}

async fn run(
    client: kube::Client,
    settings: LeaseSettings,
    leader: watch::Sender<bool>,
    metrics: MirrorMetrics,
    stop: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let period = settings.duration / 3;
    // Step down this long after the last successful write, before anyone else could
    // take the claim over (they wait the whole duration).
    let hold = settings.duration * 2 / 3;
    let mut observed = None;
    let mut held_until: Option<Instant> = None;
    let set = |is: bool| {
        let changed = leader.send_if_modified(|v| {
            let changed = *v != is;
            *v = is;
            changed
        });
        if changed {
            metrics.leader.set(i64::from(is));
            metrics.transitions.inc();
            if is {
                tracing::info!(identity = %settings.identity, lease = %settings.name, "holding the Lease: this replica writes");
            } else {
                tracing::warn!(identity = %settings.identity, lease = %settings.name, "not holding the Lease: this replica stops writing");
            }
        }
    };
    // Every change of the Lease as it happens (a holder's renewals above all); errors back
    // off and relist, and the polling below covers the gap.
    let config = watcher::Config::default().fields(&format!("metadata.name={}", settings.name));
    let mut changes = watcher(api.clone(), config).default_backoff().boxed();
    let mut next = Instant::now();
    loop {
        let until = held_until;
        let step_down = async move {
            match until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => break,
            () = step_down => {
                held_until = None;
                set(false);
                continue;
            }
            change = changes.next() => {
                match change {
                    Some(Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease))) => {
                        if let Some(at) = observe(&settings.identity, &lease, &mut observed, Instant::now()) {
                            next = next.min(at);
                        }
                    }
                    Some(Ok(watcher::Event::Delete(_))) => {
                        observed = None;
                        next = Instant::now();
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::debug!(lease = %settings.name, "watching the Lease: {e}");
                    }
                    // The stream never ends; should it, polling goes on alone.
                    None => changes = futures_util::stream::pending().boxed(),
                }
                continue;
            }
            () = tokio::time::sleep_until(next) => {}
        }
        let started = Instant::now();
        let attempt = tokio::time::timeout(period, async {
            let current = api.get_opt(&settings.name).await?;
            let expiry = current
                .as_ref()
                .and_then(|l| observe(&settings.identity, l, &mut observed, started));
            let step = decide(&settings.identity, current.as_ref(), &mut observed, started);
            let wrote = match &step {
                Step::Create => {
                    api.create(&PostParams::default(), &claim(&settings, None))
                        .await?;
                    true
                }
                Step::Acquire(_) => {
                    api.replace(
                        &settings.name,
                        &PostParams::default(),
                        &claim(&settings, current.as_ref()),
                    )
                    .await?;
                    true
                }
                Step::Renew(rv) => {
                    let mut renewed = current.clone().unwrap_or_default();
                    renewed.metadata.resource_version = Some(rv.clone());
                    let spec = renewed.spec.get_or_insert_with(LeaseSpec::default);
                    spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
                    spec.lease_duration_seconds = Some(duration_seconds(settings.duration));
                    api.replace(&settings.name, &PostParams::default(), &renewed)
                        .await?;
                    true
                }
                Step::Wait => false,
            };
            Ok::<(bool, Option<Instant>), kube::Error>((wrote, expiry.filter(|_| !wrote)))
        })
        .await;
        next = Instant::now() + period;
        if let Ok(Ok((_, Some(expiry)))) = &attempt {
            // Try again the moment the other holder's claim expires, if before the poll.
            next = next.min((*expiry).max(Instant::now()));
        }
        match attempt.map(|r| r.map(|(wrote, _)| wrote)) {
            Ok(Ok(true)) => {
                held_until = Some(started + hold);
                set(true);
            }
            Ok(Ok(false)) => {
                held_until = None;
                set(false);
            }
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => {
                // Another replica wrote first: it holds the Lease.
                held_until = None;
                set(false);
            }
            Ok(Err(e)) => {
                tracing::warn!(lease = %settings.name, "Lease request failed (retried in {period:?}): {e}");
            }
            Err(_) => {
                tracing::warn!(lease = %settings.name, "Lease request timed out after {period:?}");
            }
        }
    }
    let was_leader = *leader.borrow();
    set(false);
    if was_leader {
        release(&api, &settings).await;
    }
}

/// Gives the Lease up (empty holder), so the other replica takes over at its next attempt.
async fn release(api: &Api<Lease>, settings: &LeaseSettings) {
    let released = tokio::time::timeout(Duration::from_secs(2), async {
        let Some(mut lease) = api.get_opt(&settings.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
        api.replace(&settings.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    })
    .await;
    match released {
        Ok(Ok(())) => tracing::info!(lease = %settings.name, "Lease released"),
        Ok(Err(e)) => tracing::warn!(lease = %settings.name, "releasing the Lease: {e}"),
        Err(_) => tracing::warn!(lease = %settings.name, "releasing the Lease timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, rv: &str, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("isthmus-route-sync".into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(duration),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn observe_says_when_a_claim_may_be_taken() {
        let t0 = Instant::now();
        let mut seen = None;
        assert_eq!(
            observe("a", &lease(Some("a"), "1", 15), &mut seen, t0),
            None
        );
        assert_eq!(observe("a", &lease(None, "2", 15), &mut seen, t0), Some(t0));
        let claim = lease(Some("b"), "3", 15);
        assert_eq!(
            observe("a", &claim, &mut seen, t0),
            Some(t0 + Duration::from_secs(15))
        );
        // The same version seen later still expires from when it was first seen...
        let later = t0 + Duration::from_secs(5);
        assert_eq!(
            observe("a", &claim, &mut seen, later),
            Some(t0 + Duration::from_secs(15))
        );
        // ...and decide agrees at that moment, not before.
        let at = t0 + Duration::from_secs(15);
        assert_eq!(decide("a", Some(&claim), &mut seen, later), Step::Wait);
        assert_eq!(
            decide("a", Some(&claim), &mut seen, at),
            Step::Acquire("3".into())
        );
        // A renewal (new version) starts the wait over.
        let renewed = lease(Some("b"), "4", 15);
        assert_eq!(
            observe("a", &renewed, &mut seen, later),
            Some(later + Duration::from_secs(15))
        );
    }

    #[test]
    fn no_lease_is_created_and_an_own_one_is_renewed() {
        let now = Instant::now();
        let mut seen = None;
        assert_eq!(decide("a", None, &mut seen, now), Step::Create);
        assert_eq!(
            decide("a", Some(&lease(Some("a"), "7", 15)), &mut seen, now),
            Step::Renew("7".into())
        );
    }

    #[test]
    fn a_live_claim_is_waited_out_by_this_replicas_clock_and_a_released_one_taken_at_once() {
        let t0 = Instant::now();
        let mut seen = None;
        let held = lease(Some("b"), "7", 15);
        assert_eq!(decide("a", Some(&held), &mut seen, t0), Step::Wait);
        let t = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(decide("a", Some(&held), &mut seen, t(14)), Step::Wait);
        // b renewed (a new version): the wait starts again from when it was seen.
        let renewed = lease(Some("b"), "8", 15);
        assert_eq!(decide("a", Some(&renewed), &mut seen, t(14)), Step::Wait);
        assert_eq!(decide("a", Some(&renewed), &mut seen, t(28)), Step::Wait);
        assert_eq!(
            decide("a", Some(&renewed), &mut seen, t(29)),
            Step::Acquire("8".into())
        );
        let released = lease(None, "9", 1);
        assert_eq!(
            decide("a", Some(&released), &mut None, t0),
            Step::Acquire("9".into())
        );
    }

    #[test]
    fn a_malformed_lease_is_decided_without_panicking() {
        let t0 = Instant::now();
        // No spec at all: nobody holds it.
        let bare = Lease {
            metadata: ObjectMeta {
                resource_version: Some("3".into()),
                ..ObjectMeta::default()
            },
            spec: None,
        };
        assert_eq!(
            decide("a", Some(&bare), &mut None, t0),
            Step::Acquire("3".into())
        );
        // A holder with a negative duration: its claim is judged expired once this replica
        // has seen the same version (never at first sight, so a live holder is not raced).
        let mut seen = None;
        let odd = lease(Some("b"), "4", -5);
        assert_eq!(decide("a", Some(&odd), &mut seen, t0), Step::Wait);
        assert_eq!(
            decide("a", Some(&odd), &mut seen, t0 + Duration::from_millis(1)),
            Step::Acquire("4".into())
        );
    }

    #[test]
    fn a_claim_counts_transitions_and_carries_the_version_it_replaces() {
        let settings = LeaseSettings {
            namespace: "isthmus".into(),
            name: "isthmus-route-sync".into(),
            identity: "a".into(),
            duration: Duration::from_secs(15),
        };
        let mut previous = lease(Some("b"), "8", 15);
        previous.spec.as_mut().unwrap().lease_transitions = Some(3);
        let taken = claim(&settings, Some(&previous));
        let spec = taken.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(4));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert!(spec.acquire_time.is_some() && spec.renew_time.is_some());
        assert_eq!(taken.metadata.resource_version.as_deref(), Some("8"));
        let fresh = claim(&settings, None).spec.unwrap();
        assert_eq!(fresh.lease_transitions, Some(0));
    }
}
