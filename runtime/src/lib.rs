//! Process conventions every Isthmus binary (gateway, dns-shim, route-sync) follows.
//!
//! This crate owns the parts of a process that are not its job but that every process needs done
//! the same way:
//!
//! - [`config`]: load YAML, validate, and exit with status 64 and a message naming the file, the
//!   field and what was expected;
//! - [`telemetry`]: one `tracing` subscriber, text or JSON, on stderr;
//! - [`shutdown`]: SIGTERM/SIGINT start a graceful drain, a second one exits at once; drain with a
//!   deadline;
//! - [`admin`]: the `/healthz`, `/readyz` and `/metrics` HTTP endpoint;
//! - [`metrics`]: what every binary's `/metrics` shows the same way (certificate expiry and
//!   reload failures) and the Prometheus text form of the registry.
//!
//! It must never read process environment (binaries parse flags and pass values in), never touch
//! data-plane sockets, and never do blocking work on the async runtime: the admin server shares
//! the runtime with the data plane and must not slow it down.

#![warn(missing_docs)]

pub mod admin;
pub mod config;
pub mod metrics;
pub mod shutdown;
pub mod telemetry;
