//! Egress ports (`bind_egress_ports`): the port a connection arrived on names its route.
//!
//! On Kubernetes, route-sync's mirror Service of an imported route has the route's port as
//! `port` and an egress port as `targetPort`; kube-proxy rewrites a call to the Service's
//! ClusterIP to an egress pod's address and that target port, so the port is all the egress
//! sees. Here no Kubernetes is involved: routes carry `egress_port` as route-sync stamps it,
//! and the apps answer with their own names so the tests check which one answered.

mod common;

use std::net::SocketAddr;

use common::*;
use isthmus_gateway::config::{EgressConfig, PeerConfig, Transport};
use isthmus_gateway::metrics::{Direction, ReasonLabels};
use isthmus_route_sync::{Route, RouteStore};
use isthmus_runtime::config::HumanDuration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn exchange(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(out)
}

/// Routes parsed from YAML, each `name:port` given the egress port listed for it.
fn with_ports(yaml: &str, ports: &[(&str, u16)]) -> Vec<Route> {
    routes(yaml)
        .snapshot()
        .iter()
        .map(|r| {
            let mut r = (**r).clone();
            r.egress_port = ports
                .iter()
                .find(|(key, _)| *key == r.key.to_string())
                .map(|(_, p)| *p);
            r
        })
        .collect()
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(local(port)).is_ok()
}

/// Two raw-TCP routes on one route port, both homed in k8s, each with its egress port: a
/// connection to each egress port reaches its own app (raw TCP, no Host or SNI needed); a
/// port two routes claim is refused and counted; a route moving its egress port follows,
/// and the port it left stops listening (a connection accepted on a port the table no
/// longer carries is refused as `unknown_egress_port`: a race, covered by the unit tests of
/// `identify`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_egress_port_reaches_its_route_and_follows_the_table() {
    for transport in [Transport::Tcp, Transport::Quic] {
        let (orders, _) = echo_backend("ORDERS:").await;
        let (billing, _) = echo_backend("BILLING:").await;
        let route_port = free_port();
        let (p_orders, p_billing, p_moved) = (free_port(), free_port(), free_port());
        let yaml = format!(
            r#"
routes:
  - {{name: orders.apps.internal, port: {route_port}, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["{orders}"]}}
  - {{name: billing.apps.internal, port: {route_port}, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["{billing}"]}}
"#
        );
        let orders_key = format!("orders.apps.internal:{route_port}");
        let billing_key = format!("billing.apps.internal:{route_port}");
        let mesh = Mesh::new();
        let (ingress_addr, ingress) =
            start_ingress(mesh.context("k8s", &routes(&yaml)), ingress_cfg()).await;
        let mut cfg = EgressConfig::with_peers(vec![PeerConfig {
            cluster: "k8s".into(),
            endpoints: vec![ingress_addr],
            transport,
            fallback_to_tcp: false,
        }]);
        cfg.listen_address = Some("127.0.0.1".parse().unwrap());
        cfg.bind_egress_ports = true;
        cfg.route_wait = HumanDuration::from_millis(200);
        let diego = RouteStore::new();
        diego.replace_all(with_ports(
            &yaml,
            &[(&orders_key, p_orders), (&billing_key, p_billing)],
        ));
        let ctx = mesh.context("diego", &diego);
        let egress = isthmus_gateway::egress::Egress::bind(ctx.clone(), cfg)
            .await
            .unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let force = tokio_util::sync::CancellationToken::new();
        let running = Running {
            shutdown: shutdown.clone(),
            force: force.clone(),
            task: tokio::spawn(egress.run(shutdown, force)),
        };
        eventually(|| listening(p_orders) && listening(p_billing)).await;
        assert!(!listening(p_moved), "no route carries this port yet");

        for round in 0..3 {
            for (port, app) in [(p_orders, "ORDERS:"), (p_billing, "BILLING:")] {
                let payload = format!("raw bytes {round}");
                let out = within(exchange(local(port), payload.as_bytes()))
                    .await
                    .unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&out),
                    format!("{app}{payload}"),
                    "port {port} over {transport:?}"
                );
            }
        }

        // Both routes claim one port for a moment: refused (after route_wait), never
        // guessed, and counted with its reason.
        diego.replace_all(with_ports(
            &yaml,
            &[(&orders_key, p_orders), (&billing_key, p_orders)],
        ));
        eventually(|| !listening(p_billing)).await;
        let out = within(exchange(local(p_orders), b"which?")).await;
        assert!(
            out.as_ref().map_or(true, Vec::is_empty),
            "an ambiguous port must be refused: {out:?}"
        );
        let ambiguous = ReasonLabels {
            route: "unknown".into(),
            direction: Direction::Egress,
            peer_cluster: "unknown".into(),
            reason: "ambiguous_egress_port",
        };
        assert_eq!(ctx.metrics.refused.get_or_create(&ambiguous).get(), 1);

        // orders moves to a new port, billing takes its own back: each follows.
        diego.replace_all(with_ports(
            &yaml,
            &[(&orders_key, p_moved), (&billing_key, p_billing)],
        ));
        eventually(|| listening(p_moved) && listening(p_billing) && !listening(p_orders)).await;
        let out = within(exchange(local(p_moved), b"moved")).await.unwrap();
        assert_eq!(out, b"ORDERS:moved");
        let out = within(exchange(local(p_billing), b"back")).await.unwrap();
        assert_eq!(out, b"BILLING:back");

        running.stop().await;
        ingress.stop().await;
    }
}
