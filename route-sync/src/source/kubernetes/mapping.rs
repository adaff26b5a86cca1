//! Services, EndpointSlices and ServiceExports to routes: a pure function of the objects
//! the watchers hold. No client, no clock.
//!
//! The rules (docs/architecture.md, "Kubernetes route source", says the same):
//! - A Service is a route source when it carries `isthmus.io/route: <name>`. Each of its
//!   TCP ports is one route `<name>:<port>` (the Service port's `port`), or only the ports
//!   `isthmus.io/ports` names (comma-separated port names or numbers).
//! - Protocol: `isthmus.io/protocol`, else the port's `appProtocol` (`http`,
//!   `kubernetes.io/h2c` -> http; `tls`, `https` -> tls; others are not decisive), else the
//!   port name's first `-`-separated part (`http`, `http2` -> http; `tls`, `https` -> tls),
//!   else tcp.
//! - Exported when a ServiceExport of the same namespace and name exists, or the Service
//!   says `isthmus.io/export: "true"`. `isthmus.io/allowed-peers` lists the callers
//!   (`cluster:<name>` or SPIFFE IDs, separated by commas or spaces); none by default.
//! - Backends: the endpoints of the Service's EndpointSlices (label
//!   `kubernetes.io/service-name`) at the slice port named as the Service port. Ready
//!   (unset `ready` means ready) and not terminating endpoints are used; serving but
//!   terminating ones only when no ready one is left. Sorted and deduplicated.
//! - A bad annotation refuses the whole Service (its last good routes are kept by the
//!   caller); two Services claiming one `name:port`: the older (creationTimestamp, then
//!   `namespace/name`) wins, the other is refused as a conflict.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{Backend, ClusterName, PeerSelector, Protocol, Route, RouteKey, RouteName};
use crate::source::Rejected;

/// The annotation that makes a Service a route: its value is the route name.
pub const ROUTE: &str = "isthmus.io/route";
/// Which ports are routes: comma-separated port names or numbers. Default all TCP ports.
pub const PORTS: &str = "isthmus.io/ports";
/// The route protocol (`tcp`, `http`, `tls`) for every port, over `appProtocol`.
pub const PROTOCOL: &str = "isthmus.io/protocol";
/// `"true"` exports the Service's routes without a ServiceExport.
pub const EXPORT: &str = "isthmus.io/export";
/// Who may call the routes from other clusters.
pub const ALLOWED_PEERS: &str = "isthmus.io/allowed-peers";
/// The EndpointSlice label naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Service's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    /// The namespace.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl ServiceRef {
    /// The reference of an object's metadata (namespace `default` when unset).
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self {
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            name: meta.name.clone().unwrap_or_default(),
        }
    }

    /// `Service <ns>/<name>`, the entry of a [`Rejected`].
    pub fn entry(&self) -> String {
        format!("Service {self}")
    }
}

impl std::fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What became of one Service, for its ServiceExport's conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No `isthmus.io/route` annotation: not a route.
    NotAnnotated,
    /// Its routes are in the table.
    Routes,
    /// Refused for a bad annotation; the reason names the value and what was expected.
    Invalid(String),
    /// Refused: an older Service claims one of its `name:port`s.
    Conflict(String),
}

/// The outcome of one mapping.
#[derive(Debug, Default)]
pub struct Mapped {
    /// The routes of the accepted Services, sorted by key.
    pub routes: Vec<Route>,
    /// The accepted Services' routes, per Service (what the caller keeps as last good).
    pub by_service: BTreeMap<ServiceRef, Vec<Route>>,
    /// The refused Services, each with why.
    pub rejected: Vec<Rejected>,
    /// Every annotated or refused Service's verdict; Services without the annotation are
    /// [`Verdict::NotAnnotated`].
    pub verdicts: BTreeMap<ServiceRef, Verdict>,
}

/// Maps the objects to routes homed in `cluster`. `exports` are the namespace/name of
/// every ServiceExport; `namespaces` limits the Services considered (empty: all).
pub fn map(
    cluster: &ClusterName,
    namespaces: &[String],
    services: &[&Service],
    slices: &[&EndpointSlice],
    exports: &HashSet<ServiceRef>,
) -> Mapped {
    let in_scope = |ns: &str| namespaces.is_empty() || namespaces.iter().any(|n| n == ns);
    let mut slices_of: HashMap<ServiceRef, Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let mut key = ServiceRef::of(&slice.metadata);
        key.name.clone_from(service);
        slices_of.entry(key).or_default().push(slice);
    }

    // Oldest first: the first Service to claim a key keeps it.
    let mut ordered: Vec<(&Service, ServiceRef)> = services
        .iter()
        .map(|s| (*s, ServiceRef::of(&s.metadata)))
        .filter(|(_, r)| in_scope(&r.namespace))
        .collect();
    ordered.sort_by(|(a, ra), (b, rb)| {
        let created = |s: &Service| s.metadata.creation_timestamp.as_ref().map(|t| t.0);
        created(a).cmp(&created(b)).then_with(|| ra.cmp(rb))
    });

    let mut out = Mapped::default();
    let mut claimed: HashMap<RouteKey, ServiceRef> = HashMap::new();
    for (service, sref) in ordered {
        let no_slices = Vec::new();
        let own_slices = slices_of.get(&sref).unwrap_or(&no_slices);
        let exported = exports.contains(&sref);
        let routes = match service_routes(cluster, service, own_slices, exported) {
            Ok(None) => {
                out.verdicts.insert(sref, Verdict::NotAnnotated);
                continue;
            }
            Ok(Some(routes)) => routes,
            Err((route, reason)) => {
                out.rejected.push(Rejected {
                    entry: sref.entry(),
                    route,
                    reason: reason.clone(),
                });
                out.verdicts.insert(sref, Verdict::Invalid(reason));
                continue;
            }
        };
        if let Some((key, owner)) = routes
            .iter()
            .find_map(|r| claimed.get(&r.key).map(|o| (&r.key, o)))
        {
            let reason = format!(
                "{key} is already the route of Service {owner}, which is older; \
                 expected one Service per name and port"
            );
            out.rejected.push(Rejected {
                entry: sref.entry(),
                route: Some(key.to_string()),
                reason: reason.clone(),
            });
            out.verdicts.insert(sref, Verdict::Conflict(reason));
            continue;
        }
        for r in &routes {
            claimed.insert(r.key.clone(), sref.clone());
        }
        out.routes.extend(routes.iter().cloned());
        out.by_service.insert(sref.clone(), routes);
        out.verdicts.insert(sref, Verdict::Routes);
    }
    out.routes.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// The routes of one Service: `Ok(None)` when it is not annotated, `Err((route, reason))`
/// when an annotation is bad.
#[allow(clippy::type_complexity)]
fn service_routes(
    cluster: &ClusterName,
    service: &Service,
    slices: &[&EndpointSlice],
    export_object: bool,
) -> Result<Option<Vec<Route>>, (Option<String>, String)> {
    let annotations = service.metadata.annotations.clone().unwrap_or_default();
    let Some(raw_name) = annotations.get(ROUTE) else {
        return Ok(None);
    };
    let bad = |route: Option<String>, reason: String| (route, reason);
    let name = RouteName::parse(raw_name.trim())
        .map_err(|e| bad(None, format!("annotation {ROUTE}: {e}")))?;
    let protocol = match annotations.get(PROTOCOL) {
        Some(p) => Some(p.trim().parse::<Protocol>().map_err(|_| {
            bad(
                Some(name.to_string()),
                format!(
                    "annotation {PROTOCOL}: {p:?} is not a protocol; expected tcp, http or tls"
                ),
            )
        })?),
        None => None,
    };
    let exported = match annotations.get(EXPORT).map(|v| v.trim()) {
        None => export_object,
        Some("true") => true,
        Some("false") => export_object,
        Some(other) => {
            return Err(bad(
                Some(name.to_string()),
                format!("annotation {EXPORT}: {other:?}; expected \"true\" or \"false\""),
            ));
        }
    };
    let allowed_peers = match annotations.get(ALLOWED_PEERS) {
        Some(list) => {
            let mut peers = Vec::new();
            for item in list.split([',', ' ', '\t', '\n']).filter(|s| !s.is_empty()) {
                peers.push(PeerSelector::parse(item).map_err(|e| {
                    bad(
                        Some(name.to_string()),
                        format!("annotation {ALLOWED_PEERS}: {e}"),
                    )
                })?);
            }
            peers
        }
        None => Vec::new(),
    };

    let ports: Vec<&ServicePort> = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(|p| p.iter().collect())
        .unwrap_or_default();
    let is_tcp = |p: &ServicePort| p.protocol.as_deref().unwrap_or("TCP") == "TCP";
    let selected: Vec<&ServicePort> = match annotations.get(PORTS) {
        None => ports.iter().copied().filter(|p| is_tcp(p)).collect(),
        Some(list) => {
            let items: Vec<&str> = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            if items.is_empty() {
                return Err(bad(
                    Some(name.to_string()),
                    format!(
                        "annotation {PORTS}: {list:?} names no port; expected comma-separated \
                         port names or numbers"
                    ),
                ));
            }
            let mut chosen = Vec::new();
            for item in items {
                let port = ports.iter().copied().find(|p| {
                    p.name.as_deref() == Some(item) || item.parse::<i32>().ok() == Some(p.port)
                });
                match port {
                    Some(p) if is_tcp(p) => {
                        if !chosen.iter().any(|c: &&ServicePort| c.port == p.port) {
                            chosen.push(p);
                        }
                    }
                    Some(p) => {
                        return Err(bad(
                            Some(name.to_string()),
                            format!(
                                "annotation {PORTS}: port {item:?} is {}; expected a TCP port",
                                p.protocol.as_deref().unwrap_or("TCP")
                            ),
                        ));
                    }
                    None => {
                        let known: Vec<String> = ports
                            .iter()
                            .map(|p| match &p.name {
                                Some(n) => format!("{n} ({})", p.port),
                                None => p.port.to_string(),
                            })
                            .collect();
                        return Err(bad(
                            Some(name.to_string()),
                            format!(
                                "annotation {PORTS}: {item:?} names no port of the Service; \
                                 expected one of [{}]",
                                known.join(", ")
                            ),
                        ));
                    }
                }
            }
            chosen
        }
    };

    let mut routes = Vec::with_capacity(selected.len());
    for port in selected {
        let number = u16::try_from(port.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                bad(
                    Some(name.to_string()),
                    format!("port {} is not 1..=65535", port.port),
                )
            })?;
        let key = RouteKey::new(name.clone(), number);
        routes.push(Route {
            protocol: protocol.unwrap_or_else(|| port_protocol(port)),
            home_cluster: cluster.clone(),
            exported,
            allowed_peers: allowed_peers.clone(),
            backends: backends(slices, port.name.as_deref().unwrap_or("")),
            weights: BTreeMap::new(),
            vip: None,
            egress_port: None,
            revision: 0,
            key,
        });
    }
    Ok(Some(routes))
}

/// A port's protocol from its `appProtocol`, else its name, else tcp.
pub fn port_protocol(port: &ServicePort) -> Protocol {
    match port
        .app_protocol
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("http" | "kubernetes.io/h2c") => return Protocol::Http,
        Some("tls" | "https") => return Protocol::Tls,
        _ => {}
    }
    let name = port.name.as_deref().unwrap_or("");
    match name.split('-').next().unwrap_or("") {
        "http" | "http2" => Protocol::Http,
        "tls" | "https" => Protocol::Tls,
        _ => Protocol::Tcp,
    }
}

/// The backends of one Service port: ready endpoints, else serving-but-terminating ones.
pub fn backends(slices: &[&EndpointSlice], port_name: &str) -> Vec<Backend> {
    let mut ready = BTreeSet::new();
    let mut draining = BTreeSet::new();
    for slice in slices {
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            let conditions = endpoint.conditions.as_ref();
            // API convention: an unset `ready` or `serving` means true, unset
            // `terminating` false.
            let is_ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(is_ready);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let set = if is_ready && !terminating {
                &mut ready
            } else if terminating && serving {
                &mut draining
            } else {
                continue;
            };
            for address in &endpoint.addresses {
                let text = if address.contains(':') {
                    format!("[{address}]:{port}")
                } else {
                    format!("{address}:{port}")
                };
                // A malformed address is one endpoint lost, not the route: skip it.
                match Backend::parse(&text) {
                    Ok(b) => {
                        set.insert(b);
                    }
                    Err(e) => tracing::debug!("EndpointSlice address skipped: {e}"),
                }
            }
        }
    }
    if ready.is_empty() {
        draining.into_iter().collect()
    } else {
        ready.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn cluster() -> ClusterName {
        ClusterName::parse("k8s").unwrap()
    }

    fn port(name: Option<&str>, number: i32) -> ServicePort {
        ServicePort {
            name: name.map(str::to_string),
            port: number,
            ..ServicePort::default()
        }
    }

    fn service(
        ns: &str,
        name: &str,
        annotations: &[(&str, &str)],
        ports: Vec<ServicePort>,
    ) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(ports),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    fn routed(ns: &str, name: &str, route: &str) -> Service {
        service(ns, name, &[(ROUTE, route)], vec![port(Some("http"), 8080)])
    }

    /// (address, ready, serving, terminating)
    type Ep<'a> = (&'a str, Option<bool>, Option<bool>, Option<bool>);

    fn slice(
        ns: &str,
        service: &str,
        ports: &[(Option<&str>, i32)],
        eps: &[Ep<'_>],
    ) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(format!("{service}-{}", eps.len())),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), service.to_string())].into()),
                ..ObjectMeta::default()
            },
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort {
                        name: n.map(str::to_string),
                        port: Some(*p),
                        ..EndpointPort::default()
                    })
                    .collect(),
            ),
            endpoints: Some(
                eps.iter()
                    .map(|(a, ready, serving, terminating)| Endpoint {
                        addresses: vec![a.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            serving: *serving,
                            terminating: *terminating,
                        }),
                        ..Endpoint::default()
                    })
                    .collect(),
            ),
        }
    }

    fn run(services: &[Service], slices: &[EndpointSlice], exports: &[(&str, &str)]) -> Mapped {
        let exports = exports
            .iter()
            .map(|(ns, n)| ServiceRef {
                namespace: ns.to_string(),
                name: n.to_string(),
            })
            .collect();
        map(
            &cluster(),
            &[],
            &services.iter().collect::<Vec<_>>(),
            &slices.iter().collect::<Vec<_>>(),
            &exports,
        )
    }

    fn backends_of(m: &Mapped) -> Vec<String> {
        m.routes[0]
            .backends
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn annotated_service_with_slice_and_export_is_an_exported_route() {
        let svc = service(
            "shop",
            "orders",
            &[
                (ROUTE, "Orders.Apps.Internal"),
                (
                    ALLOWED_PEERS,
                    "cluster:diego, spiffe://mesh.local/cluster/diego/gateway",
                ),
            ],
            vec![port(Some("http"), 8080)],
        );
        let sl = slice(
            "shop",
            "orders",
            &[(Some("http"), 9000)],
            &[
                ("10.0.0.2", Some(true), None, None),
                ("10.0.0.1", None, None, None),
            ],
        );
        let m = run(&[svc], &[sl], &[("shop", "orders")]);
        assert!(m.rejected.is_empty(), "{:?}", m.rejected);
        assert_eq!(m.routes.len(), 1);
        let r = &m.routes[0];
        assert_eq!(r.key.to_string(), "orders.apps.internal:8080");
        assert_eq!(r.protocol, Protocol::Http);
        assert_eq!(r.home_cluster, cluster());
        assert!(r.exported);
        assert_eq!(r.allowed_peers.len(), 2);
        // Pod address and target port, sorted; an unset `ready` is ready.
        assert_eq!(backends_of(&m), ["10.0.0.1:9000", "10.0.0.2:9000"]);
        assert_eq!(m.verdicts.values().next(), Some(&Verdict::Routes));
    }

    #[test]
    fn not_exported_without_export_or_annotation_and_export_annotation_exports() {
        let m = run(
            &[routed("a", "s", "s.apps.internal")],
            &[],
            &[("a", "other")],
        );
        assert!(!m.routes[0].exported);
        assert!(m.routes[0].allowed_peers.is_empty());
        let svc = service(
            "a",
            "s",
            &[(ROUTE, "s.apps.internal"), (EXPORT, "true")],
            vec![port(None, 80)],
        );
        assert!(run(&[svc], &[], &[]).routes[0].exported);
        let svc = service(
            "a",
            "s",
            &[(ROUTE, "s.apps.internal"), (EXPORT, "false")],
            vec![port(None, 80)],
        );
        assert!(!run(std::slice::from_ref(&svc), &[], &[]).routes[0].exported);
        // A ServiceExport exports even with the annotation "false".
        assert!(run(&[svc], &[], &[("a", "s")]).routes[0].exported);
    }

    #[test]
    fn unannotated_services_are_not_routes() {
        let svc = service("a", "plain", &[], vec![port(None, 80)]);
        let m = run(&[svc], &[], &[("a", "plain")]);
        assert!(m.routes.is_empty() && m.rejected.is_empty());
        assert_eq!(m.verdicts.values().next(), Some(&Verdict::NotAnnotated));
    }

    #[test]
    fn namespace_filter() {
        let svcs = [
            routed("a", "s", "a.apps.internal"),
            routed("b", "s", "b.apps.internal"),
        ];
        let m = map(
            &cluster(),
            &["b".into()],
            &svcs.iter().collect::<Vec<_>>(),
            &[],
            &HashSet::new(),
        );
        assert_eq!(m.routes.len(), 1);
        assert_eq!(m.routes[0].key.name.as_str(), "b.apps.internal");
    }

    #[test]
    fn one_route_per_tcp_port_and_port_selection() {
        let mut udp = port(Some("dns"), 53);
        udp.protocol = Some("UDP".into());
        let ports = vec![
            port(Some("http"), 8080),
            port(Some("admin"), 9090),
            udp.clone(),
        ];
        let svc = service("a", "s", &[(ROUTE, "s.apps.internal")], ports.clone());
        let keys: Vec<u16> = run(&[svc], &[], &[])
            .routes
            .iter()
            .map(|r| r.key.port)
            .collect();
        assert_eq!(keys, [8080, 9090]);
        let svc = service(
            "a",
            "s",
            &[(ROUTE, "s.apps.internal"), (PORTS, "9090, http")],
            ports.clone(),
        );
        let keys: Vec<u16> = run(&[svc], &[], &[])
            .routes
            .iter()
            .map(|r| r.key.port)
            .collect();
        assert_eq!(keys, [8080, 9090]);
        let svc = service(
            "a",
            "s",
            &[(ROUTE, "s.apps.internal"), (PORTS, "admin")],
            ports.clone(),
        );
        let keys: Vec<u16> = run(&[svc], &[], &[])
            .routes
            .iter()
            .map(|r| r.key.port)
            .collect();
        assert_eq!(keys, [9090]);
        let svc = service(
            "a",
            "s",
            &[(ROUTE, "s.apps.internal"), (PORTS, "dns")],
            ports,
        );
        let m = run(&[svc], &[], &[]);
        assert!(m.routes.is_empty());
        assert!(
            m.rejected[0].reason.contains("expected a TCP port"),
            "{}",
            m.rejected[0].reason
        );
    }

    #[test]
    fn protocol_rules() {
        let mut app = port(Some("web"), 1);
        app.app_protocol = Some("kubernetes.io/h2c".into());
        assert_eq!(port_protocol(&app), Protocol::Http);
        app.app_protocol = Some("https".into());
        assert_eq!(port_protocol(&app), Protocol::Tls);
        app.app_protocol = Some("tls".into());
        assert_eq!(port_protocol(&app), Protocol::Tls);
        // appProtocol decides over the name.
        let mut p = port(Some("tls-x"), 1);
        p.app_protocol = Some("http".into());
        assert_eq!(port_protocol(&p), Protocol::Http);
        // Not decisive: fall back to the name.
        p.app_protocol = Some("kubernetes.io/ws".into());
        assert_eq!(port_protocol(&p), Protocol::Tls);
        assert_eq!(
            port_protocol(&port(Some("http-metrics"), 1)),
            Protocol::Http
        );
        assert_eq!(port_protocol(&port(Some("https"), 1)), Protocol::Tls);
        assert_eq!(port_protocol(&port(Some("httpx"), 1)), Protocol::Tcp);
        assert_eq!(port_protocol(&port(Some("grpc"), 1)), Protocol::Tcp);
        assert_eq!(port_protocol(&port(None, 1)), Protocol::Tcp);
        // The annotation decides over everything.
        let svc = service(
            "a",
            "s",
            &[(ROUTE, "s.apps.internal"), (PROTOCOL, "TCP")],
            vec![port(Some("http"), 80)],
        );
        assert_eq!(run(&[svc], &[], &[]).routes[0].protocol, Protocol::Tcp);
    }

    #[test]
    fn backends_match_the_port_by_name_and_prefer_ready() {
        let svc = service(
            "a",
            "s",
            &[(ROUTE, "s.apps.internal")],
            vec![port(Some("web"), 80), port(Some("grpc"), 81)],
        );
        let s1 = slice(
            "a",
            "s",
            &[(Some("web"), 8080), (Some("grpc"), 9090)],
            &[("10.0.0.1", Some(true), Some(true), Some(false))],
        );
        // Same endpoint in a second slice (during a slice split) is one backend.
        let s2 = slice(
            "a",
            "s",
            &[(Some("web"), 8080)],
            &[
                ("10.0.0.1", Some(true), None, None),
                ("10.0.0.3", Some(false), Some(false), Some(false)),
            ],
        );
        // Another Service's slice, and a slice of the same name in another namespace.
        let other = slice(
            "a",
            "t",
            &[(Some("web"), 8080)],
            &[("10.9.9.9", None, None, None)],
        );
        let elsewhere = slice(
            "b",
            "s",
            &[(Some("web"), 8080)],
            &[("10.8.8.8", None, None, None)],
        );
        let m = run(&[svc], &[s1, s2, other, elsewhere], &[]);
        let web: Vec<String> = m.routes[0]
            .backends
            .iter()
            .map(ToString::to_string)
            .collect();
        let grpc: Vec<String> = m.routes[1]
            .backends
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(web, ["10.0.0.1:8080"]);
        assert_eq!(grpc, ["10.0.0.1:9090"]);
    }

    #[test]
    fn unnamed_port_matches_unnamed_slice_port_and_ipv6_is_bracketed() {
        let svc = service(
            "a",
            "s",
            &[(ROUTE, "s.apps.internal")],
            vec![port(None, 80)],
        );
        let sl = slice("a", "s", &[(None, 8080)], &[("fd00::1", None, None, None)]);
        let m = run(&[svc], &[sl], &[]);
        assert_eq!(backends_of(&m), ["[fd00::1]:8080"]);
    }

    #[test]
    fn terminating_leave_and_serving_terminating_only_when_no_ready() {
        let svc = routed("a", "s", "s.apps.internal");
        let eps = [
            ("10.0.0.1", Some(true), Some(true), Some(false)),
            // Terminating and not serving: gone at once.
            ("10.0.0.2", Some(false), Some(false), Some(true)),
            // Serving but terminating: a fallback only.
            ("10.0.0.3", Some(false), Some(true), Some(true)),
            // Unready: not used.
            ("10.0.0.4", Some(false), None, None),
        ];
        let sl = slice("a", "s", &[(Some("http"), 8080)], &eps);
        assert_eq!(
            backends_of(&run(std::slice::from_ref(&svc), &[sl], &[])),
            ["10.0.0.1:8080"]
        );
        let sl = slice("a", "s", &[(Some("http"), 8080)], &eps[1..]);
        assert_eq!(
            backends_of(&run(std::slice::from_ref(&svc), &[sl], &[])),
            ["10.0.0.3:8080"]
        );
        // No ready endpoint at all: still a route, with no backends.
        let sl = slice("a", "s", &[(Some("http"), 8080)], &eps[3..]);
        let m = run(&[svc], &[sl], &[]);
        assert_eq!(m.routes.len(), 1);
        assert!(m.routes[0].backends.is_empty());
    }

    fn refused(annotations: &[(&str, &str)]) -> Rejected {
        let svc = service("ns", "bad", annotations, vec![port(Some("http"), 8080)]);
        let good = routed("ns", "good", "good.apps.internal");
        let m = run(&[svc, good], &[], &[]);
        assert_eq!(m.routes.len(), 1, "the good Service applies");
        assert_eq!(m.routes[0].key.name.as_str(), "good.apps.internal");
        assert_eq!(m.rejected.len(), 1);
        let r = m.rejected[0].clone();
        assert_eq!(r.entry, "Service ns/bad");
        let verdict = &m.verdicts[&ServiceRef {
            namespace: "ns".into(),
            name: "bad".into(),
        }];
        assert!(matches!(verdict, Verdict::Invalid(reason) if *reason == r.reason));
        r
    }

    #[test]
    fn bad_annotations_are_refused_with_reasons() {
        let r = refused(&[(ROUTE, "not a name")]);
        assert!(
            r.reason.contains("isthmus.io/route") && r.reason.contains("not a name"),
            "{}",
            r.reason
        );
        let r = refused(&[(ROUTE, "b.apps.internal"), (PORTS, "nope")]);
        assert!(
            r.reason.contains("\"nope\"") && r.reason.contains("http (8080)"),
            "{}",
            r.reason
        );
        let r = refused(&[(ROUTE, "b.apps.internal"), (PORTS, " , ")]);
        assert!(r.reason.contains("names no port"), "{}", r.reason);
        let r = refused(&[
            (ROUTE, "b.apps.internal"),
            (ALLOWED_PEERS, "cluster:diego bogus"),
        ]);
        assert!(r.reason.contains("bogus"), "{}", r.reason);
        let r = refused(&[(ROUTE, "b.apps.internal"), (EXPORT, "yes")]);
        assert!(
            r.reason.contains("\"yes\"") && r.reason.contains("\"true\" or \"false\""),
            "{}",
            r.reason
        );
        let r = refused(&[(ROUTE, "b.apps.internal"), (PROTOCOL, "udp")]);
        assert!(
            r.reason.contains("\"udp\"") && r.reason.contains("tcp, http or tls"),
            "{}",
            r.reason
        );
    }

    #[test]
    fn conflict_older_service_wins_then_namespace_name() {
        let at = |s: i64| Some(Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap()));
        let mut young = routed("a", "young", "x.apps.internal");
        young.metadata.creation_timestamp = at(200);
        let mut old = routed("z", "old", "x.apps.internal");
        old.metadata.creation_timestamp = at(100);
        let m = run(&[young.clone(), old.clone()], &[], &[]);
        assert_eq!(m.routes.len(), 1);
        assert_eq!(m.by_service.keys().next().unwrap().name, "old");
        assert_eq!(m.rejected[0].entry, "Service a/young");
        assert!(
            m.rejected[0].reason.contains("Service z/old"),
            "{}",
            m.rejected[0].reason
        );
        assert!(matches!(
            m.verdicts[&ServiceRef::of(&young.metadata)],
            Verdict::Conflict(_)
        ));
        // Same age: namespace/name decides.
        young.metadata.creation_timestamp = at(100);
        let m = run(&[old, young], &[], &[]);
        assert_eq!(m.rejected[0].entry, "Service z/old");
    }
}
