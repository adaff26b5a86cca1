//! The ingress decision: may this caller reach this authority? Pure, no I/O.
//!
//! This is what keeps the ingress from being an open proxy: the authority must parse as a
//! route name (no IP literal, no single-label name such as `localhost`), the route must be
//! homed in this cluster and exported, and the caller's verified identity must be allowed.
//! Only then does the ingress learn any address to connect to, and only from the route.

use std::sync::Arc;

use isthmus_certs::SpiffeId;
use isthmus_route_sync::{ClusterName, Route, RouteKey, RouteTable};

use crate::Refusal;

/// Decides one request. `authority` is the raw `:authority` (or QUIC head) as received.
///
/// # Errors
/// The [`Refusal`] to answer with, in this order of checks: a malformed authority
/// (400), a route not homed here or not exported (404), a caller not allowed (401), a route
/// without backends (503).
pub fn authorize(
    table: &RouteTable,
    cluster: &ClusterName,
    trust_domain: &str,
    authority: &str,
    caller: &SpiffeId,
) -> Result<Arc<Route>, Refusal> {
    let key =
        RouteKey::parse_authority(authority).map_err(|e| Refusal::BadRequest(e.to_string()))?;
    let route = match table.get(&key) {
        Some(route) if route.home_cluster == *cluster && route.exported => route,
        _ => return Err(Refusal::NotExported(key.to_string())),
    };
    if !route.allows(caller, trust_domain) {
        return Err(Refusal::Denied {
            route: key.to_string(),
            caller: caller.to_string(),
        });
    }
    if route.backends.is_empty() {
        return Err(Refusal::NoBackend(key.to_string()));
    }
    Ok(Arc::clone(route))
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_route_sync::RouteStore;
    use isthmus_route_sync::source::file::parse;
    use std::path::Path;

    fn table() -> Arc<RouteTable> {
        let text = r#"
routes:
  - {name: orders.apps.internal, port: 8080, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["127.0.0.1:1"]}
  - {name: secret.apps.internal, port: 8080, home_cluster: k8s, exported: false,
     allowed_peers: [cluster:diego], backends: ["127.0.0.1:1"]}
  - {name: remote.apps.internal, port: 8080, home_cluster: diego, exported: true,
     allowed_peers: [cluster:diego], backends: ["127.0.0.1:1"]}
  - {name: empty.apps.internal, port: 8080, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego]}
  - {name: vip.apps.internal, port: 8080, home_cluster: k8s, exported: true,
     allowed_peers: ["spiffe://mesh.local/cluster/other/gateway"], backends: ["127.0.0.1:1"]}
"#;
        let store = RouteStore::new();
        store.replace_all(parse(text, Path::new("t")).unwrap().routes);
        store.snapshot()
    }

    fn decide(authority: &str, caller: &str) -> Result<Arc<Route>, Refusal> {
        authorize(
            &table(),
            &ClusterName::parse("k8s").unwrap(),
            "mesh.local",
            authority,
            &SpiffeId::parse(caller).unwrap(),
        )
    }

    const DIEGO: &str = "spiffe://mesh.local/cluster/diego/gateway";

    #[test]
    fn allowed_caller_reaches_exported_route() {
        assert!(decide("orders.apps.internal:8080", DIEGO).is_ok());
        assert!(decide("ORDERS.apps.internal.:8080", DIEGO).is_ok());
    }

    #[test]
    fn open_proxy_attempts_are_bad_requests() {
        for authority in [
            "127.0.0.1:8080",
            "localhost:8080",
            "[::1]:8080",
            "169.254.169.254:80",
            "orders.apps.internal",
            "orders.apps.internal:0",
            "",
            "orders.apps.internal:8080/x",
        ] {
            assert!(
                matches!(decide(authority, DIEGO), Err(Refusal::BadRequest(_))),
                "{authority}"
            );
        }
    }

    #[test]
    fn unexported_foreign_and_unknown_routes_are_not_found() {
        for authority in [
            "secret.apps.internal:8080",
            "remote.apps.internal:8080",
            "nothing.apps.internal:8080",
            "orders.apps.internal:9090",
        ] {
            let refusal = decide(authority, DIEGO).unwrap_err();
            assert!(matches!(refusal, Refusal::NotExported(_)), "{authority}");
            assert_eq!(refusal.status(), 404);
        }
    }

    #[test]
    fn callers_outside_the_policy_are_denied() {
        for caller in [
            "spiffe://mesh.local/cluster/k8s/gateway",
            "spiffe://other.domain/cluster/diego/gateway",
            "spiffe://mesh.local/cluster/diego2/gateway",
        ] {
            let refusal = decide("orders.apps.internal:8080", caller).unwrap_err();
            assert!(matches!(refusal, Refusal::Denied { .. }), "{caller}");
            assert_eq!(refusal.status(), 401);
            assert!(refusal.to_string().contains(caller));
        }
        assert!(decide("vip.apps.internal:8080", DIEGO).is_err());
        assert!(
            decide(
                "vip.apps.internal:8080",
                "spiffe://mesh.local/cluster/other/gateway"
            )
            .is_ok()
        );
    }

    #[test]
    fn routes_without_backends_are_unavailable() {
        assert_eq!(
            decide("empty.apps.internal:8080", DIEGO)
                .unwrap_err()
                .status(),
            503
        );
    }
}
