//! The `isthmus-gateway` binary as an operator runs it: config files, cert files, a route
//! file edited live, the admin endpoints, SIGTERM, and a bad config.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use isthmus_certs::ca::{LeafSpec, MeshCa};

const BIN: &str = env!("CARGO_BIN_EXE_isthmus-gateway");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn echo(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg)?;
    let mut got = vec![0; msg.len()];
    s.read_exact(&mut got)?;
    Ok(got)
}

fn spawn_echo() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    addr
}

fn write_routes(path: &Path, echo: SocketAddr, exported: bool) {
    let text = format!(
        "routes:\n  - {{name: orders.apps.internal, port: 8080, home_cluster: k8s, exported: {exported}, allowed_peers: [cluster:diego], backends: [\"{echo}\"]}}\n"
    );
    // Write beside, then rename: what a careful operator (or a ConfigMap) does.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn gateway_binaries_tunnel_follow_route_edits_and_drain_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = MeshCa::generate("mesh.local").unwrap();
    for cluster in ["k8s", "diego"] {
        ca.issue(&LeafSpec::new(
            cluster,
            "gateway",
            Duration::from_secs(3600),
        ))
        .unwrap()
        .write(&d.join(cluster), &ca.cert_pem())
        .unwrap();
    }
    let echo_addr = spawn_echo();
    let routes = d.join("routes.yaml");
    write_routes(&routes, echo_addr, true);
    let (tunnel, k8s_admin, diego_admin, entry) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let tls = |c: &str| {
        format!(
            "tls: {{cert: {0}/{c}/cert.pem, key: {0}/{c}/key.pem, bundle: {0}/{c}/ca.pem, reload_interval: 100ms}}",
            d.display()
        )
    };
    let k8s_cfg = d.join("k8s.yaml");
    std::fs::write(
        &k8s_cfg,
        format!(
            "cluster: k8s\ntrust_domain: mesh.local\n{}\nroutes: {{file: {}, poll_interval: 50ms}}\nadmin: {{listen: \"{k8s_admin}\"}}\ningress: {{listen: \"{tunnel}\", quic: false}}\ndrain_timeout: 5s\n",
            tls("k8s"),
            routes.display()
        ),
    )
    .unwrap();
    let diego_cfg = d.join("diego.yaml");
    std::fs::write(
        &diego_cfg,
        format!(
            "cluster: diego\ntrust_domain: mesh.local\n{}\nroutes: {{file: {}, poll_interval: 50ms}}\nadmin: {{listen: \"{diego_admin}\"}}\negress:\n  peers: [{{cluster: k8s, endpoints: [\"{tunnel}\"]}}]\n  dedicated: [{{listen: \"{entry}\", route: \"orders.apps.internal:8080\"}}]\n",
            tls("diego"),
            routes.display()
        ),
    )
    .unwrap();
    let spawn = |cfg: &Path, log: &str| {
        Proc(
            Command::new(BIN)
                .arg("--config")
                .arg(cfg)
                .arg("--log")
                .arg("info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join(log)).unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let mut k8s = spawn(&k8s_cfg, "k8s.log");
    let _diego = spawn(&diego_cfg, "diego.log");
    wait_until("both gateways ready", || {
        TcpStream::connect(k8s_admin).is_ok()
            && TcpStream::connect(diego_admin).is_ok()
            && http_get(k8s_admin, "/readyz").starts_with("HTTP/1.1 200")
            && http_get(diego_admin, "/readyz").starts_with("HTTP/1.1 200")
    });

    // A connection through both binaries.
    let mut established = TcpStream::connect(entry).unwrap();
    established
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(echo(&mut established, b"hello").unwrap(), b"hello");
    let metrics = http_get(diego_admin, "/metrics");
    assert!(
        metrics.contains("isthmus_gateway_connections_opened_total{route=\"orders.apps.internal:8080\",direction=\"egress\",peer_cluster=\"k8s\"} 1"),
        "{metrics}"
    );

    // Stop exporting orders: new connections are refused, the established one carries on.
    write_routes(&routes, echo_addr, false);
    wait_until("the ingress to stop serving orders", || {
        let Ok(mut s) = TcpStream::connect(entry) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        echo(&mut s, b"x").is_err()
    });
    assert_eq!(echo(&mut established, b"still").unwrap(), b"still");
    assert!(http_get(k8s_admin, "/metrics").contains("reason=\"not_exported\""));

    // SIGTERM: not ready at once, exits once the established connection ends.
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(k8s.0.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "`kill` is needed for this test");
    wait_until("readiness to drop", || {
        http_get(k8s_admin, "/readyz").starts_with("HTTP/1.1 503")
    });
    assert_eq!(echo(&mut established, b"draining").unwrap(), b"draining");
    drop(established);
    let start = Instant::now();
    loop {
        if let Some(code) = k8s.0.try_wait().unwrap() {
            assert!(code.success(), "{code}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the gateway did not stop after draining"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(d.join("k8s.log")).unwrap();
    assert!(log.contains("draining") && log.contains("stopped"), "{log}");
}

/// A route file that cannot be read at start keeps the gateway not ready; once it appears,
/// even as an empty table (`routes: []`, which changes nothing in the store), the gateway
/// turns ready.
#[test]
fn a_route_file_that_appears_empty_after_start_makes_the_gateway_ready() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = MeshCa::generate("mesh.local").unwrap();
    ca.issue(&LeafSpec::new("k8s", "gateway", Duration::from_secs(3600)))
        .unwrap()
        .write(&d.join("k8s"), &ca.cert_pem())
        .unwrap();
    let routes = d.join("routes.yaml");
    let (tunnel, admin) = (free_addr(), free_addr());
    let cfg = d.join("k8s.yaml");
    std::fs::write(
        &cfg,
        format!(
            "cluster: k8s\ntrust_domain: mesh.local\ntls: {{cert: {0}/k8s/cert.pem, key: {0}/k8s/key.pem, bundle: {0}/k8s/ca.pem}}\nroutes: {{file: {1}, poll_interval: 50ms}}\nadmin: {{listen: \"{admin}\"}}\ningress: {{listen: \"{tunnel}\", quic: false}}\n",
            d.display(),
            routes.display()
        ),
    )
    .unwrap();
    let _gw = Proc(
        Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("k8s.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_until("the admin server", || TcpStream::connect(admin).is_ok());
    assert!(http_get(admin, "/readyz").starts_with("HTTP/1.1 503"));
    std::fs::write(&routes, "routes: []\n").unwrap();
    wait_until("ready once the empty route file loaded", || {
        http_get(admin, "/readyz").starts_with("HTTP/1.1 200")
    });
}

#[test]
fn a_bad_config_exits_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.yaml");
    std::fs::write(
        &cfg,
        "cluster: diego\ntrust_domain: mesh.local\ntls: {cert: a, key: b, bundle: c}\nroutes: {file: r}\negress:\n  peers: [{cluster: k8s, endpoints: [\"127.0.0.1:15008\"], transport: carrier-pigeon}]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gw.yaml") && err.contains("egress.peers[0].transport"),
        "{err}"
    );

    std::fs::write(&cfg, "cluster: diego\ntrust_domain: mesh.local\ntls: {cert: a, key: b, bundle: c}\nroutes: {file: r}\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ingress"));
}
