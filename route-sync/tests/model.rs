//! Route model validation: every value a route is built from is checked, with a reason.

use isthmus_certs::SpiffeId;
use isthmus_route_sync::{Backend, ClusterName, PeerSelector, Protocol, RouteKey, RouteName};

#[test]
fn route_names_are_normalised_and_checked() {
    let n = RouteName::parse("Orders.Apps.Internal.").unwrap();
    assert_eq!(n.as_str(), "orders.apps.internal");
    for bad in [
        "",
        "localhost",
        "10.0.0.1",
        "a..b",
        "-a.internal",
        "a-.internal",
        "under_score.internal",
        "sp ace.internal",
        &format!("{}.internal", "a".repeat(64)),
    ] {
        let err = RouteName::parse(bad).unwrap_err().to_string();
        assert!(err.contains("expected"), "{bad:?}: {err}");
    }
    let domain = RouteName::parse("apps.internal").unwrap();
    assert!(n.is_within(&domain));
    assert!(domain.is_within(&domain));
    assert!(
        !RouteName::parse("xapps.internal")
            .unwrap()
            .is_within(&domain)
    );
}

#[test]
fn authorities_refuse_ip_literals_and_single_labels() {
    let key = RouteKey::parse_authority("orders.apps.internal:8080").unwrap();
    assert_eq!(key.to_string(), "orders.apps.internal:8080");
    for bad in [
        "127.0.0.1:80",
        "localhost:80",
        "[::1]:80",
        "orders.apps.internal",
        "orders.apps.internal:0",
        "orders.apps.internal:99999",
        "169.254.169.254:80",
    ] {
        assert!(RouteKey::parse_authority(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn peers_backends_protocols_and_clusters() {
    assert_eq!(
        PeerSelector::parse("cluster:diego").unwrap(),
        PeerSelector::Cluster(ClusterName::parse("diego").unwrap())
    );
    let id = "spiffe://mesh.local/cluster/diego/gateway";
    assert_eq!(
        PeerSelector::parse(id).unwrap(),
        PeerSelector::Identity(SpiffeId::parse(id).unwrap())
    );
    assert!(PeerSelector::parse("diego").is_err());
    assert!(PeerSelector::parse("cluster:Diego").is_err());

    let b = Backend::parse("[fd00::1]:8080").unwrap();
    assert_eq!((b.host(), b.port()), ("fd00::1", 8080));
    assert_eq!(b.to_string(), "[fd00::1]:8080");
    assert!(Backend::parse("orders.default.svc:8080").is_ok());
    for bad in ["10.0.0.1", "10.0.0.1:0", ":80", "a b:80", "fd00::1:80x"] {
        assert!(Backend::parse(bad).is_err(), "{bad} accepted");
    }
    assert_eq!("HTTP".parse::<Protocol>().unwrap(), Protocol::Http);
    assert!("udp".parse::<Protocol>().is_err());
}

#[test]
fn cluster_selector_is_scoped_to_the_trust_domain_and_path() {
    let sel = PeerSelector::parse("cluster:diego").unwrap();
    let ok = SpiffeId::parse("spiffe://mesh.local/cluster/diego/gateway").unwrap();
    let other_td = SpiffeId::parse("spiffe://evil.example/cluster/diego/gateway").unwrap();
    let prefix = SpiffeId::parse("spiffe://mesh.local/cluster/diego2/gateway").unwrap();
    assert!(sel.matches(&ok, "mesh.local"));
    assert!(!sel.matches(&other_td, "mesh.local"));
    assert!(!sel.matches(&prefix, "mesh.local"));
}
