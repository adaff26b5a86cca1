//! The route-sync table source for consumers (gateway, DNS shim): follows the local
//! route-sync's Watch stream into the consumer's own [`RouteStore`].
//!
//! Last known good: the table is saved atomically after changes and loaded at start, marked
//! stale until the server answers; while route-sync is unreachable the consumer keeps serving
//! what it has. After a reconnect it resumes from its revision; the server sends a full
//! snapshot only when it can no longer tell what changed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use isthmus_certs::{Component, MeshTls, PeerPolicy};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::model::{ClusterName, Route, RouteKey};
use crate::proto;
use crate::table::RouteStore;

/// Where a consumer's routes come from.
#[derive(Clone)]
pub struct RouteSyncSource {
    /// This cluster (the server must prove it is this cluster's route-sync).
    pub cluster: ClusterName,
    /// The mesh trust domain.
    pub trust_domain: String,
    /// The local route-sync replicas, tried in turn.
    pub endpoints: Vec<SocketAddr>,
    /// The consumer's identity.
    pub tls: MeshTls,
    /// Where the last table is saved; none saves nothing.
    pub cache: Option<PathBuf>,
}

/// Live state of a consumer's route-sync source.
#[derive(Debug, Default)]
pub struct SourceState {
    /// True while the table is last-known-good (not yet or no longer in touch).
    pub stale: AtomicBool,
    /// Snapshots received.
    pub snapshots: AtomicU64,
    /// Deltas received.
    pub deltas: AtomicU64,
    /// Routes refused (invalid on the wire).
    pub rejected: AtomicU64,
    /// The revision of the table last saved to the cache (0: none yet).
    pub cached_revision: AtomicU64,
}

impl SourceState {
    /// Calls `f` with the staleness every 250 ms until `cancel`: how a consumer keeps its
    /// health (`/healthz` says "stale", readiness) in step with its table.
    pub fn report(
        self: Arc<Self>,
        cancel: CancellationToken,
        mut f: impl FnMut(bool) + Send + 'static,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                f(self.stale.load(Ordering::Acquire));
            }
        })
    }
}

impl RouteSyncSource {
    /// Loads the cache into `store` (stale), then follows the server until `cancel`.
    pub fn spawn(
        self,
        store: RouteStore,
        cancel: CancellationToken,
    ) -> (Arc<SourceState>, JoinHandle<()>) {
        let state = Arc::new(SourceState {
            stale: AtomicBool::new(true),
            ..SourceState::default()
        });
        let mut resume = (String::new(), 0);
        if let Some(path) = &self.cache {
            match crate::persist::load(path) {
                Ok(Some(saved)) => {
                    let (routes, _) = crate::persist::routes_of(&saved);
                    store.replace_all(routes);
                    tracing::info!(
                        routes = store.snapshot().len(),
                        "loaded the last known routes (stale until route-sync answers)"
                    );
                    resume = (saved.epoch, saved.revision);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("ignoring the route cache: {e}"),
            }
        }
        let task = tokio::spawn(run(self, store, Arc::clone(&state), resume, cancel));
        (state, task)
    }
}

async fn run(
    src: RouteSyncSource,
    store: RouteStore,
    state: Arc<SourceState>,
    mut resume: (String, u64),
    cancel: CancellationToken,
) {
    // The table comes only from our own cluster's route-sync, never another component.
    let policy = PeerPolicy::component(
        &src.trust_domain,
        src.cluster.as_str(),
        Component::ROUTE_SYNC,
    );
    let tls = src.tls.client_config(policy, &[b"h2"]);
    let saver = src.cache.clone().map(|path| {
        let (tx, rx) = tokio::sync::watch::channel(Saved::default());
        tokio::spawn(save_loop(
            path,
            store.clone(),
            Arc::clone(&state),
            rx,
            cancel.clone(),
        ));
        tx
    });
    let mut attempt = 0usize;
    let mut backoff = Duration::from_millis(100);
    loop {
        let addr = src.endpoints[attempt % src.endpoints.len()];
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            r = follow(addr, Arc::clone(&tls), &store, &state, &mut resume, &mut backoff, saver.as_ref()) => r,
        };
        state.stale.store(true, Ordering::Release);
        tracing::warn!(endpoint = %addr, "route-sync stream ended ({}); serving the last known routes", result.err().unwrap_or_else(|| "closed".into()));
        attempt += 1;
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn follow(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    store: &RouteStore,
    state: &SourceState,
    resume: &mut (String, u64),
    backoff: &mut Duration,
    saver: Option<&tokio::sync::watch::Sender<Saved>>,
) -> Result<(), String> {
    let channel = crate::grpc::channel(addr, tls).map_err(|e| e.to_string())?;
    let mut client =
        proto::route_sync_client::RouteSyncClient::new(channel).max_decoding_message_size(64 << 20);
    let mut stream = client
        .watch(proto::WatchRequest {
            epoch: resume.0.clone(),
            revision: resume.1,
        })
        .await
        .map_err(|e| format!("watch refused: {}", e.message()))?
        .into_inner();
    // A chunked snapshot or delta (`more`) is decoded message by message and applied whole:
    // only its validated routes are held, never its wire form.
    let mut pending: Option<(bool, Vec<Route>, Vec<RouteKey>)> = None;
    let mut names = proto::Names::default();
    loop {
        let mut update = match stream.message().await {
            Ok(Some(u)) => u,
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.message().to_string()),
        };
        *backoff = Duration::from_millis(100);
        let (_, routes, removals) =
            pending.get_or_insert_with(|| (update.snapshot, Vec::new(), Vec::new()));
        routes.reserve(update.upserts.len());
        for r in std::mem::take(&mut update.upserts) {
            match r.to_model_with(&mut names) {
                Ok(route) => routes.push(route),
                Err(e) => {
                    state.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("route-sync sent an invalid route {:?}: {e}", r.name);
                }
            }
        }
        removals.extend(update.removals.iter().filter_map(|k| k.to_model().ok()));
        if update.more {
            continue;
        }
        let (snapshot, routes, removals) = pending.take().unwrap_or_default();
        if snapshot {
            state.snapshots.fetch_add(1, Ordering::Relaxed);
            store.replace_all(routes);
        } else {
            state.deltas.fetch_add(1, Ordering::Relaxed);
            store.apply(routes, removals);
        }
        // The table is updated before the revision is published: a save that reads this
        // revision then the table holds at least what the revision promises.
        *resume = (update.epoch.clone(), update.revision);
        state.stale.store(update.stale, Ordering::Release);
        if let Some(saver) = saver {
            saver.send_replace(Saved {
                epoch: update.epoch,
                revision: update.revision,
                now: update.snapshot,
            });
        }
    }
}

/// What the cache should hold: the table as of this revision (or newer).
#[derive(Clone, Debug, Default)]
struct Saved {
    epoch: String,
    revision: u64,
    /// A snapshot: saved at once rather than batched.
    now: bool,
}

/// Keeps the cache file trailing the table, off the follow loop and off the runtime's
/// workers (the gateway's data plane shares them): saving is O(routes) of file I/O, and
/// updates keep being applied meanwhile. Changes are batched until the
/// stream has been quiet for 200 ms or for at most a second; a snapshot is saved at once.
async fn save_loop(
    path: PathBuf,
    store: RouteStore,
    state: Arc<SourceState>,
    mut wanted: tokio::sync::watch::Receiver<Saved>,
    cancel: CancellationToken,
) {
    const QUIET: Duration = Duration::from_millis(200);
    const AT_MOST: Duration = Duration::from_secs(1);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = wanted.changed() => if changed.is_err() { return },
        }
        let first = tokio::time::Instant::now();
        while !wanted.borrow().now {
            let deadline = (tokio::time::Instant::now() + QUIET).min(first + AT_MOST);
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep_until(deadline) => break,
                changed = wanted.changed() => if changed.is_err() { break },
            }
            if tokio::time::Instant::now() >= first + AT_MOST {
                break;
            }
        }
        // Revision first, then the table: the table is at least that new.
        let Saved {
            epoch, revision, ..
        } = wanted.borrow_and_update().clone();
        let table = store.snapshot();
        let path = path.clone();
        let saved =
            tokio::task::spawn_blocking(move || save(&path, &table, &epoch, revision)).await;
        if let Ok(true) = saved {
            state.cached_revision.store(revision, Ordering::Release);
        }
    }
}

fn save(
    path: &std::path::Path,
    table: &crate::table::RouteTable,
    epoch: &str,
    revision: u64,
) -> bool {
    let header = proto::Update {
        epoch: epoch.to_string(),
        revision,
        snapshot: true,
        ..proto::Update::default()
    };
    let routes = table.iter().map(|r| proto::Route::from_model(r, true));
    match crate::persist::save_routes(path, &header, routes) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("cannot save the route cache {}: {e}", path.display());
            false
        }
    }
}
