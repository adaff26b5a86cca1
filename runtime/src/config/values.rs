//! Validated newtypes shared by every config: a value of one of these types is valid by
//! construction, so configs hold them instead of re-checking raw numbers and strings.
//!
//! Each deserializes with a visitor whose `expecting` text is the plain-language rule
//! ([`Port::EXPECTED`], [`HumanDuration::EXPECTED`]), so even a value of the wrong YAML type gets
//! an error that says what to write instead.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Unexpected, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A TCP or UDP port a listener can bind or a client can dial: 1..=65535.
///
/// Port 0 ("any free port") is refused because in a config it is almost always a mistake: peers
/// could never find the listener. Tests that want an ephemeral port bind `:0` directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port(u16);

/// A number that is not a usable port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid port {value:?}: expected {}", Port::EXPECTED)]
pub struct PortError {
    /// The value as given.
    pub value: String,
}

impl Port {
    /// What a valid port looks like, for error messages.
    pub const EXPECTED: &'static str = "a port in 1..=65535";

    /// `port`, if it is not 0.
    ///
    /// # Errors
    ///
    /// [`PortError`] for 0.
    pub fn new(port: u16) -> Result<Self, PortError> {
        if port == 0 {
            return Err(PortError {
                value: port.to_string(),
            });
        }
        Ok(Self(port))
    }

    /// The port number.
    pub const fn get(self) -> u16 {
        self.0
    }
}

impl TryFrom<u64> for Port {
    type Error = PortError;

    fn try_from(value: u64) -> Result<Self, Self::Error> {
        let port = u16::try_from(value).map_err(|_| PortError {
            value: value.to_string(),
        })?;
        Self::new(port)
    }
}

impl TryFrom<u16> for Port {
    type Error = PortError;

    fn try_from(value: u16) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

/// Parses a decimal port, for command-line flags.
impl FromStr for Port {
    type Err = PortError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let port: u16 = s.parse().map_err(|_| PortError {
            value: s.to_owned(),
        })?;
        Self::new(port)
    }
}

impl From<Port> for u16 {
    fn from(port: Port) -> Self {
        port.0
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Port {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u16(self.0)
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PortVisitor;

        impl Visitor<'_> for PortVisitor {
            type Value = Port;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(Port::EXPECTED)
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Port, E> {
                Port::try_from(value)
                    .map_err(|_| E::invalid_value(Unexpected::Unsigned(value), &self))
            }

            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Port, E> {
                match u64::try_from(value) {
                    Ok(value) => self.visit_u64(value),
                    Err(_) => Err(E::invalid_value(Unexpected::Signed(value), &self)),
                }
            }
        }

        deserializer.deserialize_u64(PortVisitor)
    }
}

/// A duration written with a unit, such as `250ms`, `5s`, `2m`, `1h` or `7d`.
///
/// A bare number is refused: whether `30` means seconds or milliseconds is exactly the ambiguity
/// that turns a 30-second timeout into a 30-millisecond one. Values are whole milliseconds, so
/// [`Display`](fmt::Display) prints a string that parses back to the same value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct HumanDuration(Duration);

/// Text that is not a [`HumanDuration`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The text does not start with a whole, unsigned number.
    #[error(
        "invalid duration {input:?}: it must start with a whole number; expected {}",
        HumanDuration::EXPECTED
    )]
    NoNumber {
        /// The text as given.
        input: String,
    },
    /// A number with no unit after it.
    #[error(
        "invalid duration {input:?}: it has no unit; expected {}",
        HumanDuration::EXPECTED
    )]
    NoUnit {
        /// The text as given.
        input: String,
    },
    /// A unit other than `ms`, `s`, `m`, `h` or `d`.
    #[error(
        "invalid duration {input:?}: unknown unit {unit:?}; expected {}",
        HumanDuration::EXPECTED
    )]
    UnknownUnit {
        /// The text as given.
        input: String,
        /// The part after the number.
        unit: String,
    },
    /// More milliseconds than fit in a `u64`.
    #[error(
        "invalid duration {input:?}: it is too large; expected {}",
        HumanDuration::EXPECTED
    )]
    TooLarge {
        /// The text as given.
        input: String,
    },
}

/// Units from largest to smallest, with their length in milliseconds; `Display` picks the first
/// that divides the value exactly.
const UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

impl HumanDuration {
    /// What a valid duration looks like, for error messages.
    pub const EXPECTED: &'static str =
        "a duration like 500ms, 5s, 2m, 1h or 7d (units: ms, s, m, h, d)";

    /// A duration of `millis` milliseconds.
    pub const fn from_millis(millis: u64) -> Self {
        Self(Duration::from_millis(millis))
    }

    /// A duration of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// The duration.
    pub const fn get(self) -> Duration {
        self.0
    }
}

impl From<HumanDuration> for Duration {
    fn from(value: HumanDuration) -> Self {
        value.0
    }
}

impl FromStr for HumanDuration {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let digits_end = input
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(input.len());
        let (digits, unit) = input.split_at(digits_end);
        if digits.is_empty() {
            return Err(DurationError::NoNumber {
                input: input.to_owned(),
            });
        }
        if unit.is_empty() {
            return Err(DurationError::NoUnit {
                input: input.to_owned(),
            });
        }
        let Some(&(_, unit_millis)) = UNITS.iter().find(|(name, _)| *name == unit) else {
            return Err(DurationError::UnknownUnit {
                input: input.to_owned(),
                unit: unit.to_owned(),
            });
        };
        // Digits only, so the parse can fail only by overflowing.
        let millis = digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit_millis))
            .ok_or_else(|| DurationError::TooLarge {
                input: input.to_owned(),
            })?;
        Ok(Self::from_millis(millis))
    }
}

impl TryFrom<String> for HumanDuration {
    type Error = DurationError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl TryFrom<&str> for HumanDuration {
    type Error = DurationError;

    fn try_from(value: &str) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Whole milliseconds by construction, so this is exact; u64 millis covers every value the
        // constructors can make.
        let millis = u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX);
        if millis == 0 {
            return f.write_str("0s");
        }
        let (name, size) = UNITS
            .iter()
            .find(|(_, size)| millis % size == 0)
            .copied()
            .unwrap_or(("ms", 1));
        write!(f, "{}{name}", millis / size)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;

        impl Visitor<'_> for DurationVisitor {
            type Value = HumanDuration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(HumanDuration::EXPECTED)
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<HumanDuration, E> {
                value.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(DurationVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_rejects_zero_and_out_of_range() {
        assert_eq!(Port::new(0), Err(PortError { value: "0".into() }));
        assert!(Port::try_from(70_000_u64).is_err());
        assert!("65536".parse::<Port>().is_err());
        assert!("http".parse::<Port>().is_err());
        assert_eq!(Port::try_from(65_535_u64).map(Port::get), Ok(65_535));
        assert_eq!("1".parse::<Port>().map(u16::from), Ok(1));
        assert_eq!(
            Port::new(0).unwrap_err().to_string(),
            "invalid port \"0\": expected a port in 1..=65535"
        );
    }

    #[test]
    fn duration_parsing_table() {
        let ok: [(&str, Duration); 8] = [
            ("250ms", Duration::from_millis(250)),
            ("0ms", Duration::ZERO),
            ("5s", Duration::from_secs(5)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3_600)),
            ("7d", Duration::from_secs(7 * 86_400)),
            ("90s", Duration::from_secs(90)),
            ("007s", Duration::from_secs(7)),
        ];
        for (text, want) in ok {
            assert_eq!(
                text.parse::<HumanDuration>().map(HumanDuration::get),
                Ok(want),
                "{text}"
            );
        }

        let no_number = |s: &str| DurationError::NoNumber { input: s.into() };
        let no_unit = |s: &str| DurationError::NoUnit { input: s.into() };
        let unknown = |s: &str, u: &str| DurationError::UnknownUnit {
            input: s.into(),
            unit: u.into(),
        };
        let bad: [(&str, DurationError); 11] = [
            ("", no_number("")),
            ("s", no_number("s")),
            ("-5s", no_number("-5s")),
            (" 5s", no_number(" 5s")),
            ("30", no_unit("30")),
            ("5 s", unknown("5 s", " s")),
            ("1.5s", unknown("1.5s", ".5s")),
            ("5sec", unknown("5sec", "sec")),
            ("5S", unknown("5S", "S")),
            ("1m30s", unknown("1m30s", "m30s")),
            (
                "18446744073709551616ms",
                DurationError::TooLarge {
                    input: "18446744073709551616ms".into(),
                },
            ),
        ];
        for (text, want) in bad {
            assert_eq!(text.parse::<HumanDuration>(), Err(want), "{text:?}");
        }
        assert_eq!(
            "213503982335d".parse::<HumanDuration>(),
            Err(DurationError::TooLarge {
                input: "213503982335d".into()
            })
        );
    }

    #[test]
    fn duration_error_says_what_to_write() {
        let err = "30".parse::<HumanDuration>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid duration \"30\": it has no unit; expected a duration like 500ms, 5s, 2m, 1h or 7d \
             (units: ms, s, m, h, d)"
        );
    }

    #[test]
    fn duration_display_uses_the_largest_exact_unit_and_round_trips() {
        let cases = [
            (HumanDuration::from_millis(250), "250ms"),
            (HumanDuration::from_millis(1_500), "1500ms"),
            (HumanDuration::from_secs(5), "5s"),
            (HumanDuration::from_secs(90), "90s"),
            (HumanDuration::from_secs(120), "2m"),
            (HumanDuration::from_secs(7_200), "2h"),
            (HumanDuration::from_secs(86_400), "1d"),
            (HumanDuration::from_millis(0), "0s"),
        ];
        for (value, text) in cases {
            assert_eq!(value.to_string(), text);
            assert_eq!(text.parse::<HumanDuration>(), Ok(value));
        }
    }
}
