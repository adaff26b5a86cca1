//! route-sync serves and trusts identities by component, not by cluster: a peer cluster's
//! gateway or shim is no peer, a local component other than the gateway and the shim is no
//! consumer, and neither a node nor a consumer accepts a server that is not route-sync.
//! Real mTLS gRPC on loopback, every await bounded.

mod common;

use common::{TD, c, eventually, tls};

use std::net::SocketAddr;
use std::time::Duration;

use isthmus_certs::ca::MeshCa;
use isthmus_certs::{Component, MeshTls, PeerPolicy};
use isthmus_route_sync::node::{Node, NodeHandle, NodeSettings, PeerSpec};
use isthmus_route_sync::proto::route_sync_client::RouteSyncClient;
use isthmus_route_sync::{Backend, Protocol, Route, RouteKey, RouteName, RouteStore, proto};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const STEP: Duration = Duration::from_secs(5);

fn route(name: &str, home: &str) -> Route {
    Route {
        key: RouteKey::new(RouteName::parse(name).unwrap(), 8080),
        protocol: Protocol::Http,
        home_cluster: c(home),
        exported: true,
        allowed_peers: vec![],
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
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A node of `cluster` presenting `identity`, peering with `peers`.
async fn node(cluster: &str, identity: MeshTls, peers: Vec<(&str, SocketAddr)>) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    node_on(listener, cluster, identity, peers)
}

/// As [`node`], on a listener bound beforehand (so a peer can be pointed at it first).
fn node_on(
    listener: TcpListener,
    cluster: &str,
    identity: MeshTls,
    peers: Vec<(&str, SocketAddr)>,
) -> Running {
    let settings = NodeSettings {
        cluster: c(cluster),
        trust_domain: TD.into(),
        tls: identity,
        peers: peers
            .into_iter()
            .map(|(p, a)| PeerSpec {
                cluster: c(p),
                endpoints: vec![a],
            })
            .collect(),
        state_dir: None,
        handshake_timeout: STEP,
        vips: None,
        limits: Default::default(),
        keepalive: Default::default(),
    };
    let node = Node::with_listener(settings, listener);
    let cancel = CancellationToken::new();
    let running = Running {
        addr: node.local_addr().unwrap(),
        local: node.local_store(),
        merged: node.merged_store(),
        handle: node.handle(),
        cancel: cancel.clone(),
    };
    node.handle().local_loaded();
    tokio::spawn(node.run(cancel));
    running
}

/// A gRPC client of the node at `addr` presenting `identity`; it accepts only `cluster`'s
/// route-sync as the server, as every real client does.
fn client(
    identity: &MeshTls,
    cluster: &str,
    addr: SocketAddr,
) -> RouteSyncClient<tonic::transport::Channel> {
    let policy = PeerPolicy::component(TD, cluster, Component::ROUTE_SYNC);
    let channel =
        isthmus_route_sync::grpc::channel(addr, identity.client_config(policy, &[b"h2"])).unwrap();
    RouteSyncClient::new(channel)
}

/// What each RPC answers `identity`: `Ok(())` or the refusal's code and message.
async fn calls(identity: &MeshTls, server: &Running) -> [Result<(), (tonic::Code, String)>; 3] {
    let mut rpc = client(identity, "k8s", server.addr);
    let refusal = |s: tonic::Status| (s.code(), s.message().to_owned());
    let watch = timeout(STEP, rpc.watch(proto::WatchRequest::default()))
        .await
        .expect("Watch answers")
        .map(drop)
        .map_err(refusal);
    let list = timeout(STEP, rpc.list(proto::ListRequest::default()))
        .await
        .expect("List answers")
        .map(drop)
        .map_err(refusal);
    let status = timeout(STEP, rpc.status(proto::StatusRequest::default()))
        .await
        .expect("Status answers")
        .map(drop)
        .map_err(refusal);
    [watch, list, status]
}

fn assert_denied(result: &Result<(), (tonic::Code, String)>, presented: &str, expected: &str) {
    let (code, message) = result.as_ref().expect_err("must be refused");
    assert_eq!(*code, tonic::Code::PermissionDenied, "{message}");
    assert!(
        message.contains(presented),
        "{presented:?} missing from: {message}"
    );
    assert!(
        message.contains(expected),
        "{expected:?} missing from: {message}"
    );
}

#[tokio::test]
async fn a_peer_clusters_gateway_and_shim_are_refused_as_peers_and_as_consumers() {
    let ca = MeshCa::generate(TD).unwrap();
    let k8s = node(
        "k8s",
        tls(&ca, "k8s", "route-sync"),
        vec![("diego", "127.0.0.1:9".parse().unwrap())],
    )
    .await;
    k8s.local.replace_all([route("a.apps.internal", "k8s")]);

    // The peer's route-sync is served (the peer view), as the control.
    for result in calls(&tls(&ca, "diego", "route-sync"), &k8s).await {
        result.expect("the peer's route-sync is served");
    }
    // Its gateway and its shim are neither a peer nor a consumer of ours.
    for component in ["gateway", "dns-shim"] {
        let presented = format!("spiffe://{TD}/cluster/diego/{component}");
        for result in calls(&tls(&ca, "diego", component), &k8s).await {
            assert_denied(
                &result,
                &presented,
                &format!(
                    "component route-sync of cluster diego (spiffe://{TD}/cluster/diego/route-sync)"
                ),
            );
        }
    }
}

#[tokio::test]
async fn local_components_are_served_by_what_they_are() {
    let ca = MeshCa::generate(TD).unwrap();
    let k8s = node("k8s", tls(&ca, "k8s", "route-sync"), vec![]).await;

    // The consumers: the gateway and the shim get everything.
    for component in ["gateway", "dns-shim"] {
        for result in calls(&tls(&ca, "k8s", component), &k8s).await {
            result.unwrap_or_else(|e| panic!("{component} must be served: {e:?}"));
        }
    }
    // `isthmus-route-sync status` presents route-sync's own identity: Status only.
    let [watch, list, status] = calls(&tls(&ca, "k8s", "route-sync"), &k8s).await;
    status.expect("the status command is answered");
    let own = format!("spiffe://{TD}/cluster/k8s/route-sync");
    for result in [watch, list] {
        assert_denied(
            &result,
            &own,
            &format!("component gateway of cluster k8s (spiffe://{TD}/cluster/k8s/gateway)"),
        );
        assert_denied(&result, &own, "component dns-shim of cluster k8s");
    }
    // Any other local component gets nothing at all.
    let stranger = format!("spiffe://{TD}/cluster/k8s/intruder");
    for result in calls(&tls(&ca, "k8s", "intruder"), &k8s).await {
        assert_denied(&result, &stranger, "component gateway of cluster k8s");
    }
}

#[tokio::test]
async fn a_node_refuses_a_peer_server_that_is_not_route_sync() {
    let ca = MeshCa::generate(TD).unwrap();
    // diego's gateway certificate, serving the RouteSync API as if it were diego's route-sync.
    let impostor_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let impostor_addr = impostor_listener.local_addr().unwrap();
    let k8s = node(
        "k8s",
        tls(&ca, "k8s", "route-sync"),
        vec![("diego", impostor_addr)],
    )
    .await;
    let impostor = node_on(
        impostor_listener,
        "diego",
        tls(&ca, "diego", "gateway"),
        vec![("k8s", k8s.addr)],
    );
    impostor
        .local
        .replace_all([route("evil.apps.internal", "diego")]);

    eventually("k8s refuses the impostor's certificate", STEP, || {
        let status = k8s.handle.status();
        let error = &status.peers[0].last_error;
        error.contains(&format!("spiffe://{TD}/cluster/diego/gateway"))
            && error.contains("component route-sync of cluster diego")
    })
    .await;
    assert!(
        k8s.merged.snapshot().is_empty(),
        "nothing imported from the impostor"
    );
    assert_eq!(
        impostor.local.snapshot().len(),
        1,
        "the impostor had a route to offer"
    );
}

#[tokio::test]
async fn a_consumer_refuses_a_server_that_is_not_route_sync() {
    let ca = MeshCa::generate(TD).unwrap();
    // k8s's DNS shim certificate, answering where the consumer expects route-sync.
    let impostor = tls(&ca, "k8s", "dns-shim");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(
        impostor.server_config(PeerPolicy::trust_domain(TD), &[b"h2"]),
    );
    let (tx, mut handshakes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let result = acceptor
                .accept(tcp)
                .await
                .map(drop)
                .map_err(|e| e.to_string());
            let _ = tx.send(result);
        }
    });

    let store = RouteStore::new();
    let cancel = CancellationToken::new();
    let source = isthmus_route_sync::client::RouteSyncSource {
        cluster: c("k8s"),
        trust_domain: TD.into(),
        endpoints: vec![addr],
        tls: tls(&ca, "k8s", "gateway"),
        cache: None,
    };
    let (state, _) = source.spawn(store.clone(), cancel.clone());
    let first = timeout(STEP, handshakes.recv())
        .await
        .expect("the consumer dials")
        .expect("server alive");
    // The chain is good (one CA), so only the consumer's SPIFFE ID check can have refused
    // the certificate; rustls tells the server with this alert.
    let error = first.expect_err("the consumer must refuse a server that is not route-sync");
    assert!(error.contains("CertificateUnknown"), "{error}");
    assert!(store.snapshot().is_empty());
    assert!(state.stale.load(std::sync::atomic::Ordering::Acquire));
    cancel.cancel();
}
