//! The RouteSync gRPC service. What a caller sees follows from its verified identity:
//! - a component of this cluster gets the merged table, local backends included;
//! - a configured peer cluster gets only the routes homed here and exported, without backends
//!   (so imported routes are never exported again: no loops);
//! - anyone else is refused.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tonic::{Request, Response, Status};

use super::peer::now_ms;
use super::{Shared, lock};
use crate::grpc::Caller;
use crate::model::Route;
use crate::proto;
use crate::table::{Delta, RouteTable};

/// Routes per message of a chunked snapshot (keeps messages far below gRPC size limits).
const CHUNK: usize = 5_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum View {
    Local,
    Peer,
}

pub(super) struct RouteSyncService {
    shared: Arc<Shared>,
}

impl RouteSyncService {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn view<T>(&self, request: &Request<T>) -> Result<View, Status> {
        let Some(Caller(id)) = request.extensions().get::<Caller>() else {
            return Err(Status::unauthenticated("no verified identity"));
        };
        let settings = &self.shared.settings;
        if id.trust_domain() != settings.trust_domain {
            return Err(Status::permission_denied(format!(
                "{id} is outside the trust domain"
            )));
        }
        match id.cluster() {
            Some(c) if c == settings.cluster.as_str() => Ok(View::Local),
            Some(c) if settings.peers.iter().any(|p| p.cluster.as_str() == c) => Ok(View::Peer),
            _ => {
                tracing::warn!(caller = %id, "route-sync refused a caller that is neither local nor a configured peer");
                Err(Status::permission_denied(format!(
                    "{id} is neither a component of cluster {} nor a configured peer",
                    settings.cluster
                )))
            }
        }
    }
}

fn visible(shared: &Shared, view: View, route: &Route) -> Option<proto::Route> {
    match view {
        View::Local => Some(proto::Route::from_model(route, true)),
        View::Peer => (route.home_cluster == shared.settings.cluster && route.exported)
            .then(|| proto::Route::from_model(route, false)),
    }
}

fn header(shared: &Shared, revision: u64) -> proto::Update {
    proto::Update {
        epoch: shared.epoch.clone(),
        revision,
        stale: shared.stale(),
        cluster: shared.settings.cluster.to_string(),
        sent_at_unix_ms: now_ms(),
        ..proto::Update::default()
    }
}

fn snapshot(shared: &Shared, view: View, table: &RouteTable) -> Vec<proto::Update> {
    let routes: Vec<_> = table
        .iter()
        .filter_map(|r| visible(shared, view, r))
        .collect();
    let mut out = Vec::new();
    let mut chunks = routes.chunks(CHUNK).peekable();
    if chunks.peek().is_none() {
        let mut u = header(shared, table.revision());
        u.snapshot = true;
        return vec![u];
    }
    while let Some(chunk) = chunks.next() {
        let mut u = header(shared, table.revision());
        u.snapshot = true;
        u.more = chunks.peek().is_some();
        u.upserts = chunk.to_vec();
        out.push(u);
    }
    out
}

fn delta(shared: &Shared, view: View, revision: u64, delta: &Delta) -> proto::Update {
    let mut u = header(shared, revision);
    for route in &delta.upserted {
        match visible(shared, view, route) {
            Some(r) => u.upserts.push(r),
            // No longer visible to this caller (unexported, or not ours): a removal.
            None => u.removals.push(proto::RouteKey::from_model(&route.key)),
        }
    }
    u.removals
        .extend(delta.removed.iter().map(proto::RouteKey::from_model));
    u
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<proto::Update, Status>> + Send>>;

#[tonic::async_trait]
impl proto::route_sync_server::RouteSync for RouteSyncService {
    type WatchStream = UpdateStream;

    async fn watch(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let view = self.view(&request)?;
        let req = request.into_inner();
        let shared = Arc::clone(&self.shared);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<proto::Update, Status>>(8);
        tokio::spawn(async move {
            // Subscribe first, so no change between the first answer and the loop is lost.
            let mut watch = shared.merged.subscribe();
            let resume = (req.epoch == shared.epoch)
                .then(|| shared.merged.changes_since(req.revision))
                .flatten();
            let mut sent = match resume {
                Some((revision, d)) => {
                    if tx
                        .send(Ok(delta(&shared, view, revision, &d)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    revision
                }
                None => {
                    let table = shared.merged.snapshot();
                    for u in snapshot(&shared, view, &table) {
                        if tx.send(Ok(u)).await.is_err() {
                            return;
                        }
                    }
                    table.revision()
                }
            };
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    () = shared.shutdown.cancelled() => return,
                    _ = watch.changed() => {}
                }
                let updates = match shared.merged.changes_since(sent) {
                    Some((revision, d)) if d.is_empty() => {
                        sent = revision;
                        continue;
                    }
                    Some((revision, d)) => {
                        let u = delta(&shared, view, revision, &d);
                        sent = revision;
                        if view == View::Peer && u.upserts.is_empty() && u.removals.is_empty() {
                            continue;
                        }
                        vec![u]
                    }
                    None => {
                        let table = shared.merged.snapshot();
                        sent = table.revision();
                        snapshot(&shared, view, &table)
                    }
                };
                for u in updates {
                    if tx.send(Ok(u)).await.is_err() {
                        return;
                    }
                }
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list(
        &self,
        request: Request<proto::ListRequest>,
    ) -> Result<Response<proto::Update>, Status> {
        let view = self.view(&request)?;
        let table = self.shared.merged.snapshot();
        let mut u = header(&self.shared, table.revision());
        u.snapshot = true;
        u.upserts = table
            .iter()
            .filter_map(|r| visible(&self.shared, view, r))
            .collect();
        Ok(Response::new(u))
    }

    async fn status(
        &self,
        request: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusReply>, Status> {
        self.view(&request)?;
        Ok(Response::new(status(&self.shared)))
    }
}

pub(super) fn status(shared: &Shared) -> proto::StatusReply {
    let table = shared.merged.snapshot();
    let merger = lock(&shared.merger);
    proto::StatusReply {
        cluster: shared.settings.cluster.to_string(),
        identity: shared.settings.tls.local_id().to_string(),
        epoch: shared.epoch.clone(),
        revision: table.revision(),
        routes: table.len() as u64,
        local_routes: merger.local_count() as u64,
        stale: shared.stale(),
        peers: shared
            .peers
            .iter()
            .map(|(spec, state)| {
                let s = lock(state);
                proto::PeerStatus {
                    cluster: spec.cluster.to_string(),
                    endpoint: s.endpoint.clone(),
                    state: s.state.to_string(),
                    epoch: s.epoch.clone(),
                    revision: s.revision,
                    routes: merger.imported_count(&spec.cluster) as u64,
                    last_error: s.last_error.clone(),
                    last_update_unix_ms: s.last_update_unix_ms,
                    trust_anchors: s.trust_anchors.clone(),
                    snapshots: s.snapshots,
                    deltas: s.deltas,
                }
            })
            .collect(),
        conflicts: merger
            .conflicts()
            .into_iter()
            .map(|c| proto::Conflict {
                name: c.key.name.to_string(),
                port: u32::from(c.key.port),
                clusters: c.clusters.iter().map(ToString::to_string).collect(),
                winner: c.winner.to_string(),
            })
            .collect(),
        trust_anchors: shared.settings.tls.trust_anchors(),
        rejected: shared.rejected.load(std::sync::atomic::Ordering::Relaxed),
    }
}
