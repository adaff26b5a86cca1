//! Route sources: where a cluster's routes come from.
//!
//! A source yields the full set of routes it knows; the [`RouteStore`]
//! diffs it against the current table. The YAML file source is the first; Kubernetes and
//! Cloud Foundry sources follow behind the same shape.

pub mod file;
pub mod kubernetes;

use std::fmt;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::table::RouteStore;

/// Where a cluster's own routes come from. A source writes the full set it knows into a
/// [`RouteStore`] (snapshot) and keeps it current (watch); the store turns each write into a
/// revisioned delta, and route-sync follows the store. The file source is the first;
/// Kubernetes (Services/EndpointSlices, MCS ServiceExport) and Cloud Foundry
/// (service-discovery-controller `/routes`, Cloud Controller v3) sources implement the same
/// trait: list, then watch, writing each change into the store.
pub trait RouteSource: Send + 'static {
    /// A short description for logs and status (`file /etc/isthmus/routes.yaml`).
    fn describe(&self) -> String;

    /// Loads once into `into` and keeps it current until `cancel`. A source that cannot
    /// load leaves the store as it was (last known good) and retries.
    fn run(self, into: RouteStore, cancel: CancellationToken) -> JoinHandle<()>;
}

impl RouteSource for file::FileSource {
    fn describe(&self) -> String {
        format!("file {}", self.path().display())
    }

    fn run(self, into: RouteStore, cancel: CancellationToken) -> JoinHandle<()> {
        self.watch(into, Duration::from_millis(500), cancel)
    }
}

/// One entry a source refused, with why. The other entries still apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Where the entry was: `routes[3]` in a file.
    pub entry: String,
    /// The route's `name:port`, when it got that far.
    pub route: Option<String>,
    /// Why it was refused, naming the value and what was expected.
    pub reason: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.route {
            Some(route) => write!(f, "{} ({route}) rejected: {}", self.entry, self.reason),
            None => write!(f, "{} rejected: {}", self.entry, self.reason),
        }
    }
}
