//! The mirror's I/O: one watch of the mirror Services (both replicas), the address book
//! published to the node from it, and, on the Lease holder only, the writes [`plan`]
//! decides. Errors from the API are retried with a backoff; the watch relists by itself.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    AddressBook, InTheWay, Mirrored, Refused, Wanted, Write, is_managed, plan, read_back, selector,
    to_service,
};
use crate::k8s::Leadership;
use crate::model::RouteName;
use crate::node::NodeHandle;
use crate::proto;

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
#[derive(Clone, Debug, Default)]
pub struct MirrorMetrics {
    /// 1 while this replica holds the Lease.
    pub leader: Gauge,
    /// Times this replica became or stopped being the holder.
    pub transitions: Counter,
    /// Writes to the API.
    pub writes: Family<WriteLabels, Counter>,
    /// Refusals, by reason: a route name or key refused a mirror Service (counted once each
    /// time it becomes refused), and mirror Services that cannot be read back (once per
    /// version seen).
    pub refused: Family<ReasonLabels, Counter>,
    /// Route names or keys refused a mirror Service now.
    pub refused_now: Gauge,
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
            "Imported routes refused a mirror Service, and unreadable mirror Services, by reason",
            self.refused.clone(),
        );
        r.register(
            "mirror_refused_now",
            "Imported route names or keys without a mirror Service now, for a reason",
            self.refused_now.clone(),
        );
        r.register(
            "mirror_services",
            "Mirror Services seen by the watch",
            self.services.clone(),
        );
    }

    fn write(&self, op: &'static str, outcome: &'static str) {
        self.writes
            .get_or_create(&WriteLabels { op, outcome })
            .inc();
    }

    fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
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
    /// A full reconcile at least this often, even when nothing was seen to change (and
    /// Services in the way are looked at again).
    pub resync: Duration,
    /// The Lease that elects the writer, for `status` (`None`: this replica always writes).
    pub lease: Option<String>,
}

/// First and longest wait before a failed write is tried again.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);

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

/// The mirror's state between events.
struct Mirror {
    api: Api<Service>,
    settings: MirrorSettings,
    node: NodeHandle,
    leadership: Leadership,
    metrics: MirrorMetrics,
    /// The mirror Services as the watch (and this replica's own writes) last showed them.
    seen: BTreeMap<String, Service>,
    /// Whether `seen` is complete (the first list is done).
    synced: bool,
    /// Services not labelled as Isthmus's found in the way of a create; looked at again at
    /// each resync.
    foreign: BTreeSet<String>,
    /// (name, resourceVersion) of unreadable Services already reported.
    reported: BTreeSet<(String, String)>,
    /// What the last reconcile refused (for `status`, and to count each refusal once).
    refused: BTreeSet<String>,
    /// The watch's last error, cleared by the next event.
    watch_error: Option<String>,
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
    // The default backoff: a failing list or watch is retried from 800 ms up to 30 s.
    let mut events = std::pin::pin!(watcher::watcher(api.clone(), config).default_backoff());
    let mut table = node.merged().subscribe();
    let mut leader = leadership.receiver();
    let mut resync = tokio::time::interval(settings.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut m = Mirror {
        api,
        settings,
        node,
        leadership,
        metrics,
        seen: BTreeMap::new(),
        synced: false,
        foreign: BTreeSet::new(),
        reported: BTreeSet::new(),
        refused: BTreeSet::new(),
        watch_error: None,
    };
    // Until the first list, imported routes carry no address: none is known yet.
    m.node.set_mirror_book(AddressBook::default());
    m.status();
    let mut initial: Option<BTreeMap<String, Service>> = None;
    let mut retry: Option<(Instant, Duration)> = None;
    loop {
        let retry_at = retry.map(|(at, _)| at);
        let retry_due = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let mut dirty = false;
        tokio::select! {
            () = stop.cancelled() => return,
            event = events.next() => match event {
                None => return,
                Some(Ok(event)) => {
                    dirty = true;
                    m.watch_error = None;
                    match event {
                        watcher::Event::Init => initial = Some(BTreeMap::new()),
                        watcher::Event::InitApply(svc) => {
                            if let (Some(init), Some(name)) = (initial.as_mut(), svc.metadata.name.clone()) {
                                init.insert(name, svc);
                            }
                        }
                        watcher::Event::InitDone => {
                            m.seen = initial.take().unwrap_or_default();
                            m.synced = true;
                        }
                        watcher::Event::Apply(svc) => {
                            if let Some(name) = svc.metadata.name.clone() {
                                m.seen.insert(name, svc);
                            }
                        }
                        watcher::Event::Delete(svc) => {
                            if let Some(name) = &svc.metadata.name {
                                m.seen.remove(name);
                            }
                        }
                    }
                    if m.synced {
                        m.publish();
                    }
                }
                Some(Err(e)) => {
                    // Retried with the backoff; what was seen stays (last known good).
                    tracing::warn!(namespace = %m.settings.namespace, "watching mirror Services: {e}");
                    m.watch_error = Some(e.to_string());
                }
            },
            _ = table.changed() => dirty = true,
            _ = leader.changed() => dirty = true,
            () = retry_due => dirty = true,
            _ = resync.tick() => {
                dirty = true;
                m.foreign.clear();
            }
        }
        // Write only from a complete view of what exists: a partial one would create
        // duplicates of Services not listed yet, or hand out their ports.
        if dirty && m.synced && m.leadership.is_leader() {
            if m.reconcile().await {
                retry = None;
            } else {
                let wait = retry.map_or(RETRY_FIRST, |(_, w)| (w * 2).min(RETRY_MAX));
                tracing::debug!("mirror writes incomplete; trying again in {wait:?}");
                retry = Some((Instant::now() + wait, wait));
            }
        } else if !m.leadership.is_leader() {
            // Not the writer: nothing is refused by this replica, nothing to retry.
            retry = None;
            m.refused.clear();
            m.metrics.refused_now.set(0);
        }
        m.status();
    }
}

impl Mirror {
    /// The managed Services read back, and the unreadable ones with what is wrong (each
    /// version logged and counted once).
    fn read_all(&mut self) -> (Vec<Mirrored>, BTreeMap<String, InTheWay>) {
        let mut good = Vec::new();
        let mut bad = BTreeMap::new();
        for (name, svc) in &self.seen {
            if !is_managed(svc) {
                // The watch selects by label; a Service that lost them is no longer shown.
                continue;
            }
            match read_back(svc) {
                Ok(m) => good.push(m),
                Err(e) => {
                    let rv = svc.metadata.resource_version.clone().unwrap_or_default();
                    if self.reported.insert((name.clone(), rv)) {
                        tracing::warn!("{e}; it is left alone");
                        self.metrics.refuse("bad_mirror_service");
                    }
                    bad.insert(name.clone(), InTheWay::Unreadable(e.what));
                }
            }
        }
        self.reported.retain(|(name, _)| bad.contains_key(name));
        (good, bad)
    }

    /// Gives the node the address book of what the watch shows.
    fn publish(&mut self) {
        let (mirrored, _) = self.read_all();
        self.metrics
            .services
            .set(i64::try_from(self.seen.len()).unwrap_or(i64::MAX));
        self.node
            .set_mirror_book(AddressBook::from_services(&mirrored));
    }

    /// Tells the node what `status` shows of the mirror.
    fn status(&self) {
        let writer = self.leadership.is_leader();
        self.node.set_mirror_status(proto::MirrorStatus {
            namespace: self.settings.namespace.clone(),
            lease: self.settings.lease.clone().unwrap_or_default(),
            writer,
            synced: self.synced,
            services: self.seen.len() as u64,
            refused: self.refused.iter().cloned().collect(),
            last_error: self.watch_error.clone().unwrap_or_default(),
        });
    }

    /// Brings the API to the wanted state. True when every write went through (or there was
    /// none); false when one should be tried again.
    async fn reconcile(&mut self) -> bool {
        let (existing, mut blocked) = self.read_all();
        for name in &self.foreign {
            blocked.insert(name.clone(), InTheWay::Foreign);
        }
        let wanted = wanted_of(&self.node);
        let plan = plan(
            &wanted,
            &existing,
            &blocked,
            &self.settings.egress_ports,
            &self.settings.egress_selector,
        );
        self.note_refused(&plan.refused);
        let mut complete = true;
        for write in plan.writes {
            // Leadership may end mid-plan: stop writing at once.
            if !self.leadership.is_leader() {
                return true;
            }
            complete &= match write {
                Write::Create(desired) => self.create(desired).await,
                Write::Replace(desired, rv) => self.replace(desired, rv).await,
                Write::Delete(service) => self.delete(service).await,
            };
        }
        self.publish();
        complete
    }

    /// Logs and counts refusals that are new since the last reconcile.
    fn note_refused(&mut self, refused: &[Refused]) {
        let now: BTreeSet<String> = refused.iter().map(ToString::to_string).collect();
        for r in refused {
            if !self.refused.contains(&r.to_string()) {
                tracing::warn!("mirror refused: {r}");
                self.metrics.refuse(r.reason());
            }
        }
        self.metrics
            .refused_now
            .set(i64::try_from(now.len()).unwrap_or(i64::MAX));
        self.refused = now;
    }

    async fn create(&mut self, desired: super::Desired) -> bool {
        let ns = &self.settings.namespace;
        let svc = to_service(&desired, ns, &self.settings.egress_selector, None);
        match self.api.create(&PostParams::default(), &svc).await {
            Ok(created) => {
                self.metrics.write("create", "ok");
                tracing::info!(service = %desired.service, route = %desired.route, "mirror Service created");
                // Seen at once, not when the watch shows it: a reconcile before then must
                // not hand its egress ports to another name.
                self.seen.insert(desired.service.clone(), created);
                true
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                self.metrics.write("create", "conflict");
                // Ours (the watch has not shown it yet) or someone else's: look.
                match self.api.get_opt(&desired.service).await {
                    Ok(Some(other)) if !is_managed(&other) => {
                        self.foreign.insert(desired.service.clone());
                        let refused = Refused::Foreign {
                            route: desired.route.clone(),
                            service: desired.service.clone(),
                        };
                        if self.refused.insert(refused.to_string()) {
                            tracing::warn!("mirror refused: {refused}");
                            self.metrics.refuse(refused.reason());
                            self.metrics.refused_now.inc();
                        }
                        true
                    }
                    Ok(Some(ours)) => {
                        self.seen.insert(desired.service.clone(), ours);
                        false
                    }
                    Ok(None) => false,
                    Err(e) => {
                        tracing::warn!(service = %desired.service, "reading a Service in the way: {e}");
                        false
                    }
                }
            }
            Err(e) => {
                self.metrics.write("create", "error");
                tracing::warn!(service = %desired.service, "creating mirror Service: {e}");
                false
            }
        }
    }

    async fn replace(&mut self, desired: super::Desired, rv: Option<String>) -> bool {
        let ns = &self.settings.namespace;
        let svc = to_service(&desired, ns, &self.settings.egress_selector, rv);
        // The ClusterIP is immutable: keep the one the API server gave.
        let svc = keep_cluster_ip(svc, self.seen.get(&desired.service));
        match self
            .api
            .replace(&desired.service, &PostParams::default(), &svc)
            .await
        {
            Ok(replaced) => {
                self.metrics.write("replace", "ok");
                tracing::info!(service = %desired.service, route = %desired.route, "mirror Service updated");
                self.seen.insert(desired.service.clone(), replaced);
                true
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Changed since the watch showed it: the next event brings it.
                self.metrics.write("replace", "conflict");
                false
            }
            Err(e) => {
                self.metrics.write("replace", "error");
                tracing::warn!(service = %desired.service, "replacing mirror Service: {e}");
                false
            }
        }
    }

    async fn delete(&mut self, service: String) -> bool {
        // Only a Service the watch shows with Isthmus's labels reaches here; the delete is
        // conditional on the version seen, so one relabelled since is not deleted.
        let rv = self
            .seen
            .get(&service)
            .and_then(|s| s.metadata.resource_version.clone());
        let params = DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                resource_version: rv,
                uid: None,
            }),
            ..DeleteParams::default()
        };
        match self.api.delete(&service, &params).await {
            Ok(_) => {
                self.metrics.write("delete", "ok");
                tracing::info!(%service, "mirror Service deleted: its route left the imports");
                self.seen.remove(&service);
                true
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                self.metrics.write("delete", "ok");
                self.seen.remove(&service);
                true
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                self.metrics.write("delete", "conflict");
                false
            }
            Err(e) => {
                self.metrics.write("delete", "error");
                tracing::warn!(%service, "deleting mirror Service: {e}");
                false
            }
        }
    }
}

/// `svc` with the ClusterIP(s) of `current`, which a replace must carry unchanged.
fn keep_cluster_ip(mut svc: Service, current: Option<&Service>) -> Service {
    if let (Some(spec), Some(cur)) = (svc.spec.as_mut(), current.and_then(|c| c.spec.as_ref())) {
        spec.cluster_ip.clone_from(&cur.cluster_ip);
        spec.cluster_ips.clone_from(&cur.cluster_ips);
        spec.ip_families.clone_from(&cur.ip_families);
        spec.ip_family_policy.clone_from(&cur.ip_family_policy);
    }
    svc
}
