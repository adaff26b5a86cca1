//! Limits against a hostile or broken peer: chunk chains and routes per peer are bounded
//! (refused with a reason, the last good imports kept), and the gRPC server's HTTP/2
//! keepalive drops a caller that vanished without a FIN.

mod common;

use common::{TD, c, eventually, tls};

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use isthmus_certs::PeerPolicy;
use isthmus_certs::ca::MeshCa;
use isthmus_route_sync::node::{Keepalive, Node, NodeHandle, NodeSettings, PeerLimits, PeerSpec};
use isthmus_route_sync::proto;
use isthmus_route_sync::{RouteKey, RouteName, RouteStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

const LIMITS: PeerLimits = PeerLimits {
    max_batch_chunks: 4,
    max_batch_routes: 1000,
    max_routes_per_peer: 10,
};

fn wire(i: usize) -> proto::Route {
    proto::Route {
        name: format!("evil-{i}.apps.internal"),
        port: 8080,
        home_cluster: "evil".into(),
        exported: true,
        allowed_peers: vec!["cluster:k8s".into()],
        ..proto::Route::default()
    }
}

fn update(
    routes: impl IntoIterator<Item = proto::Route>,
    snapshot: bool,
    more: bool,
) -> proto::Update {
    proto::Update {
        epoch: "evil-epoch".into(),
        revision: 7,
        snapshot,
        more,
        cluster: "evil".into(),
        upserts: routes.into_iter().collect(),
        ..proto::Update::default()
    }
}

/// What the hostile peer sends on its second Watch (the first gets a good snapshot of three
/// routes and ends, so the node reconnects).
#[derive(Clone, Copy)]
enum Attack {
    /// A chain of one-route chunks that never ends.
    EndlessChain,
    /// Two chunks of 600 routes, still `more`: past max_batch_routes before the last chunk.
    HugeChain,
    /// One complete snapshot of 20 routes: past max_routes_per_peer.
    TooManyRoutes,
}

type Updates = Pin<Box<dyn Stream<Item = Result<proto::Update, Status>> + Send>>;

struct Hostile {
    attack: Attack,
    watches: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl proto::route_sync_server::RouteSync for Hostile {
    type WatchStream = Updates;

    async fn watch(
        &self,
        _: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let n = self.watches.fetch_add(1, Ordering::SeqCst);
        let stream: Updates = if n == 0 {
            Box::pin(futures_util::stream::iter([Ok(update(
                (0..3).map(wire),
                true,
                false,
            ))]))
        } else {
            match self.attack {
                Attack::EndlessChain => {
                    Box::pin(futures_util::stream::unfold(0usize, |i| async move {
                        Some((Ok(update([wire(100 + i)], false, true)), i + 1))
                    }))
                }
                // Then silence, the chain left open.
                Attack::HugeChain => Box::pin(
                    futures_util::stream::iter(
                        (0..2).map(|k| Ok(update((k * 600..(k + 1) * 600).map(wire), false, true))),
                    )
                    .chain(futures_util::stream::pending()),
                ),
                Attack::TooManyRoutes => Box::pin(
                    futures_util::stream::iter([Ok(update((0..20).map(wire), true, false))])
                        .chain(futures_util::stream::pending()),
                ),
            }
        };
        Ok(Response::new(stream))
    }

    async fn list(
        &self,
        _: Request<proto::ListRequest>,
    ) -> Result<Response<proto::Update>, Status> {
        Err(Status::unimplemented("not here"))
    }

    async fn status(
        &self,
        _: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusReply>, Status> {
        Ok(Response::new(proto::StatusReply::default()))
    }
}

/// Serves the hostile peer as cluster `evil`'s route-sync, over the mesh's mTLS.
async fn hostile(
    ca: &MeshCa,
    attack: Attack,
    cancel: CancellationToken,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_tls =
        tls(ca, "evil", "route-sync").server_config(PeerPolicy::trust_domain(TD), &[b"h2"]);
    let incoming = isthmus_route_sync::grpc::incoming(
        listener,
        server_tls,
        Duration::from_secs(5),
        cancel.clone(),
    );
    let watches = Arc::new(AtomicUsize::new(0));
    let service = Hostile {
        attack,
        watches: Arc::clone(&watches),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(proto::route_sync_server::RouteSyncServer::new(service))
            .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned()),
    );
    (addr, watches)
}

fn settings(ca: &MeshCa, peers: Vec<PeerSpec>, keepalive: Keepalive) -> NodeSettings {
    NodeSettings {
        cluster: c("k8s"),
        trust_domain: TD.into(),
        tls: tls(ca, "k8s", "route-sync"),
        peers,
        state_dir: None,
        handshake_timeout: Duration::from_secs(5),
        vips: None,
        limits: LIMITS,
        keepalive,
    }
}

struct Running {
    addr: SocketAddr,
    merged: RouteStore,
    handle: NodeHandle,
    metrics: isthmus_route_sync::node::NodeMetrics,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start(settings: NodeSettings) -> Running {
    let node = Node::bind(settings, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    node.handle().local_loaded();
    let cancel = CancellationToken::new();
    Running {
        addr: node.local_addr().unwrap(),
        merged: node.merged_store(),
        handle: node.handle(),
        metrics: node.metrics(),
        cancel: cancel.clone(),
        task: tokio::spawn(node.run(cancel)),
    }
}

fn key(i: usize) -> RouteKey {
    RouteKey::new(
        RouteName::parse(&format!("evil-{i}.apps.internal")).unwrap(),
        8080,
    )
}

fn metrics_text(m: &isthmus_route_sync::node::NodeMetrics) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    m.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

/// The peer first sends three good routes, then `attack`: the attack is refused with a
/// reason naming the limit, the three routes stay, and status and metrics say so.
async fn refused(attack: Attack, limit: &str, metric_reason: &str) {
    let ca = MeshCa::generate(TD).unwrap();
    let cancel = CancellationToken::new();
    let (evil, watches) = hostile(&ca, attack, cancel.clone()).await;
    let node = start(settings(
        &ca,
        vec![PeerSpec {
            cluster: c("evil"),
            endpoints: vec![evil],
        }],
        Keepalive::default(),
    ))
    .await;
    eventually("the good snapshot imported", Duration::from_secs(5), || {
        node.merged.snapshot().len() == 3
    })
    .await;
    eventually("the attack refused", Duration::from_secs(5), || {
        node.handle.peer("evil").is_some_and(|p| p.refused >= 1)
    })
    .await;
    assert!(watches.load(Ordering::SeqCst) >= 2);
    let peer = node.handle.peer("evil").unwrap();
    assert!(peer.last_error.contains(limit), "{}", peer.last_error);
    assert_ne!(peer.state, "connected", "the stream was dropped");
    // The last good imports are kept, nothing of the attack applied.
    let t = node.merged.snapshot();
    assert_eq!(t.len(), 3);
    assert!((0..3).all(|i| t.get(&key(i)).is_some()));
    let status = node.handle.status();
    let p = status.peers.iter().find(|p| p.cluster == "evil").unwrap();
    assert!(p.refused >= 1 && p.last_error.contains(limit));
    assert_eq!(p.routes, 3);
    let text = metrics_text(&node.metrics);
    assert!(
        text.lines().any(
            |l| l.starts_with("isthmus_route_sync_peer_updates_refused_total{")
                && l.contains(&format!("reason=\"{metric_reason}\""))
                && !l.ends_with(" 0")
        ),
        "{text}"
    );
    cancel.cancel();
    node.cancel.cancel();
    timeout(Duration::from_secs(5), node.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn an_endless_chunk_chain_is_dropped_and_the_imports_kept() {
    refused(Attack::EndlessChain, "max_batch_chunks", "batch_chunks").await;
}

#[tokio::test]
async fn a_chain_of_too_many_routes_is_dropped_and_the_imports_kept() {
    refused(Attack::HugeChain, "max_batch_routes", "batch_routes").await;
}

#[tokio::test]
async fn a_peer_beyond_its_route_limit_is_refused_and_the_imports_kept() {
    refused(
        Attack::TooManyRoutes,
        "max_routes_per_peer",
        "routes_per_peer",
    )
    .await;
}

/// A TCP relay that forwards until told to go silent, then forwards nothing and reads
/// nothing while keeping both sockets open: a consumer that vanished without a FIN.
async fn relay(to: SocketAddr, silent: tokio::sync::watch::Receiver<bool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = TcpStream::connect(to).await.unwrap();
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        let pump = |mut from: tokio::net::tcp::OwnedReadHalf,
                    mut to: tokio::net::tcp::OwnedWriteHalf,
                    mut silent: tokio::sync::watch::Receiver<bool>| async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                tokio::select! {
                    () = async {
                        while !*silent.borrow_and_update() {
                            if silent.changed().await.is_err() {
                                return;
                            }
                        }
                    } => {
                        // Hold the sockets, never read or write again.
                        std::future::pending::<()>().await;
                    }
                    n = from.read(&mut buf) => match n {
                        Ok(0) | Err(_) => return,
                        Ok(n) => if to.write_all(&buf[..n]).await.is_err() { return },
                    },
                }
            }
        };
        let a = tokio::spawn(pump(cr, sw, silent.clone()));
        let b = tokio::spawn(pump(sr, cw, silent));
        let _ = tokio::join!(a, b);
    });
    addr
}

#[tokio::test]
async fn a_consumer_that_vanishes_without_a_fin_is_dropped_within_the_keepalive_bound() {
    let ca = MeshCa::generate(TD).unwrap();
    let keepalive = Keepalive {
        interval: Duration::from_millis(200),
        timeout: Duration::from_millis(200),
    };
    let node = start(settings(&ca, vec![], keepalive)).await;
    assert_eq!(node.merged.watchers(), 0);
    let (silent, quiet) = tokio::sync::watch::channel(false);
    let via = relay(node.addr, quiet).await;
    let client_tls =
        tls(&ca, "k8s", "gateway").client_config(PeerPolicy::trust_domain(TD), &[b"h2"]);
    let mut client = proto::route_sync_client::RouteSyncClient::new(
        isthmus_route_sync::grpc::channel(via, client_tls).unwrap(),
    );
    let mut stream = timeout(
        Duration::from_secs(5),
        client.watch(proto::WatchRequest::default()),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    let first = timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap();
    assert!(first.is_some_and(|u| u.snapshot));
    assert_eq!(
        node.merged.watchers(),
        1,
        "the Watch stream's task is alive"
    );

    // The consumer vanishes: no FIN, no RST, just silence. Its stream object stays alive
    // here, so nothing but the server's keepalive can end the server's task.
    silent.send_replace(true);
    let vanished = tokio::time::Instant::now();
    eventually(
        "the server dropped the silent consumer",
        Duration::from_secs(5),
        || node.merged.watchers() == 0,
    )
    .await;
    let took = vanished.elapsed();
    // interval + timeout, with room for a loaded machine; far below "never".
    assert!(took < Duration::from_secs(3), "took {took:?}");
    drop(stream);
    node.cancel.cancel();
    timeout(Duration::from_secs(5), node.task)
        .await
        .unwrap()
        .unwrap();
}
