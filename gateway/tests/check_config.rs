//! `isthmus-gateway --check-config`: a valid file prints what would run and exits 0, with the
//! certificate files absent ("not present here"); an invalid one exits 64 naming the field.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_isthmus-gateway");

/// An ingress and egress gateway whose certificates do not exist on this machine.
const GOOD: &str = r#"
cluster: k8s
trust_domain: mesh.local
tls: {cert: /nonexistent/isthmus/cert.pem, key: /nonexistent/isthmus/key.pem, bundle: /nonexistent/isthmus/ca.pem}
routes: {route_sync: {endpoints: ["10.0.0.10:15010"]}}
admin: {listen: "0.0.0.0:15020"}
ingress: {listen: "0.0.0.0:15008", quic: true}
egress:
  listen_address: 0.0.0.0
  peers:
    - {cluster: diego, endpoints: ["10.0.16.5:15008"], transport: quic}
"#;

fn check(flag: &str, config: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, config).unwrap();
    Command::new(BIN)
        .arg(flag)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap()
}

#[test]
fn valid_config_prints_the_summary_and_exits_0() {
    let out = check("--check-config", GOOD);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "configuration ok",
        "roles: ingress, egress",
        "listen: 0.0.0.0:15008 tcp (h2) and udp (quic)",
        "diego: 10.0.16.5:15008 (quic, tcp fallback)",
        "route_sync: 10.0.0.10:15010",
        "cert: /nonexistent/isthmus/cert.pem (not present here)",
        "key: /nonexistent/isthmus/key.pem (not present here)",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}

#[test]
fn check_is_an_alias() {
    let out = check("--check", GOOD);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration ok"));
}

#[test]
fn invalid_config_exits_64_naming_file_and_field() {
    let out = check(
        "--check-config",
        &GOOD.replace("peers:\n", "peers: []\n  x:\n"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("gateway.yaml") && stderr.contains("egress.x"),
        "{stderr}"
    );
    let out = check(
        "--check-config",
        &GOOD.replace("cluster: k8s", "cluster: K8S"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("field `cluster`"), "{stderr}");
    assert!(out.stdout.is_empty(), "no summary for an invalid file");
}
