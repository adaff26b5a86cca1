//! The `isthmus-route-sync` binary as an operator runs it: two clusters peering from config
//! files, `status` showing peers, routes and anchors, SIGTERM, and a bad config.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use isthmus_certs::ca::{LeafSpec, MeshCa};

const BIN: &str = env!("CARGO_BIN_EXE_isthmus-route-sync");

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

fn config(
    d: &Path,
    cluster: &str,
    listen: SocketAddr,
    admin: SocketAddr,
    peer: (&str, SocketAddr),
) -> std::path::PathBuf {
    let path = d.join(format!("{cluster}.yaml"));
    std::fs::write(
        &path,
        format!(
            "cluster: {cluster}\ntrust_domain: mesh.local\ntls: {{cert: {0}/{cluster}/cert.pem, key: {0}/{cluster}/key.pem, bundle: {0}/{cluster}/ca.pem}}\nlisten: \"{listen}\"\nadmin: {{listen: \"{admin}\"}}\nsource: {{file: {0}/{cluster}-routes.yaml, poll_interval: 50ms}}\npeers: [{{cluster: {1}, endpoints: [\"{2}\"]}}]\nstate_dir: {0}/{cluster}-state\n",
            d.display(),
            peer.0,
            peer.1
        ),
    )
    .unwrap();
    path
}

fn status(cfg: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("status")
        .arg("--config")
        .arg(cfg)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn two_route_sync_binaries_peer_and_report_status() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = MeshCa::generate("mesh.local").unwrap();
    for cluster in ["diego", "k8s"] {
        ca.issue(&LeafSpec::new(
            cluster,
            "route-sync",
            Duration::from_secs(3600),
        ))
        .unwrap()
        .write(&d.join(cluster), &ca.cert_pem())
        .unwrap();
    }
    std::fs::write(
        d.join("diego-routes.yaml"),
        "routes:\n  - {name: orders.apps.internal, port: 8080, home_cluster: diego, exported: true, allowed_peers: [cluster:k8s], backends: [\"10.0.0.1:8080\"]}\n",
    )
    .unwrap();
    std::fs::write(d.join("k8s-routes.yaml"), "routes: []\n").unwrap();
    let (gd, gk, ad, ak) = (free_addr(), free_addr(), free_addr(), free_addr());
    let diego_cfg = config(d, "diego", gd, ad, ("k8s", gk));
    let k8s_cfg = config(d, "k8s", gk, ak, ("diego", gd));
    let spawn = |cfg: &Path| {
        Proc(
            Command::new(BIN)
                .arg("--config")
                .arg(cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let _diego = spawn(&diego_cfg);
    let mut k8s = spawn(&k8s_cfg);
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (ok, text) = status(&k8s_cfg);
        if ok
            && text.contains("routes      1 served")
            && text.contains("connected")
            && !text.contains("disconnected")
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "k8s never imported orders:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(text.contains("diego"), "{text}");
    assert!(text.contains("stale       no"), "{text}");
    assert!(!text.contains("NO ANCHOR IN COMMON"), "{text}");

    // SIGTERM stops it cleanly, and its imports were saved.
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(k8s.0.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "`kill` is needed for this test");
    let start = Instant::now();
    while k8s.0.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "route-sync did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.join("k8s-state/peer-diego.pb").exists());
}

#[test]
fn a_bad_config_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("rs.yaml");
    std::fs::write(&cfg, "cluster: k8s\ntrust_domain: mesh.local\ntls: {cert: a, key: b, bundle: c}\nsource: {file: r}\npeers: [{cluster: k8s, endpoints: [\"127.0.0.1:1\"]}]\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("peers[0].cluster"));
}
