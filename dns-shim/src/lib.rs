//! The Isthmus DNS shim.
//!
//! Authoritative for the internal domains (`apps.internal` by default): a name whose route is
//! homed in another cluster is answered with the local egress gateway's address (a per-route
//! VIP computed exactly as the egress computes it, or a shared egress address); every other
//! name in those domains is forwarded to the resolver the platform already has (a DNS server
//! such as bosh-dns or CoreDNS, Cloud Foundry's service-discovery-controller, or a bosh-dns
//! HTTP handler). Names outside the domains are refused.
//!
//! It must never answer a name it does not know with an address of its own, never let a
//! route-table update hold up a query, and never leave a client without an answer: every
//! forwarded query ends in the upstream's answer or SERVFAIL within `upstream_timeout`.
//!
//! Layout: [`wire`] (DNS framing), [`decide`] and [`snapshot`] (the answering rules and
//! their data: pure, no sockets) under [`engine`] (parse, decide, forward, count), with a
//! thin tokio layer in [`transport`] and [`shim`]; [`upstream`] holds the platform
//! resolver clients; [`server`] assembles the process from [`config`].

#![warn(missing_docs)]

pub mod config;
pub mod decide;
pub mod engine;
mod error;
pub mod metrics;
pub mod server;
pub mod shim;
pub mod snapshot;
pub mod transport;
pub mod upstream;
pub mod wire;

pub use error::ShimError;
pub use shim::{DnsShim, Settings};
