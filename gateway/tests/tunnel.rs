//! The tunnel end to end, in-process on loopback, over both transports: a "diego" egress
//! carries app connections to a "k8s" ingress, which forwards to backends.

mod common;

use std::time::Duration;

use common::*;
use isthmus_gateway::config::Transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct World {
    egress_addr: std::net::SocketAddr,
    ingress: Running,
    egress: Running,
    ingress_ctx: isthmus_gateway::Context,
    egress_ctx: isthmus_gateway::Context,
    ingress_addr: std::net::SocketAddr,
    mesh: Mesh,
}

async fn world(
    transport: Transport,
    route: &str,
    extra_endpoints_first: Vec<std::net::SocketAddr>,
) -> World {
    let (echo, _) = echo_backend("").await;
    let dead = dead_port().await;
    let mesh = Mesh::new();
    let ingress_ctx = mesh.context("k8s", &world_routes(echo, dead));
    let (ingress_addr, ingress) = start_ingress(ingress_ctx.clone(), ingress_cfg()).await;
    let egress_ctx = mesh.context("diego", &world_routes(echo, dead));
    let mut endpoints = extra_endpoints_first;
    endpoints.push(ingress_addr);
    let (egress_addr, egress) =
        start_egress(egress_ctx.clone(), egress_cfg(route, endpoints, transport)).await;
    World {
        egress_addr,
        ingress,
        egress,
        ingress_ctx,
        egress_ctx,
        ingress_addr,
        mesh,
    }
}

fn checksum(data: &[u8]) -> u64 {
    // FNV-1a: enough to catch a lost, duplicated or reordered chunk.
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

async fn big_round_trip(transport: Transport) {
    let w = world(transport, "orders.apps.internal:8080", vec![]).await;
    let payload: Vec<u8> = (0..100 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let want = checksum(&payload);
    let s = within(TcpStream::connect(w.egress_addr)).await.unwrap();
    let (mut r, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(&payload).await.unwrap();
        wr.shutdown().await.unwrap();
    });
    let mut got = Vec::with_capacity(100 * 1024 * 1024);
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), 100 * 1024 * 1024);
    assert_eq!(checksum(&got), want);
    w.egress.stop().await;
    w.ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_round_trip_tcp() {
    big_round_trip(Transport::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_round_trip_quic() {
    big_round_trip(Transport::Quic).await;
}

async fn half_close(transport: Transport) {
    let w = world(transport, "orders.apps.internal:8080", vec![]).await;
    let mut s = within(TcpStream::connect(w.egress_addr)).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    // Shut our write side: the backend must see end-of-file, answer, and close its side,
    // while our read side keeps working.
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    within(s.read_to_end(&mut out)).await.unwrap();
    assert_eq!(out, b"ping");
    // Both gateways saw the connection end cleanly: closed, and not counted as broken.
    let labels = |direction, peer: &str| isthmus_gateway::metrics::ConnLabels {
        route: "orders.apps.internal:8080".into(),
        direction,
        peer_cluster: peer.into(),
    };
    let (e, i) = (&w.egress_ctx.metrics, &w.ingress_ctx.metrics);
    let egress = labels(isthmus_gateway::metrics::Direction::Egress, "k8s");
    let ingress = labels(isthmus_gateway::metrics::Direction::Ingress, "diego");
    eventually(|| {
        e.closed.get_or_create(&egress).get() == 1 && i.closed.get_or_create(&ingress).get() == 1
    })
    .await;
    assert_eq!(
        e.failed_total("stream_error") + i.failed_total("stream_error"),
        0
    );
    assert_eq!(e.bytes_to_backend.get_or_create(&egress).get(), 4);
    assert_eq!(i.bytes_from_backend.get_or_create(&ingress).get(), 4);
    w.egress.stop().await;
    w.ingress.stop().await;
}

#[tokio::test]
async fn half_close_tcp() {
    half_close(Transport::Tcp).await;
}

#[tokio::test]
async fn half_close_quic() {
    half_close(Transport::Quic).await;
}

async fn thousand_connections(transport: Transport) {
    let w = world(transport, "orders.apps.internal:8080", vec![]).await;
    let mut conns = Vec::new();
    // Open 1,000 app connections and keep all of them open at once.
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let addr = w.egress_addr;
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"hello").await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"hello");
            s
        }));
    }
    for t in tasks {
        conns.push(
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    // 1,000 streams at 100 per connection: ten tunnel connections, not a thousand.
    let n = w
        .ingress_ctx
        .metrics
        .ingress_connections
        .get_or_create(&isthmus_gateway::metrics::PoolLabels {
            peer_cluster: "diego".into(),
            transport: transport_name(transport),
        })
        .get();
    assert!(
        (10..=12).contains(&n),
        "{n} tunnel connections carried 1,000 app connections"
    );
    let pooled = w
        .egress_ctx
        .metrics
        .pool_connections
        .get_or_create(&isthmus_gateway::metrics::PoolLabels {
            peer_cluster: "k8s".into(),
            transport: transport_name(transport),
        })
        .get();
    assert_eq!(pooled, n);
    drop(conns);
    w.egress.stop().await;
    w.ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_app_connections_share_a_handful_of_tunnels_tcp() {
    thousand_connections(Transport::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_app_connections_share_a_handful_of_tunnels_quic() {
    thousand_connections(Transport::Quic).await;
}

async fn backend_down(transport: Transport) {
    let w = world(transport, "down.apps.internal:8080", vec![]).await;
    let mut s = within(TcpStream::connect(w.egress_addr)).await.unwrap();
    let _ = s.write_all(b"x").await;
    let mut buf = Vec::new();
    // The app sees its connection fail (reset, or closed with nothing), promptly.
    let r = within(s.read_to_end(&mut buf)).await;
    assert!(r.is_err() || buf.is_empty(), "{r:?} {buf:?}");
    eventually(|| w.ingress_ctx.metrics.failed_total("backend_unreachable") >= 1).await;
    eventually(|| w.egress_ctx.metrics.failed_total("remote_unavailable") >= 1).await;
    w.egress.stop().await;
    w.ingress.stop().await;
}

#[tokio::test]
async fn backend_down_fails_cleanly_tcp() {
    backend_down(Transport::Tcp).await;
}

#[tokio::test]
async fn backend_down_fails_cleanly_quic() {
    backend_down(Transport::Quic).await;
}

async fn first_endpoint_down(transport: Transport) {
    let dead = dead_port().await;
    let w = world(transport, "orders.apps.internal:8080", vec![dead]).await;
    for _ in 0..4 {
        let out = within(round_trip(w.egress_addr, b"failover"))
            .await
            .unwrap();
        assert_eq!(out, b"failover");
    }
    w.egress.stop().await;
    w.ingress.stop().await;
}

#[tokio::test]
async fn first_ingress_down_second_used_tcp() {
    first_endpoint_down(Transport::Tcp).await;
}

#[tokio::test]
async fn first_ingress_down_second_used_quic() {
    first_endpoint_down(Transport::Quic).await;
}

#[tokio::test]
async fn quic_falls_back_to_tcp_when_udp_is_blocked() {
    let (echo, _) = echo_backend("").await;
    let mesh = Mesh::new();
    let store = world_routes(echo, dead_port().await);
    let mut cfg = ingress_cfg();
    cfg.quic = false; // nothing answers on UDP: as if a firewall dropped it
    let (ingress_addr, ingress) = start_ingress(mesh.context("k8s", &store), cfg).await;
    let mut egress_cfg = egress_cfg(
        "orders.apps.internal:8080",
        vec![ingress_addr],
        Transport::Quic,
    );
    egress_cfg.peers[0].fallback_to_tcp = true;
    egress_cfg.pool.handshake_timeout = isthmus_runtime::config::HumanDuration::from_millis(300);
    let ctx = mesh.context("diego", &store);
    let (addr, egress) = start_egress(ctx.clone(), egress_cfg).await;
    let out = within(round_trip(addr, b"over tcp")).await.unwrap();
    assert_eq!(out, b"over tcp");
    let tcp = ctx
        .metrics
        .pool_connections
        .get_or_create(&isthmus_gateway::metrics::PoolLabels {
            peer_cluster: "k8s".into(),
            transport: "tcp",
        })
        .get();
    assert_eq!(tcp, 1);
    egress.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn drain_lets_in_flight_connections_finish_then_stops() {
    let w = world(Transport::Tcp, "orders.apps.internal:8080", vec![]).await;
    let mut s = within(TcpStream::connect(w.egress_addr)).await.unwrap();
    s.write_all(b"one").await.unwrap();
    let mut buf = [0u8; 3];
    within(s.read_exact(&mut buf)).await.unwrap();

    // Drain both gateways: listeners close, the connection in flight keeps working.
    w.egress.shutdown.cancel();
    w.ingress.shutdown.cancel();
    eventually(|| {
        std::net::TcpStream::connect_timeout(&w.egress_addr, Duration::from_millis(100)).is_err()
    })
    .await;
    s.write_all(b"two").await.unwrap();
    within(s.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"two");
    assert!(!w.egress.task.is_finished() && !w.ingress.task.is_finished());

    // When it ends, both gateways stop on their own.
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(s.read_to_end(&mut rest)).await.unwrap();
    within(w.egress.task).await.unwrap();
    within(w.ingress.task).await.unwrap();
    let _ = (w.mesh, w.ingress_addr, w.ingress.force, w.egress.force);
}

#[tokio::test]
async fn drain_deadline_force_closes_what_is_left() {
    let w = world(Transport::Quic, "orders.apps.internal:8080", vec![]).await;
    let mut s = within(TcpStream::connect(w.egress_addr)).await.unwrap();
    s.write_all(b"one").await.unwrap();
    let mut buf = [0u8; 3];
    within(s.read_exact(&mut buf)).await.unwrap();
    w.egress.shutdown.cancel();
    w.ingress.shutdown.cancel();
    // The deadline passes: force closes the connection that never ended.
    w.egress.force.cancel();
    w.ingress.force.cancel();
    within(w.egress.task).await.unwrap();
    within(w.ingress.task).await.unwrap();
    let mut rest = Vec::new();
    let r = within(s.read_to_end(&mut rest)).await;
    assert!(r.is_err() || rest.is_empty());
}

async fn idle_pooled_connections_close(transport: Transport) {
    let (echo, _) = echo_backend("").await;
    let mesh = Mesh::new();
    let store = world_routes(echo, dead_port().await);
    let (ingress_addr, ingress) = start_ingress(mesh.context("k8s", &store), ingress_cfg()).await;
    let mut cfg = egress_cfg("orders.apps.internal:8080", vec![ingress_addr], transport);
    cfg.pool.idle_timeout = isthmus_runtime::config::HumanDuration::from_millis(200);
    let ctx = mesh.context("diego", &store);
    let (addr, egress) = start_egress(ctx.clone(), cfg).await;
    let pooled = || {
        ctx.metrics
            .pool_connections
            .get_or_create(&isthmus_gateway::metrics::PoolLabels {
                peer_cluster: "k8s".into(),
                transport: transport_name(transport),
            })
            .get()
    };
    // A long-lived app connection keeps its tunnel connection past the idle timeout...
    let mut s = within(TcpStream::connect(addr)).await.unwrap();
    s.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    within(s.read_exact(&mut b)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pooled(), 1);
    s.write_all(b"b").await.unwrap();
    within(s.read_exact(&mut b)).await.unwrap();
    // ...and once no stream is left, the idle connection is closed.
    drop(s);
    eventually(|| pooled() == 0).await;
    // The next app connection dials a fresh one.
    assert_eq!(within(round_trip(addr, b"again")).await.unwrap(), b"again");
    egress.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn idle_pooled_connections_close_tcp() {
    idle_pooled_connections_close(Transport::Tcp).await;
}

#[tokio::test]
async fn idle_pooled_connections_close_quic() {
    idle_pooled_connections_close(Transport::Quic).await;
}

/// A TCP relay that can turn into a black hole: once frozen it forwards nothing and closes
/// nothing, as a vanished host or a partition between the clusters would. It counts the
/// reads it forwarded each way, so a test can watch keep-alives cross.
struct BlackHole {
    addr: std::net::SocketAddr,
    state: std::sync::Arc<HoleState>,
}

#[derive(Default)]
struct HoleState {
    frozen: std::sync::atomic::AtomicBool,
    /// Reads forwarded: [towards the target, back to the client].
    forwarded: [std::sync::atomic::AtomicUsize; 2],
}

impl BlackHole {
    async fn to(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = std::sync::Arc::new(HoleState::default());
        let shared = std::sync::Arc::clone(&state);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(Self::pipe(cr, sw, std::sync::Arc::clone(&shared), 0));
                tokio::spawn(Self::pipe(sr, cw, std::sync::Arc::clone(&shared), 1));
            }
        });
        Self { addr, state }
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        state: std::sync::Arc<HoleState>,
        direction: usize,
    ) {
        use std::sync::atomic::Ordering;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if state.frozen.load(Ordering::Acquire) {
                // Swallow everything, answer nothing, keep both sockets open.
                let _held = (from, to);
                return std::future::pending().await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
            state.forwarded[direction].fetch_add(1, Ordering::Release);
        }
    }

    fn freeze(&self) {
        self.state
            .frozen
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn forwarded(&self) -> [usize; 2] {
        self.state
            .forwarded
            .each_ref()
            .map(|n| n.load(std::sync::atomic::Ordering::Acquire))
    }
}

/// An egress and an ingress with a black hole between them, and one app connection through
/// it that has carried bytes.
struct HoleWorld {
    app: TcpStream,
    hole: BlackHole,
    egress_ctx: isthmus_gateway::Context,
    ingress_ctx: isthmus_gateway::Context,
    egress: Running,
    ingress: Running,
}

impl HoleWorld {
    async fn start(egress_dead_after: Duration, ingress_dead_after: Duration) -> Self {
        let millis =
            |d: Duration| isthmus_runtime::config::HumanDuration::from_millis(d.as_millis() as u64);
        let (echo, _) = echo_backend("").await;
        let mesh = Mesh::new();
        let store = world_routes(echo, dead_port().await);
        let ingress_ctx = mesh.context("k8s", &store);
        let mut icfg = ingress_cfg();
        icfg.dead_after = millis(ingress_dead_after);
        let (ingress_addr, ingress) = start_ingress(ingress_ctx.clone(), icfg).await;
        let hole = BlackHole::to(ingress_addr).await;
        let mut cfg = egress_cfg("orders.apps.internal:8080", vec![hole.addr], Transport::Tcp);
        cfg.pool.dead_after = millis(egress_dead_after);
        let egress_ctx = mesh.context("diego", &store);
        let (addr, egress) = start_egress(egress_ctx.clone(), cfg).await;
        let mut app = within(TcpStream::connect(addr)).await.unwrap();
        app.write_all(b"a").await.unwrap();
        let mut b = [0u8; 1];
        within(app.read_exact(&mut b)).await.unwrap();
        Self {
            app,
            hole,
            egress_ctx,
            ingress_ctx,
            egress,
            ingress,
        }
    }

    /// The hole swallows everything from now on, starting with a byte of the app's.
    async fn freeze(&mut self) {
        self.hole.freeze();
        self.app.write_all(b"b").await.unwrap();
    }

    async fn stop(self) {
        self.egress.stop().await;
        self.ingress.stop().await;
    }
}

fn tcp_gauge(family: &isthmus_gateway::metrics::Metrics, ingress: bool) -> i64 {
    let labels = isthmus_gateway::metrics::PoolLabels {
        peer_cluster: if ingress { "diego" } else { "k8s" }.into(),
        transport: "tcp",
    };
    if ingress {
        family.ingress_connections.get_or_create(&labels).get()
    } else {
        family.pool_connections.get_or_create(&labels).get()
    }
}

/// TCP has no idle timeout of its own: without HTTP/2 PINGs a silent ingress would hold the
/// pooled connection, and every app connection on it, until the kernel gave up retransmitting.
#[tokio::test]
async fn egress_closes_a_tcp_tunnel_whose_ingress_went_silent() {
    let mut w = HoleWorld::start(Duration::from_millis(400), Duration::from_secs(60)).await;
    w.freeze().await;
    // The app connection ends (reset or EOF) instead of hanging.
    let mut rest = [0u8; 16];
    let ended = within(w.app.read(&mut rest)).await;
    assert!(matches!(ended, Ok(0) | Err(_)), "got {ended:?}");
    eventually(|| tcp_gauge(&w.egress_ctx.metrics, false) == 0).await;
    w.stop().await;
}

/// The ingress side reclaims a tunnel (and the backend connections of its streams) whose
/// egress vanished without a reset.
#[tokio::test]
async fn ingress_closes_a_tcp_tunnel_whose_egress_went_silent() {
    let mut w = HoleWorld::start(Duration::from_secs(60), Duration::from_millis(400)).await;
    assert_eq!(tcp_gauge(&w.ingress_ctx.metrics, true), 1);
    w.freeze().await;
    eventually(|| tcp_gauge(&w.ingress_ctx.metrics, true) == 0).await;
    w.stop().await;
}

/// PINGs keep a quiet but healthy tunnel alive on both sides: an app connection that stays
/// silent while many keep-alives cross (several times `dead_after`) still works, on the same
/// pooled connection.
#[tokio::test]
async fn quiet_tcp_tunnels_stay_up() {
    let dead_after = Duration::from_millis(200);
    let mut w = HoleWorld::start(dead_after, dead_after).await;
    // A keep-alive crosses at most every 2 ticks of dead_after / 4: 20 each way is at least
    // 2.5 x dead_after of nothing but keep-alives.
    let before = w.hole.forwarded();
    eventually(|| {
        let now = w.hole.forwarded();
        now[0] >= before[0] + 20 && now[1] >= before[1] + 20
    })
    .await;
    w.app.write_all(b"c").await.unwrap();
    let mut b = [0u8; 1];
    within(w.app.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"c");
    assert_eq!(tcp_gauge(&w.egress_ctx.metrics, false), 1);
    assert_eq!(tcp_gauge(&w.ingress_ctx.metrics, true), 1);
    w.stop().await;
}
