//! Certificate metrics read the live material at scrape time: seconds to expiry follow a
//! reload, and failed reloads are counted per file.

use std::path::Path;
use std::time::Duration;

use isthmus_certs::ca::{LeafSpec, MeshCa};
use isthmus_certs::{MeshTls, TlsFiles};
use isthmus_runtime::metrics::{
    CERTIFICATE_EXPIRY, CERTIFICATE_RELOAD_FAILURES, CertificateMetrics, prometheus_text,
};
use prometheus_client::registry::Registry;

fn issue(ca: &MeshCa, dir: &Path, ttl: Duration) {
    ca.issue(&LeafSpec::new("k8s", "gateway", ttl))
        .unwrap()
        .write(dir, &ca.cert_pem())
        .unwrap();
}

/// The value of the one sample of `name` in `text`, with its labels.
fn sample<'a>(text: &'a str, name: &str) -> (&'a str, f64) {
    let mut found = text.lines().filter(|l| l.starts_with(&format!("{name}{{")));
    let line = found
        .next()
        .unwrap_or_else(|| panic!("no {name} in\n{text}"));
    assert!(found.next().is_none(), "more than one {name} in\n{text}");
    let (labels, value) = line.rsplit_once(' ').unwrap();
    (labels, value.parse().unwrap())
}

fn scrape(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    prometheus_text(&text)
}

#[test]
fn expiry_and_reload_failures_are_read_at_scrape_time() {
    let dir = tempfile::tempdir().unwrap();
    let ca = MeshCa::generate("mesh.local").unwrap();
    issue(&ca, dir.path(), Duration::from_secs(3600));
    let files = TlsFiles::in_dir(dir.path());
    let tls = MeshTls::load(&files).unwrap();
    let mut registry = Registry::default();
    CertificateMetrics::new()
        .add("gateway", &files, &tls)
        .register(&mut registry);

    let text = scrape(&registry);
    assert!(
        text.contains(&format!("# TYPE {CERTIFICATE_EXPIRY} gauge\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!("# TYPE {CERTIFICATE_RELOAD_FAILURES} counter\n")),
        "{text}"
    );
    let (labels, left) = sample(&text, CERTIFICATE_EXPIRY);
    let cert = files.cert.display().to_string();
    assert_eq!(
        labels,
        format!(
            "{CERTIFICATE_EXPIRY}{{component=\"gateway\",file=\"{cert}\",\
             spiffe_id=\"spiffe://mesh.local/cluster/k8s/gateway\"}}"
        )
    );
    assert!((3500.0..=3600.0).contains(&left), "{left} s left of 3600");
    assert_eq!(sample(&text, CERTIFICATE_RELOAD_FAILURES).1, 0.0);

    // A half-written certificate: the reload fails, the old one stays, the failure counts.
    std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\nMII").unwrap();
    assert!(tls.reload_from(&files).is_err());
    let text = scrape(&registry);
    assert_eq!(sample(&text, CERTIFICATE_RELOAD_FAILURES).1, 1.0);
    assert!((3500.0..=3600.0).contains(&sample(&text, CERTIFICATE_EXPIRY).1));

    // A new leaf with a day to go: the next scrape says so, with no one setting a gauge.
    issue(&ca, dir.path(), Duration::from_secs(86_400));
    assert!(tls.reload_from(&files).unwrap());
    let text = scrape(&registry);
    let left = sample(&text, CERTIFICATE_EXPIRY).1;
    assert!(
        (86_300.0..=86_400.0).contains(&left),
        "{left} s left of 86400"
    );
    assert_eq!(sample(&text, CERTIFICATE_RELOAD_FAILURES).1, 1.0);
}

#[test]
fn no_certificate_registers_nothing() {
    let mut registry = Registry::default();
    CertificateMetrics::new().register(&mut registry);
    assert!(!scrape(&registry).contains("isthmus_certificate"));
}
