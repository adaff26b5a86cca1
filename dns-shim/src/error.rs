//! The crate's one error type.
//!
//! Start-up errors (binding, loading the SDC's certificate files, a bad upstream URL) and
//! upstream failures on the query path share it. An upstream failure never reaches a client
//! as anything but SERVFAIL; [`ShimError::reason`] gives the short, fixed label it is counted
//! under.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why the shim could not start, or why one upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// A listening socket could not be set up.
    #[error(
        "cannot bind DNS {transport} on {addr}: {source}; is another DNS server on that port, or is NET_BIND_SERVICE missing for port 53?"
    )]
    Bind {
        /// `udp` or `tcp`.
        transport: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A certificate or key file could not be read.
    #[error("cannot read the {what} file {}: {source}", path.display())]
    ReadFile {
        /// Which file: `SDC CA`, `SDC client certificate`, `SDC client key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file held nothing usable.
    #[error("the {what} file {} holds no usable PEM {expected}: {reason}", path.display())]
    Pem {
        /// Which file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the file should hold: `CERTIFICATE` or `PRIVATE KEY`.
        expected: &'static str,
        /// What the parser said.
        reason: String,
    },
    /// rustls refused the SDC client configuration (e.g. a key that does not match the cert).
    #[error("cannot build the SDC client TLS configuration: {source}")]
    Tls {
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// An upstream URL that cannot be used.
    #[error("upstream URL {url:?} is invalid: {reason}")]
    InvalidUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The upstream did not answer within the configured `upstream_timeout`.
    #[error("upstream did not answer in time")]
    UpstreamTimeout,
    /// Connecting to, writing to or reading from an upstream failed.
    #[error("upstream {server}: {source}")]
    UpstreamIo {
        /// The upstream's address or URL.
        server: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange with an HTTP upstream failed below the status line.
    #[error("upstream {server}: HTTP error: {source}")]
    UpstreamHttp {
        /// The upstream URL.
        server: String,
        /// What hyper said.
        #[source]
        source: hyper::Error,
    },
    /// An HTTP upstream answered with a status other than 200.
    #[error("upstream {server} answered HTTP {status}")]
    UpstreamStatus {
        /// The upstream URL.
        server: String,
        /// The status code.
        status: u16,
    },
    /// The SDC answered 500 `address table is not warm`: it has just started.
    #[error("upstream {server}: the service-discovery-controller's address table is not warm yet")]
    NotWarm {
        /// The SDC URL.
        server: String,
    },
    /// The upstream answered something that is not a valid reply to the question asked.
    #[error("upstream {server} sent a bad reply: {reason}")]
    BadReply {
        /// The upstream's address or URL.
        server: String,
        /// What was wrong.
        reason: String,
    },
    /// Too many forwarded queries are already waiting on the upstream.
    #[error("too many forwarded queries in flight; answering SERVFAIL")]
    Overloaded,
}

impl ShimError {
    /// A short, fixed label for the `reason` of the upstream-failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            ShimError::UpstreamTimeout => "timeout",
            ShimError::UpstreamIo { .. } => "io",
            ShimError::UpstreamHttp { .. } => "http",
            ShimError::UpstreamStatus { .. } => "http_status",
            ShimError::NotWarm { .. } => "not_warm",
            ShimError::BadReply { .. } => "bad_reply",
            ShimError::Overloaded => "overloaded",
            ShimError::Bind { .. }
            | ShimError::ReadFile { .. }
            | ShimError::Pem { .. }
            | ShimError::Tls { .. }
            | ShimError::InvalidUrl { .. } => "setup",
        }
    }
}
