//! route-sync with tables too large for one message: a node keeps one copy of each route,
//! a load larger than half the table travels as a chunked snapshot, and a delta larger than
//! a chunk travels in chunks and is applied whole. In-process, real mTLS gRPC on loopback.

mod common;

use common::{TD, c, eventually, tls};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_certs::ca::MeshCa;
use isthmus_route_sync::client::RouteSyncSource;
use isthmus_route_sync::node::{Node, NodeHandle, NodeSettings, PeerSpec};
use isthmus_route_sync::{Backend, RouteStore};
use isthmus_route_sync::{PeerSelector, Protocol, Route, RouteKey, RouteName};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// More than two chunks of 5,000.
const ROUTES: usize = 12_000;

fn key(i: usize) -> RouteKey {
    RouteKey::new(
        RouteName::parse(&format!("app-{i}.apps.internal")).unwrap(),
        8080,
    )
}

/// Route `i` of diego; `weight` tells versions apart.
fn route(i: usize, weight: u32) -> Route {
    Route {
        key: key(i),
        protocol: Protocol::Http,
        home_cluster: c("diego"),
        exported: true,
        allowed_peers: vec![PeerSelector::parse("cluster:k8s").unwrap()],
        backends: vec![Backend::parse("10.1.2.3:8080").unwrap()],
        weights: [(c("diego"), weight)].into(),
        vip: None,
        egress_port: None,
        revision: 0,
    }
}

struct Running {
    addr: SocketAddr,
    local: RouteStore,
    merged: RouteStore,
    handle: NodeHandle,
    metrics: prometheus_client::registry::Registry,
    cancel: CancellationToken,
}

impl Running {
    /// Messages received from `peer` (the `peer_updates` counter).
    fn messages_from(&self, peer: &str) -> u64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.metrics).unwrap();
        let series = format!("isthmus_route_sync_peer_updates_total{{peer=\"{peer}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0, |v| v.trim().parse().unwrap())
    }
}

fn start(ca: &MeshCa, cluster: &str, listener: TcpListener, peer: (&str, SocketAddr)) -> Running {
    let node = Node::with_listener(
        NodeSettings {
            cluster: c(cluster),
            trust_domain: TD.into(),
            tls: tls(ca, cluster, "route-sync"),
            peers: vec![PeerSpec {
                cluster: c(peer.0),
                endpoints: vec![peer.1],
            }],
            state_dir: None,
            handshake_timeout: Duration::from_secs(5),
            vips: None,
            limits: Default::default(),
            keepalive: Default::default(),
        },
        listener,
    );
    node.handle().local_loaded();
    let cancel = CancellationToken::new();
    let mut metrics = prometheus_client::registry::Registry::default();
    node.metrics().register(&mut metrics);
    let running = Running {
        metrics,
        addr: node.local_addr().unwrap(),
        local: node.local_store(),
        merged: node.merged_store(),
        handle: node.handle(),
        cancel: cancel.clone(),
    };
    tokio::spawn(node.run(cancel));
    running
}

fn weight(store: &RouteStore, i: usize) -> Option<u32> {
    store
        .snapshot()
        .get(&key(i))
        .map(|r| r.weights.values().copied().next().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_loads_and_deltas_arrive_whole_and_routes_are_kept_once() {
    let ca = MeshCa::generate(TD).unwrap();
    let (ld, lk) = (
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    let (ad, ak) = (ld.local_addr().unwrap(), lk.local_addr().unwrap());
    let diego = start(&ca, "diego", ld, ("k8s", ak));
    let k8s = start(&ca, "k8s", lk, ("diego", ad));
    let consumer = RouteStore::new();
    let (source, _) = RouteSyncSource {
        cluster: c("k8s"),
        trust_domain: TD.into(),
        endpoints: vec![k8s.addr],
        tls: tls(&ca, "k8s", "gateway"),
        cache: None,
    }
    .spawn(consumer.clone(), diego.cancel.clone());
    eventually("the peer connected", Duration::from_secs(20), || {
        k8s.handle
            .peer("diego")
            .is_some_and(|p| p.state == "connected")
    })
    .await;
    let before = k8s.handle.peer("diego").unwrap();

    // A load into a table that was empty: the peer, already watching, gets it as a snapshot.
    diego.local.replace_all((0..ROUTES).map(|i| route(i, 1)));
    eventually("the load at the consumer", Duration::from_secs(20), || {
        consumer.snapshot().len() == ROUTES
    })
    .await;
    let after = k8s.handle.peer("diego").unwrap();
    assert_eq!(after.snapshots, before.snapshots + 1, "{after:?}");
    assert_eq!(after.deltas, before.deltas, "{after:?}");

    // The node keeps one copy of each route: its merged table serves the local store's.
    let (local, merged) = (diego.local.snapshot(), diego.merged.snapshot());
    assert_eq!(merged.len(), ROUTES);
    for i in [0, ROUTES / 2, ROUTES - 1] {
        let (l, m) = (local.get(&key(i)).unwrap(), merged.get(&key(i)).unwrap());
        assert!(Arc::ptr_eq(l, m), "route {i} is held twice");
    }

    // A delta of more than a chunk (and less than half the table) comes in several messages
    // that each side applies as one change.
    let changed = 5_500;
    let (k8s_rev, consumer_rev) = (
        k8s.merged.snapshot().revision(),
        consumer.snapshot().revision(),
    );
    let snapshots = source.snapshots.load(std::sync::atomic::Ordering::Relaxed);
    let (messages, deltas) = (
        k8s.messages_from("diego"),
        k8s.handle.peer("diego").unwrap().deltas,
    );
    diego.local.apply((0..changed).map(|i| route(i, 2)), []);
    eventually("the delta at the consumer", Duration::from_secs(20), || {
        weight(&consumer, changed - 1) == Some(2) && weight(&consumer, 0) == Some(2)
    })
    .await;
    assert!((0..changed).all(|i| weight(&consumer, i) == Some(2)));
    assert!((changed..ROUTES).all(|i| weight(&consumer, i) == Some(1)));
    assert_eq!(
        k8s.messages_from("diego"),
        messages + 2,
        "5,500 changes in two messages"
    );
    assert_eq!(k8s.handle.peer("diego").unwrap().deltas, deltas + 1);
    assert_eq!(k8s.merged.snapshot().revision(), k8s_rev + 1);
    assert_eq!(consumer.snapshot().revision(), consumer_rev + 1);
    assert_eq!(
        source.snapshots.load(std::sync::atomic::Ordering::Relaxed),
        snapshots,
        "a delta, not a snapshot"
    );

    diego.cancel.cancel();
    k8s.cancel.cancel();
}
