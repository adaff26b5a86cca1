//! Failover that does not fail calls: an ingress that cannot answer for its table (not
//! loaded yet, or draining) says so with a retryable refusal, and the egress carries the
//! call through another ingress of the cluster; a final answer from a loaded table stays
//! final. Drains of the ingress and of the egress, each on its own.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use isthmus_gateway::config::{
    AdminConfig, GatewayConfig, IngressConfig, RouteSyncSourceConfig, RoutesConfig, Transport,
};
use isthmus_gateway::server::Gateway;
use isthmus_runtime::config::{HumanDuration, TlsConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// A whole k8s gateway (ingress only) whose route-sync never answers and that has no
/// cache: its table is never loaded. Returns its ingress address and its health.
async fn unloaded_gateway(
    mesh: &Mesh,
    dir: &std::path::Path,
) -> (
    SocketAddr,
    isthmus_runtime::admin::Health,
    CancellationToken,
) {
    let leaf = mesh
        .ca
        .issue(&isthmus_certs::ca::LeafSpec::new(
            "k8s",
            "gateway",
            Duration::from_secs(3600),
        ))
        .unwrap();
    leaf.write(dir, &mesh.ca.cert_pem()).unwrap();
    let cfg = GatewayConfig {
        cluster: "k8s".into(),
        trust_domain: TD.into(),
        tls: TlsConfig {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            bundle: dir.join("ca.pem"),
            reload_interval: HumanDuration::from_secs(60),
        },
        routes: RoutesConfig {
            file: None,
            poll_interval: HumanDuration::from_millis(500),
            route_sync: Some(RouteSyncSourceConfig {
                endpoints: vec![dead_port().await],
                cache: None,
            }),
        },
        admin: AdminConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
        },
        drain_timeout: HumanDuration::from_secs(5),
        ingress: Some(IngressConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..IngressConfig::default()
        }),
        egress: None,
    };
    let gateway = Gateway::build(&cfg).await.unwrap();
    let addr = gateway.ingress.as_ref().unwrap().local_addr().unwrap();
    let health = gateway.health.clone();
    let shutdown = CancellationToken::new();
    tokio::spawn(gateway.run(shutdown.clone()));
    (addr, health, shutdown)
}

async fn unloaded_first_endpoint(transport: Transport) {
    let (echo, _) = echo_backend("").await;
    let dead = dead_port().await;
    let mesh = Mesh::new();
    let dir = tempfile::tempdir().unwrap();
    let (unloaded, health, unloaded_stop) = unloaded_gateway(&mesh, dir.path()).await;
    let loaded_ctx = mesh.context("k8s", &world_routes(echo, dead));
    let (loaded, ingress) = start_ingress(loaded_ctx.clone(), ingress_cfg()).await;
    let egress_ctx = mesh.context("diego", &world_routes(echo, dead));
    let (addr, egress) = start_egress(
        egress_ctx.clone(),
        egress_cfg(
            "orders.apps.internal:8080",
            vec![unloaded, loaded],
            transport,
        ),
    )
    .await;
    // The first call tries the unloaded ingress first (the pool starts at endpoint 0).
    for i in 0..10 {
        let msg = format!("call {i}");
        let out = within(round_trip(addr, msg.as_bytes())).await.unwrap();
        assert_eq!(out, msg.as_bytes());
    }
    assert!(
        egress_ctx.metrics.attempts_refused_total("not_ready") >= 1,
        "the unloaded ingress's refusal is counted with its reason"
    );
    assert_eq!(egress_ctx.metrics.refused_total("remote_not_exported"), 0);
    assert!(!health.is_ready(), "an unloaded gateway is not ready");
    assert_eq!(
        health.not_ready_reason().as_deref(),
        Some("waiting for route-sync")
    );
    egress.stop().await;
    ingress.stop().await;
    unloaded_stop.cancel();
}

#[tokio::test]
async fn an_ingress_without_its_table_sends_calls_to_the_next_tcp() {
    unloaded_first_endpoint(Transport::Tcp).await;
}

#[tokio::test]
async fn an_ingress_without_its_table_sends_calls_to_the_next_quic() {
    unloaded_first_endpoint(Transport::Quic).await;
}

async fn not_exported_is_final(transport: Transport) {
    let (echo, _) = echo_backend("").await;
    let dead = dead_port().await;
    let mesh = Mesh::new();
    let first_ctx = mesh.context("k8s", &world_routes(echo, dead));
    let second_ctx = mesh.context("k8s", &world_routes(echo, dead));
    let (first, a) = start_ingress(first_ctx.clone(), ingress_cfg()).await;
    let (second, b) = start_ingress(second_ctx.clone(), ingress_cfg()).await;
    let egress_ctx = mesh.context("diego", &world_routes(echo, dead));
    let (addr, egress) = start_egress(
        egress_ctx.clone(),
        egress_cfg("secret.apps.internal:8080", vec![first, second], transport),
    )
    .await;
    let mut s = within(TcpStream::connect(addr)).await.unwrap();
    let _ = s.write_all(b"x").await;
    let mut buf = Vec::new();
    let r = within(s.read_to_end(&mut buf)).await;
    assert!(r.is_err() || buf.is_empty(), "{r:?} {buf:?}");
    eventually(|| egress_ctx.metrics.refused_total("remote_not_exported") == 1).await;
    assert_eq!(first_ctx.metrics.refused_total("not_exported"), 1);
    assert_eq!(
        second_ctx.metrics.refused_total("not_exported"),
        0,
        "a 404 from a loaded table is final: the second endpoint is not tried"
    );
    assert_eq!(egress_ctx.metrics.attempts_refused_total("not_exported"), 0);
    egress.stop().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn not_exported_from_a_loaded_table_is_final_tcp() {
    not_exported_is_final(Transport::Tcp).await;
}

#[tokio::test]
async fn not_exported_from_a_loaded_table_is_final_quic() {
    not_exported_is_final(Transport::Quic).await;
}

fn opened(ctx: &isthmus_gateway::Context) -> u64 {
    ctx.metrics
        .opened
        .get_or_create(&isthmus_gateway::metrics::ConnLabels {
            route: "orders.apps.internal:8080".into(),
            direction: isthmus_gateway::metrics::Direction::Ingress,
            peer_cluster: "diego".into(),
        })
        .get()
}

fn failures(ctx: &isthmus_gateway::Context) -> u64 {
    [
        "stream_error",
        "remote_unavailable",
        "peer_unreachable",
        "backend_unreachable",
    ]
    .iter()
    .map(|r| ctx.metrics.failed_total(r))
    .sum()
}

fn egress_handshake_failures(ctx: &isthmus_gateway::Context) -> u64 {
    let mut text = String::new();
    let mut reg = prometheus_client::registry::Registry::default();
    ctx.metrics.register(&mut reg);
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("isthmus_gateway_handshake_failures_total{")
                && l.contains("role=\"egress\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn echo_on(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0; msg.len()];
    within(s.read_exact(&mut got)).await.unwrap();
    assert_eq!(got, msg);
}

async fn ingress_drains_alone(transport: Transport) {
    let (echo, _) = echo_backend("").await;
    let dead = dead_port().await;
    let mesh = Mesh::new();
    let a_ctx = mesh.context("k8s", &world_routes(echo, dead));
    let b_ctx = mesh.context("k8s", &world_routes(echo, dead));
    let (a_addr, a) = start_ingress(a_ctx.clone(), ingress_cfg()).await;
    let (b_addr, b) = start_ingress(b_ctx.clone(), ingress_cfg()).await;
    let egress_ctx = mesh.context("diego", &world_routes(echo, dead));
    let (addr, egress) = start_egress(
        egress_ctx.clone(),
        egress_cfg("orders.apps.internal:8080", vec![a_addr, b_addr], transport),
    )
    .await;
    // A long connection on A (the pool starts at endpoint 0).
    let mut long = within(TcpStream::connect(addr)).await.unwrap();
    echo_on(&mut long, b"before").await;
    assert_eq!(opened(&a_ctx), 1);

    // A drains on its own; the egress and B keep running.
    a.shutdown.cancel();
    for i in 0..30 {
        let msg = format!("during {i}");
        let out = within(round_trip(addr, msg.as_bytes())).await.unwrap();
        assert_eq!(out, msg.as_bytes());
    }
    assert_eq!(opened(&a_ctx), 1, "a draining ingress admits no new stream");
    assert_eq!(opened(&b_ctx), 30);
    assert_eq!(failures(&egress_ctx), 0);
    assert_eq!(
        egress_handshake_failures(&egress_ctx),
        0,
        "the egress does not dial a replica it knows is draining"
    );

    // The stream in flight on A still works, and A stops once it ended.
    echo_on(&mut long, b"still here").await;
    assert!(!a.task.is_finished());
    long.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(long.read_to_end(&mut rest)).await.unwrap();
    within(a.task).await.unwrap();
    assert_eq!(failures(&egress_ctx), 0);
    egress.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_draining_ingress_finishes_its_streams_and_gets_no_new_ones_quic() {
    ingress_drains_alone(Transport::Quic).await;
}

#[tokio::test]
async fn a_draining_ingress_finishes_its_streams_and_gets_no_new_ones_tcp() {
    ingress_drains_alone(Transport::Tcp).await;
}

async fn egress_drains_alone(transport: Transport) {
    let (echo, _) = echo_backend("").await;
    let dead = dead_port().await;
    let mesh = Mesh::new();
    let ingress_ctx = mesh.context("k8s", &world_routes(echo, dead));
    let (ingress_addr, ingress) = start_ingress(ingress_ctx.clone(), ingress_cfg()).await;
    let egress_ctx = mesh.context("diego", &world_routes(echo, dead));
    let (addr, egress) = start_egress(
        egress_ctx.clone(),
        egress_cfg("orders.apps.internal:8080", vec![ingress_addr], transport),
    )
    .await;
    let mut long = within(TcpStream::connect(addr)).await.unwrap();
    echo_on(&mut long, b"before").await;

    egress.shutdown.cancel();
    // New app connections are refused: the listener is closed.
    eventually(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err())
        .await;
    // The connection in flight finishes, and the egress stops once it has.
    echo_on(&mut long, b"still here").await;
    assert!(!egress.task.is_finished());
    long.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(long.read_to_end(&mut rest)).await.unwrap();
    within(egress.task).await.unwrap();
    assert_eq!(failures(&egress_ctx), 0);
    assert_eq!(ingress_ctx.metrics.failed_total("stream_error"), 0);
    assert!(!ingress.task.is_finished(), "the ingress was not stopped");
    ingress.shutdown.cancel();
    ingress.force.cancel();
    within(ingress.task).await.unwrap();
}

#[tokio::test]
async fn a_draining_egress_finishes_its_streams_and_refuses_new_apps_quic() {
    egress_drains_alone(Transport::Quic).await;
}

#[tokio::test]
async fn a_draining_egress_finishes_its_streams_and_refuses_new_apps_tcp() {
    egress_drains_alone(Transport::Tcp).await;
}

#[tokio::test]
async fn a_draining_quic_ingress_refuses_new_connections_at_once() {
    let (echo, _) = echo_backend("").await;
    let dead = dead_port().await;
    let mesh = Mesh::new();
    let a_ctx = mesh.context("k8s", &world_routes(echo, dead));
    let b_ctx = mesh.context("k8s", &world_routes(echo, dead));
    let (a_addr, a) = start_ingress(a_ctx.clone(), ingress_cfg()).await;
    let (b_addr, b) = start_ingress(b_ctx.clone(), ingress_cfg()).await;
    // Another egress's stream keeps A draining.
    let other = within(RawQuic::connect(
        a_addr,
        &mesh.tls("diego", "gateway"),
        "k8s",
    ))
    .await
    .unwrap();
    let (status, mut send, mut recv) =
        within(other.connect_route("orders.apps.internal:8080")).await;
    assert_eq!(status, 200);
    assert_eq!(
        within(quic_echo(&mut send, &mut recv, b"held")).await,
        b"held"
    );
    a.shutdown.cancel();

    // An egress that never had a connection to A dials it first. With a handshake that
    // would wait far longer than the test, only a prompt refusal lets the call through B.
    let mut cfg = egress_cfg(
        "orders.apps.internal:8080",
        vec![a_addr, b_addr],
        Transport::Quic,
    );
    cfg.pool.handshake_timeout = HumanDuration::from_secs(60);
    cfg.pool.dead_after = HumanDuration::from_secs(60);
    let egress_ctx = mesh.context("diego", &world_routes(echo, dead));
    let (addr, egress) = start_egress(egress_ctx.clone(), cfg).await;
    let out = within(round_trip(addr, b"via b")).await.unwrap();
    assert_eq!(out, b"via b");
    assert_eq!(opened(&b_ctx), 1);
    assert!(handshake_failures_of(&a_ctx, "draining") >= 1);

    // The held stream finishes; then A stops.
    assert_eq!(
        within(quic_echo(&mut send, &mut recv, b"done")).await,
        b"done"
    );
    send.finish().unwrap();
    let rest = within(recv.read_to_end(64)).await.unwrap();
    assert!(rest.is_empty());
    within(a.task).await.unwrap();
    egress.stop().await;
    b.stop().await;
}

fn handshake_failures_of(ctx: &isthmus_gateway::Context, reason: &'static str) -> i64 {
    ctx.metrics
        .handshake_failures
        .get_or_create(&isthmus_gateway::metrics::HandshakeLabels {
            role: "ingress",
            reason,
        })
        .get() as i64
}
