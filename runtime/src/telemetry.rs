//! Logging: one global `tracing` subscriber writing text or JSON lines to stderr.
//!
//! stdout is left to the program (and to tools that pipe it); container runtimes collect stderr
//! just the same. [`init`] takes its filter as a value and reads no environment, so a test or a
//! library caller gets exactly the filter it passes. Only [`init_or_exit`], which a binary's
//! `main` calls at the edge, reads `$RUST_LOG`, and only when no `--log` flag was given: the
//! flag wins, then `$RUST_LOG`, then `info`.

use std::fmt;
use std::io::IsTerminal as _;
use std::str::FromStr;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LogFormat {
    /// Human-readable lines, coloured only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line, event fields at the top level, for log shippers.
    Json,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A log format name other than `text` or `json`.
    #[error("unknown log format {value:?}: expected \"text\" or \"json\"")]
    UnknownFormat {
        /// The name as given.
        value: String,
    },
    /// The filter is not valid `EnvFilter` syntax.
    #[error(
        "invalid log filter {filter:?}: expected comma-separated directives like \"info\" or \
         \"isthmus_gateway=debug,warn\""
    )]
    InvalidFilter {
        /// The filter as given.
        filter: String,
        /// What the filter parser rejected.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber (or `log` logger) was already installed, by an earlier [`init`] or by
    /// other code; the existing one stays in place.
    #[error("logging is already initialised; call telemetry::init once per process")]
    AlreadyInitialized {
        /// What the installer reported.
        #[source]
        source: tracing_subscriber::util::TryInitError,
    },
}

impl FromStr for LogFormat {
    type Err = TelemetryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(TelemetryError::UnknownFormat {
                value: s.to_owned(),
            }),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// Installs the global subscriber: `format` lines on stderr, events kept by `filter`
/// (`EnvFilter` syntax, e.g. `info` or `isthmus_gateway=debug,warn`).
///
/// # Errors
///
/// [`TelemetryError::InvalidFilter`] if `filter` does not parse (nothing is installed then);
/// [`TelemetryError::AlreadyInitialized`] if a global subscriber already exists, which is
/// harmless: logging keeps working through the first one.
pub fn init(format: LogFormat, filter: &str) -> Result<(), TelemetryError> {
    let env_filter =
        EnvFilter::try_new(filter).map_err(|source| TelemetryError::InvalidFilter {
            filter: filter.to_owned(),
            source,
        })?;
    // Escape codes are noise in files and log collectors, so colour only for a person.
    let ansi = std::io::stderr().is_terminal();
    let (text, json) = match format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .json()
                    .flatten_event(true),
            ),
        ),
    };
    tracing_subscriber::registry()
        .with(env_filter)
        .with(text)
        .with(json)
        .try_init()
        .map_err(|source| TelemetryError::AlreadyInitialized { source })
}

/// What a binary's `main` does first: [`init`] with `--log`, else `$RUST_LOG`, else `info`;
/// a bad filter is printed and the process exits with [`crate::config::EXIT_CONFIG`].
pub fn init_or_exit(format: LogFormat, log: Option<String>) {
    let filter = log
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    if let Err(e) = init(format, &filter) {
        eprintln!("error: {e}");
        std::process::exit(crate::config::EXIT_CONFIG);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_format_parses_and_prints_its_names() {
        for format in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(format.to_string().parse::<LogFormat>().ok(), Some(format));
        }
        let err = "yaml".parse::<LogFormat>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown log format \"yaml\": expected \"text\" or \"json\""
        );
        assert!("JSON".parse::<LogFormat>().is_err());
    }
}
