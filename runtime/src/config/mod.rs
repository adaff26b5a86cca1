//! Configuration loading: parse YAML, then validate, with errors that name the file, the field and
//! what was expected.
//!
//! Parsing has no side effects. [`load`] reads one file, deserializes it with
//! `serde_path_to_error` over `serde_norway` (so a failure carries the dotted field path, e.g.
//! `routes[1].port`, and the line and column), then runs [`Validate`] for the semantic checks that
//! serde cannot express. Binding sockets or starting tasks is the caller's next step, never this
//! module's.
//!
//! Config types are expected to use `#[serde(deny_unknown_fields)]`: a misspelt key then fails with
//! the list of valid ones instead of being silently ignored.

pub mod check;
mod tls;
mod values;

use std::error::Error as _;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

pub use tls::TlsConfig;
pub use values::{DurationError, HumanDuration, Port, PortError};

/// Exit status for a binary whose configuration is invalid (BSD `EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// Semantic checks run after serde has parsed a config type.
///
/// Serde checks shape and types; `Validate` checks what depends on values, such as "at least one
/// listener" or "`min` below `max`". Return the first problem found, naming the field relative to
/// `self`; a parent prefixes its own path with [`FieldError::within`].
pub trait Validate {
    /// Checks `self`.
    ///
    /// # Errors
    ///
    /// Returns the offending field and what was expected there.
    fn validate(&self) -> Result<(), FieldError>;
}

/// A list is valid when every element is; the error names the index, e.g. `[2].port`, so that
/// `within("listeners")` yields `listeners[2].port`.
impl<T: Validate> Validate for [T] {
    fn validate(&self) -> Result<(), FieldError> {
        for (index, item) in self.iter().enumerate() {
            item.validate()
                .map_err(|e| e.within(&format!("[{index}]")))?;
        }
        Ok(())
    }
}

impl<T: Validate> Validate for Vec<T> {
    fn validate(&self) -> Result<(), FieldError> {
        self.as_slice().validate()
    }
}

/// An absent optional section is valid; a present one must be.
impl<T: Validate> Validate for Option<T> {
    fn validate(&self) -> Result<(), FieldError> {
        self.as_ref().map_or(Ok(()), Validate::validate)
    }
}

/// A field that failed a [`Validate`] check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}expected {expected}", FieldPrefix(field))]
pub struct FieldError {
    /// Dotted path to the field, with indices, e.g. `listeners[2].port`; empty for the whole value.
    pub field: String,
    /// What a valid value looks like, e.g. `a port in 1..=65535`.
    pub expected: String,
}

impl FieldError {
    /// A problem with `field`, which should have been `expected`.
    pub fn new(field: impl Into<String>, expected: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            expected: expected.into(),
        }
    }

    /// Prefixes the field path with `parent`, the path of the value that contains it.
    ///
    /// `FieldError::new("port", ..).within("listeners[2]")` names `listeners[2].port`; an index
    /// segment joins without a dot, so `new("[2].port", ..).within("listeners")` names the same.
    #[must_use]
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_owned()
        } else if parent.is_empty() {
            self.field
        } else if self.field.starts_with('[') {
            format!("{parent}{}", self.field)
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read: missing, unreadable, or not UTF-8.
    #[error("cannot read configuration file {}", path.display())]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML, or its shape or types do not match the config type.
    #[error(
        "invalid configuration in {}{}: {}{message}",
        path.display(),
        Position(*line, *column),
        FieldPrefix(field)
    )]
    Parse {
        /// The file (or the origin given to [`from_str`]).
        path: PathBuf,
        /// Dotted path to the field, e.g. `routes[1].port`; empty when the whole document is wrong.
        field: String,
        /// 1-based line of the problem, when the parser knows it.
        line: Option<usize>,
        /// 1-based column of the problem, when the parser knows it.
        column: Option<usize>,
        /// Serde's message, e.g. ``invalid type: string "x", expected a port in 1..=65535`` or
        /// ``unknown field `prot`, expected `host` or `port` ``.
        message: String,
    },
    /// The file parsed, but a [`Validate`] check failed.
    #[error("invalid configuration in {}: {}expected {expected}", path.display(), FieldPrefix(field))]
    Invalid {
        /// The file (or the origin given to [`from_str`]).
        path: PathBuf,
        /// Dotted path to the field, e.g. `listeners[2].port`.
        field: String,
        /// What a valid value looks like.
        expected: String,
    },
}

/// Reads, parses and validates the YAML file at `path`.
///
/// # Errors
///
/// [`ConfigError::Read`] if the file cannot be read, [`ConfigError::Parse`] if it is not valid
/// YAML for `T`, [`ConfigError::Invalid`] if `T::validate` rejects it.
pub fn load<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    from_str(&text, path)
}

/// Parses and validates YAML `text`; `origin` is the name errors give for it.
///
/// For tests and embedded defaults; binaries use [`load`] or [`load_or_exit`].
///
/// # Errors
///
/// [`ConfigError::Parse`] if `text` is not valid YAML for `T`, [`ConfigError::Invalid`] if
/// `T::validate` rejects it.
pub fn from_str<T: DeserializeOwned + Validate>(
    text: &str,
    origin: &Path,
) -> Result<T, ConfigError> {
    let deserializer = serde_norway::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        // serde_path_to_error spells the document root ".": we leave the field out instead.
        let field = if path == "." { String::new() } else { path };
        let inner = err.into_inner();
        let location = inner.location();
        ConfigError::Parse {
            path: origin.to_owned(),
            message: bare_message(&inner, &field),
            field,
            line: location.as_ref().map(serde_norway::Location::line),
            column: location.as_ref().map(serde_norway::Location::column),
        }
    })?;
    value
        .validate()
        .map_err(|FieldError { field, expected }| ConfigError::Invalid {
            path: origin.to_owned(),
            field,
            expected,
        })?;
    Ok(value)
}

/// Loads the configuration at `path`, or prints why not and exits with [`EXIT_CONFIG`].
///
/// For `main` only: it prints `error: <reason>` (with the I/O cause, if any) to stderr, since
/// logging may not be set up before the configuration that configures it has loaded.
pub fn load_or_exit<T: DeserializeOwned + Validate>(path: &Path) -> T {
    match load(path) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            std::process::exit(EXIT_CONFIG)
        }
    }
}

/// `err` and its causes on one line, `outer: inner: innermost`, as `anyhow` prints with `{:#}`.
fn report(err: &ConfigError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// serde_norway's message without the parts [`ConfigError::Parse`] already carries.
///
/// serde_norway has no accessor for the bare message: its `Display` adds its own copy of the
/// field path in front and ` at line L column C` after the problem. Both are removed so that the
/// file, position and field appear once, in our order. Its path can stop short of ours (for an
/// unknown field it names the enclosing map), so any ancestor of `field` counts. A YAML syntax
/// error keeps its second position (", while scanning ... at line L column C"): it points at
/// where the broken construct began, which is worth seeing.
fn bare_message(err: &serde_norway::Error, field: &str) -> String {
    let mut full = err.to_string();
    if let Some(location) = err.location() {
        let position = format!(" at line {} column {}", location.line(), location.column());
        full = full.replacen(&position, "", 1);
    }
    let mut message = full.as_str();
    let mut prefix = field;
    while !prefix.is_empty() {
        if let Some(rest) = message
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix(": "))
        {
            message = rest;
            break;
        }
        // Up one level: `a.b[1].c` -> `a.b[1]` -> `a.b` -> `a`.
        prefix = &prefix[..prefix.rfind(['.', '[']).unwrap_or(0)];
    }
    message.to_owned()
}

/// Writes `field `<path>`: ` before a message, or nothing for the document root.
struct FieldPrefix<'a>(&'a str);

impl fmt::Display for FieldPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "field `{}`: ", self.0)
        }
    }
}

/// Writes `:line:column` (or `:line`) after a file name, the form editors and terminals link.
struct Position(Option<usize>, Option<usize>);

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(line), Some(column)) => write!(f, ":{line}:{column}"),
            (Some(line), None) => write!(f, ":{line}"),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_joins_names_with_dots_and_indices_without() {
        let e = FieldError::new("port", "a port")
            .within("[2]")
            .within("listeners");
        assert_eq!(e.field, "listeners[2].port");
        assert_eq!(FieldError::new("", "x").within("tls").field, "tls");
        assert_eq!(FieldError::new("port", "x").within("").field, "port");
    }

    #[test]
    fn field_error_display_names_field_and_expectation() {
        let e = FieldError::new("listeners[2].port", "a port in 1..=65535");
        assert_eq!(
            e.to_string(),
            "field `listeners[2].port`: expected a port in 1..=65535"
        );
        assert_eq!(
            FieldError::new("", "one listener").to_string(),
            "expected one listener"
        );
    }

    #[test]
    fn config_error_display_reads_like_a_compiler_diagnostic() {
        let parse = ConfigError::Parse {
            path: "/etc/isthmus/gateway.yaml".into(),
            field: "routes[1].port".into(),
            line: Some(7),
            column: Some(11),
            message: "invalid type: string \"http\", expected a port in 1..=65535".into(),
        };
        assert_eq!(
            parse.to_string(),
            "invalid configuration in /etc/isthmus/gateway.yaml:7:11: field `routes[1].port`: \
             invalid type: string \"http\", expected a port in 1..=65535"
        );
        let invalid = ConfigError::Invalid {
            path: "g.yaml".into(),
            field: "listeners".into(),
            expected: "at least one listener".into(),
        };
        assert_eq!(
            invalid.to_string(),
            "invalid configuration in g.yaml: field `listeners`: expected at least one listener"
        );
    }

    #[test]
    fn report_appends_the_io_cause() {
        let err = ConfigError::Read {
            path: "/nowhere/x.yaml".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        };
        assert_eq!(
            err.to_string(),
            "cannot read configuration file /nowhere/x.yaml"
        );
        assert_eq!(
            report(&err),
            "cannot read configuration file /nowhere/x.yaml: gone"
        );
    }

    #[test]
    fn vec_validate_names_the_index() {
        struct Item(u8);
        impl Validate for Item {
            fn validate(&self) -> Result<(), FieldError> {
                if self.0 == 0 {
                    return Err(FieldError::new("n", "non-zero"));
                }
                Ok(())
            }
        }
        let items = vec![Item(1), Item(0)];
        let err = items.validate().unwrap_err().within("items");
        assert_eq!(err.field, "items[1].n");
        assert!(None::<Item>.validate().is_ok());
    }
}
