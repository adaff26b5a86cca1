//! route-sync metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::merge::Merger;
use crate::vip::VipCounts;

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

/// Labels of an update refused from a peer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabel {
    /// The peer cluster.
    pub peer: String,
    /// `batch_chunks`, `batch_routes` or `routes_per_peer`: the limit it broke.
    pub reason: &'static str,
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
    /// Updates refused from peers for breaking a limit, by peer and limit.
    pub peer_refused: Family<RefusedLabel, Counter>,
    /// Route names with a VIP.
    pub vips_assigned: Gauge,
    /// VIPs held for names that left.
    pub vips_held: Gauge,
    /// VIPs nobody has or holds.
    pub vips_free: Gauge,
    /// Route names without a VIP because the range is exhausted.
    pub vips_exhausted: Gauge,
    /// Times a route name was left without a VIP.
    pub vip_refused: Counter,
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
            peer_refused: Family::default(),
            vips_assigned: Gauge::default(),
            vips_held: Gauge::default(),
            vips_free: Gauge::default(),
            vips_exhausted: Gauge::default(),
            vip_refused: Counter::default(),
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
        r.register(
            "peer_updates_refused",
            "Updates refused from peers for breaking a limit, by peer and limit",
            self.peer_refused.clone(),
        );
        r.register(
            "vips_assigned",
            "Route names with a VIP",
            self.vips_assigned.clone(),
        );
        r.register(
            "vips_held",
            "VIPs held for route names that left",
            self.vips_held.clone(),
        );
        r.register(
            "vips_free",
            "VIPs nobody has or holds",
            self.vips_free.clone(),
        );
        r.register(
            "vips_exhausted",
            "Route names without a VIP because the range is exhausted",
            self.vips_exhausted.clone(),
        );
        r.register(
            "vip_refusals",
            "Times a route name was left without a VIP (range exhausted)",
            self.vip_refused.clone(),
        );
    }

    pub(crate) fn set_vips(&self, counts: &VipCounts) {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.vips_assigned.set(gauge(counts.assigned));
        self.vips_held.set(gauge(counts.held));
        self.vips_free.set(gauge(counts.free));
        self.vips_exhausted.set(gauge(counts.waiting));
        let seen = self.vip_refused.get();
        if counts.refused_total > seen {
            self.vip_refused.inc_by(counts.refused_total - seen);
        }
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
