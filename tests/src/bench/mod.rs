//! The reproducible gateway benchmark behind `isthmus-bench-gateway` (run it through
//! `tests/bench/gateway.sh`).
//!
//! It measures four paths from a client to a backend on one machine: direct, through an
//! Isthmus egress/ingress pair over TLS/TCP and over QUIC, and through a HAProxy pair doing
//! mutual TLS per connection. For each: bulk throughput, new connections per second, added
//! ping-pong latency and, for the gateway pairs, resident memory per idle tunneled connection.
//! It prints a table and judges the gateway issue's targets.
//!
//! - [`stats`], [`report`] and [`table`] are pure (percentiles, verdicts, the printed tables)
//!   and unit-tested;
//! - [`load`] is the tokio client; [`backend`] the echo and sink servers, run in a separate
//!   process;
//! - [`setup`] and [`procs`] build the paths from real processes and always stop them.
//!
//! It never runs from `cargo test`: timings are not assertions.
//!
//! [`combined`] is the report of `tests/bench/all.sh` (`isthmus-bench-report`): the gateway,
//! DNS shim and route-sync benchmarks' JSON documents judged against their targets in one
//! table. Pure too, and unit-tested.

pub mod backend;
pub mod combined;
pub mod load;
pub mod procs;
pub mod report;
pub mod run;
pub mod setup;
pub mod stats;
pub mod table;
