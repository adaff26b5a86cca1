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

/// A route file missing at start keeps the shim not ready (it would forward every name);
/// once the file appears, even as an empty table (`routes: []`, which changes nothing in
/// the store), the shim turns ready.
#[test]
fn a_route_file_that_appears_empty_after_start_makes_the_shim_ready() {
    use std::io::{Read as _, Write as _};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = dir.path().join("dns-shim.yaml");
    std::fs::write(
        &cfg,
        GOOD.replace(
            "routes: {file: routes.yaml}",
            &format!(
                "routes: {{file: {}, poll_interval: 50ms}}\nadmin: {{listen: \"{admin}\"}}",
                routes.display()
            ),
        ),
    )
    .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _shim = Kill(
        Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let readyz = || -> Option<String> {
        let mut s = std::net::TcpStream::connect(admin).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    let wait = |what: &str, want: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if readyz().is_some_and(|r| r.starts_with(want)) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait("not ready without a route file", "HTTP/1.1 503");
    std::fs::write(&routes, "routes: []\n").unwrap();
    wait("ready once the empty route file loaded", "HTTP/1.1 200");
}
