//! The Kubernetes source's [`KubeStats`] as Prometheus metrics, read at scrape time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::{KINDS, KubeStats, KubernetesSource};

/// Name of the staleness gauge as scraped: 1 while the routes are last-known-good.
pub const STALE: &str = "isthmus_route_source_stale";
/// Name of the refused-Service counter as scraped.
pub const SERVICES_REJECTED: &str = "isthmus_kube_source_services_rejected_total";
/// Name of the watch error counter as scraped.
pub const WATCH_ERRORS: &str = "isthmus_kube_source_watch_errors_total";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The metrics of a [`KubernetesSource`]:
/// `isthmus_route_source_stale{source="kubernetes"}`,
/// `isthmus_kube_source_{events,watch_errors,lists}_total{kind}`,
/// `isthmus_kube_source_services_rejected_total`, `isthmus_kube_source_services_rejected`
/// (now), `isthmus_kube_source_export_status_writes_total{result="ok|failed"}` and
/// `isthmus_kube_source_discovery_errors_total`.
#[derive(Debug)]
pub struct KubernetesMetrics {
    stats: Arc<KubeStats>,
}

impl KubernetesMetrics {
    /// The metrics of `source`.
    pub fn new(source: &KubernetesSource) -> Self {
        Self {
            stats: source.stats(),
        }
    }

    /// Registers them in `registry`.
    pub fn register(self, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(self));
    }
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: &AtomicU64,
) -> std::fmt::Result {
    let c = ConstCounter::new(value.load(Ordering::Relaxed));
    let e =
        encoder.encode_descriptor(name.trim_end_matches("_total"), help, None, c.metric_type())?;
    c.encode(e)
}

fn per_kind(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: &[AtomicU64; 3],
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(
        name.trim_end_matches("_total"),
        help,
        None,
        ConstCounter::new(0u64).metric_type(),
    )?;
    for (kind, value) in KINDS.iter().zip(values) {
        ConstCounter::new(value.load(Ordering::Relaxed))
            .encode(family.encode_family(&KindLabel { kind })?)?;
    }
    Ok(())
}

impl prometheus_client::collector::Collector for KubernetesMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let s = &self.stats;
        {
            let g = ConstGauge::new(i64::from(s.stale.load(Ordering::Relaxed)));
            let mut family = encoder.encode_descriptor(
                STALE,
                "1 while the local route source serves last-known-good routes (API server unreachable, or not listed yet)",
                None,
                g.metric_type(),
            )?;
            g.encode(family.encode_family(&SourceLabel {
                source: "kubernetes",
            })?)?;
        }
        per_kind(
            &mut encoder,
            "isthmus_kube_source_events_total",
            "Watch events received from the API server",
            &s.events,
        )?;
        per_kind(
            &mut encoder,
            WATCH_ERRORS,
            "Watch errors; each keeps the last known objects and relists after a backoff",
            &s.watch_errors,
        )?;
        per_kind(
            &mut encoder,
            "isthmus_kube_source_lists_total",
            "Complete lists (initial, after an error, after 410 Gone)",
            &s.lists,
        )?;
        counter(
            &mut encoder,
            SERVICES_REJECTED,
            "Services refused for a bad annotation or a conflict (each refusal once, with its reason in the log)",
            &s.services_rejected,
        )?;
        {
            let g = ConstGauge::new(
                i64::try_from(s.services_rejected_now.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
            );
            let e = encoder.encode_descriptor(
                "isthmus_kube_source_services_rejected",
                "Services refused in the current table",
                None,
                g.metric_type(),
            )?;
            g.encode(e)?;
        }
        {
            let mut family = encoder.encode_descriptor(
                "isthmus_kube_source_export_status_writes",
                "ServiceExport status writes",
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (result, value) in [("ok", &s.status_writes), ("failed", &s.status_write_errors)] {
                ConstCounter::new(value.load(Ordering::Relaxed))
                    .encode(family.encode_family(&ResultLabel { result })?)?;
            }
        }
        counter(
            &mut encoder,
            "isthmus_kube_source_discovery_errors_total",
            "Failed lookups of the ServiceExport API (the previous answer was kept)",
            &s.discovery_errors,
        )
    }
}
