//! Errors of the route model and its sources.

use std::path::PathBuf;

/// A value that cannot be part of a route. Each names the input and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRoute {
    /// A host name that is not a valid route name.
    #[error("route name {name:?} is invalid: expected {expected}")]
    Name {
        /// The name as given.
        name: String,
        /// What a valid name looks like.
        expected: String,
    },
    /// A cluster name outside `[a-z0-9-]{1,63}`.
    #[error("cluster name {name:?} is invalid: expected 1 to 63 characters of a-z, 0-9 and '-'")]
    Cluster {
        /// The name as given.
        name: String,
    },
    /// A port outside 1..=65535.
    #[error("port {value} is invalid: expected 1 to 65535")]
    Port {
        /// The value as given.
        value: i64,
    },
    /// A protocol other than tcp, http or tls.
    #[error("protocol {value:?} is invalid: expected tcp, http or tls")]
    Protocol {
        /// The value as given.
        value: String,
    },
    /// An allowed-peer entry that is neither `cluster:<name>` nor a SPIFFE ID.
    #[error("allowed peer {value:?} is invalid: {reason}")]
    Peer {
        /// The value as given.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// A backend that is not `host:port`.
    #[error("backend {value:?} is invalid: expected host:port with a port of 1 to 65535")]
    Backend {
        /// The value as given.
        value: String,
    },
    /// A tunnel authority that is not `route-name:port`.
    #[error("authority {authority:?} is invalid: expected <route name>:<port>")]
    Authority {
        /// The authority as given.
        authority: String,
    },
    /// A weight map that sends no traffic anywhere.
    #[error("weights of {route} are invalid: expected at least one weight above 0")]
    Weights {
        /// The route.
        route: String,
    },
    /// A VIP that is not an IPv4 or IPv6 address.
    #[error("VIP {value:?} is invalid: expected an IPv4 or IPv6 address such as 100.64.0.7")]
    Vip {
        /// The text as received.
        value: String,
    },
}

/// A route source could not produce a table; the previous table stays in force.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The route file could not be read.
    #[error("cannot read route file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The route file is not YAML of the expected shape (`routes:` followed by a list).
    #[error("route file {path} is not valid: {reason}; keeping the last good table")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column when known.
        reason: String,
    },
}
