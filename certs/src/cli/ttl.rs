//! The `--ttl` syntax: a positive whole number and one unit, `s`, `m`, `h` or `d`
//! (`90s`, `30m`, `24h`, `7d`), at most ten years.

use std::time::Duration;

const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Parses a TTL such as `24h`. The error text is shown by clap after the argument name.
pub(crate) fn parse(s: &str) -> Result<Duration, String> {
    let expected = "expected a whole number followed by s, m, h or d, e.g. 90s, 30m, 24h, 7d";
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit; {expected}"))?;
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(format!("{s:?} does not start with a number; {expected}"));
    }
    let unit_secs: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?} has unknown unit {unit:?}; {expected}")),
    };
    let too_long = || format!("{s:?} is longer than the maximum of 3650d");
    let value: u64 = digits.parse().map_err(|_| too_long())?;
    let secs = value.checked_mul(unit_secs).ok_or_else(too_long)?;
    if secs == 0 {
        return Err(format!(
            "{s:?} is zero; a certificate must be valid for some time"
        ));
    }
    let ttl = Duration::from_secs(secs);
    if ttl > MAX_TTL {
        return Err(too_long());
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_each_unit() {
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse(" 1h "), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("3650d"), Ok(MAX_TTL));
    }

    #[test]
    fn refuses_bad_input_with_a_reason() {
        for (input, needle) in [
            ("", "no unit"),
            ("24", "no unit"),
            ("h", "does not start with a number"),
            ("-1h", "does not start with a number"),
            ("1.5h", "unknown unit"),
            ("24H", "unknown unit"),
            ("1w", "unknown unit"),
            ("1h30m", "unknown unit"),
            ("24 h", "unknown unit"),
            ("0s", "zero"),
            ("3651d", "maximum"),
            ("99999999999999999999s", "maximum"),
            ("9999999999999999d", "maximum"),
        ] {
            let err = parse(input).expect_err(input);
            assert!(err.contains(needle), "{input:?}: {err}");
        }
    }
}
