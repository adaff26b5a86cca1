//! The shim's metrics, registered once and shared by every task.
//!
//! Every label value is one of a fixed set (query types outside a short list count as
//! `other`), never text a client sent, so a scanner cannot blow up cardinality.

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::{Arc, OnceLock};

/// Who produced a reply.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Source {
    /// The shim itself: egress answers, NODATA, SOA, REFUSED, FORMERR, overload SERVFAIL.
    Local,
    /// The platform resolver (including SERVFAIL when it failed or timed out).
    Upstream,
}

/// Labels of one answered query.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    /// `A`, `AAAA`, ... or `other`.
    pub qtype: &'static str,
    /// `NOERROR`, `NXDOMAIN`, `SERVFAIL`, ...
    pub rcode: &'static str,
    /// local or upstream.
    pub source: Source,
    /// udp or tcp.
    pub transport: &'static str,
}

/// Labels of a malformed packet.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MalformedLabels {
    /// udp or tcp.
    pub transport: &'static str,
    /// See [`crate::wire::Malformed::label`].
    pub reason: &'static str,
}

/// Labels naming the upstream kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// dns, sdc or bosh-dns-http.
    pub kind: &'static str,
}

/// Labels of a failed upstream exchange.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// dns, sdc or bosh-dns-http.
    pub kind: &'static str,
    /// See [`crate::ShimError::reason`].
    pub reason: &'static str,
}

/// Labels naming a transport.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    /// udp or tcp.
    pub transport: &'static str,
}

type HistogramFamily = Family<UpstreamLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.25 ms to about 4 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 15))
}

/// Every shim metric.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Replies sent, by query type, rcode, source and transport.
    pub queries: Family<QueryLabels, Counter>,
    /// Packets that were not a usable query (dropped or answered FORMERR).
    pub malformed: Family<MalformedLabels, Counter>,
    /// Replies sent with TC because they did not fit the client's UDP size.
    pub truncated: Family<TransportLabels, Counter>,
    /// Time spent waiting on the upstream, successful or not.
    pub upstream_latency: HistogramFamily,
    /// Upstream exchanges that failed (the client got SERVFAIL), by reason.
    pub upstream_failures: Family<FailureLabels, Counter>,
    /// Names currently answered with an egress address.
    pub remote_names: Gauge,
    /// The route-table revision the answers are built from.
    pub table_revision: Gauge,
    /// Names homed elsewhere answered SERVFAIL because their routes carry no VIP.
    pub remote_names_without_vip: Gauge,
    /// Open TCP client connections.
    pub tcp_connections: Gauge,
    /// TCP connections closed at once because `max_tcp_connections` were open.
    pub tcp_rejected: Counter,
    /// The `queries` counter of every label combination, resolved once: a reply is counted
    /// with an array index and one atomic add instead of a locked map lookup.
    reply_counters: Arc<[OnceLock<Counter>]>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            queries: Family::default(),
            malformed: Family::default(),
            truncated: Family::default(),
            upstream_latency: Family::new_with_constructor(latency_histogram),
            upstream_failures: Family::default(),
            remote_names: Gauge::default(),
            table_revision: Gauge::default(),
            remote_names_without_vip: Gauge::default(),
            tcp_connections: Gauge::default(),
            tcp_rejected: Counter::default(),
            reply_counters: (0..QTYPES.len() * RCODES.len() * 2 * 2)
                .map(|_| OnceLock::new())
                .collect(),
        }
    }
}

impl Metrics {
    /// Registers every metric under the `isthmus_dns` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("isthmus_dns");
        r.register(
            "queries",
            "DNS replies sent, by query type, rcode, source (local or upstream) and transport",
            self.queries.clone(),
        );
        r.register(
            "malformed_packets",
            "Packets that were not a usable query: dropped or answered FORMERR",
            self.malformed.clone(),
        );
        r.register(
            "truncated_replies",
            "UDP replies sent with TC set because the answer did not fit",
            self.truncated.clone(),
        );
        r.register(
            "upstream_duration_seconds",
            "Time spent waiting on the platform resolver",
            self.upstream_latency.clone(),
        );
        r.register(
            "upstream_failures",
            "Forwarded queries answered SERVFAIL because the upstream failed, by reason",
            self.upstream_failures.clone(),
        );
        r.register(
            "remote_names",
            "Names answered with a local egress address (homed in another cluster)",
            self.remote_names.clone(),
        );
        r.register(
            "route_table_revision",
            "Route-table revision the answers are built from",
            self.table_revision.clone(),
        );
        r.register(
            "remote_names_without_vip",
            "Names homed elsewhere answered SERVFAIL because their routes carry no VIP",
            self.remote_names_without_vip.clone(),
        );
        r.register(
            "tcp_connections",
            "Open DNS-over-TCP client connections",
            self.tcp_connections.clone(),
        );
        r.register(
            "tcp_rejected",
            "TCP connections closed at once because max_tcp_connections were open",
            self.tcp_rejected.clone(),
        );
    }

    /// Counts one reply.
    pub fn reply(
        &self,
        qtype: Option<RecordType>,
        rcode: ResponseCode,
        source: Source,
        transport: &'static str,
    ) {
        let q = qtype.map_or(0, qtype_index);
        let r = rcode_index(rcode);
        let slot = ((q * RCODES.len() + r) * 2 + usize::from(source == Source::Upstream)) * 2
            + usize::from(transport == "tcp");
        let make = || {
            self.queries
                .get_or_create(&QueryLabels {
                    qtype: QTYPES.get(q).copied().unwrap_or("other"),
                    rcode: RCODES.get(r).copied().unwrap_or("other"),
                    source,
                    transport,
                })
                .clone()
        };
        match self.reply_counters.get(slot) {
            Some(cell) => cell.get_or_init(make).inc(),
            None => make().inc(),
        };
    }

    /// Counts one malformed packet.
    pub fn malformed(&self, transport: &'static str, reason: &'static str) {
        self.malformed
            .get_or_create(&MalformedLabels { transport, reason })
            .inc();
    }
}

/// Query-type labels; index 0 is for replies without a decoded question.
const QTYPES: [&str; 16] = [
    "none", "other", "A", "AAAA", "ANY", "CNAME", "HTTPS", "MX", "NS", "PTR", "SOA", "SRV", "SVCB",
    "TXT", "AXFR", "IXFR",
];

/// Rcode labels.
const RCODES: [&str; 8] = [
    "other", "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS",
];

fn qtype_index(t: RecordType) -> usize {
    match t {
        RecordType::A => 2,
        RecordType::AAAA => 3,
        RecordType::ANY => 4,
        RecordType::CNAME => 5,
        RecordType::HTTPS => 6,
        RecordType::MX => 7,
        RecordType::NS => 8,
        RecordType::PTR => 9,
        RecordType::SOA => 10,
        RecordType::SRV => 11,
        RecordType::SVCB => 12,
        RecordType::TXT => 13,
        RecordType::AXFR => 14,
        RecordType::IXFR => 15,
        _ => 1,
    }
}

fn rcode_index(r: ResponseCode) -> usize {
    match r {
        ResponseCode::NoError => 1,
        ResponseCode::FormErr => 2,
        ResponseCode::ServFail => 3,
        ResponseCode::NXDomain => 4,
        ResponseCode::NotImp => 5,
        ResponseCode::Refused => 6,
        ResponseCode::BADVERS => 7,
        _ => 0,
    }
}

/// The label of a query type: its mnemonic for the common ones, else `other`.
pub fn qtype_label(t: RecordType) -> &'static str {
    QTYPES.get(qtype_index(t)).copied().unwrap_or("other")
}

/// The label of an rcode: its mnemonic, or `other`.
pub fn rcode_label(r: ResponseCode) -> &'static str {
    RCODES.get(rcode_index(r)).copied().unwrap_or("other")
}
