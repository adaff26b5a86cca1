//! Every refusal of the ingress and egress: answered with its own status, counted, and
//! harmless to the other streams of the same tunnel connection. Both transports.

mod common;

use common::*;
use http::Method;
use isthmus_gateway::metrics::{ConnLabels, Direction};

struct World {
    mesh: Mesh,
    ingress_addr: std::net::SocketAddr,
    echo: std::net::SocketAddr,
    ctx: isthmus_gateway::Context,
    ingress: Running,
}

async fn world() -> World {
    let (echo, _) = echo_backend("").await;
    let mesh = Mesh::new();
    let ctx = mesh.context("k8s", &world_routes(echo, dead_port().await));
    let (ingress_addr, ingress) = start_ingress(ctx.clone(), ingress_cfg()).await;
    World {
        mesh,
        ingress_addr,
        echo,
        ctx,
        ingress,
    }
}

fn opened(ctx: &isthmus_gateway::Context) -> u64 {
    ctx.metrics
        .opened
        .get_or_create(&ConnLabels {
            route: "orders.apps.internal:8080".into(),
            direction: Direction::Ingress,
            peer_cluster: "diego".into(),
        })
        .get()
}

fn open_proxy_targets(echo: std::net::SocketAddr) -> Vec<String> {
    vec![
        echo.to_string(),
        format!("localhost:{}", echo.port()),
        format!("[::1]:{}", echo.port()),
        "169.254.169.254:80".into(),
        "orders.apps.internal".into(),
    ]
}

#[tokio::test]
async fn h2_refusals_have_their_own_status_and_do_not_disturb_other_streams() {
    let w = world().await;
    let diego = w.mesh.tls("diego", "gateway");
    let mut client = within(RawH2::connect(w.ingress_addr, &diego, "k8s"))
        .await
        .unwrap();

    // A good stream stays open through every refusal below.
    let (status, mut send, mut recv) =
        within(client.request(Method::CONNECT, "orders.apps.internal:8080")).await;
    assert_eq!(status, 200);
    assert_eq!(
        within(h2_echo(&mut send, &mut recv, b"before")).await,
        b"before"
    );

    for target in open_proxy_targets(w.echo) {
        let (status, _, _) = within(client.request(Method::CONNECT, &target)).await;
        assert_eq!(status, 400, "open-proxy attempt {target}");
    }
    let (status, _, _) =
        within(client.request(Method::GET, "https://orders.apps.internal:8080/")).await;
    assert_eq!(status, 400, "not CONNECT");
    for (target, want) in [
        ("secret.apps.internal:8080", 404),  // not exported
        ("nothing.apps.internal:8080", 404), // unknown
        ("orders.apps.internal:9999", 404),  // wrong port
        ("private.apps.internal:8080", 401), // exported, but not to diego
        ("down.apps.internal:8080", 503),    // exported, backend down
    ] {
        let (status, _, _) = within(client.request(Method::CONNECT, target)).await;
        assert_eq!(status, want, "{target}");
    }

    assert_eq!(
        within(h2_echo(&mut send, &mut recv, b"after")).await,
        b"after"
    );
    let m = &w.ctx.metrics;
    assert_eq!(m.refused_total("bad_request"), 6);
    assert_eq!(m.refused_total("not_exported"), 3);
    assert_eq!(m.refused_total("denied"), 1);
    assert_eq!(m.failed_total("backend_unreachable"), 1);
    assert_eq!(opened(&w.ctx), 1, "only the good stream reached a backend");
    w.ingress.stop().await;
}

#[tokio::test]
async fn quic_refusals_have_their_own_status_and_do_not_disturb_other_streams() {
    let w = world().await;
    let diego = w.mesh.tls("diego", "gateway");
    let client = within(RawQuic::connect(w.ingress_addr, &diego, "k8s"))
        .await
        .unwrap();
    let (status, mut send, mut recv) =
        within(client.connect_route("orders.apps.internal:8080")).await;
    assert_eq!(status, 200);
    assert_eq!(
        within(quic_echo(&mut send, &mut recv, b"before")).await,
        b"before"
    );

    for target in open_proxy_targets(w.echo) {
        let (status, _, _) = within(client.connect_route(&target)).await;
        assert_eq!(status, 400, "open-proxy attempt {target}");
    }
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"CONNECT orders.apps.internal:8080 HTTP/1.1\r\n\r\n",
        b"CONNECT orders.apps.internal:8080 ISTHMUS/1\r\nbad header\r\n\r\n",
        b"\x00\x01\x02\r\n\r\n",
    ] {
        let (status, _, _) = within(client.raw_request(garbage)).await;
        assert_eq!(status, 400, "{:?}", String::from_utf8_lossy(garbage));
    }
    for (target, want) in [
        ("secret.apps.internal:8080", 404),
        ("private.apps.internal:8080", 401),
        ("down.apps.internal:8080", 503),
    ] {
        let (status, _, _) = within(client.connect_route(target)).await;
        assert_eq!(status, want, "{target}");
    }
    assert_eq!(
        within(quic_echo(&mut send, &mut recv, b"after")).await,
        b"after"
    );
    let m = &w.ctx.metrics;
    assert_eq!(m.refused_total("bad_request"), 9);
    assert_eq!(m.refused_total("not_exported"), 1);
    assert_eq!(m.refused_total("denied"), 1);
    assert_eq!(opened(&w.ctx), 1);
    w.ingress.stop().await;
}

#[tokio::test]
async fn an_allowed_identity_gets_what_another_is_denied() {
    let w = world().await;
    let billing = w.mesh.tls("billing", "gateway");
    let mut client = within(RawH2::connect(w.ingress_addr, &billing, "k8s"))
        .await
        .unwrap();
    let (status, mut send, mut recv) =
        within(client.request(Method::CONNECT, "private.apps.internal:8080")).await;
    assert_eq!(status, 200);
    assert_eq!(within(h2_echo(&mut send, &mut recv, b"ok")).await, b"ok");
    let (status, _, _) = within(client.request(Method::CONNECT, "orders.apps.internal:8080")).await;
    assert_eq!(status, 401, "orders allows cluster:diego only");
    w.ingress.stop().await;
}

/// The status the ingress at `addr` answers a CONNECT for orders from `tls` over h2, or
/// `None` when it refuses the connection (at the handshake, or on the first request: TLS 1.3
/// reports a refused client certificate on the first read).
async fn h2_admits(addr: std::net::SocketAddr, tls: &isthmus_certs::MeshTls) -> Option<u16> {
    let client = within(RawH2::connect(addr, tls, "k8s")).await.ok()?;
    let mut ready = within(client.send.clone().ready()).await.ok()?;
    let req = http::Request::builder()
        .method(Method::CONNECT)
        .uri("orders.apps.internal:8080")
        .body(())
        .unwrap();
    let (resp, _) = ready.send_request(req, false).ok()?;
    let status = within(resp).await.ok()?.status().as_u16();
    drop(client);
    Some(status)
}

/// As [`h2_admits`], over QUIC; a refused client certificate may only show as the
/// connection closing after the client's side of the handshake finished.
async fn quic_admits(addr: std::net::SocketAddr, tls: &isthmus_certs::MeshTls) -> Option<u16> {
    let client = within(RawQuic::connect(addr, tls, "k8s")).await.ok()?;
    let (mut send, mut recv) = within(client.conn.open_bi()).await.ok()?;
    within(send.write_all(b"CONNECT orders.apps.internal:8080 ISTHMUS/1\r\n\r\n"))
        .await
        .ok()?;
    let mut buf = Vec::new();
    loop {
        if let Ok(isthmus_gateway::frame::Parsed::Complete { head, .. }) =
            isthmus_gateway::frame::parse_response(&buf)
        {
            return Some(head.status);
        }
        let chunk = within(recv.read_chunk(1024, true)).await.ok()??;
        buf.extend_from_slice(&chunk.bytes);
    }
}

#[tokio::test]
async fn an_ingress_admits_only_gateways_unless_configured() {
    let w = world().await;
    for component in ["dns-shim", "route-sync"] {
        let caller = w.mesh.tls("diego", component);
        assert_eq!(
            h2_admits(w.ingress_addr, &caller).await,
            None,
            "diego's {component} must not open a tunnel connection"
        );
        assert_eq!(
            quic_admits(w.ingress_addr, &caller).await,
            None,
            "diego's {component} must not open a QUIC tunnel connection"
        );
    }
    assert_eq!(opened(&w.ctx), 0);
    // diego's gateway is admitted, and the route's allowed_peers decide.
    let gateway = w.mesh.tls("diego", "gateway");
    assert_eq!(h2_admits(w.ingress_addr, &gateway).await, Some(200));
    assert_eq!(quic_admits(w.ingress_addr, &gateway).await, Some(200));
    w.ingress.stop().await;

    // A caller component added in the config is admitted at the handshake.
    let mut cfg = ingress_cfg();
    cfg.allowed_callers = vec![
        "gateway".to_owned().try_into().unwrap(),
        "dns-shim".to_owned().try_into().unwrap(),
    ];
    let (addr, ingress) = start_ingress(w.ctx.clone(), cfg).await;
    assert_eq!(
        h2_admits(addr, &w.mesh.tls("diego", "dns-shim")).await,
        Some(200)
    );
    assert_eq!(
        h2_admits(addr, &w.mesh.tls("diego", "route-sync")).await,
        None
    );
    ingress.stop().await;
}

#[test]
fn allowed_callers_are_parsed_and_validated() {
    use isthmus_gateway::config::GatewayConfig;
    use isthmus_runtime::config::{ConfigError, from_str};
    let file = std::path::Path::new("gateway.yaml");
    let head = "cluster: k8s\ntrust_domain: mesh.local\n\
                tls: {cert: c.pem, key: k.pem, bundle: b.pem}\nroutes: {file: r.yaml}\n";
    let cfg: GatewayConfig = from_str(&format!("{head}ingress: {{}}\n"), file).unwrap();
    let policy = cfg.ingress.unwrap().caller_policy("mesh.local");
    assert_eq!(
        policy.to_string(),
        "[component gateway of any cluster (spiffe://mesh.local/cluster/*/gateway)]"
    );
    let cfg: GatewayConfig = from_str(
        &format!("{head}ingress: {{allowed_callers: [gateway, operator]}}\n"),
        file,
    )
    .unwrap();
    assert_eq!(cfg.ingress.unwrap().allowed_callers.len(), 2);

    let err = from_str::<GatewayConfig>(
        &format!("{head}ingress: {{allowed_callers: [\"a/b\"]}}\n"),
        file,
    )
    .unwrap_err();
    assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("ingress.allowed_callers"), "{text}");
    assert!(text.contains("not a component name"), "{text}");

    let err = from_str::<GatewayConfig>(&format!("{head}ingress: {{allowed_callers: []}}\n"), file)
        .unwrap_err();
    assert!(
        matches!(&err, ConfigError::Invalid { field, .. } if field == "ingress.allowed_callers"),
        "{err}"
    );
    assert!(err.to_string().contains("admits nobody"), "{err}");
}

#[tokio::test]
async fn handshakes_from_outside_the_mesh_are_refused_and_counted() {
    let w = world().await;
    // Another CA entirely: its leaf does not chain to the ingress' bundle.
    let stranger = Mesh::new().tls("diego", "gateway");
    assert!(
        within(RawH2::connect(w.ingress_addr, &stranger, "k8s"))
            .await
            .is_err()
            || {
                // TLS 1.3 reports a refused client certificate on the first read, not the handshake.
                let c = RawH2::connect(w.ingress_addr, &stranger, "k8s")
                    .await
                    .unwrap();
                let ready = c.send.clone().ready().await;
                ready.is_err() || {
                    let req = http::Request::builder()
                        .method(Method::CONNECT)
                        .uri("orders.apps.internal:8080")
                        .body(())
                        .unwrap();
                    let (resp, _) = ready.unwrap().send_request(req, false).unwrap();
                    resp.await.is_err()
                }
            }
    );
    assert!(
        within(RawQuic::connect(w.ingress_addr, &stranger, "k8s"))
            .await
            .is_err()
    );
    let m = &w.ctx.metrics;
    eventually(|| {
        let mut text = String::new();
        let mut reg = prometheus_client::registry::Registry::default();
        m.register(&mut reg);
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        text.lines()
            .filter(|l| {
                l.starts_with("isthmus_gateway_handshake_failures_total{")
                    && l.contains("role=\"ingress\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
            >= 2
    })
    .await;
    assert_eq!(opened(&w.ctx), 0);
    w.ingress.stop().await;
}

#[tokio::test]
async fn egress_refuses_a_dns_shim_posing_as_the_home_clusters_ingress() {
    // A stolen k8s DNS-shim certificate serves the k8s peer endpoint: same cluster, same
    // CA, but not a gateway. The egress must not send app bytes to it.
    let (echo, _) = echo_backend("").await;
    let mesh = Mesh::new();
    let store = world_routes(echo, dead_port().await);
    let impostor = isthmus_gateway::Context {
        tls: mesh.tls("k8s", "dns-shim"),
        ..mesh.context("k8s", &store)
    };
    let (addr, ingress) = start_ingress(impostor.clone(), ingress_cfg()).await;
    let ctx = mesh.context("diego", &store);
    let (entry, egress) = start_egress(
        ctx.clone(),
        egress_cfg(
            "orders.apps.internal:8080",
            vec![addr],
            isthmus_gateway::config::Transport::Tcp,
        ),
    )
    .await;
    let r = within(round_trip(entry, b"secret")).await;
    assert!(r.is_err() || r.unwrap().is_empty());
    eventually(|| ctx.metrics.failed_total("peer_unreachable") == 1).await;
    assert_eq!(opened(&impostor), 0, "no stream reached the impostor");
    egress.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn egress_refuses_an_ingress_that_is_not_the_home_cluster() {
    // The "k8s" peer endpoint is served by a gateway with a diego identity: the egress
    // must not send app traffic to it.
    let (echo, _) = echo_backend("").await;
    let mesh = Mesh::new();
    let store = world_routes(echo, dead_port().await);
    let impostor = mesh.context("diego", &store);
    let (addr, ingress) = start_ingress(impostor, ingress_cfg()).await;
    let ctx = mesh.context("diego", &store);
    let (entry, egress) = start_egress(
        ctx.clone(),
        egress_cfg(
            "orders.apps.internal:8080",
            vec![addr],
            isthmus_gateway::config::Transport::Tcp,
        ),
    )
    .await;
    let r = within(round_trip(entry, b"secret")).await;
    assert!(r.is_err() || r.unwrap().is_empty());
    eventually(|| ctx.metrics.failed_total("peer_unreachable") == 1).await;
    egress.stop().await;
    ingress.stop().await;
}

fn handshake_failures(ctx: &isthmus_gateway::Context, reason: &'static str) -> i64 {
    ctx.metrics
        .handshake_failures
        .get_or_create(&isthmus_gateway::metrics::HandshakeLabels {
            role: "ingress",
            reason,
        })
        .get() as i64
}

#[tokio::test]
async fn handshakes_beyond_the_cap_are_refused_and_counted() {
    let (echo, _) = echo_backend("").await;
    let mesh = Mesh::new();
    let ctx = mesh.context("k8s", &world_routes(echo, dead_port().await));
    let mut cfg = ingress_cfg();
    cfg.max_handshakes = 2;
    cfg.handshake_timeout = isthmus_runtime::config::HumanDuration::from_secs(60);
    let (addr, ingress) = start_ingress(ctx.clone(), cfg).await;
    let caller = mesh.tls("diego", "gateway");

    // Two connections that never say hello hold both handshake slots.
    let stallers = [
        within(tokio::net::TcpStream::connect(addr)).await.unwrap(),
        within(tokio::net::TcpStream::connect(addr)).await.unwrap(),
    ];
    // A real caller is refused on either transport, and each refusal is counted.
    assert!(within(RawH2::connect(addr, &caller, "k8s")).await.is_err());
    assert!(
        within(RawQuic::connect(addr, &caller, "k8s"))
            .await
            .is_err()
    );
    eventually(|| handshake_failures(&ctx, "handshake_limit") >= 2).await;

    // Once the slow ones go, callers get in again.
    drop(stallers);
    eventually(|| handshake_failures(&ctx, "eof") >= 2).await;
    let mut client = within(RawH2::connect(addr, &caller, "k8s")).await.unwrap();
    let (status, mut send, mut recv) =
        within(client.request(Method::CONNECT, "orders.apps.internal:8080")).await;
    assert_eq!(status, 200);
    assert_eq!(within(h2_echo(&mut send, &mut recv, b"in")).await, b"in");
    assert!(within(RawQuic::connect(addr, &caller, "k8s")).await.is_ok());
    ingress.stop().await;
}
