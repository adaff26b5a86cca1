//! Shared egress ports and VIPs: a connection reaches the route it named (by the VIP it
//! arrived on, its HTTP Host header or its TLS SNI) and never another app's; peeked bytes
//! are replayed to the backend; raw TCP on a shared address is refused; the own-cluster
//! path reaches only exported routes. Every app answers with its own name, and the tests
//! assert which one answered.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use common::*;
use isthmus_gateway::config::{EgressConfig, PeerConfig, Transport};
use isthmus_route_sync::{Route, RouteStore};
use isthmus_runtime::config::HumanDuration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The bytes of a real TLS ClientHello with this SNI.
fn client_hello(sni: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(cfg), sni.to_string().try_into().unwrap()).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

async fn exchange(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(out)
}

/// Whether a call was refused: reset, or closed without a byte.
async fn refused(addr: SocketAddr, bytes: &[u8]) -> bool {
    match within(exchange(addr, bytes)).await {
        Err(_) => true,
        Ok(out) => out.is_empty(),
    }
}

/// Routes parsed from YAML, each name given the VIP listed for it (route-sync assigns them
/// in production; the file source never does).
fn with_vips(yaml: &str, vips: &[(&str, &str)]) -> Vec<Route> {
    let store = routes(yaml);
    store
        .snapshot()
        .iter()
        .map(|r| {
            let mut r = (**r).clone();
            r.vip = vips
                .iter()
                .find(|(name, _)| *name == r.key.name.as_str())
                .map(|(_, ip)| ip.parse::<IpAddr>().unwrap());
            r
        })
        .collect()
}

fn store_of(routes: Vec<Route>) -> RouteStore {
    let store = RouteStore::new();
    store.replace_all(routes);
    store
}

fn egress_to(ingress: SocketAddr, transport: Transport) -> EgressConfig {
    EgressConfig::with_peers(vec![PeerConfig {
        cluster: "k8s".into(),
        endpoints: vec![ingress],
        transport,
        fallback_to_tcp: false,
    }])
}

async fn run_egress(ctx: isthmus_gateway::Context, cfg: EgressConfig) -> Running {
    let egress = isthmus_gateway::egress::Egress::bind(ctx, cfg)
        .await
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let force = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(egress.run(shutdown.clone(), force.clone()));
    Running {
        shutdown,
        force,
        task,
    }
}

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// The point of the shared port: two HTTP routes on one port, one homed here (served by its
/// local app), one homed in k8s. Each call reaches the app whose name it carried, never the
/// port's other route, even though the port has exactly one remote route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_http_routes_on_one_port_each_call_reaches_the_app_it_named() {
    for transport in [Transport::Tcp, Transport::Quic] {
        let (orders, _) = echo_backend("ORDERS:").await;
        let (billing, _) = echo_backend("BILLING:").await;
        let port = free_port();
        let yaml = format!(
            r#"
routes:
  - {{name: orders.apps.internal, port: {port}, protocol: http, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["{orders}"]}}
  - {{name: billing.apps.internal, port: {port}, protocol: http, home_cluster: diego,
     exported: true, backends: ["{billing}"]}}
"#
        );
        let mesh = Mesh::new();
        let (ingress_addr, ingress) =
            start_ingress(mesh.context("k8s", &routes(&yaml)), ingress_cfg()).await;
        let mut cfg = egress_to(ingress_addr, transport);
        cfg.listen_address = Some("127.0.0.1".parse().unwrap());
        let ctx = mesh.context("diego", &routes(&yaml));
        let running = run_egress(ctx.clone(), cfg).await;
        let shared = at("127.0.0.1", port);
        eventually(|| std::net::TcpStream::connect(shared).is_ok()).await;

        for round in 0..3 {
            for (host, app) in [
                ("orders.apps.internal", "ORDERS:"),
                ("Billing.Apps.Internal", "BILLING:"),
            ] {
                let request = format!("GET /{round} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n");
                let out = within(exchange(shared, request.as_bytes())).await.unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&out),
                    format!("{app}{request}"),
                    "{host} over {transport:?}"
                );
            }
        }
        running.stop().await;
        ingress.stop().await;
    }
}

/// Two routes on one port while one of them moves to k8s and back, under load: every reply
/// comes from an app of the name the call carried, never from the port's other app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_never_reaches_the_other_app_of_its_port_while_a_route_moves() {
    let (orders_k8s, _) = echo_backend("ORDERS-K8S:").await;
    let (orders_diego, _) = echo_backend("ORDERS-DIEGO:").await;
    let (billing, _) = echo_backend("BILLING:").await;
    let port = free_port();
    let billing_route = format!(
        "  - {{name: billing.apps.internal, port: {port}, protocol: http, home_cluster: k8s, \
         exported: true, allowed_peers: [cluster:diego], backends: [\"{billing}\"]}}\n"
    );
    let in_k8s = format!(
        "routes:\n  - {{name: orders.apps.internal, port: {port}, protocol: http, \
         home_cluster: k8s, exported: true, allowed_peers: [cluster:diego], \
         backends: [\"{orders_k8s}\"]}}\n{billing_route}"
    );
    let in_diego = format!(
        "routes:\n  - {{name: orders.apps.internal, port: {port}, protocol: http, \
         home_cluster: diego, exported: true, backends: [\"{orders_diego}\"]}}\n{billing_route}"
    );
    let mesh = Mesh::new();
    let (ingress_addr, ingress) =
        start_ingress(mesh.context("k8s", &routes(&in_k8s)), ingress_cfg()).await;
    let mut cfg = egress_to(ingress_addr, Transport::Tcp);
    cfg.listen_address = Some("127.0.0.1".parse().unwrap());
    let diego = routes(&in_diego);
    let ctx = mesh.context("diego", &diego);
    let running = run_egress(ctx.clone(), cfg).await;
    let shared = at("127.0.0.1", port);
    eventually(|| std::net::TcpStream::connect(shared).is_ok()).await;

    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = Vec::new();
    for (host, apps) in [
        (
            "orders.apps.internal",
            &["ORDERS-K8S:", "ORDERS-DIEGO:"][..],
        ),
        ("billing.apps.internal", &["BILLING:"][..]),
    ] {
        for _ in 0..2 {
            let (done, stop) = (Arc::clone(&done), Arc::clone(&stop));
            callers.push(tokio::spawn(async move {
                let request = format!("GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n");
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let out = within(exchange(shared, request.as_bytes())).await.unwrap();
                    let out = String::from_utf8_lossy(&out).into_owned();
                    assert!(
                        apps.iter().any(|app| out == format!("{app}{request}")),
                        "{host} answered by {out:?}"
                    );
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }));
        }
    }
    // Three moves each way, each after more calls have gone through.
    let moved = routes(&in_k8s).snapshot();
    let home = routes(&in_diego).snapshot();
    for round in 1..=6 {
        eventually(|| done.load(std::sync::atomic::Ordering::Relaxed) >= round * 20).await;
        let table = if round % 2 == 1 { &moved } else { &home };
        diego.replace_all(table.iter().map(|r| (**r).clone()));
    }
    eventually(|| done.load(std::sync::atomic::Ordering::Relaxed) >= 140).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for caller in callers {
        within(caller).await.unwrap();
    }
    running.stop().await;
    ingress.stop().await;
}

/// HTTP by Host and TLS by SNI on one shared port; the peeked bytes arrive intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_sni_routing_on_one_shared_port() {
    let (web, _) = echo_backend("WEB:").await;
    let (tls, _) = echo_backend("TLS:").await;
    let port = free_port();
    let yaml = format!(
        r#"
routes:
  - {{name: web.apps.internal, port: {port}, protocol: http, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["{web}"]}}
  - {{name: tlsapp.apps.internal, port: {port}, protocol: tls, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["{tls}"]}}
"#
    );
    let mesh = Mesh::new();
    let (ingress_addr, ingress) =
        start_ingress(mesh.context("k8s", &routes(&yaml)), ingress_cfg()).await;
    let mut cfg = egress_to(ingress_addr, Transport::Tcp);
    cfg.listen_address = Some("127.0.0.1".parse().unwrap());
    let ctx = mesh.context("diego", &routes(&yaml));
    let running = run_egress(ctx.clone(), cfg).await;
    let shared = at("127.0.0.1", port);
    eventually(|| std::net::TcpStream::connect(shared).is_ok()).await;

    let request = format!("GET / HTTP/1.1\r\nHost: Web.Apps.Internal:{port}\r\n\r\n");
    let out = within(exchange(shared, request.as_bytes())).await.unwrap();
    assert_eq!(out, [b"WEB:".as_slice(), request.as_bytes()].concat());
    let hello = client_hello("tlsapp.apps.internal");
    let out = within(exchange(shared, &hello)).await.unwrap();
    assert_eq!(out, [b"TLS:".as_slice(), &hello].concat());
    // A Host that names no route is refused after the wait for the table, and counted.
    let before = ctx.metrics.refused_total("no_route");
    let nope = format!("GET / HTTP/1.1\r\nHost: nope.apps.internal:{port}\r\n\r\n");
    assert!(refused(shared, nope.as_bytes()).await);
    eventually(|| ctx.metrics.refused_total("no_route") == before + 1).await;

    running.stop().await;
    ingress.stop().await;
}

/// Raw TCP on a shared address names nothing, even on a port that exactly one (remote)
/// route uses: the DNS shim may already answer another name with this address. Refused
/// with the reason, and the route's app never sees the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_on_a_shared_address_without_a_vip_is_refused_with_the_reason() {
    let (raw, _) = echo_backend("RAW:").await;
    let port = free_port();
    let yaml = format!(
        r#"
routes:
  - {{name: raw.apps.internal, port: {port}, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["{raw}"]}}
"#
    );
    let mesh = Mesh::new();
    let (ingress_addr, ingress) =
        start_ingress(mesh.context("k8s", &routes(&yaml)), ingress_cfg()).await;
    let mut cfg = egress_to(ingress_addr, Transport::Tcp);
    cfg.listen_address = Some("127.0.0.1".parse().unwrap());
    let ctx = mesh.context("diego", &routes(&yaml));
    let running = run_egress(ctx.clone(), cfg).await;
    let shared = at("127.0.0.1", port);
    // The probe connects and closes without a byte: refused as unidentified too.
    eventually(|| std::net::TcpStream::connect(shared).is_ok()).await;
    eventually(|| ctx.metrics.refused_total("unidentified") == 1).await;

    assert!(refused(shared, b"\x00\x01binary").await);
    eventually(|| ctx.metrics.refused_total("unidentified") == 2).await;
    assert_eq!(ctx.metrics.refused_total("no_route"), 0);

    running.stop().await;
    ingress.stop().await;
}

/// VIPs on a wildcard listener (VIP traffic routed to the host, as in production): each VIP
/// reaches its own route's app, two raw routes sharing a port included, a local exported one
/// too; an address of the VIP range that no route carries is refused after `route_wait`,
/// and one whose route arrives during the wait is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_via_a_vip_reaches_the_right_app() {
    let (a, _) = echo_backend("A:").await;
    let (b, _) = echo_backend("B:").await;
    let (l, _) = echo_backend("LOCAL:").await;
    let (late, _) = echo_backend("LATE:").await;
    let port = free_port();
    let yaml = format!(
        r#"
routes:
  - {{name: a.apps.internal, port: {port}, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["{a}"]}}
  - {{name: b.apps.internal, port: {port}, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["{b}"]}}
  - {{name: l.apps.internal, port: {port}, home_cluster: diego, exported: true,
     backends: ["{l}"]}}
  - {{name: late.apps.internal, port: {port}, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["{late}"]}}
"#
    );
    let vips = [
        ("a.apps.internal", "127.77.0.1"),
        ("b.apps.internal", "127.77.0.2"),
        ("l.apps.internal", "127.77.0.3"),
        ("late.apps.internal", "127.77.0.4"),
    ];
    let all = with_vips(&yaml, &vips);
    let mesh = Mesh::new();
    let (ingress_addr, ingress) =
        start_ingress(mesh.context("k8s", &routes(&yaml)), ingress_cfg()).await;
    let mut cfg = egress_to(ingress_addr, Transport::Tcp);
    cfg.listen_address = Some("0.0.0.0".parse().unwrap());
    cfg.vip_range = Some("127.77.0.0/16".into());
    cfg.route_wait = HumanDuration::from_millis(300);
    let diego = store_of(
        all.iter()
            .filter(|r| r.key.name.as_str() != "late.apps.internal")
            .cloned()
            .collect(),
    );
    let ctx = mesh.context("diego", &diego);
    let running = run_egress(ctx.clone(), cfg).await;
    eventually(|| std::net::TcpStream::connect(at("127.77.0.1", port)).is_ok()).await;

    for (ip, app) in [
        ("127.77.0.1", "A:"),
        ("127.77.0.2", "B:"),
        ("127.77.0.3", "LOCAL:"),
    ] {
        for _ in 0..2 {
            let out = within(exchange(at(ip, port), b"\x00\x01binary"))
                .await
                .unwrap();
            assert_eq!(out, [app.as_bytes(), b"\x00\x01binary"].concat(), "{ip}");
        }
    }
    // A Host header does not override the VIP: the address names the route.
    let request = format!("GET / HTTP/1.1\r\nHost: b.apps.internal:{port}\r\n\r\n");
    let out = within(exchange(at("127.77.0.1", port), request.as_bytes()))
        .await
        .unwrap();
    assert!(
        out.starts_with(b"A:GET"),
        "{}",
        String::from_utf8_lossy(&out)
    );

    // In the VIP range, no route's VIP: waits, then refused; never peeked for a name.
    assert!(refused(at("127.77.0.200", port), request.as_bytes()).await);
    eventually(|| ctx.metrics.refused_total("unknown_vip") == 1).await;

    // The VIP of a route the egress does not hold yet: the call waits for the table.
    let before = diego.watchers();
    let call = tokio::spawn(exchange(at("127.77.0.4", port), b"early"));
    eventually(|| diego.watchers() > before).await;
    diego.replace_all(all.clone());
    let out = within(call).await.unwrap().unwrap();
    assert_eq!(out, b"LATE:early");

    running.stop().await;
    ingress.stop().await;
}

/// `bind_vips`: one listener per route `vip:port`, local routes included, opened as routes
/// arrive and closed when they leave; each reaches its own route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_vips_listens_on_each_route_vip_and_follows_the_table() {
    let (a, _) = echo_backend("A:").await;
    let (l, _) = echo_backend("LOCAL:").await;
    let (c, _) = echo_backend("C:").await;
    let port = free_port();
    let yaml = format!(
        r#"
routes:
  - {{name: a.apps.internal, port: {port}, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["{a}"]}}
  - {{name: l.apps.internal, port: {port}, home_cluster: diego, exported: true,
     backends: ["{l}"]}}
  - {{name: c.apps.internal, port: {port}, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["{c}"]}}
"#
    );
    let vips = [
        ("a.apps.internal", "127.78.0.1"),
        ("l.apps.internal", "127.78.0.2"),
        ("c.apps.internal", "127.78.0.3"),
    ];
    let all = with_vips(&yaml, &vips);
    let named = |names: &[&str]| -> Vec<Route> {
        all.iter()
            .filter(|r| names.contains(&r.key.name.as_str()))
            .cloned()
            .collect()
    };
    let mesh = Mesh::new();
    let (ingress_addr, ingress) =
        start_ingress(mesh.context("k8s", &routes(&yaml)), ingress_cfg()).await;
    let mut cfg = egress_to(ingress_addr, Transport::Tcp);
    cfg.bind_vips = true;
    let diego = store_of(named(&["a.apps.internal", "l.apps.internal"]));
    let ctx = mesh.context("diego", &diego);
    let running = run_egress(ctx.clone(), cfg).await;
    let open = |ip: &str| std::net::TcpStream::connect(at(ip, port)).is_ok();
    eventually(|| open("127.78.0.1") && open("127.78.0.2")).await;
    assert!(!open("127.78.0.3"), "no route has this VIP yet");

    let out = within(exchange(at("127.78.0.1", port), b"x"))
        .await
        .unwrap();
    assert_eq!(out, b"A:x");
    let out = within(exchange(at("127.78.0.2", port), b"y"))
        .await
        .unwrap();
    assert_eq!(out, b"LOCAL:y");

    // a leaves, c arrives: a's listener closes, c's opens.
    diego.replace_all(named(&["l.apps.internal", "c.apps.internal"]));
    eventually(|| !open("127.78.0.1") && open("127.78.0.3")).await;
    let out = within(exchange(at("127.78.0.3", port), b"z"))
        .await
        .unwrap();
    assert_eq!(out, b"C:z");

    running.stop().await;
    ingress.stop().await;
}

/// The own-cluster path (a route homed here, reached through the egress while it comes
/// home) serves exported routes from their local app and refuses unexported ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_own_cluster_path_reaches_only_exported_routes() {
    let (open_app, _) = echo_backend("OPEN:").await;
    let (hidden_app, _) = echo_backend("HIDDEN:").await;
    let port = free_port();
    let yaml = format!(
        r#"
routes:
  - {{name: open.apps.internal, port: {port}, protocol: http, home_cluster: diego,
     exported: true, backends: ["{open_app}"]}}
  - {{name: hidden.apps.internal, port: {port}, protocol: http, home_cluster: diego,
     backends: ["{hidden_app}"]}}
"#
    );
    let mesh = Mesh::new();
    let mut cfg = egress_to(dead_port().await, Transport::Tcp);
    cfg.listen_address = Some("127.0.0.1".parse().unwrap());
    cfg.route_wait = HumanDuration::from_millis(200);
    let ctx = mesh.context("diego", &routes(&yaml));
    let running = run_egress(ctx.clone(), cfg).await;
    let shared = at("127.0.0.1", port);
    eventually(|| std::net::TcpStream::connect(shared).is_ok()).await;

    let request = format!("GET / HTTP/1.1\r\nHost: open.apps.internal:{port}\r\n\r\n");
    let out = within(exchange(shared, request.as_bytes())).await.unwrap();
    assert_eq!(out, [b"OPEN:".as_slice(), request.as_bytes()].concat());

    let request = format!("GET / HTTP/1.1\r\nHost: hidden.apps.internal:{port}\r\n\r\n");
    assert!(refused(shared, request.as_bytes()).await);
    eventually(|| ctx.metrics.refused_total("not_exported") == 1).await;

    running.stop().await;
}

/// The own-cluster path breaks the way a tunnel does: a local backend that resets mid-stream
/// reaches the app as a reset, never as a clean end that would pass for a complete reply.
#[tokio::test]
async fn a_backend_reset_on_the_own_cluster_path_reaches_the_app_as_a_reset() {
    // A backend that reads the request, sends half a reply, then resets.
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nhalf of a bo").await;
                let _ = s.set_zero_linger();
            });
        }
    });
    let port = free_port();
    let yaml = format!(
        "routes:\n  - {{name: open.apps.internal, port: {port}, protocol: http, \
         home_cluster: diego, exported: true, backends: [\"{backend_addr}\"]}}\n"
    );
    let mesh = Mesh::new();
    let mut cfg = egress_to(dead_port().await, Transport::Tcp);
    cfg.listen_address = Some("127.0.0.1".parse().unwrap());
    let ctx = mesh.context("diego", &routes(&yaml));
    let running = run_egress(ctx.clone(), cfg).await;
    let shared = at("127.0.0.1", port);
    eventually(|| std::net::TcpStream::connect(shared).is_ok()).await;

    let mut s = TcpStream::connect(shared).await.unwrap();
    let request = format!("GET / HTTP/1.0\r\nHost: open.apps.internal:{port}\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let end = within(async {
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    let e = end.expect_err("the app saw a clean end of a reply its backend broke off");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    running.stop().await;
}

#[tokio::test]
async fn slow_clients_cannot_hold_a_shared_port_open() {
    let mesh = Mesh::new();
    let port = free_port();
    let yaml = format!(
        "routes:\n  - {{name: web.apps.internal, port: {port}, protocol: http, home_cluster: k8s}}\n  \
         - {{name: www.apps.internal, port: {port}, protocol: http, home_cluster: k8s}}\n"
    );
    let mut cfg = egress_to(dead_port().await, Transport::Tcp);
    cfg.listen_address = Some("127.0.0.1".parse().unwrap());
    cfg.peek_timeout = HumanDuration::from_millis(200);
    let ctx = mesh.context("diego", &routes(&yaml));
    let running = run_egress(ctx.clone(), cfg).await;
    let shared = at("127.0.0.1", port);
    eventually(|| std::net::TcpStream::connect(shared).is_ok()).await;
    // Half a request line, then silence: the egress gives up after the peek timeout.
    let mut s = TcpStream::connect(shared).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    let mut buf = Vec::new();
    let r = within(s.read_to_end(&mut buf)).await;
    assert!(r.is_err() || buf.is_empty());
    eventually(|| ctx.metrics.refused_total("peek_timeout") == 1).await;
    running.stop().await;
}

/// A route moving away: its port is open while it is still local, and a connection that
/// arrives a moment before the egress's table has moved waits for it instead of failing.
/// Moving back: a connection that still reaches the egress is served locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_moving_away_finds_its_port_open_and_waits_for_the_table() {
    let (web, _) = echo_backend("K8S:").await;
    let port = free_port();
    let remote = format!(
        r#"
routes:
  - {{name: orders.apps.internal, port: {port}, protocol: http, home_cluster: k8s,
     exported: true, allowed_peers: [cluster:diego], backends: ["{web}"]}}
"#
    );
    let local = format!(
        "routes:\n  - {{name: orders.apps.internal, port: {port}, protocol: http, home_cluster: diego}}\n"
    );
    let mesh = Mesh::new();
    let (ingress_addr, ingress) =
        start_ingress(mesh.context("k8s", &routes(&remote)), ingress_cfg()).await;
    let mut cfg = EgressConfig::with_peers(vec![PeerConfig {
        cluster: "k8s".into(),
        endpoints: vec![ingress_addr],
        transport: Transport::Tcp,
        fallback_to_tcp: false,
    }]);
    cfg.listen_address = Some("127.0.0.1".parse().unwrap());
    let diego_routes = routes(&local);
    let ctx = mesh.context("diego", &diego_routes);
    let egress = isthmus_gateway::egress::Egress::bind(ctx.clone(), cfg)
        .await
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let force = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(egress.run(shutdown.clone(), force.clone()));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Only a local route uses the port, and it is open already.
    eventually(|| std::net::TcpStream::connect(addr).is_ok()).await;

    // The app's request arrives while orders is still local here; the table moves a moment
    // later; the request goes through.
    let request = format!("GET / HTTP/1.1\r\nHost: orders.apps.internal:{port}\r\n\r\n");
    let before = diego_routes.watchers();
    let call = tokio::spawn(async move { exchange(addr, request.as_bytes()).await });
    // The request has reached the egress and waits for the table: it watches it.
    eventually(|| diego_routes.watchers() > before).await;
    let moved = routes(&remote);
    diego_routes.replace_all(moved.snapshot().iter().map(|r| (**r).clone()));
    let out = within(call).await.unwrap().unwrap();
    assert!(out.starts_with(b"K8S:GET / HTTP/1.1"), "{out:?}");
    assert_eq!(ctx.metrics.refused_total("local_route"), 0);

    // The route comes home (rollback) while apps still hold the egress's address: their
    // connections are served by the local backends, not refused.
    let (home, _) = echo_backend("DIEGO:").await;
    let back = routes(&format!(
        "routes:\n  - {{name: orders.apps.internal, port: {port}, protocol: http, \
         home_cluster: diego, exported: true, backends: [\"{home}\"]}}\n"
    ));
    diego_routes.replace_all(back.snapshot().iter().map(|r| (**r).clone()));
    let request = format!("GET / HTTP/1.1\r\nHost: orders.apps.internal:{port}\r\n\r\n");
    let out = within(exchange(addr, request.as_bytes())).await.unwrap();
    assert!(out.starts_with(b"DIEGO:GET / HTTP/1.1"), "{out:?}");
    assert_eq!(ctx.metrics.refused_total("local_route"), 0);

    shutdown.cancel();
    force.cancel();
    within(task).await.unwrap();
    ingress.stop().await;
}
