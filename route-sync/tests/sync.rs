//! route-sync end to end, in-process, real mTLS gRPC on loopback: peering, deletion, resume
//! without snapshot, partitions, bad data, and three clusters without loops.

mod common;

use common::{TD, c, eventually, tls};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use isthmus_certs::ca::MeshCa;
use isthmus_route_sync::client::RouteSyncSource;
use isthmus_route_sync::node::{Node, NodeHandle, NodeSettings, PeerSpec};
use isthmus_route_sync::{Backend, Protocol, Route, RouteKey, RouteName, RouteStore};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

fn key(name: &str) -> RouteKey {
    RouteKey::new(RouteName::parse(name).unwrap(), 8080)
}

fn route(name: &str, home: &str, exported: bool) -> Route {
    Route {
        key: key(name),
        protocol: Protocol::Http,
        home_cluster: c(home),
        exported,
        allowed_peers: vec![],
        backends: vec![Backend::parse("10.1.2.3:8080").unwrap()],
        weights: Default::default(),
        vip: None,
        revision: 0,
    }
}

struct Running {
    addr: SocketAddr,
    local: RouteStore,
    merged: RouteStore,
    handle: NodeHandle,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.cancel.cancel();
        timeout(Duration::from_secs(5), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

fn start(
    ca: &MeshCa,
    cluster: &str,
    listener: TcpListener,
    peers: Vec<(&str, SocketAddr)>,
    state: Option<PathBuf>,
) -> Running {
    let settings = NodeSettings {
        cluster: c(cluster),
        trust_domain: TD.into(),
        tls: tls(ca, cluster, "route-sync"),
        peers: peers
            .into_iter()
            .map(|(p, a)| PeerSpec {
                cluster: c(p),
                endpoints: vec![a],
            })
            .collect(),
        state_dir: state,
        handshake_timeout: Duration::from_secs(5),
        vips: None,
        limits: Default::default(),
        keepalive: Default::default(),
    };
    let node = Node::with_listener(settings, listener);
    let running = Running {
        addr: node.local_addr().unwrap(),
        local: node.local_store(),
        merged: node.merged_store(),
        handle: node.handle(),
        cancel: CancellationToken::new(),
        task: tokio::spawn(async {}),
    };
    node.handle().local_loaded();
    let cancel = running.cancel.clone();
    Running {
        task: tokio::spawn(node.run(cancel)),
        ..running
    }
}

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

fn consumer(
    ca: &MeshCa,
    cluster: &str,
    server: SocketAddr,
    cache: Option<PathBuf>,
) -> RouteSyncSource {
    RouteSyncSource {
        cluster: c(cluster),
        trust_domain: TD.into(),
        endpoints: vec![server],
        tls: tls(ca, cluster, "gateway"),
        cache,
    }
}

#[tokio::test]
async fn exported_routes_reach_the_other_cluster_and_deletions_follow() {
    let ca = MeshCa::generate(TD).unwrap();
    let (ld, lk) = (listener().await, listener().await);
    let (ad, ak) = (ld.local_addr().unwrap(), lk.local_addr().unwrap());
    let diego = start(&ca, "diego", ld, vec![("k8s", ak)], None);
    let k8s = start(&ca, "k8s", lk, vec![("diego", ad)], None);
    let store = RouteStore::new();
    let cancel = CancellationToken::new();
    let (state, _) = consumer(&ca, "k8s", k8s.addr, None).spawn(store.clone(), cancel.clone());

    diego.local.replace_all([
        route("orders.apps.internal", "diego", true),
        route("hidden.apps.internal", "diego", false),
    ]);
    eventually(
        "orders at the k8s consumer within 1 s",
        Duration::from_secs(1),
        || store.snapshot().get(&key("orders.apps.internal")).is_some(),
    )
    .await;
    let t = store.snapshot();
    let orders = t.get(&key("orders.apps.internal")).unwrap();
    assert_eq!(orders.home_cluster.as_str(), "diego");
    assert!(
        orders.backends.is_empty(),
        "backends never leave their cluster"
    );
    assert!(
        t.get(&key("hidden.apps.internal")).is_none(),
        "not exported, not shared"
    );

    // Deletion, and an export withdrawn, propagate.
    diego
        .local
        .replace_all([route("hidden.apps.internal", "diego", false)]);
    eventually(
        "orders gone at the k8s consumer",
        Duration::from_secs(1),
        || store.snapshot().get(&key("orders.apps.internal")).is_none(),
    )
    .await;
    assert!(state.deltas.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    let status = k8s.handle.status();
    assert_eq!(status.peers[0].state, "connected");
    assert_eq!(status.trust_anchors.len(), 1);
    assert_eq!(
        status.peers[0].trust_anchors, status.trust_anchors,
        "both sides use the same anchor"
    );
    cancel.cancel();
    diego.stop().await;
    k8s.stop().await;
}

#[tokio::test]
async fn a_restarted_peer_resumes_from_its_revision_without_a_snapshot() {
    let ca = MeshCa::generate(TD).unwrap();
    let state_dir = tempfile::tempdir().unwrap();
    let (ld, lk) = (listener().await, listener().await);
    let (ad, ak) = (ld.local_addr().unwrap(), lk.local_addr().unwrap());
    let diego = start(&ca, "diego", ld, vec![("k8s", ak)], None);
    diego
        .local
        .replace_all([route("a.apps.internal", "diego", true)]);
    let k8s = start(
        &ca,
        "k8s",
        lk,
        vec![("diego", ad)],
        Some(state_dir.path().into()),
    );
    eventually("a imported", Duration::from_secs(2), || {
        k8s.merged.snapshot().get(&key("a.apps.internal")).is_some()
    })
    .await;
    assert_eq!(k8s.handle.peer("diego").unwrap().snapshots, 1);
    k8s.stop().await;

    // While k8s is down, diego changes.
    diego.local.replace_all([
        route("a.apps.internal", "diego", true),
        route("b.apps.internal", "diego", true),
    ]);
    let lk = TcpListener::bind(ak).await.unwrap();
    let k8s = start(
        &ca,
        "k8s",
        lk,
        vec![("diego", ad)],
        Some(state_dir.path().into()),
    );
    // Restored from disk before any peer answered.
    assert!(k8s.merged.snapshot().get(&key("a.apps.internal")).is_some());
    eventually("b imported after restart", Duration::from_secs(2), || {
        k8s.merged.snapshot().get(&key("b.apps.internal")).is_some()
    })
    .await;
    let peer = k8s.handle.peer("diego").unwrap();
    assert_eq!(peer.snapshots, 0, "resumed with a delta, no full snapshot");
    assert!(peer.deltas >= 1);
    diego.stop().await;
    k8s.stop().await;
}

#[tokio::test]
async fn consumers_keep_serving_through_a_partition_and_catch_up() {
    let ca = MeshCa::generate(TD).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let cache_file = cache.path().join("routes.pb");
    let (ld, lk) = (listener().await, listener().await);
    let (ad, ak) = (ld.local_addr().unwrap(), lk.local_addr().unwrap());
    let diego = start(&ca, "diego", ld, vec![("k8s", ak)], None);
    diego
        .local
        .replace_all([route("a.apps.internal", "diego", true)]);
    let k8s = start(&ca, "k8s", lk, vec![("diego", ad)], None);
    let store = RouteStore::new();
    let cancel = CancellationToken::new();
    let (state, _) = consumer(&ca, "k8s", k8s.addr, Some(cache_file.clone()))
        .spawn(store.clone(), cancel.clone());
    eventually("a at the consumer", Duration::from_secs(2), || {
        store.snapshot().get(&key("a.apps.internal")).is_some()
    })
    .await;
    eventually("fresh", Duration::from_secs(2), || {
        !state.stale.load(std::sync::atomic::Ordering::Acquire)
    })
    .await;
    eventually("the table cached", Duration::from_secs(2), || {
        state
            .cached_revision
            .load(std::sync::atomic::Ordering::Acquire)
            > 0
    })
    .await;

    // Partition: the local route-sync goes away. The consumer keeps its table, says stale.
    let k8s_addr = k8s.addr;
    k8s.stop().await;
    eventually("stale", Duration::from_secs(2), || {
        state.stale.load(std::sync::atomic::Ordering::Acquire)
    })
    .await;
    assert!(store.snapshot().get(&key("a.apps.internal")).is_some());

    // A consumer restarted now serves the cached table before anything answers.
    let restarted = RouteStore::new();
    let cancel2 = CancellationToken::new();
    consumer(&ca, "k8s", k8s_addr, Some(cache_file)).spawn(restarted.clone(), cancel2.clone());
    assert!(restarted.snapshot().get(&key("a.apps.internal")).is_some());

    // Changes during the partition arrive once route-sync is back.
    diego
        .local
        .replace_all([route("b.apps.internal", "diego", true)]);
    let k8s = start(
        &ca,
        "k8s",
        TcpListener::bind(ak).await.unwrap(),
        vec![("diego", ad)],
        None,
    );
    eventually("caught up", Duration::from_secs(5), || {
        let t = store.snapshot();
        t.get(&key("b.apps.internal")).is_some() && t.get(&key("a.apps.internal")).is_none()
    })
    .await;
    cancel.cancel();
    cancel2.cancel();
    diego.stop().await;
    k8s.stop().await;
}

#[tokio::test]
async fn bad_local_entries_are_rejected_while_good_ones_apply() {
    let ca = MeshCa::generate(TD).unwrap();
    let (ld, lk) = (listener().await, listener().await);
    let (ad, ak) = (ld.local_addr().unwrap(), lk.local_addr().unwrap());
    let diego = start(&ca, "diego", ld, vec![("k8s", ak)], None);
    let k8s = start(&ca, "k8s", lk, vec![("diego", ad)], None);
    // A file with a bad entry and a route claiming to live in k8s.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.yaml");
    std::fs::write(
        &file,
        "routes:\n  - {name: good.apps.internal, port: 8080, home_cluster: diego, exported: true}\n  - {name: 10.0.0.1, port: 8080, home_cluster: diego}\n  - {name: spoof.apps.internal, port: 8080, home_cluster: k8s, exported: true}\n",
    )
    .unwrap();
    let source = isthmus_route_sync::source::file::FileSource::new(&file);
    source.apply(&diego.local).unwrap();
    eventually("good at k8s", Duration::from_secs(2), || {
        k8s.merged
            .snapshot()
            .get(&key("good.apps.internal"))
            .is_some()
    })
    .await;
    assert!(
        k8s.merged
            .snapshot()
            .get(&key("spoof.apps.internal"))
            .is_none()
    );
    assert_eq!(
        diego.handle.status().rejected,
        1,
        "the spoofed route was refused and counted"
    );
    assert_eq!(
        source
            .stats()
            .entries_rejected
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    diego.stop().await;
    k8s.stop().await;
}

#[tokio::test]
async fn strangers_get_nothing() {
    let ca = MeshCa::generate(TD).unwrap();
    let node = start(&ca, "diego", listener().await, vec![], None);
    node.local
        .replace_all([route("a.apps.internal", "diego", true)]);
    // A cluster that is not a configured peer.
    let store = RouteStore::new();
    let cancel = CancellationToken::new();
    let mut src = consumer(&ca, "diego", node.addr, None);
    src.tls = tls(&ca, "billing", "route-sync");
    src.cluster = c("diego");
    let (state, _) = src.spawn(store.clone(), cancel.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(store.snapshot().is_empty());
    assert!(state.stale.load(std::sync::atomic::Ordering::Acquire));
    cancel.cancel();
    node.stop().await;
}

#[tokio::test]
async fn three_clusters_share_without_loops() {
    let ca = MeshCa::generate(TD).unwrap();
    let (la, lb, lc) = (listener().await, listener().await, listener().await);
    let (a, b, cc) = (
        la.local_addr().unwrap(),
        lb.local_addr().unwrap(),
        lc.local_addr().unwrap(),
    );
    let na = start(&ca, "a", la, vec![("b", b), ("c", cc)], None);
    let nb = start(&ca, "b", lb, vec![("a", a), ("c", cc)], None);
    let nc = start(&ca, "c", lc, vec![("a", a), ("b", b)], None);
    na.local.replace_all([route("x.apps.internal", "a", true)]);
    nb.local.replace_all([route("y.apps.internal", "b", true)]);
    eventually("everyone sees x and y", Duration::from_secs(2), || {
        [&na, &nb, &nc]
            .iter()
            .all(|n| n.merged.snapshot().len() == 2)
    })
    .await;
    let status = nc.handle.status();
    let routes_from = |p: &str| status.peers.iter().find(|s| s.cluster == p).unwrap().routes;
    assert_eq!(routes_from("a"), 1, "c imports x from a only");
    assert_eq!(
        routes_from("b"),
        1,
        "c imports y from b only: b never re-exports x"
    );
    assert!(status.conflicts.is_empty());
    // Churn settles: revisions stop growing (no update ping-pong between three nodes).
    let before = [
        na.merged.snapshot().revision(),
        nb.merged.snapshot().revision(),
        nc.merged.snapshot().revision(),
    ];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = [
        na.merged.snapshot().revision(),
        nb.merged.snapshot().revision(),
        nc.merged.snapshot().revision(),
    ];
    assert_eq!(before, after);
    na.stop().await;
    nb.stop().await;
    nc.stop().await;
}

/// A consumer learns it is fresh even when the table it follows never changes: here it
/// connects while the node is stale (its peer is not up yet) and the table is empty, then
/// the peer comes up with nothing exported.
#[tokio::test]
async fn consumers_learn_freshness_even_when_the_table_does_not_change() {
    let ca = MeshCa::generate(TD).unwrap();
    let (ld, lk) = (listener().await, listener().await);
    let (ad, ak) = (ld.local_addr().unwrap(), lk.local_addr().unwrap());
    let diego = start(&ca, "diego", ld, vec![("k8s", ak)], None);
    let store = RouteStore::new();
    let cancel = CancellationToken::new();
    let (state, _) = consumer(&ca, "diego", diego.addr, None).spawn(store.clone(), cancel.clone());
    eventually(
        "the node stale while its peer is down",
        Duration::from_secs(2),
        || diego.handle.is_stale(),
    )
    .await;
    assert!(state.stale.load(std::sync::atomic::Ordering::Acquire));

    let k8s = start(&ca, "k8s", lk, vec![("diego", ad)], None);
    eventually("the consumer fresh", Duration::from_secs(5), || {
        !state.stale.load(std::sync::atomic::Ordering::Acquire)
    })
    .await;
    assert!(store.snapshot().is_empty());
    cancel.cancel();
    k8s.stop().await;
    diego.stop().await;
}
