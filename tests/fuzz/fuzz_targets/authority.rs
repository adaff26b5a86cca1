//! The ingress request check: whatever `:authority` a caller sends (as h2 hands it over, or
//! raw as in a QUIC head), `authorize` never panics, never accepts an IP literal or a
//! single-label name, and admits a request only for the exported route homed here that the
//! authority names exactly.
#![no_main]
use std::sync::{Arc, OnceLock};

use isthmus_certs::SpiffeId;
use isthmus_gateway::ingress::authorize::authorize;
use isthmus_route_sync::source::file::parse;
use isthmus_route_sync::{ClusterName, RouteKey, RouteStore, RouteTable};
use libfuzzer_sys::fuzz_target;

const TABLE: &str = r#"
routes:
  - {name: orders.apps.internal, port: 8080, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["127.0.0.1:1"]}
  - {name: secret.apps.internal, port: 8080, home_cluster: k8s, exported: false,
     allowed_peers: [cluster:diego], backends: ["127.0.0.1:1"]}
  - {name: remote.apps.internal, port: 8080, home_cluster: diego, exported: true,
     allowed_peers: [cluster:diego], backends: ["127.0.0.1:1"]}
  - {name: other.apps.internal, port: 9090, home_cluster: k8s, exported: true,
     allowed_peers: ["spiffe://mesh.local/cluster/other/gateway"], backends: ["127.0.0.1:1"]}
"#;

struct Fixture {
    table: Arc<RouteTable>,
    cluster: ClusterName,
    caller: SpiffeId,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let store = RouteStore::new();
        let loaded = parse(TABLE, std::path::Path::new("fuzz")).expect("the fixture table parses");
        store.replace_all(loaded.routes);
        Fixture {
            table: store.snapshot(),
            cluster: ClusterName::parse("k8s").expect("cluster name"),
            caller: SpiffeId::parse("spiffe://mesh.local/cluster/diego/gateway").expect("id"),
        }
    })
}

fn check(authority: &str) {
    let f = fixture();
    let decided = authorize(&f.table, &f.cluster, "mesh.local", authority, &f.caller);
    if let Ok(key) = RouteKey::parse_authority(authority) {
        assert!(key.name.as_str().parse::<std::net::IpAddr>().is_err());
        assert!(
            key.name.as_str().contains('.'),
            "single-label name accepted"
        );
    }
    if let Ok(route) = decided {
        let key = RouteKey::parse_authority(authority).expect("admitted, so it parses");
        assert_eq!(route.key, key, "admitted {authority:?} as another route");
        assert!(route.exported && route.home_cluster == f.cluster);
        assert_eq!(route.key.to_string(), "orders.apps.internal:8080");
    }
}

fuzz_target!(|data: &[u8]| {
    // Raw, as a QUIC head carries it.
    if let Ok(s) = std::str::from_utf8(data) {
        check(s);
    }
    // As h2 hands it to the ingress: only what `http` accepts as a URI authority.
    if let Ok(authority) = http::uri::Authority::try_from(data) {
        check(authority.as_str());
    }
});
