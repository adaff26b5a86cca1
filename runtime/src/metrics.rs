//! Metrics every binary exposes the same way, and the Prometheus text form of the registry.
//!
//! - [`CertificateMetrics`]: each mesh certificate's seconds to expiry and its reload
//!   failures, read from the live [`MeshTls`] at scrape time, so the value is current on every
//!   scrape and follows a reload without anyone having to remember to update a gauge.
//! - [`prometheus_text`]: the registry (which `prometheus-client` writes in OpenMetrics text)
//!   rewritten as Prometheus text format 0.0.4, for scrapers and tools that do not ask for
//!   OpenMetrics (`promtool check metrics`, `curl`, older agents). The two differ where it
//!   matters to a parser: an OpenMetrics counter family `x` has samples `x_total`, while the
//!   0.0.4 parser takes `# TYPE x counter` to describe samples named `x`, so it would see
//!   untyped `x_total` samples without help.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use isthmus_certs::{MeshTls, TlsFiles};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Name of the seconds-to-expiry gauge.
pub const CERTIFICATE_EXPIRY: &str = "isthmus_certificate_expiry_seconds";
/// Name of the reload-failure counter as scraped (the registry adds `_total`).
pub const CERTIFICATE_RELOAD_FAILURES: &str = "isthmus_certificate_reload_failures_total";

/// Labels of one watched certificate. All three are fixed by configuration (the SPIFFE ID
/// changes only when an operator installs a certificate for another identity), so the
/// series count is one per certificate a process holds.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    /// The component holding it: `gateway`, `route-sync`, `dns-shim`.
    component: String,
    /// The certificate file it is loaded (and reloaded) from.
    file: String,
    /// The SPIFFE ID of the leaf in use.
    spiffe_id: String,
}

/// Labels of a reload-failure count: per component and file, not per identity, since a
/// failed reload has no new identity.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FileLabels {
    /// The component holding it.
    component: String,
    /// The certificate file that did not load.
    file: String,
}

#[derive(Debug)]
struct Watched {
    component: String,
    file: String,
    tls: MeshTls,
}

/// The certificates of one process, exposed at scrape time as
/// `isthmus_certificate_expiry_seconds{component,file,spiffe_id}` (negative once expired)
/// and `isthmus_certificate_reload_failures_total{component,file}`.
///
/// Register one per registry (with [`CertificateMetrics::register`]) after adding every
/// certificate the process holds: the metric names must be described once.
#[derive(Debug, Default)]
pub struct CertificateMetrics {
    watched: Vec<Watched>,
}

impl CertificateMetrics {
    /// An empty set; [`add`](Self::add) the certificates.
    pub fn new() -> Self {
        Self::default()
    }

    /// Watches `tls`, the live material of `component` loaded from `files`.
    #[must_use]
    pub fn add(mut self, component: &str, files: &TlsFiles, tls: &MeshTls) -> Self {
        self.watched.push(Watched {
            component: component.to_owned(),
            file: files.cert.display().to_string(),
            tls: tls.clone(),
        });
        self
    }

    /// Adds the collector to `registry`. An empty set registers nothing.
    pub fn register(self, registry: &mut Registry) {
        if !self.watched.is_empty() {
            registry.register_collector(Box::new(self));
        }
    }

    fn encode_at(&self, mut encoder: DescriptorEncoder<'_>, now_unix: f64) -> std::fmt::Result {
        // Each descriptor borrows the encoder until its samples are written.
        {
            let mut expiry = encoder.encode_descriptor(
                CERTIFICATE_EXPIRY,
                "Seconds until the certificate in use expires (negative once it has)",
                None,
                ConstGauge::new(0.0).metric_type(),
            )?;
            for w in &self.watched {
                let identity = w.tls.identity();
                let labels = CertLabels {
                    component: w.component.clone(),
                    file: w.file.clone(),
                    spiffe_id: identity.id().to_string(),
                };
                // Whole seconds are all an X.509 validity carries.
                let left = identity.not_after().unix_timestamp() as f64 - now_unix.floor();
                ConstGauge::new(left).encode(expiry.encode_family(&labels)?)?;
            }
        }
        let mut failures = encoder.encode_descriptor(
            CERTIFICATE_RELOAD_FAILURES.trim_end_matches("_total"),
            "Certificate reloads that failed and kept the previous material",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for w in &self.watched {
            let labels = FileLabels {
                component: w.component.clone(),
                file: w.file.clone(),
            };
            let count = w.tls.reload_status().failures;
            ConstCounter::new(count).encode(failures.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl Collector for CertificateMetrics {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.encode_at(encoder, now)
    }
}

/// Rewrites OpenMetrics text, as `prometheus_client::encoding::text::encode` writes it, in
/// Prometheus text format 0.0.4: counter and info families are described under the names
/// their samples carry (`x_total`, `x_info`), `info` becomes `gauge` and `unknown` becomes
/// `untyped`, and the `# UNIT` and `# EOF` lines, which 0.0.4 has no place for, are left out.
/// Sample lines are the same in both formats and pass through unchanged.
pub fn prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // The TYPE line follows the HELP line in prometheus-client's output; both must be renamed,
    // so each family's HELP is held until its TYPE is known.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush_help(&mut out, help.take());
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "unknown" => ("", "untyped"),
                other => ("", other),
            };
            let renamed = format!("{name}{suffix}");
            match help.take() {
                Some((h, text)) if h == name => flush_help(&mut out, Some((&renamed, text))),
                other => flush_help(&mut out, other),
            }
            let _ = writeln!(out, "# TYPE {renamed} {kind}");
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else {
            flush_help(&mut out, help.take());
            out.push_str(line);
            out.push('\n');
        }
    }
    flush_help(&mut out, help);
    out
}

fn flush_help(out: &mut String, help: Option<(&str, &str)>) {
    if let Some((name, text)) = help {
        let _ = writeln!(out, "# HELP {name} {text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_counters_become_prometheus_counters() {
        let om = "# HELP a_requests Requests.\n# TYPE a_requests counter\n\
                  a_requests_total{x=\"1\"} 3\n\
                  # HELP a_lag_seconds Lag.\n# TYPE a_lag_seconds histogram\n# UNIT a_lag_seconds seconds\n\
                  a_lag_seconds_bucket{le=\"+Inf\"} 1\na_lag_seconds_sum 0.5\na_lag_seconds_count 1\n\
                  # HELP a_build Build.\n# TYPE a_build info\na_build_info{v=\"1\"} 1\n\
                  # HELP a_open Open.\n# TYPE a_open gauge\na_open 2\n# EOF\n";
        assert_eq!(
            prometheus_text(om),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\n\
             a_requests_total{x=\"1\"} 3\n\
             # HELP a_lag_seconds Lag.\n# TYPE a_lag_seconds histogram\n\
             a_lag_seconds_bucket{le=\"+Inf\"} 1\na_lag_seconds_sum 0.5\na_lag_seconds_count 1\n\
             # HELP a_build_info Build.\n# TYPE a_build_info gauge\na_build_info{v=\"1\"} 1\n\
             # HELP a_open Open.\n# TYPE a_open gauge\na_open 2\n"
        );
    }
}
