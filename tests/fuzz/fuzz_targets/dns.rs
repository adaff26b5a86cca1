//! The DNS shim's request path: any packet a client sends (UDP or TCP) goes through the
//! engine's wire parsing and its decision against a small route table without a panic, and
//! every reply it sends decodes as a DNS message that fits the transport's limit.
#![no_main]
use std::net::Ipv4Addr;
use std::sync::OnceLock;
use std::time::Duration;

use hickory_proto::op::Message;
use isthmus_dns_shim::decide::Policy;
use isthmus_dns_shim::engine::{Engine, EngineSettings, Step, Transport};
use isthmus_dns_shim::metrics::Metrics;
use isthmus_dns_shim::snapshot::{AnswerMode, Snapshot};
use isthmus_dns_shim::upstream::Upstream;
use isthmus_dns_shim::upstream::dns::DnsUpstream;
use isthmus_route_sync::source::file::parse;
use isthmus_route_sync::{ClusterName, RouteName, RouteStore};
use libfuzzer_sys::fuzz_target;

const TABLE: &str = r#"
routes:
  - {name: orders.apps.internal, port: 8080, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], vip: 100.64.0.5}
  - {name: billing.apps.internal, port: 443, protocol: tls, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego]}
  - {name: local.apps.internal, port: 8080, home_cluster: diego, exported: true,
     allowed_peers: [cluster:k8s], backends: ["127.0.0.1:1"]}
"#;

/// One engine answering in VIP mode, one in shared-address mode.
fn engines() -> &'static [Engine; 2] {
    static ENGINES: OnceLock<[Engine; 2]> = OnceLock::new();
    ENGINES.get_or_init(|| {
        let store = RouteStore::new();
        store.replace_all(
            parse(TABLE, std::path::Path::new("fuzz"))
                .expect("table")
                .routes,
        );
        let table = store.snapshot();
        let local = ClusterName::parse("diego").expect("cluster");
        let domains = [RouteName::parse("apps.internal").expect("domain")];
        // In VIP mode, orders carries a VIP and billing none (answered SERVFAIL).
        let vip = AnswerMode::Vip;
        let shared = AnswerMode::Shared {
            v4: vec![Ipv4Addr::new(10, 0, 0, 7)],
            v6: vec!["fd00::7".parse().expect("v6")],
        };
        [vip, shared].map(|mode| {
            let snapshot = Snapshot::build(&table, &local, &mode);
            let settings = EngineSettings {
                policy: Policy::new(&domains, &mode, 0, 30),
                edns_udp_payload: 1232,
                upstream_timeout: Duration::from_secs(1),
                max_forwarded_in_flight: 4,
            };
            // Never asked: `handle` stops before the upstream.
            let upstream = Upstream::Dns(DnsUpstream::new(
                vec!["127.0.0.1:9".parse().expect("addr")],
                Duration::from_secs(1),
            ));
            Engine::new(settings, snapshot, upstream, Metrics::default())
        })
    })
}

fuzz_target!(|data: &[u8]| {
    for engine in engines() {
        for (transport, limit) in [(Transport::Udp, 1232), (Transport::Tcp, 65_535)] {
            match engine.handle(data, transport) {
                Step::Reply(bytes) => {
                    // A UDP reply never exceeds what the client can take (512 without EDNS).
                    assert!(
                        bytes.len() <= limit,
                        "{} byte reply over {transport:?}",
                        bytes.len()
                    );
                    let reply = Message::from_vec(&bytes).expect("the shim's reply decodes");
                    if data.len() >= 2 {
                        assert_eq!(reply.metadata.id.to_be_bytes(), [data[0], data[1]]);
                    }
                }
                Step::Drop | Step::Forward(_) => {}
            }
        }
    }
});
