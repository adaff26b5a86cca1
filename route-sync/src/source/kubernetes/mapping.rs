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
