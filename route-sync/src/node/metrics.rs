//! route-sync metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::merge::Merger;

/// Labels naming a peer cluster.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// The peer cluster.
    pub peer: String,
}

/// Labels naming where routes came from.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabel {
    /// `local`, or the peer cluster they were imported from.
    pub origin: String,
}

/// Every route-sync metric.
#[derive(Clone)]
pub struct NodeMetrics {
    /// Routes by origin.
    pub routes: Family<OriginLabel, Gauge>,
    /// Routes in the merged table.
    pub merged_routes: Gauge,
    /// Changes applied to the merged table.
    pub applied: Counter,
    /// Routes refused from a source or a peer.
    pub rejected: Counter,
    /// Updates received from peers, by peer.
    pub peer_updates: Family<PeerLabel, Counter>,
    /// 1 while connected to the peer.
    pub peer_connected: Family<PeerLabel, Gauge>,
    /// Seconds from a peer sending an update to it being applied here.
    pub propagation_lag: Histogram,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self {
            routes: Family::default(),
            merged_routes: Gauge::default(),
            applied: Counter::default(),
            rejected: Counter::default(),
            peer_updates: Family::default(),
            peer_connected: Family::default(),
            propagation_lag: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
        }
    }
}

impl NodeMetrics {
    /// Registers under `isthmus_route_sync`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("isthmus_route_sync");
        r.register("routes", "Routes by origin", self.routes.clone());
        r.register(
            "merged_routes",
            "Routes in the merged table",
            self.merged_routes.clone(),
        );
        r.register(
            "updates_applied",
            "Changes applied to the merged table",
            self.applied.clone(),
        );
        r.register(
            "updates_rejected",
            "Routes refused from a source or a peer",
            self.rejected.clone(),
        );
        r.register(
            "peer_updates",
            "Updates received from peers",
            self.peer_updates.clone(),
        );
        r.register(
            "peer_connected",
            "1 while connected to the peer",
            self.peer_connected.clone(),
        );
        r.register(
            "propagation_lag_seconds",
            "Time from a peer sending an update to it being applied here",
            self.propagation_lag.clone(),
        );
    }

    pub(crate) fn set_counts(&self, merger: &Merger, merged: usize) {
        self.merged_routes.set(merged as i64);
        self.routes
            .get_or_create(&OriginLabel {
                origin: "local".into(),
            })
            .set(merger.local_count() as i64);
    }
}
