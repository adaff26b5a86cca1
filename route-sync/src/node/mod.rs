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
use crate::model::{ClusterName, Route, RouteKey};
use crate::proto;
use crate::source::Rejected;
use crate::table::RouteStore;

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
    /// Deltas received.
    pub deltas: u64,
    /// Whether the peer has been reached since start.
    pub ever_connected: bool,
}

pub(crate) struct Shared {
    pub(crate) settings: NodeSettings,
    /// Routes from this cluster's sources.
    pub(crate) local: RouteStore,
    /// The merged table served to consumers.
    pub(crate) merged: RouteStore,
    pub(crate) merger: Mutex<Merger>,
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

    /// Applies merger results for `keys` to the merged table, counting refusals.
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
        let applied = self.merged.apply_shared(delta.upserts, delta.removals);
        if applied.is_change() {
            self.metrics.applied.inc();
            self.metrics
                .set_counts(merger, self.merged.snapshot().len());
            self.dirty.notify_one();
        }
    }

    pub(crate) fn state_path(&self, name: &str) -> Option<PathBuf> {
        self.settings.state_dir.as_ref().map(|d| d.join(name))
    }
}

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
        merged.replace_all_shared(merger.all());
        metrics.set_counts(&merger, merged.snapshot().len());
        let epoch = format!("{:016x}", rand::random::<u64>());
        Self {
            shared: Arc::new(Shared {
                settings,
                local,
                merged,
                merger: Mutex::new(merger),
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
        let server = tonic::transport::Server::builder()
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

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
