//! `isthmus-route-sync --check-config`: a valid file prints what would run and exits 0, with
//! the certificate files absent ("not present here") and no API server; an invalid one exits
//! 64 naming the field.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_isthmus-route-sync");

/// The Kubernetes deployment's shape: kubernetes source, mirror, one peer.
const GOOD: &str = r#"
cluster: k8s
trust_domain: mesh.local
tls: {cert: /nonexistent/isthmus/cert.pem, key: /nonexistent/isthmus/key.pem, bundle: /nonexistent/isthmus/ca.pem}
listen: "0.0.0.0:15010"
source: {kubernetes: {namespaces: [apps]}}
mirror:
  namespace: isthmus
  egress_selector: {app.kubernetes.io/name: isthmus-egress}
  egress_ports: 20000-29999
  lease: {name: isthmus-route-sync, duration: 15s}
peers:
  - {cluster: diego, endpoints: ["10.0.16.5:15010"]}
state_dir: /nonexistent/isthmus/state
"#;

fn check(config: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("route-sync.yaml");
    std::fs::write(&path, config).unwrap();
    Command::new(BIN)
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap()
}

#[test]
fn valid_config_prints_the_summary_and_exits_0() {
    let out = check(GOOD);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "configuration ok",
        "listen: 0.0.0.0:15010 (grpc",
        "namespaces: apps",
        "egress_selector: app.kubernetes.io/name=isthmus-egress",
        "diego: 10.0.16.5:15010",
        "bundle: /nonexistent/isthmus/ca.pem (not present here)",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}

#[test]
fn invalid_config_exits_64_naming_file_and_field() {
    let out = check(&GOOD.replace("egress_ports: 20000-29999", "egress_ports: 29999-20000"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("route-sync.yaml") && stderr.contains("field `mirror.egress_ports`"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no summary for an invalid file");
    let out = check(&GOOD.replace("state_dir:", "stat_dir:"));
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stat_dir"));
}
