//! Imported routes as Kubernetes Services ("mirror Services"), as Linkerd's service mirror
//! keeps them: one ClusterIP Service per imported route name in Isthmus's own namespace,
//! selecting the egress gateway pods, one Service port per route port whose `targetPort` is
//! an egress port owned by that route key.
//!
//! kube-proxy translates a call to the Service's ClusterIP to an egress pod's address and
//! the target port: the egress never sees the ClusterIP, only the port, so the port names
//! the route. The ClusterIP is the route's `vip` for local consumers (the DNS shim answers
//! it), the target port its `egress_port`.
//!
//! The API is the store: a route key keeps the target port its Service has, so restarts and
//! leader changes keep every port and (the Service staying) every ClusterIP. Everything
//! deciding is pure ([`service_name`], [`plan`], [`AddressBook::from_services`]), here with
//! no sockets and no clock; [`run`] (in `task`) watches, publishes the address book to the
//! node, and, while this replica holds the Lease, writes.

mod task;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::RangeInclusive;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::{ClusterName, RouteKey, RouteName};

pub use task::{MirrorMetrics, MirrorSettings, ReasonLabels, WriteLabels, run};

/// The standard label naming who manages an object; a Service without this value is never
/// touched.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`] on mirror Services.
pub const MANAGED_BY: &str = "isthmus-route-sync";
/// Isthmus's own label: what kind of object this is to Isthmus.
pub const MIRROR_LABEL: &str = "isthmus.io/mirror";
/// The route name a mirror Service stands for. Not `isthmus.io/route`: that one makes a
/// Service a route of the Kubernetes source, and a mirror Service must never be re-exported.
pub const ROUTE_ANNOTATION: &str = "isthmus.io/mirror-of";
/// The route's home cluster.
pub const HOME_ANNOTATION: &str = "isthmus.io/home-cluster";

/// The label selector of every mirror Service (the watch, and the managed check).
pub fn selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY},{MIRROR_LABEL}=true")
}

/// The Service name of a route name: a DNS-1035 label (a-z first, a-z 0-9 '-', at most 63),
/// readable (the sanitised name, truncated) and unique (a hash of the whole name), the same
/// on every replica and every run.
pub fn service_name(route: &RouteName) -> String {
    let mut readable = String::new();
    for c in route.as_str().chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if c == '-' && (readable.is_empty() || readable.ends_with('-')) {
            continue;
        }
        readable.push(c);
    }
    if !readable.starts_with(|c: char| c.is_ascii_lowercase()) {
        readable.insert_str(0, "r-");
    }
    // 63 = readable (<= 52) + '-' + 10 hex digits.
    readable.truncate(52);
    let readable = readable.trim_end_matches('-');
    format!("{readable}-{:010x}", fnv1a(route.as_str()) & 0xff_ffff_ffff)
}

/// FNV-1a, 64 bits: stable across builds and platforms (std's hasher is not).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What route-sync reads back from one of its mirror Services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirrored {
    /// The Service's name.
    pub service: String,
    /// The route name it stands for.
    pub route: RouteName,
    /// The route's home cluster.
    pub home: String,
    /// Route port → egress (target) port.
    pub ports: BTreeMap<u16, u16>,
    /// The ClusterIP, once the API server allocated it.
    pub cluster_ip: Option<IpAddr>,
    /// The egress pods it selects.
    pub selector: BTreeMap<String, String>,
    /// For a replace.
    pub resource_version: Option<String>,
}

/// A mirror Service that cannot be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mirror Service {service}: {what}")]
pub struct BadMirror {
    /// The Service's name.
    pub service: String,
    /// What is wrong and what was expected.
    pub what: String,
}

/// Whether `svc` carries the labels of a mirror Service.
pub fn is_managed(svc: &Service) -> bool {
    let labels = svc.metadata.labels.as_ref();
    labels
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .map(String::as_str)
        == Some(MANAGED_BY)
        && labels.and_then(|l| l.get(MIRROR_LABEL)).map(String::as_str) == Some("true")
}

/// Reads a managed Service back.
///
/// # Errors
/// [`BadMirror`] when the annotations or ports are not what route-sync writes.
pub fn read_back(svc: &Service) -> Result<Mirrored, BadMirror> {
    let service = svc.metadata.name.clone().unwrap_or_default();
    let bad = |what: String| BadMirror {
        service: service.clone(),
        what,
    };
    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    let route = annotations.get(ROUTE_ANNOTATION).ok_or_else(|| {
        bad(format!(
            "no {ROUTE_ANNOTATION} annotation (expected a route name)"
        ))
    })?;
    let route = RouteName::parse(route).map_err(|e| {
        bad(format!(
            "{ROUTE_ANNOTATION}: {route:?} is not a route name: {e}"
        ))
    })?;
    let home = annotations
        .get(HOME_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    let spec = svc.spec.clone().unwrap_or_default();
    let mut ports = BTreeMap::new();
    for p in spec.ports.unwrap_or_default() {
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(format!("port {}: expected 1-65535", p.port)))?;
        let target = match &p.target_port {
            Some(IntOrString::Int(t)) => u16::try_from(*t).ok().filter(|t| *t != 0),
            _ => None,
        }
        .ok_or_else(|| {
            bad(format!(
                "port {port}: expected a numeric targetPort 1-65535"
            ))
        })?;
        ports.insert(port, target);
    }
    let cluster_ip = spec
        .cluster_ip
        .as_deref()
        .filter(|ip| !ip.is_empty() && *ip != "None")
        .map(|ip| {
            ip.parse::<IpAddr>()
                .map_err(|_| bad(format!("clusterIP {ip:?}: expected an IP address")))
        })
        .transpose()?;
    Ok(Mirrored {
        service,
        route,
        home,
        ports,
        cluster_ip,
        selector: spec.selector.unwrap_or_default(),
        resource_version: svc.metadata.resource_version.clone(),
    })
}

/// One imported route name and the ports it has, as the merged table says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The route name.
    pub route: RouteName,
    /// Its home cluster.
    pub home: ClusterName,
    /// Its ports.
    pub ports: BTreeSet<u16>,
}

/// The Service route-sync wants for one route name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The Service name ([`service_name`]).
    pub service: String,
    /// The route name.
    pub route: RouteName,
    /// Its home cluster.
    pub home: String,
    /// Route port → egress port.
    pub ports: BTreeMap<u16, u16>,
}

/// A write to the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// No Service of this name exists (among the managed ones).
    Create(Desired),
    /// The managed Service exists and differs; replaced at this resourceVersion.
    Replace(Desired, Option<String>),
    /// A managed Service no imported name wants.
    Delete(String),
}

/// Why a Service of a mirror's name cannot be written: route-sync does not own it, or owns
/// it but cannot read it back (edited by hand).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InTheWay {
    /// No Isthmus labels: someone else's.
    Foreign,
    /// Isthmus's labels, but not readable as a mirror Service: what is wrong.
    Unreadable(String),
}

/// Why a route key or name gets no mirror Service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Every port of `mirror.egress_ports` is taken.
    #[error("{0}: no free egress port in mirror.egress_ports (widen the range)")]
    PortsExhausted(RouteKey),
    /// A Service of the mirror name exists without Isthmus's labels.
    #[error(
        "{route}: Service {service} exists and is not managed by isthmus-route-sync; \
         not overwriting it (rename or delete it)"
    )]
    Foreign {
        /// The route name.
        route: RouteName,
        /// The Service in the way.
        service: String,
    },
    /// The Service of the mirror name carries Isthmus's labels but cannot be read back.
    #[error(
        "{route}: mirror Service {service} cannot be read back ({what}); not overwriting a \
         Service edited by hand (fix or delete it)"
    )]
    Unreadable {
        /// The route name.
        route: RouteName,
        /// The Service in the way.
        service: String,
        /// What is wrong with it.
        what: String,
    },
}

impl Refused {
    /// The fixed metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::PortsExhausted(_) => "ports_exhausted",
            Refused::Foreign { .. } => "foreign_service",
            Refused::Unreadable { .. } => "unreadable_service",
        }
    }
}

/// What [`plan`] decided.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Writes that bring the API to the wanted state, deletes first (they free ports).
    pub writes: Vec<Write>,
    /// Route keys left without an egress port, with the reason.
    pub refused: Vec<Refused>,
}

/// Decides the mirror Services for `wanted` given the managed Services that exist and read
/// back (`existing`), the Services of mirror names that must not be written (`blocked`: not
/// Isthmus's, or unreadable) and the egress port range. A key keeps the target port its
/// Service has (when in range and not claimed twice); a new key takes the lowest free port;
/// none left: refused. Pure.
pub fn plan(
    wanted: &[Wanted],
    existing: &[Mirrored],
    blocked: &BTreeMap<String, InTheWay>,
    range: &RangeInclusive<u16>,
    selector: &BTreeMap<String, String>,
) -> Plan {
    let by_service: BTreeMap<&str, &Mirrored> =
        existing.iter().map(|m| (m.service.as_str(), m)).collect();
    let mut refused = Vec::new();
    let mut wanted_names = BTreeMap::new();
    for w in wanted {
        let service = service_name(&w.route);
        match blocked.get(&service) {
            Some(InTheWay::Foreign) => {
                refused.push(Refused::Foreign {
                    route: w.route.clone(),
                    service,
                });
                continue;
            }
            Some(InTheWay::Unreadable(what)) => {
                refused.push(Refused::Unreadable {
                    route: w.route.clone(),
                    service,
                    what: what.clone(),
                });
                continue;
            }
            None => {}
        }
        wanted_names.insert(service, w);
    }
    // Ports kept first, over every wanted key, so a new key never takes a port an existing
    // key still holds.
    let mut taken = BTreeSet::new();
    let mut assigned: BTreeMap<&str, BTreeMap<u16, u16>> = BTreeMap::new();
    for (service, w) in &wanted_names {
        let Some(old) = by_service
            .get(service.as_str())
            .filter(|m| m.route == w.route)
        else {
            continue;
        };
        for port in &w.ports {
            if let Some(target) = old.ports.get(port)
                && range.contains(target)
                && taken.insert(*target)
            {
                assigned
                    .entry(service.as_str())
                    .or_default()
                    .insert(*port, *target);
            }
        }
    }
    let mut free = range.clone().filter(|p| !taken.contains(p));
    for (service, w) in &wanted_names {
        for port in &w.ports {
            let ports = assigned.entry(service.as_str()).or_default();
            if ports.contains_key(port) {
                continue;
            }
            match free.next() {
                Some(target) => {
                    ports.insert(*port, target);
                }
                None => refused.push(Refused::PortsExhausted(RouteKey::new(
                    w.route.clone(),
                    *port,
                ))),
            }
        }
    }
    let mut writes: Vec<Write> = existing
        .iter()
        .filter(|m| !wanted_names.contains_key(&m.service))
        .map(|m| Write::Delete(m.service.clone()))
        .collect();
    for (service, w) in &wanted_names {
        let ports = assigned.remove(service.as_str()).unwrap_or_default();
        let desired = Desired {
            service: service.clone(),
            route: w.route.clone(),
            home: w.home.to_string(),
            ports,
        };
        match by_service.get(service.as_str()) {
            // A Service cannot have no port: a name with every key refused gets none.
            None if desired.ports.is_empty() => {}
            None => writes.push(Write::Create(desired)),
            Some(_) if desired.ports.is_empty() => writes.push(Write::Delete(service.clone())),
            Some(old)
                if old.route == desired.route
                    && old.home == desired.home
                    && old.ports == desired.ports
                    && old.selector == *selector => {}
            Some(old) => writes.push(Write::Replace(desired, old.resource_version.clone())),
        }
    }
    Plan { writes, refused }
}

/// The Service object for `desired`.
pub fn to_service(
    desired: &Desired,
    namespace: &str,
    selector: &BTreeMap<String, String>,
    resource_version: Option<String>,
) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(desired.service.clone()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                (MIRROR_LABEL.to_string(), "true".to_string()),
            ])),
            annotations: Some(BTreeMap::from([
                (ROUTE_ANNOTATION.to_string(), desired.route.to_string()),
                (HOME_ANNOTATION.to_string(), desired.home.clone()),
            ])),
            resource_version,
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_string()),
            selector: Some(selector.clone()),
            ports: Some(
                desired
                    .ports
                    .iter()
                    .map(|(port, target)| ServicePort {
                        name: Some(format!("p{port}")),
                        port: i32::from(*port),
                        target_port: Some(IntOrString::Int(i32::from(*target))),
                        protocol: Some("TCP".to_string()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Route name → the ClusterIP and port → egress port of its mirror Service: what every
/// replica stamps on the merged table's imported routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressBook(BTreeMap<RouteName, BookEntry>);

/// One name's entry in the [`AddressBook`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BookEntry {
    /// The Service's ClusterIP, once allocated.
    pub cluster_ip: Option<IpAddr>,
    /// Route port → egress port.
    pub ports: BTreeMap<u16, u16>,
}

impl AddressBook {
    /// The book of these Services read back. A name two Services claim (edited by hand)
    /// keeps neither: no route is given an address that may be another's.
    pub fn from_services<'a>(services: impl IntoIterator<Item = &'a Mirrored>) -> Self {
        let mut book = BTreeMap::new();
        let mut doubled = BTreeSet::new();
        for m in services {
            let entry = BookEntry {
                cluster_ip: m.cluster_ip,
                ports: m.ports.clone(),
            };
            if book.insert(m.route.clone(), entry).is_some() {
                doubled.insert(m.route.clone());
            }
        }
        for name in doubled {
            book.remove(&name);
        }
        Self(book)
    }

    /// The `vip` and `egress_port` of `key`.
    pub fn stamp(&self, key: &RouteKey) -> (Option<IpAddr>, Option<u16>) {
        match self.0.get(&key.name) {
            None => (None, None),
            Some(e) => (e.cluster_ip, e.ports.get(&key.port).copied()),
        }
    }

    /// The names whose entry differs between `self` and `other`.
    pub fn changed_names(&self, other: &AddressBook) -> BTreeSet<RouteName> {
        let mut names = BTreeSet::new();
        for (name, entry) in &self.0 {
            if other.0.get(name) != Some(entry) {
                names.insert(name.clone());
            }
        }
        for name in other.0.keys() {
            if !self.0.contains_key(name) {
                names.insert(name.clone());
            }
        }
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> RouteName {
        RouteName::parse(s).unwrap()
    }

    fn wanted(route: &str, ports: &[u16]) -> Wanted {
        Wanted {
            route: name(route),
            home: ClusterName::parse("diego").unwrap(),
            ports: ports.iter().copied().collect(),
        }
    }

    fn sel() -> BTreeMap<String, String> {
        BTreeMap::from([("app".to_string(), "isthmus-egress".to_string())])
    }

    /// What the API would hold after `plan`'s creates and replaces (no ClusterIPs).
    fn applied(existing: &[Mirrored], plan: &Plan) -> Vec<Mirrored> {
        let mut by: BTreeMap<String, Mirrored> = existing
            .iter()
            .map(|m| (m.service.clone(), m.clone()))
            .collect();
        for w in &plan.writes {
            match w {
                Write::Create(d) | Write::Replace(d, _) => {
                    let svc = to_service(d, "isthmus", &sel(), None);
                    by.insert(d.service.clone(), read_back(&svc).unwrap());
                }
                Write::Delete(s) => {
                    by.remove(s);
                }
            }
        }
        by.into_values().collect()
    }

    #[test]
    fn service_names_are_dns_1035_labels_readable_and_unique() {
        for route in [
            "orders.apps.internal",
            "9lives.apps.internal",
            "a-very-long-route-name-that-goes-on-and-on.and-on-and-on.apps.internal",
            "xn--bcher-kva.apps.internal",
        ] {
            let n = service_name(&name(route));
            assert!(n.len() <= 63, "{n}");
            assert!(n.starts_with(|c: char| c.is_ascii_lowercase()), "{n}");
            assert!(n.ends_with(|c: char| c.is_ascii_alphanumeric()), "{n}");
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{n}"
            );
            assert!(!n.contains("--"), "{n}");
        }
        assert!(service_name(&name("orders.apps.internal")).starts_with("orders-apps-internal-"));
        // Two names that sanitise alike still differ.
        assert_ne!(
            service_name(&name("a-b.apps.internal")),
            service_name(&name("a.b.apps.internal"))
        );
        // Stable: the same on every replica and run.
        assert_eq!(
            service_name(&name("orders.apps.internal")),
            service_name(&name("orders.apps.internal"))
        );
    }

    #[test]
    fn new_keys_take_the_lowest_free_port_and_existing_ones_keep_theirs() {
        let range = 20000..=20009;
        let first = plan(
            &[
                wanted("a.apps.internal", &[80, 81]),
                wanted("b.apps.internal", &[80]),
            ],
            &[],
            &BTreeMap::new(),
            &range,
            &sel(),
        );
        assert!(first.refused.is_empty());
        assert_eq!(first.writes.len(), 2);
        let state = applied(&[], &first);
        let ports: BTreeSet<u16> = state
            .iter()
            .flat_map(|m| m.ports.values().copied())
            .collect();
        assert_eq!(ports, BTreeSet::from([20000, 20001, 20002]));
        // Same imports again (a restart, another leader): nothing to write.
        let again = plan(
            &[
                wanted("a.apps.internal", &[80, 81]),
                wanted("b.apps.internal", &[80]),
            ],
            &state,
            &BTreeMap::new(),
            &range,
            &sel(),
        );
        assert_eq!(again, Plan::default());
        // a leaves, c arrives: a's Service is deleted, c takes the lowest port free once
        // a's are released, and b keeps its port.
        let b_port = state
            .iter()
            .find(|m| m.route == name("b.apps.internal"))
            .unwrap()
            .ports[&80];
        let next = plan(
            &[
                wanted("b.apps.internal", &[80]),
                wanted("c.apps.internal", &[9000]),
            ],
            &state,
            &BTreeMap::new(),
            &range,
            &sel(),
        );
        assert!(
            next.writes
                .contains(&Write::Delete(service_name(&name("a.apps.internal"))))
        );
        let after = applied(&state, &next);
        let get = |r: &str| {
            after
                .iter()
                .find(|m| m.route == name(r))
                .unwrap()
                .ports
                .clone()
        };
        assert_eq!(get("b.apps.internal")[&80], b_port);
        assert_eq!(get("c.apps.internal")[&9000], 20000);
        // A new port of an existing name: the Service is replaced, its other port kept.
        let grown = plan(
            &[
                wanted("b.apps.internal", &[80, 443]),
                wanted("c.apps.internal", &[9000]),
            ],
            &after,
            &BTreeMap::new(),
            &range,
            &sel(),
        );
        assert!(
            matches!(grown.writes.as_slice(), [Write::Replace(d, _)] if d.ports[&80] == b_port)
        );
    }

    #[test]
    fn no_egress_port_is_used_twice_even_when_services_were_edited_to_share_one() {
        let range = 20000..=20009;
        let first = plan(
            &[
                wanted("a.apps.internal", &[80]),
                wanted("b.apps.internal", &[80]),
            ],
            &[],
            &BTreeMap::new(),
            &range,
            &sel(),
        );
        let mut state = applied(&[], &first);
        // Someone set b's target port to a's, and another's to one out of the range.
        let a_port = state[0].ports[&80];
        state[1].ports.insert(80, a_port);
        let next = plan(
            &[
                wanted("a.apps.internal", &[80]),
                wanted("b.apps.internal", &[80]),
            ],
            &state,
            &BTreeMap::new(),
            &range,
            &sel(),
        );
        let after = applied(&state, &next);
        let ports: Vec<u16> = after
            .iter()
            .flat_map(|m| m.ports.values().copied())
            .collect();
        assert_eq!(ports.len(), 2);
        assert_ne!(ports[0], ports[1], "{after:?}");
        assert!(ports.iter().all(|p| range.contains(p)));
        // The one that kept the port is a (first by name); b was moved.
        assert_eq!(after[0].ports[&80], a_port);
        let mut out_of_range = after.clone();
        out_of_range[0].ports.insert(80, 40000);
        let fixed = applied(
            &out_of_range,
            &plan(
                &[
                    wanted("a.apps.internal", &[80]),
                    wanted("b.apps.internal", &[80]),
                ],
                &out_of_range,
                &BTreeMap::new(),
                &range,
                &sel(),
            ),
        );
        assert!(
            fixed.iter().all(|m| range.contains(&m.ports[&80])),
            "{fixed:?}"
        );
    }

    #[test]
    fn an_exhausted_range_refuses_the_key_with_its_reason() {
        let range = 20000..=20001;
        let p = plan(
            &[
                wanted("a.apps.internal", &[80, 81]),
                wanted("b.apps.internal", &[80]),
            ],
            &[],
            &BTreeMap::new(),
            &range,
            &sel(),
        );
        assert_eq!(
            p.refused,
            [Refused::PortsExhausted(RouteKey::new(
                name("b.apps.internal"),
                80
            ))]
        );
        assert_eq!(p.refused[0].reason(), "ports_exhausted");
        // b has no port at all: no Service (one with no port is invalid).
        assert_eq!(p.writes.len(), 1);
    }

    #[test]
    fn a_foreign_service_in_the_way_is_refused_never_written() {
        let a = service_name(&name("a.apps.internal"));
        let foreign = BTreeMap::from([(a.clone(), InTheWay::Foreign)]);
        let p = plan(
            &[
                wanted("a.apps.internal", &[80]),
                wanted("b.apps.internal", &[80]),
            ],
            &[],
            &foreign,
            &(20000..=20009),
            &sel(),
        );
        // b is written; a is not, and its refusal names the route and the Service.
        assert!(
            matches!(p.writes.as_slice(), [Write::Create(d)] if d.route == name("b.apps.internal")),
            "{p:?}"
        );
        assert_eq!(p.refused.len(), 1);
        assert_eq!(p.refused[0].reason(), "foreign_service");
        let text = p.refused[0].to_string();
        assert!(
            text.contains(&a) && text.contains("a.apps.internal"),
            "{text}"
        );
        // One of ours edited beyond reading is refused too, with what is wrong.
        let unreadable = BTreeMap::from([(a.clone(), InTheWay::Unreadable("no ports".into()))]);
        let p = plan(
            &[wanted("a.apps.internal", &[80])],
            &[],
            &unreadable,
            &(20000..=20009),
            &sel(),
        );
        assert!(p.writes.is_empty());
        assert_eq!(p.refused[0].reason(), "unreadable_service");
        assert!(p.refused[0].to_string().contains("no ports"));
        // And a Service without the labels is not managed, whatever its annotations say.
        let mut svc = to_service(
            &Desired {
                service: "x".into(),
                route: name("a.apps.internal"),
                home: "diego".into(),
                ports: BTreeMap::from([(80, 20000)]),
            },
            "isthmus",
            &sel(),
            None,
        );
        assert!(is_managed(&svc));
        svc.metadata.labels = None;
        assert!(!is_managed(&svc));
    }

    #[test]
    fn the_book_stamps_cluster_ip_and_egress_port_and_drops_doubled_names() {
        let mut svc = to_service(
            &Desired {
                service: "s1".into(),
                route: name("a.apps.internal"),
                home: "diego".into(),
                ports: BTreeMap::from([(80, 20003)]),
            },
            "isthmus",
            &sel(),
            None,
        );
        svc.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.7".into());
        let m = read_back(&svc).unwrap();
        let book = AddressBook::from_services([&m]);
        assert_eq!(
            book.stamp(&RouteKey::new(name("a.apps.internal"), 80)),
            (Some("10.96.0.7".parse().unwrap()), Some(20003))
        );
        assert_eq!(
            book.stamp(&RouteKey::new(name("a.apps.internal"), 81)),
            (Some("10.96.0.7".parse().unwrap()), None)
        );
        let mut twin = m.clone();
        twin.service = "s2".into();
        assert_eq!(
            AddressBook::from_services([&m, &twin])
                .stamp(&RouteKey::new(name("a.apps.internal"), 80)),
            (None, None)
        );
        assert_eq!(
            book.changed_names(&AddressBook::default()),
            BTreeSet::from([name("a.apps.internal")])
        );
    }

    #[test]
    fn a_mirror_service_that_cannot_be_read_back_is_an_error_naming_it() {
        let mut svc = to_service(
            &Desired {
                service: "s1".into(),
                route: name("a.apps.internal"),
                home: "diego".into(),
                ports: BTreeMap::from([(80, 20003)]),
            },
            "isthmus",
            &sel(),
            None,
        );
        svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].target_port =
            Some(IntOrString::String("http".into()));
        let e = read_back(&svc).unwrap_err();
        assert!(
            e.to_string().contains("s1") && e.to_string().contains("targetPort"),
            "{e}"
        );
        svc.metadata.annotations = None;
        let e = read_back(&svc).unwrap_err();
        assert!(e.to_string().contains(ROUTE_ANNOTATION), "{e}");
    }
}
