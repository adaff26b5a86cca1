//! The Kubernetes route source: annotated Services, their EndpointSlices and MCS
//! ServiceExports, watched through the API server, written into the local [`RouteStore`].
//!
//! The mapping itself is [`mapping::map`], a pure function of the watched objects; this
//! module is the tokio layer: watchers and their stores, coalescing, freshness, the
//! ServiceExport status writes and the metrics.
//!
//! Namespaces: with `source.kubernetes.namespaces` set, each namespace gets its own
//! watchers (so the ServiceAccount needs read access to those namespaces only: a Role per
//! namespace, no ClusterRole); with none set, one cluster-wide watcher per kind.
//!
//! Freshness: the first table is written only once every watcher finished its initial
//! list (and the ServiceExport API was discovered, served or not). A watcher that errors
//! (API server unreachable, forbidden) marks the source stale, keeps its store as it was
//! (so the routes stay), and after a backoff starts over with a full list: the source is
//! fresh again when every relist completed, which also catches every change made while it
//! was away. A `410 Gone` is not an outage: kube-rs relists at once and the routes stay.

pub mod conditions;
pub mod mapping;
mod metrics;

pub use metrics::{KubernetesMetrics, SERVICES_REJECTED, STALE, WATCH_ERRORS};

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::runtime::reflector::{Store, store::Writer};
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::k8s::Leadership;
use crate::model::{ClusterName, Route};
use crate::node::NodeHandle;
use crate::source::{Rejected, RouteSource};
use crate::table::RouteStore;
use mapping::{ServiceRef, Verdict};

/// The MCS API group.
pub const MCS_GROUP: &str = "multicluster.x-k8s.io";
/// The MCS API versions served, preferred first.
pub const MCS_VERSIONS: [&str; 2] = ["v1beta1", "v1alpha1"];

/// How often the ServiceExport API is looked up again, so that MCS CRDs installed (or
/// upgraded from v1alpha1 to v1beta1) after start are picked up without a restart.
pub const REDISCOVER_EVERY: Duration = Duration::from_secs(30);

/// How long changes are gathered before one table is computed: a rollout touches a
/// Service's slices many times within milliseconds, and one table write is cheaper for
/// every consumer than ten.
pub const COALESCE: Duration = Duration::from_millis(30);

/// The kinds watched, in the order of the per-kind counters.
const KINDS: [&str; 3] = ["Service", "EndpointSlice", "ServiceExport"];

/// Counters of the source, for metrics and for tests that wait on a state.
#[derive(Debug, Default)]
pub struct KubeStats {
    /// Whether the routes served are last-known-good rather than the API's current view.
    pub stale: AtomicBool,
    /// Tables written into the store (changed or not).
    pub syncs: AtomicU64,
    /// Watch events received, per kind.
    pub events: [AtomicU64; 3],
    /// Watch errors (each followed by a backoff and a relist), per kind.
    pub watch_errors: [AtomicU64; 3],
    /// Completed lists (initial, after an error, or after a 410), per kind.
    pub lists: [AtomicU64; 3],
    /// Services refused (a refusal counts once, when it first appears or its reason changes).
    pub services_rejected: AtomicU64,
    /// Services refused in the last table.
    pub services_rejected_now: AtomicU64,
    /// ServiceExport status writes that succeeded.
    pub status_writes: AtomicU64,
    /// ServiceExport status writes that failed (retried with the next table).
    pub status_write_errors: AtomicU64,
    /// ServiceExport API discoveries that failed (the previous answer was kept).
    pub discovery_errors: AtomicU64,
    /// The ServiceExport API version in use: 0 none, 1 v1beta1, 2 v1alpha1.
    pub export_version: AtomicU64,
}

/// The Kubernetes route source.
#[derive(Clone)]
pub struct KubernetesSource {
    client: kube::Client,
    cluster: ClusterName,
    namespaces: Vec<String>,
    leadership: Leadership,
    node: Option<NodeHandle>,
    rediscover: Duration,
    stats: Arc<KubeStats>,
}

impl Debug for KubernetesSource {
    // The client holds credentials: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesSource")
            .field("cluster", &self.cluster)
            .field("namespaces", &self.namespaces)
            .finish_non_exhaustive()
    }
}

impl KubernetesSource {
    /// A source reading Services of `namespaces` (empty: all) through `client`, homing
    /// their routes in `cluster`, writing ServiceExport status while `leadership` says so.
    pub fn new(
        client: kube::Client,
        cluster: ClusterName,
        namespaces: Vec<String>,
        leadership: Leadership,
    ) -> Self {
        let stats = KubeStats {
            stale: AtomicBool::new(true),
            ..KubeStats::default()
        };
        Self {
            client,
            cluster,
            namespaces,
            leadership,
            node: None,
            rediscover: REDISCOVER_EVERY,
            stats: Arc::new(stats),
        }
    }

    /// Tells `node` whether the local routes are fresh as that changes.
    #[must_use]
    pub fn with_node(mut self, node: NodeHandle) -> Self {
        self.node = Some(node);
        self
    }

    /// Looks the ServiceExport API up every `every` instead of [`REDISCOVER_EVERY`].
    #[must_use]
    pub fn rediscover_every(mut self, every: Duration) -> Self {
        self.rediscover = every;
        self
    }

    /// The counters, shared with the running source.
    pub fn stats(&self) -> Arc<KubeStats> {
        Arc::clone(&self.stats)
    }

    /// Watches until `cancel`, writing each table into `store`.
    pub fn watch(self, store: RouteStore, cancel: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move { self.run_loop(store, cancel).await })
    }

    fn scopes(&self) -> Vec<Option<String>> {
        if self.namespaces.is_empty() {
            vec![None]
        } else {
            self.namespaces.iter().cloned().map(Some).collect()
        }
    }

    async fn run_loop(self, store: RouteStore, cancel: CancellationToken) {
        let cancel = cancel.child_token();
        let _stop_children = cancel.clone().drop_guard();
        let notify = Arc::new(Notify::new());
        let ctx = WatchCtx {
            notify: Arc::clone(&notify),
            stats: Arc::clone(&self.stats),
            cancel: cancel.clone(),
        };
        let mut services = Vec::new();
        let mut slices = Vec::new();
        let mut states = Vec::new();
        for scope in self.scopes() {
            let (api_s, api_e): (Api<Service>, Api<EndpointSlice>) = match &scope {
                Some(ns) => (
                    Api::namespaced(self.client.clone(), ns),
                    Api::namespaced(self.client.clone(), ns),
                ),
                None => (Api::all(self.client.clone()), Api::all(self.client.clone())),
            };
            let (s, w) = kube::runtime::reflector::store();
            services.push(s);
            states.push(ctx.spawn(api_s, w, 0));
            let (s, w) = kube::runtime::reflector::store();
            slices.push(s);
            states.push(ctx.spawn(api_e, w, 1));
        }
        let exports: Arc<Mutex<Exports>> = Arc::default();
        tokio::spawn(discover_loop(
            self.client.clone(),
            self.scopes(),
            self.rediscover,
            Arc::clone(&exports),
            ctx.clone(),
        ));

        let mut last_good: BTreeMap<ServiceRef, Vec<Route>> = BTreeMap::new();
        let mut refused: BTreeMap<String, String> = BTreeMap::new();
        let mut leader = self.leadership.receiver();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = notify.notified() => {}
                // A replica that just took the Lease writes the statuses its predecessor
                // may have left undone. (`Err`: no Lease, the value never changes; the
                // branch is then off for this wait.)
                Ok(()) = leader.changed() => {}
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(COALESCE) => {}
            }
            let (export_view, export_states) = {
                let e = lock(&exports);
                (e.view.clone(), e.states.clone())
            };
            let listed = states
                .iter()
                .chain(export_states.iter())
                .all(|s| s.listed.load(Ordering::Acquire))
                && export_view.is_some();
            let erroring = states
                .iter()
                .chain(export_states.iter())
                .any(|s| s.erroring.load(Ordering::Acquire));
            self.set_stale(!listed || erroring);
            if !listed {
                // No table before every list completed: a partial view would remove routes.
                continue;
            }
            let svc: Vec<Arc<Service>> = services.iter().flat_map(Store::state).collect();
            let sl: Vec<Arc<EndpointSlice>> = slices.iter().flat_map(Store::state).collect();
            let exp: Vec<Arc<DynamicObject>> = match &export_view {
                Some(Some(view)) => view.stores.iter().flat_map(Store::state).collect(),
                _ => Vec::new(),
            };
            let export_refs: HashSet<ServiceRef> =
                exp.iter().map(|e| ServiceRef::of(&e.metadata)).collect();
            let mapped = mapping::map(
                &self.cluster,
                &self.namespaces,
                &svc.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
                &sl.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
                &export_refs,
            );
            let routes = settle(&mapped, &mut last_good);
            self.note_rejected(&mapped.rejected, &mut refused);
            let applied = store.replace_all(routes);
            self.stats.syncs.fetch_add(1, Ordering::Relaxed);
            if applied.is_change() {
                tracing::info!(
                    revision = applied.revision,
                    added = applied.added,
                    changed = applied.changed,
                    removed = applied.removed,
                    rejected = mapped.rejected.len(),
                    "route table updated from the Kubernetes API"
                );
            }
            if let Some(Some(view)) = &export_view
                && self.leadership.is_leader()
            {
                self.write_export_status(view, &exp, &mapped.verdicts, &cancel)
                    .await;
            }
        }
    }

    fn set_stale(&self, stale: bool) {
        let was = self.stats.stale.swap(stale, Ordering::AcqRel);
        if was != stale {
            if stale {
                tracing::warn!("Kubernetes source stale: serving the last known routes");
            } else {
                tracing::info!("Kubernetes source fresh");
            }
        }
        if let Some(node) = &self.node {
            node.set_local_fresh(!stale);
        }
    }

    /// Logs and counts refusals once each (a Service refused for the same reason on every
    /// table is one refusal, not one per table).
    fn note_rejected(&self, rejected: &[Rejected], seen: &mut BTreeMap<String, String>) {
        let mut now = BTreeMap::new();
        for r in rejected {
            if seen.get(&r.entry) != Some(&r.reason) {
                tracing::warn!("{r}");
                self.stats.services_rejected.fetch_add(1, Ordering::Relaxed);
            }
            now.insert(r.entry.clone(), r.reason.clone());
        }
        self.stats
            .services_rejected_now
            .store(rejected.len() as u64, Ordering::Relaxed);
        *seen = now;
    }

    async fn write_export_status(
        &self,
        view: &ExportView,
        exports: &[Arc<DynamicObject>],
        verdicts: &BTreeMap<ServiceRef, Verdict>,
        cancel: &CancellationToken,
    ) {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        for export in exports {
            let sref = ServiceRef::of(&export.metadata);
            let current: Vec<Condition> = export
                .data
                .get("status")
                .and_then(|s| s.get("conditions"))
                .and_then(|c| serde_json::from_value(c.clone()).ok())
                .unwrap_or_default();
            let Some(next) = conditions::update(
                &current,
                export.metadata.generation,
                &sref.to_string(),
                verdicts.get(&sref),
                &now,
            ) else {
                continue;
            };
            let mut object = DynamicObject::clone(export);
            let status = object
                .data
                .as_object_mut()
                .map(|o| o.entry("status").or_insert_with(|| serde_json::json!({})));
            match (status, serde_json::to_value(&next)) {
                (Some(serde_json::Value::Object(s)), Ok(c)) => {
                    s.insert("conditions".into(), c);
                }
                _ => {
                    tracing::warn!(export = %sref, "ServiceExport status is not an object; not written");
                    self.stats
                        .status_write_errors
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &sref.namespace, &view.resource);
            let params = PostParams::default();
            let write = api.replace_status(&sref.name, &params, &object);
            let result = tokio::select! {
                () = cancel.cancelled() => return,
                r = tokio::time::timeout(Duration::from_secs(5), write) => r,
            };
            match result {
                Ok(Ok(_)) => {
                    self.stats.status_writes.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    // A 409 (the export changed meanwhile) is retried with the next table.
                    tracing::warn!(export = %sref, "writing ServiceExport status: {e}");
                    self.stats
                        .status_write_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    tracing::warn!(export = %sref, "writing ServiceExport status timed out after 5 s");
                    self.stats
                        .status_write_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

impl RouteSource for KubernetesSource {
    fn describe(&self) -> String {
        if self.namespaces.is_empty() {
            "kubernetes (all namespaces)".into()
        } else {
            format!("kubernetes (namespaces {})", self.namespaces.join(", "))
        }
    }

    fn run(self, into: RouteStore, cancel: CancellationToken) -> JoinHandle<()> {
        self.watch(into, cancel)
    }
}

/// The routes to write: the accepted Services' routes, plus the last good routes of each
/// refused Service (for keys no accepted Service has), so that a typo in an annotation
/// never removes a route. A Service that is gone or no longer annotated drops its routes.
fn settle(
    mapped: &mapping::Mapped,
    last_good: &mut BTreeMap<ServiceRef, Vec<Route>>,
) -> Vec<Route> {
    let mut routes = mapped.routes.clone();
    let mut keys: HashSet<_> = routes.iter().map(|r| r.key.clone()).collect();
    let mut next = mapped.by_service.clone();
    for (sref, verdict) in &mapped.verdicts {
        if !matches!(verdict, Verdict::Invalid(_) | Verdict::Conflict(_)) {
            continue;
        }
        let Some(kept) = last_good.get(sref) else {
            continue;
        };
        let kept: Vec<Route> = kept
            .iter()
            .filter(|r| !keys.contains(&r.key))
            .cloned()
            .collect();
        for r in &kept {
            tracing::warn!(service = %sref, route = %r.key, "keeping the last good version of a route whose Service was refused");
            keys.insert(r.key.clone());
        }
        routes.extend(kept.iter().cloned());
        next.insert(sref.clone(), kept);
    }
    *last_good = next;
    routes.sort_by(|a, b| a.key.cmp(&b.key));
    routes
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One watcher's state, read by the table loop.
#[derive(Debug, Default)]
struct WatchState {
    /// Its store holds a complete list (set at the first `InitDone`, and kept).
    listed: AtomicBool,
    /// Its last attempt failed; cleared when a relist completes.
    erroring: AtomicBool,
}

/// What the watchers share with the table loop.
#[derive(Clone)]
struct WatchCtx {
    notify: Arc<Notify>,
    stats: Arc<KubeStats>,
    cancel: CancellationToken,
}

impl WatchCtx {
    fn spawn<K>(&self, api: Api<K>, writer: Writer<K>, kind: usize) -> Arc<WatchState>
    where
        K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Eq + Hash + Clone + Send + Sync,
    {
        let state = Arc::new(WatchState::default());
        tokio::spawn(watch_one(
            api,
            writer,
            kind,
            Arc::clone(&state),
            self.clone(),
            self.cancel.clone(),
        ));
        state
    }
}

/// Runs one watcher into its store until `cancel`. An error marks it erroring, and after
/// kube's default backoff the watch starts over with a list (see the module docs).
async fn watch_one<K>(
    api: Api<K>,
    mut writer: Writer<K>,
    kind: usize,
    state: Arc<WatchState>,
    ctx: WatchCtx,
    cancel: CancellationToken,
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let config = watcher::Config::default();
    let mut backoff = watcher::DefaultBackoff::default();
    loop {
        let mut stream = watcher::watcher(api.clone(), config.clone()).boxed();
        loop {
            let item = tokio::select! {
                () = cancel.cancelled() => return,
                item = stream.next() => item,
            };
            let Some(item) = item else { break };
            match item {
                Ok(event) => {
                    writer.apply_watcher_event(&event);
                    ctx.stats.events[kind].fetch_add(1, Ordering::Relaxed);
                    if matches!(event, watcher::Event::InitDone) {
                        ctx.stats.lists[kind].fetch_add(1, Ordering::Relaxed);
                        state.listed.store(true, Ordering::Release);
                        state.erroring.store(false, Ordering::Release);
                        backoff = watcher::DefaultBackoff::default();
                    }
                    ctx.notify.notify_one();
                }
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    // Desynced: the watcher relists by itself; the store keeps its
                    // content until the new list is complete.
                    tracing::debug!(kind = KINDS[kind], "410 Gone: relisting");
                }
                Err(e) => {
                    tracing::warn!(
                        kind = KINDS[kind],
                        "watch failed: {e}; keeping the last known objects"
                    );
                    ctx.stats.watch_errors[kind].fetch_add(1, Ordering::Relaxed);
                    state.erroring.store(true, Ordering::Release);
                    ctx.notify.notify_one();
                    break;
                }
            }
        }
        let pause = backoff.next().unwrap_or(Duration::from_secs(30));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// The ServiceExport API as last discovered.
#[derive(Default)]
struct Exports {
    /// `None` before the first discovery; `Some(None)` when no version is served.
    view: Option<Option<ExportView>>,
    /// The states of the current export watchers.
    states: Vec<Arc<WatchState>>,
}

#[derive(Clone)]
struct ExportView {
    resource: ApiResource,
    stores: Vec<Store<DynamicObject>>,
}

/// Which ServiceExport API version the server serves: the first of [`MCS_VERSIONS`] with
/// the kind, `None` when neither.
///
/// # Errors
/// The discovery request failed for another reason than the group being absent.
async fn discover(client: &kube::Client) -> Result<Option<ApiResource>, kube::Error> {
    match kube::discovery::group(client, MCS_GROUP).await {
        Ok(group) => Ok(MCS_VERSIONS.iter().find_map(|v| {
            group
                .versioned_resources(v)
                .into_iter()
                .find(|(r, _)| r.kind == "ServiceExport")
                .map(|(r, _)| r)
        })),
        Err(kube::Error::Discovery(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn discover_loop(
    client: kube::Client,
    scopes: Vec<Option<String>>,
    every: Duration,
    exports: Arc<Mutex<Exports>>,
    ctx: WatchCtx,
) {
    let mut current: Option<Option<ApiResource>> = None;
    let mut watchers = CancellationToken::new();
    loop {
        match discover(&client).await {
            Ok(found) => {
                let same = match (&current, &found) {
                    (Some(Some(a)), Some(b)) => a.api_version == b.api_version,
                    (Some(None), None) => true,
                    _ => false,
                };
                if !same {
                    watchers.cancel();
                    watchers = ctx.cancel.child_token();
                    let wctx = WatchCtx {
                        cancel: watchers.clone(),
                        ..ctx.clone()
                    };
                    let mut e = lock(&exports);
                    e.states.clear();
                    e.view = Some(found.as_ref().map(|resource| {
                        tracing::info!(api = %resource.api_version, "watching ServiceExports");
                        let mut stores = Vec::new();
                        for scope in &scopes {
                            let api: Api<DynamicObject> = match scope {
                                Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
                                None => Api::all_with(client.clone(), resource),
                            };
                            let writer = Writer::new(resource.clone());
                            stores.push(writer.as_reader());
                            e.states.push(wctx.spawn(api, writer, 2));
                        }
                        ExportView {
                            resource: resource.clone(),
                            stores,
                        }
                    }));
                    if found.is_none() {
                        tracing::info!(
                            "no ServiceExport API served: only the {} annotation exports",
                            mapping::EXPORT
                        );
                    }
                    ctx.stats.export_version.store(
                        match &found {
                            Some(r) if r.version == "v1beta1" => 1,
                            Some(_) => 2,
                            None => 0,
                        },
                        Ordering::Relaxed,
                    );
                    current = Some(found);
                    ctx.notify.notify_one();
                }
            }
            Err(e) => {
                tracing::warn!("discovering the {MCS_GROUP} API: {e}; keeping the last answer");
                ctx.stats.discovery_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::select! {
            () = ctx.cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(name: &str, annotations: &[(&str, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
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
                ports: Some(vec![ServicePort {
                    port: 80,
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    fn settled(services: &[Service], last: &mut BTreeMap<ServiceRef, Vec<Route>>) -> Vec<String> {
        let m = mapping::map(
            &ClusterName::parse("k8s").unwrap(),
            &[],
            &services.iter().collect::<Vec<_>>(),
            &[],
            &HashSet::new(),
        );
        settle(&m, last)
            .iter()
            .map(|r| format!("{} exported={}", r.key, r.exported))
            .collect()
    }

    #[test]
    fn a_refused_service_keeps_its_last_good_routes_until_it_goes() {
        let mut last = BTreeMap::new();
        let good = svc(
            "a",
            &[
                (mapping::ROUTE, "a.apps.internal"),
                (mapping::EXPORT, "true"),
            ],
        );
        assert_eq!(
            settled(&[good], &mut last),
            ["a.apps.internal:80 exported=true"]
        );
        // A typo in the export annotation: the route stays as it was.
        let typo = svc(
            "a",
            &[
                (mapping::ROUTE, "a.apps.internal"),
                (mapping::EXPORT, "ture"),
            ],
        );
        assert_eq!(
            settled(std::slice::from_ref(&typo), &mut last),
            ["a.apps.internal:80 exported=true"]
        );
        assert_eq!(
            settled(&[typo], &mut last),
            ["a.apps.internal:80 exported=true"]
        );
        // The annotation removed: not a route any more.
        assert!(settled(&[svc("a", &[])], &mut last).is_empty());
        // Refused with no good version before: nothing to keep.
        let typo = svc(
            "a",
            &[
                (mapping::ROUTE, "a.apps.internal"),
                (mapping::EXPORT, "ture"),
            ],
        );
        assert!(settled(&[typo], &mut last).is_empty());
    }
}
