//! The shim following its cluster's route-sync answers each remote name with exactly the
//! `vip` route-sync assigned to the name's routes, and computes none of its own.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use isthmus_certs::ca::{LeafSpec, MeshCa};
use isthmus_dns_shim::config::RoutesConfig;
use isthmus_route_sync::node::{Node, NodeSettings, PeerSpec, VipSettings};
use isthmus_route_sync::vip::VipRange;
use isthmus_route_sync::{
    ClusterName, PeerSelector, Protocol, Route, RouteKey, RouteName, RouteStore,
};
use isthmus_runtime::config::{HumanDuration, TlsConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const TD: &str = "mesh.local";

fn route(name: &str, home: &str) -> Route {
    Route {
        key: RouteKey::new(RouteName::parse(name).unwrap(), 8080),
        protocol: Protocol::Http,
        home_cluster: ClusterName::parse(home).unwrap(),
        exported: true,
        allowed_peers: vec![PeerSelector::parse("cluster:diego").unwrap()],
        backends: vec![],
        weights: Default::default(),
        vip: None,
        egress_port: None,
        revision: 0,
    }
}

fn node(
    ca: &MeshCa,
    cluster: &str,
    listener: TcpListener,
    peer: (&str, SocketAddr),
    vips: Option<VipSettings>,
) -> (RouteStore, RouteStore, CancellationToken) {
    let settings = NodeSettings {
        cluster: ClusterName::parse(cluster).unwrap(),
        trust_domain: TD.into(),
        tls: ca
            .mesh_tls(&LeafSpec::new(
                cluster,
                "route-sync",
                Duration::from_secs(3600),
            ))
            .unwrap(),
        peers: vec![PeerSpec {
            cluster: ClusterName::parse(peer.0).unwrap(),
            endpoints: vec![peer.1],
        }],
        state_dir: None,
        handshake_timeout: Duration::from_secs(5),
        vips,
        limits: Default::default(),
        keepalive: Default::default(),
    };
    let node = Node::with_listener(settings, listener);
    node.handle().local_loaded();
    let (local, merged) = (node.local_store(), node.merged_store());
    let cancel = CancellationToken::new();
    tokio::spawn(node.run(cancel.clone()));
    (local, merged, cancel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shim_answers_exactly_the_vip_route_sync_assigned() {
    let ca = MeshCa::generate(TD).unwrap();
    let (ld, lk) = (
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    let (ad, ak) = (ld.local_addr().unwrap(), lk.local_addr().unwrap());
    // A tiny range: two names get VIPs, the third waits without one.
    let alloc = VipSettings {
        range: VipRange::parse("10.99.0.0/30").unwrap(),
        hold: Duration::from_secs(3600),
    };
    let (_, diego, stop_d) = node(&ca, "diego", ld, ("k8s", ak), Some(alloc));
    let (k8s_local, _, stop_k) = node(&ca, "k8s", lk, ("diego", ad), None);

    let dir = tempfile::tempdir().unwrap();
    ca.issue(&LeafSpec::new(
        "diego",
        "dns-shim",
        Duration::from_secs(3600),
    ))
    .unwrap()
    .write(dir.path(), &ca.cert_pem())
    .unwrap();
    let upstream = authority().await;
    let mut cfg = config(
        &dir.path().join("unused.yaml"),
        vips(),
        dns_upstream(&[upstream.addr]),
    );
    cfg.routes = RoutesConfig {
        file: None,
        poll_interval: HumanDuration::from_millis(50),
        route_sync: Some(isthmus_dns_shim::config::RouteSyncSourceConfig {
            endpoints: vec![ad],
            trust_domain: TD.into(),
            tls: TlsConfig {
                cert: dir.path().join("cert.pem"),
                key: dir.path().join("key.pem"),
                bundle: dir.path().join("ca.pem"),
                reload_interval: HumanDuration::from_millis(500),
            },
            cache: None,
        }),
    };
    let shim = start(cfg).await;

    let names = ["a.apps.internal", "b.apps.internal", "c.apps.internal"];
    k8s_local.replace_all(names.iter().map(|n| route(n, "k8s")));
    let key = |n: &str| RouteKey::new(RouteName::parse(n).unwrap(), 8080);
    eventually(Duration::from_secs(10), "diego imported the names", || {
        names
            .iter()
            .all(|n| diego.snapshot().get(&key(n)).is_some())
    })
    .await;
    let dns = shim.dns;
    let ask = |n: &str| {
        let q = query(&format!("{n}."), RecordType::A, None);
        async move { udp(dns, &q).await }
    };
    for _ in 0..2 {
        // Twice: once after a name left and came back (it gets its held VIP again).
        let table = diego.snapshot();
        let mut answered = 0;
        for n in names {
            let vip = table.get(&key(n)).unwrap().vip;
            let mut reply = ask(n).await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                let done = match vip {
                    Some(ip) => addrs(&reply) == [ip.to_string()],
                    None => reply.metadata.response_code == ResponseCode::ServFail,
                };
                if done {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{n}: route.vip is {vip:?}, the shim answered {:?} {:?}",
                    reply.metadata.response_code,
                    addrs(&reply)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
                reply = ask(n).await;
            }
            answered += usize::from(vip.is_some());
        }
        assert_eq!(
            answered, 2,
            "a /30 has two VIPs; the third name is SERVFAIL"
        );
        // b leaves and comes back. Had b a VIP, the waiting name takes it at once (nothing
        // else is free), and b, back, is the one that waits: the shim must follow.
        k8s_local.apply([], [key("b.apps.internal")]);
        eventually(Duration::from_secs(5), "b gone at diego", || {
            diego.snapshot().get(&key("b.apps.internal")).is_none()
        })
        .await;
        k8s_local.apply([route("b.apps.internal", "k8s")], []);
        eventually(Duration::from_secs(5), "b back at diego", || {
            diego.snapshot().get(&key("b.apps.internal")).is_some()
        })
        .await;
    }
    let text = shim.metrics_text();
    assert!(
        text.contains("isthmus_dns_remote_names_without_vip 1"),
        "{text}"
    );
    shim.stop().await;
    stop_d.cancel();
    stop_k.cancel();
}
