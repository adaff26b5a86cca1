//! What operators see in the logs: a refused peer is logged with its ID and the rule it failed,
//! and a reload failure names the file and the reason without ever printing key material.
//!
//! One test in its own binary, because it installs a global subscriber (the watcher logs from
//! the blocking pool, outside the test's thread).

mod common;

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use isthmus_certs::ca::MeshCa;
use isthmus_certs::{MeshTls, PeerPolicy, TlsFiles};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn refusals_and_reload_failures_are_logged_usefully() {
    let capture = Capture::default();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_writer(capture.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish(),
    )
    .expect("first and only subscriber in this binary");

    // A policy refusal names the presented ID and the rule.
    let ca = MeshCa::generate(TD).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server_leaf = leaf(&ca, "k8s", "gateway");
    server_leaf.write(dir.path(), &ca.cert_pem()).unwrap();
    let files = TlsFiles::in_dir(dir.path());
    let server_mesh = MeshTls::load(&files).unwrap();
    let allowed = "spiffe://mesh.test/cluster/diego/gateway";
    let mut server =
        EchoServer::start(server_mesh.server_config(PeerPolicy::exact([id(allowed)]), &[ALPN]))
            .await;
    let intruder = mesh(&ca, "diego", "intruder", &[&ca]);
    let result = connect_and_echo(
        intruder.client_config(PeerPolicy::trust_domain(TD), &[ALPN]),
        server.addr,
    )
    .await;
    assert!(result.is_err());
    assert!(server.next().await.is_err());
    let logs = capture.text();
    let line = logs
        .lines()
        .find(|l| l.contains("refused TLS peer"))
        .unwrap_or_else(|| panic!("no refusal line in:\n{logs}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("spiffe://mesh.test/cluster/diego/intruder"),
        "{line}"
    );
    assert!(line.contains(&format!("exact {allowed}")), "{line}");

    // A chain that ends at another trust domain's root names both domains and the root.
    let a = RawCa::new("root of a", &["spiffe://a"]);
    let b = RawCa::new("root of b", &["spiffe://b"]);
    let two = bundle_of(&[&a.pem, &b.pem]);
    let server_a = MeshTls::new(a.leaf("spiffe://a/cluster/k8s/gateway"), two.clone());
    let mut server_a =
        EchoServer::start(server_a.server_config(PeerPolicy::trust_domain("a"), &[ALPN])).await;
    let posing = MeshTls::new(b.leaf("spiffe://a/cluster/diego/gateway"), two);
    let result = connect_and_echo(
        posing.client_config(PeerPolicy::trust_domain("a"), &[ALPN]),
        server_a.addr,
    )
    .await;
    assert!(result.is_err());
    assert!(server_a.next().await.is_err());
    let logs = capture.text();
    let line = logs
        .lines()
        .find(|l| l.contains("refused TLS peer") && l.contains("root of b"))
        .unwrap_or_else(|| panic!("no trust-domain refusal line in:\n{logs}"));
    assert!(line.contains("WARN"), "{line}");
    for needle in [
        "spiffe://a/cluster/diego/gateway",
        "trust domain a",
        "root_trust_domain=b",
    ] {
        assert!(line.contains(needle), "{needle:?} missing from {line}");
    }

    // A root that names no trust domain is reported once, when the bundle is taken into use.
    let plain = RawCa::new("plain root", &[]);
    let _ = MeshTls::new(
        a.leaf("spiffe://a/cluster/k8s/gateway"),
        bundle_of(&[&a.pem, &plain.pem]),
    );
    let logs = capture.text();
    let line = logs
        .lines()
        .find(|l| l.contains("anchors no trust domain") && l.contains("plain root"))
        .unwrap_or_else(|| panic!("no unanchored-root warning in:\n{logs}"));
    assert!(line.contains("WARN"), "{line}");

    // A reload failure names the file and the reason, and leaks no key bytes.
    let cancel = CancellationToken::new();
    let handle = server_mesh.watch(files.clone(), Duration::from_millis(50), cancel.clone());
    let other = leaf(&ca, "k8s", "gateway");
    std::fs::write(&files.key, &other.key_pem).unwrap();
    eventually("the mismatched key is refused", || {
        server_mesh.reload_status().failures > 0
    })
    .await;
    let logs = capture.text();
    let line = logs
        .lines()
        .find(|l| l.contains("keeping the previous TLS material"))
        .unwrap_or_else(|| panic!("no reload warning in:\n{logs}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("key.pem"), "{line}");
    assert!(line.contains("does not match"), "{line}");
    for key_line in other.key_pem.lines().chain(server_leaf.key_pem.lines()) {
        if !key_line.starts_with("-----") {
            assert!(!logs.contains(key_line), "key material in logs");
        }
    }

    // Fixing the key is picked up and logged with the new serial.
    std::fs::write(&files.cert, &other.cert_pem).unwrap();
    eventually("the fixed pair is loaded", || {
        server_mesh.serial() == other.serial
    })
    .await;
    let logs = capture.text();
    assert!(
        logs.lines()
            .any(|l| l.contains("TLS material updated") && l.contains(&other.serial)),
        "{logs}"
    );
    cancel.cancel();
    t(handle).await.unwrap();
}
