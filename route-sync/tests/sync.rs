//! route-sync end to end, in-process, real mTLS gRPC on loopback: peering, deletion, resume
//! without snapshot, partitions, bad data, and three clusters without loops.

mod common;

use common::{TD, c, eventually, tls};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use isthmus_certs::PeerPolicy;
use isthmus_certs::ca::MeshCa;
use isthmus_route_sync::client::RouteSyncSource;
use isthmus_route_sync::node::{Node, NodeHandle, NodeSettings, PeerSpec};
use isthmus_route_sync::proto;
use isthmus_route_sync::{Backend, PeerSelector, Protocol, Route, RouteKey, RouteName, RouteStore};
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
        // Every cluster these tests run: a peer sees only routes some caller of it may use.
        allowed_peers: ["diego", "k8s", "a", "b", "c"]
            .iter()
            .map(|p| PeerSelector::parse(&format!("cluster:{p}")).unwrap())
            .collect(),
        backends: vec![Backend::parse("10.1.2.3:8080").unwrap()],
        weights: Default::default(),
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
        "routes:\n  - {name: good.apps.internal, port: 8080, home_cluster: diego, exported: true, allowed_peers: [cluster:k8s]}\n  - {name: 10.0.0.1, port: 8080, home_cluster: diego}\n  - {name: spoof.apps.internal, port: 8080, home_cluster: k8s, exported: true}\n",
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

/// A raw gRPC client of `server` with the identity of `component` in `cluster`.
fn raw_client(
    ca: &MeshCa,
    cluster: &str,
    component: &str,
    server: SocketAddr,
) -> proto::route_sync_client::RouteSyncClient<tonic::transport::Channel> {
    let tls = tls(ca, cluster, component).client_config(PeerPolicy::trust_domain(TD), &[b"h2"]);
    proto::route_sync_client::RouteSyncClient::new(
        isthmus_route_sync::grpc::channel(server, tls).unwrap(),
    )
}

#[tokio::test]
async fn strangers_get_nothing() {
    let ca = MeshCa::generate(TD).unwrap();
    let node = start(&ca, "diego", listener().await, vec![], None);
    node.local
        .replace_all([route("a.apps.internal", "diego", true)]);
    // A cluster that is not a configured peer: every call is refused, and says why.
    let mut client = raw_client(&ca, "billing", "route-sync", node.addr);
    let watch = timeout(
        Duration::from_secs(5),
        client.watch(proto::WatchRequest::default()),
    )
    .await
    .expect("the node answered");
    let refusal = watch.expect_err("Watch refused");
    assert_eq!(refusal.code(), tonic::Code::PermissionDenied, "{refusal:?}");
    assert!(
        refusal.message().contains("billing"),
        "{}",
        refusal.message()
    );
    let list = timeout(Duration::from_secs(5), client.list(proto::ListRequest {}))
        .await
        .unwrap();
    assert_eq!(list.unwrap_err().code(), tonic::Code::PermissionDenied);
    let status = timeout(
        Duration::from_secs(5),
        client.status(proto::StatusRequest {}),
    )
    .await
    .unwrap();
    assert_eq!(status.unwrap_err().code(), tonic::Code::PermissionDenied);
    node.stop().await;
}

fn allowed(name: &str, allowed: &[&str]) -> Route {
    let mut r = route(name, "diego", true);
    r.allowed_peers = allowed
        .iter()
        .map(|p| PeerSelector::parse(p).unwrap())
        .collect();
    r
}

/// A peer receives only the exported routes some caller of its cluster may use, follows
/// changes of `allowed_peers` both ways, and its `Status` tells it no more than that view.
#[tokio::test]
async fn a_peer_sees_only_what_it_may_call_and_a_status_of_its_own_view() {
    let ca = MeshCa::generate(TD).unwrap();
    let (ld, lk, le) = (listener().await, listener().await, listener().await);
    let (ad, ak, ae) = (
        ld.local_addr().unwrap(),
        lk.local_addr().unwrap(),
        le.local_addr().unwrap(),
    );
    let diego = start(&ca, "diego", ld, vec![("k8s", ak), ("eu", ae)], None);
    let k8s = start(&ca, "k8s", lk, vec![("diego", ad)], None);
    let eu = start(&ca, "eu", le, vec![("diego", ad)], None);
    diego.local.replace_all([
        allowed("by-cluster.apps.internal", &["cluster:k8s"]),
        allowed(
            "by-id.apps.internal",
            &["spiffe://mesh.local/cluster/k8s/gateway"],
        ),
        allowed("eu-only.apps.internal", &["cluster:eu"]),
        // The right cluster name in another trust domain admits nobody of this mesh's k8s.
        allowed(
            "other-domain.apps.internal",
            &["spiffe://elsewhere.local/cluster/k8s/gateway"],
        ),
        allowed("nobody.apps.internal", &[]),
        route("unexported.apps.internal", "diego", false),
        // Offered by eu too: a conflict at diego, which k8s must not hear about.
        allowed("shared.apps.internal", &["cluster:eu"]),
    ]);
    eu.local
        .replace_all([route("shared.apps.internal", "eu", true)]);
    let names = |store: &RouteStore| {
        let mut n: Vec<String> = store
            .snapshot()
            .iter()
            .filter(|r| r.home_cluster.as_str() == "diego")
            .map(|r| r.key.name.to_string())
            .collect();
        n.sort();
        n
    };
    eventually("k8s imported its two", Duration::from_secs(5), || {
        names(&k8s.merged) == ["by-cluster.apps.internal", "by-id.apps.internal"]
    })
    .await;
    eventually("eu imported its one", Duration::from_secs(5), || {
        names(&eu.merged) == ["eu-only.apps.internal"]
    })
    .await;
    eventually("diego sees the conflict", Duration::from_secs(5), || {
        !diego.handle.status().conflicts.is_empty()
    })
    .await;

    // allowed_peers changes travel as deltas: k8s loses one route and gains another.
    diego.local.apply(
        [
            allowed("by-cluster.apps.internal", &["cluster:eu"]),
            allowed("eu-only.apps.internal", &["cluster:eu", "cluster:k8s"]),
        ],
        [],
    );
    eventually("k8s follows the change", Duration::from_secs(5), || {
        names(&k8s.merged) == ["by-id.apps.internal", "eu-only.apps.internal"]
    })
    .await;
    let via_list = timeout(
        Duration::from_secs(5),
        raw_client(&ca, "k8s", "route-sync", diego.addr).list(proto::ListRequest {}),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    let mut listed: Vec<String> = via_list.upserts.iter().map(|r| r.name.clone()).collect();
    listed.sort();
    assert_eq!(listed, ["by-id.apps.internal", "eu-only.apps.internal"]);

    // Status, as k8s's route-sync asks it: its own view only.
    let status = timeout(
        Duration::from_secs(5),
        raw_client(&ca, "k8s", "route-sync", diego.addr).status(proto::StatusRequest {}),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    assert_eq!(status.routes, 2, "{status:?}");
    assert!(
        status.peers.is_empty(),
        "no word of other peers: {status:?}"
    );
    assert!(status.conflicts.is_empty(), "no conflicts: {status:?}");
    assert!(status.vips.is_none());
    assert_eq!(status.rejected, 0);
    assert_eq!(status.revision, diego.merged.snapshot().revision());
    assert_eq!(status.trust_anchors.len(), 1);
    // A local component still gets the whole picture.
    let local = diego.handle.status();
    assert_eq!(local.peers.len(), 2);
    assert!(!local.conflicts.is_empty());
    diego.stop().await;
    k8s.stop().await;
    eu.stop().await;
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

#[tokio::test]
async fn a_watching_local_source_turns_stale_and_fresh_again() {
    let ca = MeshCa::generate(TD).unwrap();
    let node = start(&ca, "k8s", listener().await, vec![], None);
    assert!(!node.handle.is_stale());
    // The Kubernetes source lost its API server: the routes stay, marked stale.
    node.local
        .replace_all([route("orders.apps.internal", "k8s", true)]);
    node.handle.set_local_fresh(false);
    assert!(node.handle.is_stale());
    assert!(node.handle.status().stale);
    eventually("the route still served", Duration::from_secs(2), || {
        node.merged.snapshot().len() == 1
    })
    .await;
    node.handle.set_local_fresh(true);
    assert!(!node.handle.is_stale());
    assert!(!node.handle.status().stale);
    node.stop().await;
}
