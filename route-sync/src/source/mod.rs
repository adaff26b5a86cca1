//! Route sources: where a cluster's routes come from.
//!
//! A source yields the full set of routes it knows; the [`RouteStore`](crate::RouteStore)
//! diffs it against the current table. The YAML file source is the first; Kubernetes and
//! Cloud Foundry sources follow behind the same shape.

pub mod file;

use std::fmt;

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
