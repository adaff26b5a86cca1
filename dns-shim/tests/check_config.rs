//! `isthmus-dns-shim --check-config`: a valid file prints what would run and exits 0, with the
//! files it names absent ("not present here"); an invalid one exits 64 naming the field.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_isthmus-dns-shim");

/// The Kubernetes deployment's shape: routes from route-sync over mTLS, CoreDNS upstream.
const GOOD: &str = r#"
cluster: k8s
domains: [apps.internal]
listen: "0.0.0.0:5353"
answer: {vip: true}
upstream: {kind: dns, servers: ["10.96.0.10"]}
routes:
  route_sync:
    endpoints: ["10.0.0.10:15010"]
    trust_domain: mesh.local
    tls: {cert: /nonexistent/isthmus/cert.pem, key: /nonexistent/isthmus/key.pem, bundle: /nonexistent/isthmus/ca.pem}
"#;

fn check(config: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dns-shim.yaml");
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
        "listen: 0.0.0.0:5353 udp and tcp (dns)",
        "servers: 10.96.0.10:53",
        "route_sync: 10.0.0.10:15010",
        "key: /nonexistent/isthmus/key.pem (not present here)",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}

#[test]
fn invalid_config_exits_64_naming_file_and_field() {
    let out = check(&GOOD.replace("10.96.0.10", "coredns"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("dns-shim.yaml") && stderr.contains("upstream"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no summary for an invalid file");
}
