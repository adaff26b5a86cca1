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
//! deciding is pure ([`service_name`], [`plan`], [`AddressBook::from_services`]); [`run`]
//! watches, publishes the address book to the node, and, while this replica holds the
//! Lease, writes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use super::Leadership;
use crate::model::{ClusterName, RouteKey, RouteName};
use crate::node::NodeHandle;

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
    labels.and_then(|l| l.get(MANAGED_BY_LABEL)).map(String::as_str) == Some(MANAGED_BY)
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
    let route = annotations
        .get(ROUTE_ANNOTATION)
        .ok_or_else(|| bad(format!("no {ROUTE_ANNOTATION} annotation (expected a route name)")))?;
    let route = RouteName::parse(route)
        .map_err(|e| bad(format!("{ROUTE_ANNOTATION}: {route:?} is not a route name: {e}")))?;
    let home = annotations.get(HOME_ANNOTATION).cloned().unwrap_or_default();
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
        .ok_or_else(|| bad(format!("port {port}: expected a numeric targetPort 1-65535")))?;
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

/// Why a route key gets no egress port.
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
}

impl Refused {
    /// The fixed metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::PortsExhausted(_) => "ports_exhausted",
            Refused::Foreign { .. } => "foreign_service",
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

/// Decides the mirror Services for `wanted` given the managed Services that exist
/// (`existing`), the names of foreign Services in the way (`foreign`) and the egress port
/// range. A key keeps the target port its Service has (when in range and not claimed
/// twice); a new key takes the lowest free port; none left: refused. Pure.
pub fn plan(
    wanted: &[Wanted],
    existing: &[Mirrored],
    foreign: &BTreeSet<String>,
    range: &RangeInclusive<u16>,
    selector: &BTreeMap<String, String>,
) -> Plan {
    let by_service: BTreeMap<&str, &Mirrored> =
        existing.iter().map(|m| (m.service.as_str(), m)).collect();
    let mut refused = Vec::new();
    let mut wanted_names = BTreeMap::new();
    for w in wanted {
        let service = service_name(&w.route);
        if foreign.contains(&service) {
            refused.push(Refused::Foreign {
                route: w.route.clone(),
                service,
            });
            continue;
        }
        wanted_names.insert(service, w);
    }
    // Ports kept first, over every wanted key, so a new key never takes a port an existing
    // key still holds.
    let mut taken = BTreeSet::new();
    let mut assigned: BTreeMap<&str, BTreeMap<u16, u16>> = BTreeMap::new();
    for (service, w) in &wanted_names {
        let Some(old) = by_service.get(service.as_str()).filter(|m| m.route == w.route) else {
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

/// Labels of a mirror write.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// create, replace or delete.
    pub op: &'static str,
    /// ok, conflict or error.
    pub outcome: &'static str,
}

/// Labels of a refusal.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// A fixed reason.
    pub reason: &'static str,
}

/// The mirror's and the Lease's metrics.
#[derive(Clone, Default)]
pub struct MirrorMetrics {
    /// 1 while this replica holds the Lease.
    pub leader: Gauge,
    /// Times this replica became or stopped being the holder.
    pub transitions: Counter,
    /// Writes to the API.
    pub writes: Family<WriteLabels, Counter>,
    /// Route keys refused a mirror (per reconcile that found them so), and Services that
    /// could not be read back.
    pub refused: Family<ReasonLabels, Counter>,
    /// Mirror Services seen by the watch.
    pub services: Gauge,
}

impl MirrorMetrics {
    /// Registers under `isthmus_route_sync_mirror_*` and `..._lease_*`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let r = registry.sub_registry_with_prefix("isthmus_route_sync");
        r.register(
            "lease_leader",
            "1 while this replica holds the Lease and writes",
            self.leader.clone(),
        );
        r.register(
            "lease_transitions",
            "Times this replica gained or lost the Lease",
            self.transitions.clone(),
        );
        r.register(
            "mirror_writes",
            "Writes of mirror Services, by operation and outcome",
            self.writes.clone(),
        );
        r.register(
            "mirror_refused",
            "Imported route keys refused a mirror Service, and unreadable mirror Services, by reason",
            self.refused.clone(),
        );
        r.register(
            "mirror_services",
            "Mirror Services seen by the watch",
            self.services.clone(),
        );
    }

    fn write(&self, op: &'static str, outcome: &'static str) {
        self.writes.get_or_create(&WriteLabels { op, outcome }).inc();
    }
}

/// What [`run`] needs, as values.
#[derive(Debug, Clone)]
pub struct MirrorSettings {
    /// Where the Services live (the only namespace written).
    pub namespace: String,
    /// The egress pods' labels.
    pub egress_selector: BTreeMap<String, String>,
    /// The egress ports handed out.
    pub egress_ports: RangeInclusive<u16>,
    /// A full reconcile at least this often, even when nothing was seen to change.
    pub resync: Duration,
}

/// The imported route names of the node's merged table.
fn wanted_of(node: &NodeHandle) -> Vec<Wanted> {
    let table = node.merged().snapshot();
    let cluster = node.cluster();
    let mut by_name: BTreeMap<RouteName, Wanted> = BTreeMap::new();
    for r in table.iter().filter(|r| r.home_cluster != cluster) {
        by_name
            .entry(r.key.name.clone())
            .or_insert_with(|| Wanted {
                route: r.key.name.clone(),
                home: r.home_cluster.clone(),
                ports: BTreeSet::new(),
            })
            .ports
            .insert(r.key.port);
    }
    by_name.into_values().collect()
}

/// Watches the mirror Services of `settings.namespace`, keeps the node's address book in
/// step, and while `leadership` says so, writes them to match the imports, until `stop`.
pub async fn run(
    client: kube::Client,
    settings: MirrorSettings,
    node: NodeHandle,
    leadership: Leadership,
    metrics: MirrorMetrics,
    stop: CancellationToken,
) {
    let api: Api<Service> = Api::namespaced(client, &settings.namespace);
    let config = watcher::Config::default().labels(&selector());
    let mut events = std::pin::pin!(watcher::watcher(api.clone(), config));
    let mut seen: BTreeMap<String, Service> = BTreeMap::new();
    let mut initial: Option<BTreeMap<String, Service>> = None;
    let mut synced = false;
    let mut table = node.merged().subscribe();
    let mut leader = leadership.receiver();
    let mut resync = tokio::time::interval(settings.resync);
    let mut foreign = BTreeSet::new();
    node.set_mirror_book(AddressBook::default());
    loop {
        let mut dirty = false;
        tokio::select! {
            () = stop.cancelled() => return,
            event = events.next() => match event {
                None => return,
                Some(Ok(event)) => {
                    dirty = true;
                    match event {
                        watcher::Event::Init => initial = Some(BTreeMap::new()),
                        watcher::Event::InitApply(svc) => {
                            if let (Some(init), Some(name)) = (initial.as_mut(), svc.metadata.name.clone()) {
                                init.insert(name, svc);
                            }
                        }
                        watcher::Event::InitDone => {
                            seen = initial.take().unwrap_or_default();
                            synced = true;
                        }
                        watcher::Event::Apply(svc) => {
                            if let Some(name) = svc.metadata.name.clone() {
                                seen.insert(name, svc);
                            }
                        }
                        watcher::Event::Delete(svc) => {
                            if let Some(name) = &svc.metadata.name {
                                seen.remove(name);
                            }
                        }
                    }
                    if synced {
                        publish(&node, &seen, &metrics);
                    }
                }
                Some(Err(e)) => {
                    // The watcher relists by itself; what was seen stays (last known good).
                    tracing::warn!(namespace = %settings.namespace, "watching mirror Services: {e}");
                }
            },
            _ = table.changed() => dirty = true,
            _ = leader.changed() => dirty = true,
            _ = resync.tick() => {
                dirty = true;
                foreign.clear();
            }
        }
        // Write only from a complete view of what exists: a partial one would create
        // duplicates of Services not listed yet, or hand out their ports.
        if dirty && synced && leadership.is_leader() {
            reconcile(&api, &settings, &node, &leadership, &seen, &mut foreign, &metrics).await;
        }
    }
}

/// Reads back what the watch holds, counts what cannot be read, and publishes the book.
/// `metrics` is given by the watch side only, so each unreadable Service is counted once
/// per change seen rather than once more per reconcile.
fn read_all(seen: &BTreeMap<String, Service>, metrics: Option<&MirrorMetrics>) -> Vec<Mirrored> {
    seen.values()
        .filter(|s| is_managed(s))
        .filter_map(|s| match read_back(s) {
            Ok(m) => Some(m),
            Err(e) => {
                if let Some(metrics) = metrics {
                    tracing::warn!("{e}; it is left alone");
                    metrics
                        .refused
                        .get_or_create(&ReasonLabels {
                            reason: "bad_mirror_service",
                        })
                        .inc();
                }
                None
            }
        })
        .collect()
}

fn publish(node: &NodeHandle, seen: &BTreeMap<String, Service>, metrics: &MirrorMetrics) {
    let mirrored = read_all(seen, Some(metrics));
    metrics
        .services
        .set(i64::try_from(mirrored.len()).unwrap_or(i64::MAX));
    node.set_mirror_book(AddressBook::from_services(&mirrored));
}

async fn reconcile(
    api: &Api<Service>,
    settings: &MirrorSettings,
    node: &NodeHandle,
    leadership: &Leadership,
    seen: &BTreeMap<String, Service>,
    foreign: &mut BTreeSet<String>,
    metrics: &MirrorMetrics,
) {
    let existing = read_all(seen, None);
    let wanted = wanted_of(node);
    let plan = plan(
        &wanted,
        &existing,
        foreign,
        &settings.egress_ports,
        &settings.egress_selector,
    );
    for r in &plan.refused {
        tracing::warn!("mirror refused: {r}");
        metrics
            .refused
            .get_or_create(&ReasonLabels { reason: r.reason() })
            .inc();
    }
    for write in plan.writes {
        // Leadership may end mid-plan: stop writing at once.
        if !leadership.is_leader() {
            return;
        }
        let ns = &settings.namespace;
        match write {
            Write::Create(desired) => {
                let svc = to_service(&desired, ns, &settings.egress_selector, None);
                match api.create(&PostParams::default(), &svc).await {
                    Ok(_) => {
                        metrics.write("create", "ok");
                        tracing::info!(service = %desired.service, route = %desired.route, "mirror Service created");
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        metrics.write("create", "conflict");
                        // Ours (the watch has not shown it yet) or someone else's: look.
                        match api.get_opt(&desired.service).await {
                            Ok(Some(other)) if !is_managed(&other) => {
                                foreign.insert(desired.service.clone());
                                let refused = Refused::Foreign {
                                    route: desired.route.clone(),
                                    service: desired.service.clone(),
                                };
                                tracing::warn!("mirror refused: {refused}");
                                metrics
                                    .refused
                                    .get_or_create(&ReasonLabels {
                                        reason: refused.reason(),
                                    })
                                    .inc();
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!(service = %desired.service, "reading a Service in the way: {e}"),
                        }
                    }
                    Err(e) => {
                        metrics.write("create", "error");
                        tracing::warn!(service = %desired.service, "creating mirror Service: {e}");
                    }
                }
            }
            Write::Replace(desired, rv) => {
                let svc = to_service(&desired, ns, &settings.egress_selector, rv);
                // The ClusterIP is immutable: keep the one the API server gave.
                let svc = keep_cluster_ip(svc, seen.get(&desired.service));
                match api
                    .replace(&desired.service, &PostParams::default(), &svc)
                    .await
                {
                    Ok(_) => metrics.write("replace", "ok"),
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        // Changed since the watch showed it: the next event brings it.
                        metrics.write("replace", "conflict");
                    }
                    Err(e) => {
                        metrics.write("replace", "error");
                        tracing::warn!(service = %desired.service, "replacing mirror Service: {e}");
                    }
                }
            }
            Write::Delete(service) => {
                match api.delete(&service, &DeleteParams::default()).await {
                    Ok(_) => {
                        metrics.write("delete", "ok");
                        tracing::info!(%service, "mirror Service deleted: its route left the imports");
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => metrics.write("delete", "ok"),
                    Err(e) => {
                        metrics.write("delete", "error");
                        tracing::warn!(%service, "deleting mirror Service: {e}");
                    }
                }
            }
        }
    }
}

/// `svc` with the ClusterIP(s) of `current`, which a replace must carry unchanged.
fn keep_cluster_ip(mut svc: Service, current: Option<&Service>) -> Service {
    if let (Some(spec), Some(cur)) = (
        svc.spec.as_mut(),
        current.and_then(|c| c.spec.as_ref()),
    ) {
        spec.cluster_ip.clone_from(&cur.cluster_ip);
        spec.cluster_ips.clone_from(&cur.cluster_ips);
        spec.ip_families.clone_from(&cur.ip_families);
        spec.ip_family_policy.clone_from(&cur.ip_family_policy);
    }
    svc
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
            &[wanted("a.apps.internal", &[80, 81]), wanted("b.apps.internal", &[80])],
            &[],
            &BTreeSet::new(),
            &range,
            &sel(),
        );
        assert!(first.refused.is_empty());
        assert_eq!(first.writes.len(), 2);
        let state = applied(&[], &first);
        let ports: BTreeSet<u16> = state.iter().flat_map(|m| m.ports.values().copied()).collect();
        assert_eq!(ports, BTreeSet::from([20000, 20001, 20002]));
        // Same imports again (a restart, another leader): nothing to write.
        let again = plan(
            &[wanted("a.apps.internal", &[80, 81]), wanted("b.apps.internal", &[80])],
            &state,
            &BTreeSet::new(),
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
            &[wanted("b.apps.internal", &[80]), wanted("c.apps.internal", &[9000])],
            &state,
            &BTreeSet::new(),
            &range,
            &sel(),
        );
        assert!(next.writes.contains(&Write::Delete(service_name(&name("a.apps.internal")))));
        let after = applied(&state, &next);
        let get = |r: &str| after.iter().find(|m| m.route == name(r)).unwrap().ports.clone();
        assert_eq!(get("b.apps.internal")[&80], b_port);
        assert_eq!(get("c.apps.internal")[&9000], 20000);
        // A new port of an existing name: the Service is replaced, its other port kept.
        let grown = plan(
            &[wanted("b.apps.internal", &[80, 443]), wanted("c.apps.internal", &[9000])],
            &after,
            &BTreeSet::new(),
            &range,
            &sel(),
        );
        assert!(matches!(grown.writes.as_slice(), [Write::Replace(d, _)] if d.ports[&80] == b_port));
    }

    #[test]
    fn an_exhausted_range_refuses_the_key_with_its_reason() {
        let range = 20000..=20001;
        let p = plan(
            &[wanted("a.apps.internal", &[80, 81]), wanted("b.apps.internal", &[80])],
            &[],
            &BTreeSet::new(),
            &range,
            &sel(),
        );
        assert_eq!(
            p.refused,
            [Refused::PortsExhausted(RouteKey::new(name("b.apps.internal"), 80))]
        );
        assert_eq!(p.refused[0].reason(), "ports_exhausted");
        // b has no port at all: no Service (one with no port is invalid).
        assert_eq!(p.writes.len(), 1);
    }

    #[test]
    fn a_foreign_service_in_the_way_is_refused_never_written() {
        let foreign = BTreeSet::from([service_name(&name("a.apps.internal"))]);
        let p = plan(
            &[wanted("a.apps.internal", &[80])],
            &[],
            &foreign,
            &(20000..=20009),
            &sel(),
        );
        assert!(p.writes.is_empty());
        assert_eq!(p.refused[0].reason(), "foreign_service");
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
            AddressBook::from_services([&m, &twin]).stamp(&RouteKey::new(name("a.apps.internal"), 80)),
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
        assert!(e.to_string().contains("s1") && e.to_string().contains("targetPort"), "{e}");
        svc.metadata.annotations = None;
        let e = read_back(&svc).unwrap_err();
        assert!(e.to_string().contains(ROUTE_ANNOTATION), "{e}");
    }
}
