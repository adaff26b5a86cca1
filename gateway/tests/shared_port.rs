//! One shared egress port carrying several routes: recognised by the HTTP Host header, the
//! TLS SNI, or the VIP the connection arrived on; peeked bytes are replayed to the backend.

mod common;

use std::sync::Arc;

use common::*;
use isthmus_gateway::config::{EgressConfig, PeerConfig, Transport};
use isthmus_route_sync::vip::{VipMap, VipRange};
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

async fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_sni_and_vip_routing_on_one_shared_port() {
    for transport in [Transport::Tcp, Transport::Quic] {
        let (web, _) = echo_backend("WEB:").await;
        let (tls, _) = echo_backend("TLS:").await;
        let (raw, _) = echo_backend("RAW:").await;
        let port = free_port();
        let yaml = format!(
            r#"
routes:
  - {{name: web.apps.internal, port: {port}, protocol: http, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["{web}"]}}
  - {{name: tlsapp.apps.internal, port: {port}, protocol: tls, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["{tls}"]}}
  - {{name: raw.apps.internal, port: {port}, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["{raw}"]}}
"#
        );
        let mesh = Mesh::new();
        let (ingress_addr, ingress) =
            start_ingress(mesh.context("k8s", &routes(&yaml)), ingress_cfg()).await;
        let mut cfg = EgressConfig::with_peers(vec![PeerConfig {
            cluster: "k8s".into(),
            endpoints: vec![ingress_addr],
            transport,
            fallback_to_tcp: false,
        }]);
        cfg.listen_address = Some("0.0.0.0".parse().unwrap());
        cfg.vip_range = Some("127.77.0.0/16".into());
        let ctx = mesh.context("diego", &routes(&yaml));
        let egress = isthmus_gateway::egress::Egress::bind(ctx.clone(), cfg)
            .await
            .unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let force = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(egress.run(shutdown.clone(), force.clone()));
        let shared: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        eventually(|| std::net::TcpStream::connect(shared).is_ok()).await;
        eventually(|| ctx.metrics.refused_total("no_route") == 1).await;

        // HTTP/1.1 by Host header: the request arrives intact, Host and all.
        let request = format!("GET / HTTP/1.1\r\nHost: Web.Apps.Internal:{port}\r\n\r\n");
        let out = within(exchange(shared, request.as_bytes())).await.unwrap();
        assert_eq!(out, [b"WEB:".as_slice(), request.as_bytes()].concat());

        // TLS by SNI: the ClientHello arrives intact.
        let hello = client_hello("tlsapp.apps.internal");
        let out = within(exchange(shared, &hello)).await.unwrap();
        assert_eq!(out, [b"TLS:".as_slice(), &hello].concat());

        // Opaque TCP by VIP: the address the DNS shim hands out for the name.
        let range = VipRange::parse("127.77.0.0/16").unwrap();
        let map = VipMap::allocate(
            &range,
            [
                "web.apps.internal",
                "tlsapp.apps.internal",
                "raw.apps.internal",
            ],
        )
        .unwrap();
        let vip = map.ip_of("raw.apps.internal").unwrap();
        let out = within(exchange((vip, port).into(), b"\x00\x01binary"))
            .await
            .unwrap();
        assert_eq!(out, b"RAW:\x00\x01binary");

        // A Host that names no route, and a VIP that names none, are refused and counted.
        let r = within(exchange(
            shared,
            format!("GET / HTTP/1.1\r\nHost: nope.apps.internal:{port}\r\n\r\n").as_bytes(),
        ))
        .await;
        assert!(r.is_err() || r.unwrap().is_empty());
        let unused = (1..=250u8)
            .map(|i| std::net::IpAddr::from([127, 77, 200, i]))
            .find(|ip| map.name_of(*ip).is_none())
            .unwrap();
        let r = within(exchange((unused, port).into(), b"x")).await;
        assert!(r.is_err() || r.unwrap().is_empty());
        // Neither HTTP nor TLS on a non-VIP address: nothing to route by.
        let r = within(exchange(shared, b"\x00\x00\x00\x00\r\n\r\n")).await;
        assert!(r.is_err() || r.unwrap().is_empty());
        // Three, plus the readiness probe above, which connected and closed without a byte.
        eventually(|| ctx.metrics.refused_total("no_route") == 4).await;

        shutdown.cancel();
        force.cancel();
        within(task).await.unwrap();
        ingress.stop().await;
    }
}

#[tokio::test]
async fn slow_clients_cannot_hold_a_shared_port_open() {
    let mesh = Mesh::new();
    let port = free_port();
    // Two routes on the port, so the egress must peek to tell them apart.
    let yaml = format!(
        "routes:\n  - {{name: web.apps.internal, port: {port}, protocol: http, home_cluster: k8s}}\n  \
         - {{name: www.apps.internal, port: {port}, protocol: http, home_cluster: k8s}}\n"
    );
    let mut cfg = EgressConfig::with_peers(vec![PeerConfig {
        cluster: "k8s".into(),
        endpoints: vec![dead_port().await],
        transport: Transport::Tcp,
        fallback_to_tcp: false,
    }]);
    cfg.listen_address = Some("127.0.0.1".parse().unwrap());
    cfg.peek_timeout = isthmus_runtime::config::HumanDuration::from_millis(200);
    let ctx = mesh.context("diego", &routes(&yaml));
    let (_, running) = {
        let egress = isthmus_gateway::egress::Egress::bind(ctx.clone(), cfg)
            .await
            .unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let force = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(egress.run(shutdown.clone(), force.clone()));
        (
            (),
            Running {
                shutdown,
                force,
                task,
            },
        )
    };
    let shared: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    eventually(|| std::net::TcpStream::connect(shared).is_ok()).await;
    // Half a request line, then silence: the egress gives up after the peek timeout.
    let mut s = TcpStream::connect(shared).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    let mut buf = Vec::new();
    let r = within(s.read_to_end(&mut buf)).await;
    assert!(r.is_err() || buf.is_empty());
    eventually(|| ctx.metrics.refused_total("no_route") >= 1).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_one_remote_route_uses_needs_no_host_or_sni() {
    let (raw, _) = echo_backend("RAW:").await;
    let (web, _) = echo_backend("WEB:").await;
    let sole = free_port();
    let busy = free_port();
    let yaml = format!(
        r#"
routes:
  - {{name: raw.apps.internal, port: {sole}, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["{raw}"]}}
  - {{name: web.apps.internal, port: {busy}, protocol: http, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["{web}"]}}
  - {{name: www.apps.internal, port: {busy}, protocol: http, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["{web}"]}}
  - {{name: home.apps.internal, port: {busy}, home_cluster: diego}}
"#
    );
    let mesh = Mesh::new();
    let (ingress_addr, ingress) =
        start_ingress(mesh.context("k8s", &routes(&yaml)), ingress_cfg()).await;
    let mut cfg = EgressConfig::with_peers(vec![PeerConfig {
        cluster: "k8s".into(),
        endpoints: vec![ingress_addr],
        transport: Transport::Tcp,
        fallback_to_tcp: false,
    }]);
    cfg.listen_address = Some("127.0.0.1".parse().unwrap());
    let ctx = mesh.context("diego", &routes(&yaml));
    let egress = isthmus_gateway::egress::Egress::bind(ctx.clone(), cfg)
        .await
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let force = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(egress.run(shutdown.clone(), force.clone()));
    let sole_addr: std::net::SocketAddr = format!("127.0.0.1:{sole}").parse().unwrap();
    let busy_addr: std::net::SocketAddr = format!("127.0.0.1:{busy}").parse().unwrap();
    eventually(|| std::net::TcpStream::connect(busy_addr).is_ok()).await;
    eventually(|| std::net::TcpStream::connect(sole_addr).is_ok()).await;

    // Opaque bytes on the port only raw.apps.internal uses: straight through.
    let out = within(exchange(sole_addr, b"\x00\x01binary"))
        .await
        .unwrap();
    assert_eq!(out, b"RAW:\x00\x01binary");
    // Two remote routes share the other port (the local one does not count): opaque bytes
    // name neither and are refused, a Host header still picks one.
    let r = within(exchange(busy_addr, b"\x00\x00\x00\x00\r\n\r\n")).await;
    assert!(r.is_err() || r.unwrap().is_empty());
    let request = format!("GET / HTTP/1.1\r\nHost: www.apps.internal:{busy}\r\n\r\n");
    let out = within(exchange(busy_addr, request.as_bytes()))
        .await
        .unwrap();
    assert_eq!(out, [b"WEB:".as_slice(), request.as_bytes()].concat());

    shutdown.cancel();
    force.cancel();
    within(task).await.unwrap();
    ingress.stop().await;
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
