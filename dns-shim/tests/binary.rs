//! The `isthmus-dns-shim` binary: configuration checks and the exit status for a bad file.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_isthmus-dns-shim");

const GOOD: &str = r#"
cluster: diego
listen: "127.0.0.1:0"
answer: {vip: true}
upstream: {kind: dns, servers: ["169.254.0.2", "10.0.8.6:5353"]}
routes: {file: routes.yaml}
"#;

fn run(config: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dns-shim.yaml");
    std::fs::write(&path, config).unwrap();
    Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap()
}

#[test]
fn a_valid_file_checks_ok() {
    let out = run(GOOD);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for kind in [
        "upstream: {kind: sdc, url: \"https://service-discovery-controller.service.cf.internal:8054\", ca: ca.pem, cert: c.pem, key: k.pem}",
        "upstream: {kind: bosh-dns-http, url: \"http://127.0.0.1:8053\"}",
    ] {
        let cfg = GOOD.replace(
            "upstream: {kind: dns, servers: [\"169.254.0.2\", \"10.0.8.6:5353\"]}",
            kind,
        );
        let out = run(&cfg);
        assert!(
            out.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn invalid_files_exit_64_naming_the_field() {
    let cases = [
        (
            GOOD.replace("cluster: diego", "cluster: diego\nttls: 3"),
            "ttls",
        ),
        (
            // The shim computes no VIPs any more: a range is an unknown field.
            GOOD.replace("vip: true", "vip_range: 100.64.0.0/16"),
            "vip_range",
        ),
        (
            GOOD.replace("{vip: true}", "{vip: true, egress: [10.0.0.1]}"),
            "answer.vip",
        ),
        (GOOD.replace("{vip: true}", "{vip: false}"), "answer.vip"),
        (GOOD.replace("kind: dns,", "kind: dnz,"), "upstream"),
        (
            GOOD.replace("\"169.254.0.2\", ", "\"nameserver\", "),
            // serde buffers an internally tagged enum, so the path stops at `upstream`; the
            // message names the value.
            "field `upstream`: invalid DNS server \"nameserver\"",
        ),
        (
            GOOD.replace(
                "routes: {file: routes.yaml}",
                "routes: {file: routes.yaml}\nupstream_timeout: 2",
            ),
            "upstream_timeout",
        ),
        (
            GOOD.replace(
                "upstream: {kind: dns, servers: [\"169.254.0.2\", \"10.0.8.6:5353\"]}",
                "upstream: {kind: sdc, url: \"http://sdc:8054\", ca: a, cert: b, key: c}",
            ),
            "upstream.url",
        ),
    ];
    for (cfg, field) in cases {
        let out = run(&cfg);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{field}: {stderr}");
        assert!(stderr.contains(field), "{field} not named in: {stderr}");
    }
}
