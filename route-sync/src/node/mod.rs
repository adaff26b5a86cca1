//! A route-sync node: one per cluster. It follows the local source, imports peers' exported
//! routes, merges them, and serves the merged table (to local consumers) and the exported
//! local routes (to peers) over one gRPC API.
//!
//! Control plane only: nothing here is on a data path. Consumers get changes as streamed
//! deltas and keep their own lock-free table.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_certs::{MeshTls, PeerPolicy};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::merge::Merger;
use crate::model::{ClusterName, Route, RouteKey, RouteName};
use crate::proto;
use crate::source::Rejected;
use crate::table::RouteStore;
use crate::vip::{VipAllocator, VipRange};

pub(crate) mod metrics;
mod peer;
mod service;

pub use metrics::NodeMetrics;

/// How many changed keys the local store remembers. Its only reader is this node's merge
/// loop, which keeps up; when a source changes more at once (a first load), the loop
/// re-reads the whole local table, which costs about what the log would have. Peers and
/// consumers resume from the merged table, whose log stays long.
const LOCAL_LOG_CAPACITY: usize = 1 << 16;

/// A peer cluster and its route-sync endpoints, tried in turn.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    /// The peer's cluster name.
    pub cluster: ClusterName,
    /// Its route-sync addresses.
    pub endpoints: Vec<SocketAddr>,
}

/// What a node needs, as values (the binary builds it from the config file).
#[derive(Clone)]
pub struct NodeSettings {
    /// This cluster.
    pub cluster: ClusterName,
    /// The mesh trust domain.
    pub trust_domain: String,
    /// This node's identity and bundle.
    pub tls: MeshTls,
    /// Peer clusters.
    pub peers: Vec<PeerSpec>,
    /// Where last-known-good state is kept; none keeps nothing.
    pub state_dir: Option<PathBuf>,
    /// Time allowed for a TLS handshake.
    pub handshake_timeout: Duration,
    /// Per-route VIPs assigned by this node; none: routes carry no VIP.
    pub vips: Option<VipSettings>,
    /// Bounds on what a peer may send.
    pub limits: PeerLimits,
    /// HTTP/2 keepalive of the gRPC server.
    pub keepalive: Keepalive,
}

/// The node's VIP allocation: the range, and how long a name that left keeps its VIP held.
#[derive(Debug, Clone, Copy)]
pub struct VipSettings {
    /// Where VIPs come from.
    pub range: VipRange,
    /// How long a VIP stays reserved for a name that left.
    pub hold: Duration,
}

/// Bounds on what one peer may send (see `limits` in [`crate::config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLimits {
    /// Chunks of one snapshot or delta before its final one.
    pub max_batch_chunks: usize,
    /// Routes and removals of one snapshot or delta before its final chunk.
    pub max_batch_routes: usize,
    /// Routes imported from one peer.
    pub max_routes_per_peer: usize,
}

impl Default for PeerLimits {
    /// 256 chunks of 5,000 and a million entries let through a 250,000-route snapshot four
    /// times over; 500,000 routes per peer is twice the largest cluster measured.
    fn default() -> Self {
        Self {
            max_batch_chunks: 256,
            max_batch_routes: 1_000_000,
            max_routes_per_peer: 500_000,
        }
    }
}

/// HTTP/2 keepalive of the gRPC server: a caller is pinged after `interval` of silence and
/// dropped, with its Watch streams, when it does not answer within `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Silence before a PING.
    pub interval: Duration,
    /// Time allowed for the PING's answer.
    pub timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Live state of one peer, for status and for resuming.
#[derive(Debug, Default, Clone)]
pub struct PeerState {
    /// connecting, connected or disconnected.
    pub state: &'static str,
    /// The endpoint in use or last tried.
    pub endpoint: String,
    /// The epoch of the last update applied.
    pub epoch: String,
    /// The revision of the last update applied.
    pub revision: u64,
    /// The last error.
    pub last_error: String,
    /// When the last update arrived (Unix ms).
    pub last_update_unix_ms: i64,
    /// The peer's trust anchors, as it reported them.
    pub trust_anchors: Vec<String>,
    /// Snapshots received (a resume needs none).
    pub snapshots: u64,
    /// Deltas received with routes or removals (staleness-only updates are not counted).
    pub deltas: u64,
    /// Whether the peer has been reached since start.
    pub ever_connected: bool,
    /// Updates refused for breaking a limit.
    pub refused: u64,
}

pub(crate) struct Shared {
    pub(crate) settings: NodeSettings,
    /// Routes from this cluster's sources.
    pub(crate) local: RouteStore,
    /// The merged table served to consumers.
    pub(crate) merged: RouteStore,
    pub(crate) merger: Mutex<Merger>,
    /// The VIP of every name of the merged table; locked after `merger` when both are.
    pub(crate) vips: Option<Mutex<VipAllocator>>,
    /// The mirror Services' ClusterIPs and egress ports (Kubernetes), once a mirror runs:
    /// then imported routes take `vip` and `egress_port` from it. Locked after `merger`.
    pub(crate) mirror_book: Mutex<Option<Arc<crate::k8s::mirror::AddressBook>>>,
    /// What the mirror task last reported, for `status`; none without a mirror.
    pub(crate) mirror_status: Mutex<Option<proto::MirrorStatus>>,
    pub(crate) epoch: String,
    pub(crate) local_loaded: AtomicBool,
    pub(crate) peers: Vec<(PeerSpec, Mutex<PeerState>)>,
    pub(crate) rejected: AtomicU64,
    pub(crate) metrics: NodeMetrics,
    pub(crate) dirty: tokio::sync::Notify,
    /// Fired when the node stops: ends every Watch stream so the server can shut down.
    pub(crate) shutdown: CancellationToken,
    /// The last staleness told to watchers: a change is sent to them even when the table
    /// itself does not change (a consumer of an empty table must still learn it is fresh).
    pub(crate) freshness: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    /// Whether anything served is last-known-good rather than fresh.
    pub(crate) fn stale(&self) -> bool {
        !self.local_loaded.load(Ordering::Acquire)
            || self.peers.iter().any(|(_, s)| lock(s).state != "connected")
            // Imported routes' addresses come from the mirror's watch: until it has listed
            // the Services, or while it fails, they may be missing or out of date.
            || lock(&self.mirror_status)
                .as_ref()
                .is_some_and(|m| !m.synced || !m.last_error.is_empty())
    }

    /// Tells watchers when staleness changed. Call after changing what [`Shared::stale`]
    /// reads, with no peer lock held.
    pub(crate) fn note_freshness(&self) {
        let stale = self.stale();
        self.freshness.send_if_modified(|v| {
            let changed = *v != stale;
            *v = stale;
            changed
        });
    }

    /// Applies merger results for `keys` to the merged table, counting refusals, and gives
    /// every route its name's VIP (see [`Shared::assign_vips`]).
    pub(crate) fn apply_merge(
        &self,
        merger: &Merger,
        keys: HashSet<RouteKey>,
        rejected: Vec<Rejected>,
    ) {
        for r in &rejected {
            tracing::warn!("{r}");
        }
        self.rejected
            .fetch_add(rejected.len() as u64, Ordering::Relaxed);
        self.metrics.rejected.inc_by(rejected.len() as u64);
        if keys.is_empty() {
            return;
        }
        let delta = merger.resolve(keys);
        let changed = self.assign_vips(delta.upserts, delta.removals);
        if changed {
            self.metrics.applied.inc();
            self.metrics
                .set_counts(merger, self.merged.snapshot().len());
            self.dirty.notify_one();
        }
    }

    /// Applies `upserts` and `removals` to the merged table with each route's `vip` set to
    /// its name's VIP from this node's allocation (or none without one): whatever VIP a
    /// source or a peer put on a route is overwritten. A name that left the table releases
    /// its VIP (held); names that were waiting for one and got it are updated in a second
    /// change, after the first removed the old owner, so no table ever shows one VIP on two
    /// names. True when the table changed.
    fn assign_vips(&self, upserts: Vec<Arc<Route>>, removals: Vec<RouteKey>) -> bool {
        if let Some(book) = lock(&self.mirror_book).clone() {
            let upserts = upserts.into_iter().map(|r| self.stamp_mirror(r, &book));
            return self.merged.apply_shared(upserts, removals).is_change();
        }
        let Some(vips) = &self.vips else {
            let upserts = upserts.into_iter().map(|r| with_vip(r, None));
            return self.merged.apply_shared(upserts, removals).is_change();
        };
        let now = now_unix_ms();
        let mut alloc = lock(vips);
        let waiting_before = alloc.counts().waiting;
        let generation = alloc.generation();
        let upserts: Vec<Arc<Route>> = upserts
            .into_iter()
            .map(|r| {
                let vip = alloc.add(&r.key.name, now);
                with_vip(r, vip)
            })
            .collect();
        self.persist_new_vips(&alloc, generation);
        let mut changed = self
            .merged
            .apply_shared(upserts, removals.iter().cloned())
            .is_change();
        let table = self.merged.snapshot();
        let mut given = Vec::new();
        for key in &removals {
            if table.by_route_name(&key.name).is_empty() {
                given.extend(alloc.remove(&key.name, now));
            }
        }
        if !given.is_empty() {
            self.persist_new_vips(&alloc, generation);
            let routes: Vec<Arc<Route>> = given
                .iter()
                .flat_map(|(name, ip)| {
                    table
                        .by_route_name(name)
                        .iter()
                        .map(|r| with_vip(Arc::clone(r), Some(*ip)))
                })
                .collect();
            changed |= self.merged.apply_shared(routes, []).is_change();
        }
        let counts = alloc.counts();
        drop(alloc);
        if waiting_before == 0 && counts.waiting > 0 {
            tracing::warn!(
                range = %self.settings.vips.map(|v| v.range.to_string()).unwrap_or_default(),
                assigned = counts.assigned,
                waiting = counts.waiting,
                "the VIP range is exhausted: new route names get no VIP until one is released (use a wider range)"
            );
        } else if waiting_before > 0 && counts.waiting == 0 {
            tracing::info!("every route name has a VIP again");
        }
        self.metrics.set_vips(&counts);
        changed
    }

    /// `route` with the `vip` and `egress_port` of its mirror Service: imported routes only
    /// (a local route is served by the cluster's own Service, not a mirror), and none while
    /// the book has no entry (the Service is not created or not seen yet, or has gone).
    fn stamp_mirror(
        &self,
        route: Arc<Route>,
        book: &crate::k8s::mirror::AddressBook,
    ) -> Arc<Route> {
        let (vip, egress_port) = if route.home_cluster == self.settings.cluster {
            (None, None)
        } else {
            book.stamp(&route.key)
        };
        if route.vip == vip && route.egress_port == egress_port {
            return route;
        }
        let mut copy = Route::clone(&route);
        copy.vip = vip;
        copy.egress_port = egress_port;
        Arc::new(copy)
    }

    /// Replaces the mirror address book and re-stamps the merged routes of every name whose
    /// entry changed, as one ordinary change of the merged table (consumers get a delta).
    pub(crate) fn set_mirror_book(&self, book: crate::k8s::mirror::AddressBook) {
        let _merger = lock(&self.merger);
        let mut slot = lock(&self.mirror_book);
        let changed = match slot.as_deref() {
            Some(old) if *old == book => return,
            Some(old) => old.changed_names(&book),
            // The first book: every imported route may need its stamp (or none).
            None => self
                .merged
                .snapshot()
                .iter()
                .map(|r| r.key.name.clone())
                .collect(),
        };
        let book = Arc::new(book);
        *slot = Some(Arc::clone(&book));
        drop(slot);
        let table = self.merged.snapshot();
        let routes: Vec<Arc<Route>> = changed
            .iter()
            .flat_map(|name| table.by_route_name(name).iter())
            .map(|r| self.stamp_mirror(Arc::clone(r), &book))
            .collect();
        if self.merged.apply_shared(routes, []).is_change() {
            self.metrics.applied.inc();
            self.dirty.notify_one();
        }
    }

    /// Writes the VIP allocation to `state_dir` now when it changed since `generation`,
    /// before the routes carrying the new VIPs are published: a VIP a consumer has seen (and
    /// an app may have cached forever) must survive a crash of this process the next moment.
    /// The periodic save loop would leave up to its interval of new VIPs unsaved. A failed
    /// write is logged and the routes are published anyway (the save loop retries).
    fn persist_new_vips(&self, alloc: &VipAllocator, generation: u64) {
        if alloc.generation() == generation {
            return;
        }
        let Some(path) = self.state_path(VIPS_FILE) else {
            return;
        };
        if let Err(e) = crate::persist::save_message(&path, &vip_state(alloc)) {
            tracing::warn!(
                "cannot save {}: {e}; new VIPs are served unsaved",
                path.display()
            );
        }
    }

    pub(crate) fn state_path(&self, name: &str) -> Option<PathBuf> {
        self.settings.state_dir.as_ref().map(|d| d.join(name))
    }
}

/// `route` with `vip`: the same `Arc` when it already carries it, else a copy.
fn with_vip(route: Arc<Route>, vip: Option<std::net::IpAddr>) -> Arc<Route> {
    if route.vip == vip {
        return route;
    }
    let mut copy = Route::clone(&route);
    copy.vip = vip;
    Arc::new(copy)
}

pub(crate) fn now_unix_ms() -> u64 {
    u64::try_from(peer::now_ms()).unwrap_or(0)
}

/// The saved VIP allocation, or a fresh one: saved names keep their VIPs, saved holds their
/// age. A file that does not decode is logged and ignored (VIPs then start afresh).
fn restore_vips(vips: &VipSettings, dir: Option<&std::path::Path>) -> VipAllocator {
    let fresh = || VipAllocator::new(vips.range, vips.hold);
    let Some(dir) = dir else {
        return fresh();
    };
    let path = dir.join(VIPS_FILE);
    let saved = match crate::persist::load_message::<proto::VipState>(&path) {
        Ok(Some(saved)) => saved,
        Ok(None) => return fresh(),
        Err(e) => {
            tracing::warn!("ignoring saved VIPs: {e}");
            return fresh();
        }
    };
    let mut bad = 0usize;
    let mut assigned = Vec::new();
    let mut held = Vec::new();
    for e in &saved.entries {
        let (Ok(name), Ok(ip)) = (RouteName::parse(&e.name), e.vip.parse()) else {
            bad += 1;
            continue;
        };
        if e.held {
            held.push((name, ip, u64::try_from(e.held_since_unix_ms).unwrap_or(0)));
        } else {
            assigned.push((name, ip));
        }
    }
    let (alloc, dropped) =
        VipAllocator::restore(vips.range, vips.hold, assigned, held, now_unix_ms());
    let counts = alloc.counts();
    tracing::info!(
        range = %vips.range,
        saved_range = %saved.range,
        assigned = counts.assigned,
        held = counts.held,
        dropped = dropped + bad,
        "restored VIPs"
    );
    alloc
}

/// The file under `state_dir` that keeps the VIP allocation.
const VIPS_FILE: &str = "vips.pb";

/// A bound node, ready to [`run`](Node::run).
pub struct Node {
    shared: Arc<Shared>,
    listener: TcpListener,
}

impl Node {
    /// Restores last-known-good state (marked stale) and binds the gRPC listener.
    ///
    /// # Errors
    /// When the listener cannot be bound.
    pub async fn bind(settings: NodeSettings, listen: SocketAddr) -> std::io::Result<Self> {
        Ok(Self::with_listener(
            settings,
            TcpListener::bind(listen).await?,
        ))
    }

    /// As [`Node::bind`], on a listener already bound (tests bind every node's port first so
    /// that each can name the others as peers).
    pub fn with_listener(settings: NodeSettings, listener: TcpListener) -> Self {
        let mut merger = Merger::new(settings.cluster.clone());
        let mut peers = Vec::new();
        let mut vips_slot = None;
        let metrics = NodeMetrics::default();
        let merged = RouteStore::new();
        let shared_dir = settings.state_dir.clone();
        // Last known good: local routes and every peer's imports, as saved.
        let local = RouteStore::new();
        local.set_log_capacity(LOCAL_LOG_CAPACITY);
        if let Some(dir) = &shared_dir {
            match crate::persist::load(&dir.join("local.pb")) {
                Ok(Some(saved)) => {
                    let (routes, _) = crate::persist::routes_of(&saved);
                    local.replace_all(routes);
                    tracing::info!(
                        routes = local.snapshot().len(),
                        "restored local routes (stale until the source loads)"
                    );
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("ignoring saved local routes: {e}"),
            }
        }
        merger.set_local(local.snapshot().iter().cloned());
        for spec in &settings.peers {
            let mut state = PeerState {
                state: "connecting",
                ..PeerState::default()
            };
            if let Some(dir) = &shared_dir {
                match crate::persist::load(&dir.join(format!("peer-{}.pb", spec.cluster))) {
                    Ok(Some(saved)) => {
                        let (routes, _) = crate::persist::routes_of(&saved);
                        state.epoch = saved.epoch.clone();
                        state.revision = saved.revision;
                        merger.import_snapshot(&spec.cluster, routes.into_iter().map(Arc::new));
                        tracing::info!(peer = %spec.cluster, revision = saved.revision, "restored imported routes");
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("ignoring saved routes of {}: {e}", spec.cluster),
                }
            }
            peers.push((spec.clone(), Mutex::new(state)));
        }
        // VIPs before serving: restored ones first, then names the restored table has and the
        // saved allocation does not; saved names the table no longer has start their hold.
        let vips = settings
            .vips
            .as_ref()
            .map(|v| restore_vips(v, shared_dir.as_deref()));
        let all = merger.all();
        match vips {
            Some(mut alloc) => {
                let now = now_unix_ms();
                let routes: Vec<Arc<Route>> = all
                    .into_iter()
                    .map(|r| {
                        let vip = alloc.add(&r.key.name, now);
                        with_vip(r, vip)
                    })
                    .collect();
                merged.replace_all_shared(routes);
                let table = merged.snapshot();
                let gone: Vec<RouteName> = alloc
                    .assigned()
                    .filter(|(name, _)| table.by_route_name(name).is_empty())
                    .map(|(name, _)| name.clone())
                    .collect();
                for name in &gone {
                    // Every name of the table is assigned or waiting already, and a release
                    // only hands VIPs to waiting names: apply what it gives.
                    let given = alloc.remove(name, now);
                    let routes: Vec<Arc<Route>> = given
                        .iter()
                        .flat_map(|(n, ip)| {
                            table
                                .by_route_name(n)
                                .iter()
                                .map(|r| with_vip(Arc::clone(r), Some(*ip)))
                        })
                        .collect();
                    merged.apply_shared(routes, []);
                }
                metrics.set_vips(&alloc.counts());
                vips_slot = Some(Mutex::new(alloc));
            }
            None => {
                merged.replace_all_shared(all.into_iter().map(|r| with_vip(r, None)));
            }
        }
        metrics.set_counts(&merger, merged.snapshot().len());
        let epoch = format!("{:016x}", rand::random::<u64>());
        Self {
            shared: Arc::new(Shared {
                settings,
                local,
                merged,
                merger: Mutex::new(merger),
                vips: vips_slot,
                mirror_book: Mutex::new(None),
                mirror_status: Mutex::new(None),
                epoch,
                local_loaded: AtomicBool::new(false),
                peers,
                rejected: AtomicU64::new(0),
                metrics,
                dirty: tokio::sync::Notify::new(),
                shutdown: CancellationToken::new(),
                freshness: tokio::sync::watch::Sender::new(true),
            }),
            listener,
        }
    }

    /// The gRPC address.
    ///
    /// # Errors
    /// If the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The store local sources write into (a [`FileSource`](crate::source::file::FileSource)
    /// watches into it). Only routes homed in this cluster belong there.
    pub fn local_store(&self) -> RouteStore {
        self.shared.local.clone()
    }

    /// The merged table this node serves.
    pub fn merged_store(&self) -> RouteStore {
        self.shared.merged.clone()
    }

    /// Marks the local source as loaded (fresh). Sources call it after their first good load.
    pub fn handle(&self) -> NodeHandle {
        NodeHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Metrics, to register with an admin server.
    pub fn metrics(&self) -> NodeMetrics {
        self.shared.metrics.clone()
    }

    /// Serves, follows the local store and peers, and persists, until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let shared = self.shared;
        let cancel = {
            // One token for everything the node runs, fired by the caller's.
            let own = shared.shutdown.clone();
            let outer = cancel.clone();
            tokio::spawn(async move {
                outer.cancelled().await;
                own.cancel();
            });
            shared.shutdown.clone()
        };
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(follow_local(Arc::clone(&shared), cancel.clone()));
        tasks.spawn(persist_loop(Arc::clone(&shared), cancel.clone()));
        for i in 0..shared.peers.len() {
            tasks.spawn(peer::run(Arc::clone(&shared), i, cancel.clone()));
        }
        let tls = shared.settings.tls.server_config(
            PeerPolicy::trust_domain(&shared.settings.trust_domain),
            &[b"h2"],
        );
        let incoming = crate::grpc::incoming(
            self.listener,
            tls,
            shared.settings.handshake_timeout,
            cancel.clone(),
        );
        let service = service::RouteSyncService::new(Arc::clone(&shared));
        let keepalive = shared.settings.keepalive;
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(keepalive.interval))
            .http2_keepalive_timeout(Some(keepalive.timeout))
            .add_service(
                proto::route_sync_server::RouteSyncServer::new(service)
                    .max_encoding_message_size(64 << 20),
            )
            .serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned());
        if let Err(e) = server.await {
            tracing::error!("route-sync server failed: {e}");
        }
        cancel.cancel();
        while tasks.join_next().await.is_some() {}
        save_all(&shared, &mut Saved::default());
    }
}

/// A handle for sources and status readers.
#[derive(Clone)]
pub struct NodeHandle {
    shared: Arc<Shared>,
}

impl NodeHandle {
    /// Marks the local source fresh (its first good load happened).
    pub fn local_loaded(&self) {
        self.shared.local_loaded.store(true, Ordering::Release);
        self.shared.note_freshness();
    }

    /// Marks the local source fresh or stale again: a watching source (Kubernetes) loses
    /// its API server and comes back, unlike a file that, once loaded, stays loaded.
    pub fn set_local_fresh(&self, fresh: bool) {
        let was = self.shared.local_loaded.swap(fresh, Ordering::AcqRel);
        if was != fresh {
            self.shared.note_freshness();
        }
    }

    /// Whether the node serves last-known-good data.
    pub fn is_stale(&self) -> bool {
        self.shared.stale()
    }

    /// A peer's live state.
    pub fn peer(&self, cluster: &str) -> Option<PeerState> {
        self.shared
            .peers
            .iter()
            .find(|(s, _)| s.cluster.as_str() == cluster)
            .map(|(_, st)| lock(st).clone())
    }

    /// The status as the Status RPC answers it.
    pub fn status(&self) -> proto::StatusReply {
        service::status(&self.shared)
    }

    /// The merged table this node serves.
    pub fn merged(&self) -> RouteStore {
        self.shared.merged.clone()
    }

    /// This node's cluster.
    pub fn cluster(&self) -> ClusterName {
        self.shared.settings.cluster.clone()
    }

    /// Gives imported routes the `vip` and `egress_port` of their mirror Services from now
    /// on (replacing any VIP allocation), re-stamping the names whose entry changed. The
    /// mirror calls it on every change its watch sees.
    pub fn set_mirror_book(&self, book: crate::k8s::mirror::AddressBook) {
        self.shared.set_mirror_book(book);
    }

    /// Replaces what `status` shows of the mirror (and what staleness counts of it).
    pub fn set_mirror_status(&self, status: proto::MirrorStatus) {
        let mut slot = lock(&self.shared.mirror_status);
        if slot.as_ref() == Some(&status) {
            return;
        }
        *slot = Some(status);
        drop(slot);
        self.shared.note_freshness();
    }
}

/// Follows the local store: each change is merged incrementally.
async fn follow_local(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut watch = shared.local.subscribe();
    let mut seen = {
        let table = shared.local.snapshot();
        let mut merger = lock(&shared.merger);
        let (keys, rejected) = merger.set_local(table.iter().cloned());
        shared.apply_merge(&merger, keys, rejected);
        table.revision()
    };
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = watch.changed() => {}
        }
        let mut merger = lock(&shared.merger);
        let (keys, rejected, revision) = match shared.local.changes_since(seen) {
            Some((revision, delta)) => {
                let (keys, rejected) = merger.local_delta(delta.upserted, delta.removed);
                (keys, rejected, revision)
            }
            None => {
                let table = shared.local.snapshot();
                let (keys, rejected) = merger.set_local(table.iter().cloned());
                (keys, rejected, table.revision())
            }
        };
        shared.apply_merge(&merger, keys, rejected);
        seen = revision;
    }
}

/// Writes last-known-good state while it changes: at most every 500 ms, and at most a tenth
/// of the time. A save is O(routes) (a third of a second at 250,000), so it runs on a
/// blocking thread, where it delays neither the merge nor any Watch stream.
async fn persist_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    if shared.settings.state_dir.is_none() {
        return;
    }
    let mut saved = Saved::default();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = shared.dirty.notified() => {}
        }
        let started = tokio::time::Instant::now();
        let task = {
            let shared = Arc::clone(&shared);
            tokio::task::spawn_blocking(move || {
                save_all(&shared, &mut saved);
                saved
            })
        };
        saved = match task.await {
            Ok(saved) => saved,
            Err(e) => {
                tracing::warn!("saving last-known-good state failed: {e}");
                Saved::default()
            }
        };
        let pause = (started.elapsed() * 10).max(Duration::from_millis(500));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// What was last saved, so that an unchanged file is not written again.
#[derive(Debug, Default)]
struct Saved {
    /// The revision of the local table last saved.
    local: Option<u64>,
    /// Per peer, by index: the epoch and revision of the imports last saved.
    peers: Vec<Option<(String, u64)>>,
    /// The generation of the VIP allocation last saved.
    vips: Option<u64>,
}

/// Saves the local routes and each peer's imports that changed since `saved`, each as a
/// snapshot, encoded as it is written.
fn save_all(shared: &Shared, saved: &mut Saved) {
    let header = |epoch: &str, revision: u64| proto::Update {
        epoch: epoch.to_string(),
        revision,
        snapshot: true,
        cluster: shared.settings.cluster.to_string(),
        ..proto::Update::default()
    };
    if let Some(path) = shared.state_path("local.pb") {
        let local = shared.local.snapshot();
        if saved.local != Some(local.revision()) {
            let routes = local.iter().map(|r| proto::Route::from_model(r, true));
            match crate::persist::save_routes(&path, &header("", local.revision()), routes) {
                Ok(()) => saved.local = Some(local.revision()),
                Err(e) => tracing::warn!("cannot save {}: {e}", path.display()),
            }
        }
    }
    if let (Some(path), Some(vips)) = (shared.state_path(VIPS_FILE), &shared.vips) {
        // The entries are built under the lock (a few milliseconds for a /16), the file is
        // written after it is released, so a merge waits at most for the copy.
        let (generation, state) = {
            let alloc = lock(vips);
            let generation = alloc.generation();
            let state = (saved.vips != Some(generation)).then(|| vip_state(&alloc));
            (generation, state)
        };
        if let Some(state) = state {
            match crate::persist::save_message(&path, &state) {
                Ok(()) => saved.vips = Some(generation),
                Err(e) => tracing::warn!("cannot save {}: {e}", path.display()),
            }
        }
    }
    saved.peers.resize(shared.peers.len(), None);
    for (i, (spec, state)) in shared.peers.iter().enumerate() {
        let Some(path) = shared.state_path(&format!("peer-{}.pb", spec.cluster)) else {
            continue;
        };
        // The imports and the revision they are current to, taken together; the routes are
        // shared, so the merger is held only for as long as it takes to count them out.
        let (at, routes) = {
            let merger = lock(&shared.merger);
            let s = lock(state);
            let at = (s.epoch.clone(), s.revision);
            if saved.peers[i].as_ref() == Some(&at) {
                continue;
            }
            let routes: Vec<Arc<Route>> = merger.imported(&spec.cluster).cloned().collect();
            (at, routes)
        };
        let wire = routes.iter().map(|r| proto::Route::from_model(r, false));
        match crate::persist::save_routes(&path, &header(&at.0, at.1), wire) {
            Ok(()) => saved.peers[i] = Some(at),
            Err(e) => tracing::warn!("cannot save {}: {e}", path.display()),
        }
    }
}

/// The saved form of the VIP allocation.
fn vip_state(alloc: &VipAllocator) -> proto::VipState {
    let assigned = alloc.assigned().map(|(name, ip)| proto::VipEntry {
        name: name.as_str().to_owned(),
        vip: ip.to_string(),
        held: false,
        held_since_unix_ms: 0,
    });
    let held = alloc.held().map(|(name, ip, since)| proto::VipEntry {
        name: name.as_str().to_owned(),
        vip: ip.to_string(),
        held: true,
        held_since_unix_ms: i64::try_from(since).unwrap_or(i64::MAX),
    });
    proto::VipState {
        range: alloc.range().to_string(),
        entries: assigned.chain(held).collect(),
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
