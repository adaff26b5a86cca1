//! Isthmus route-sync: the route model, the watchable route table every component reads,
//! and the sources that fill it.
//!
//! - [`model`]: validated routes (`orders.apps.internal:8080`, home cluster, export flag,
//!   allowed peers, local backends, weights, revision). Pure logic, no I/O.
//! - [`table`]: [`RouteStore`], the lock-free, watchable table. Data-plane readers take a
//!   snapshot with one atomic load; writers swap in a new table and wake watchers.
//! - [`source`]: where routes come from; the YAML file source first.
//!
//! This crate owns the shape of a route. It must never let local backends leave their
//! cluster, and never make a route reachable that its home cluster did not export.

pub mod client;
pub mod config;
pub mod error;
pub mod grpc;
pub mod k8s;
pub mod merge;
pub mod model;
pub mod node;
pub mod persist;
pub mod proto;
pub mod service;
pub mod source;
pub mod status;
pub mod table;
pub mod vip;

pub use error::{InvalidRoute, SourceError};
pub use model::{Backend, ClusterName, PeerSelector, Protocol, Route, RouteKey, RouteName};
pub use table::{Applied, Delta, RouteStore, RouteTable, RouteWatch, diff};
