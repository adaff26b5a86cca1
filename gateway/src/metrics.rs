//! Gateway metrics, registered once and shared by every task.
//!
//! Label sets stay small and bounded by configuration: route names come from the route table,
//! never from what a client sent, so a scanner cannot blow up cardinality.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Which role handled a connection.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// App in this cluster to a route homed elsewhere.
    Egress,
    /// Caller from another cluster to a route homed here.
    Ingress,
}

impl prometheus_client::encoding::EncodeLabelValue for Direction {
    /// `egress` / `ingress`: label values in Prometheus' lower-case style.
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        })
    }
}

/// Labels of one tunneled connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// `name:port`, or `unknown` before the route is known.
    pub route: String,
    /// egress or ingress.
    pub direction: Direction,
    /// The other cluster: the route's home on egress, the caller's on ingress.
    pub peer_cluster: String,
}

/// Labels of a refused or failed connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `name:port`, or `unknown`.
    pub route: String,
    /// egress or ingress.
    pub direction: Direction,
    /// The other cluster, or `unknown`.
    pub peer_cluster: String,
    /// A short, fixed reason (see [`crate::Refusal::reason`]).
    pub reason: &'static str,
}

/// Labels of the tunnel connection pool.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// The cluster the pooled connections go to.
    pub peer_cluster: String,
    /// tcp or quic.
    pub transport: &'static str,
}

/// Labels of a stream attempt an ingress refused for its own state (not ready, draining,
/// busy, no backend from there), which the pool then tried on another endpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// The cluster of the refusing ingress.
    pub peer_cluster: String,
    /// Its reason: not_ready, draining, overloaded, no_backend, backend_unreachable,
    /// unavailable.
    pub reason: &'static str,
}

/// Labels of a TLS handshake failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// Which side failed: `ingress` (accepting) or `egress` (dialling).
    pub role: &'static str,
    /// A short reason: timeout, refused_identity, bad_certificate, io, ...
    pub reason: &'static str,
}

/// Every gateway metric.
#[derive(Clone, Default)]
pub struct Metrics {
    /// Tunneled connections that reached their backend or ingress (status 200).
    pub opened: Family<ConnLabels, Counter>,
    /// Tunneled connections that ended, cleanly or not.
    pub closed: Family<ConnLabels, Counter>,
    /// Connections refused by policy or validation, before any byte was carried.
    pub refused: Family<ReasonLabels, Counter>,
    /// Connections that failed: backend or peer unreachable, or an I/O error mid-stream.
    pub failed: Family<ReasonLabels, Counter>,
    /// Bytes from the caller towards the backend.
    pub bytes_to_backend: Family<ConnLabels, Counter>,
    /// Bytes from the backend towards the caller.
    pub bytes_from_backend: Family<ConnLabels, Counter>,
    /// Tunneled connections in progress.
    pub active: Family<ConnLabels, Gauge>,
    /// Pooled tunnel connections (egress side).
    pub pool_connections: Family<PoolLabels, Gauge>,
    /// Streams open on pooled tunnel connections (egress side).
    pub pool_streams: Family<PoolLabels, Gauge>,
    /// Tunnel connections accepted (ingress side) and currently open.
    pub ingress_connections: Family<PoolLabels, Gauge>,
    /// TLS/QUIC handshake failures.
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    /// Stream attempts an ingress refused for its own state (egress side); the connection
    /// itself may still have succeeded through another endpoint.
    pub attempts_refused: Family<AttemptLabels, Counter>,
}

impl Metrics {
    /// Registers every metric under the `isthmus_gateway` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("isthmus_gateway");
        r.register(
            "connections_opened",
            "Tunneled connections established",
            self.opened.clone(),
        );
        r.register(
            "connections_closed",
            "Tunneled connections ended",
            self.closed.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused before any byte was carried, by reason",
            self.refused.clone(),
        );
        r.register(
            "connections_failed",
            "Connections that failed to connect or broke mid-stream, by reason",
            self.failed.clone(),
        );
        // Unit before `_total`, as Prometheus names counters of bytes.
        r.register(
            "to_backend_bytes",
            "Bytes carried from callers towards backends",
            self.bytes_to_backend.clone(),
        );
        r.register(
            "from_backend_bytes",
            "Bytes carried from backends towards callers",
            self.bytes_from_backend.clone(),
        );
        r.register(
            "connections_active",
            "Tunneled connections in progress",
            self.active.clone(),
        );
        r.register(
            "pool_connections",
            "Pooled tunnel connections to peer clusters",
            self.pool_connections.clone(),
        );
        r.register(
            "pool_streams",
            "Streams open on pooled tunnel connections",
            self.pool_streams.clone(),
        );
        r.register(
            "ingress_tunnel_connections",
            "Tunnel connections accepted from peer clusters and open",
            self.ingress_connections.clone(),
        );
        r.register(
            "handshake_failures",
            "TLS and QUIC handshake failures, by reason",
            self.handshake_failures.clone(),
        );
        r.register(
            "tunnel_attempts_refused",
            "Stream attempts an ingress refused as not ready, draining, busy or without a backend; the next endpoint was tried",
            self.attempts_refused.clone(),
        );
    }

    /// Counts a stream attempt an ingress of `peer` refused with `reason`.
    pub fn attempt_refused(&self, peer: &str, reason: &'static str) {
        self.attempts_refused
            .get_or_create(&AttemptLabels {
                peer_cluster: peer.to_string(),
                reason,
            })
            .inc();
    }

    /// Sum of `attempts_refused` with this reason (tests and the status view).
    pub fn attempts_refused_total(&self, reason: &str) -> u64 {
        sum_reason(&self.attempts_refused, reason)
    }

    /// Counts a refusal. Reads as one line at the call site.
    pub fn refuse(&self, route: &str, direction: Direction, peer: &str, reason: &'static str) {
        self.refused
            .get_or_create(&ReasonLabels {
                route: route.to_string(),
                direction,
                peer_cluster: peer.to_string(),
                reason,
            })
            .inc();
    }

    /// Counts a failure.
    pub fn fail(&self, route: &str, direction: Direction, peer: &str, reason: &'static str) {
        self.failed
            .get_or_create(&ReasonLabels {
                route: route.to_string(),
                direction,
                peer_cluster: peer.to_string(),
                reason,
            })
            .inc();
    }

    /// Sum of `refused` over every label set with this reason (tests and the status view).
    pub fn refused_total(&self, reason: &str) -> u64 {
        sum_reason(&self.refused, reason)
    }

    /// Sum of `failed` over every label set with this reason.
    pub fn failed_total(&self, reason: &str) -> u64 {
        sum_reason(&self.failed, reason)
    }
}

fn sum_reason<L>(family: &Family<L, Counter>, reason: &str) -> u64
where
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
{
    // prometheus-client offers no iteration over a family; encode and sum the lines. This is
    // for tests and status output only, never on the data path.
    let mut registry = Registry::default();
    registry.register("m", "", family.clone());
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        return 0;
    }
    let needle = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| l.starts_with("m_total{") && l.contains(&needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
