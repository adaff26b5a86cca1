//! The RouteSync gRPC service. What a caller sees follows from its verified identity, by
//! component (`view_for`):
//! - this cluster's gateway and DNS shim get the merged table, local backends included; this
//!   cluster's route-sync identity (the `status` command) may ask for Status only;
//! - a configured peer cluster's route-sync gets only the routes homed here, exported, and
//!   whose `allowed_peers` could admit a caller of that cluster, without backends (so
//!   imported routes are never exported again: no loops), and a `Status` of only that view;
//! - anyone else, other components of this cluster and of peers included, is refused.
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tonic::{Request, Response, Status};

use isthmus_certs::{Component, PeerPolicy, PeerRule, PolicyDenied, SpiffeId};

use super::peer::now_ms;
use super::{NodeSettings, Shared, lock};
use crate::grpc::Caller;
use crate::model::{ClusterName, Route, RouteKey};
use crate::proto;
use crate::table::{Delta, RouteTable};

/// Entries per message of a chunked snapshot or delta (keeps messages far below gRPC size
/// limits, and bounds what either side holds in wire form).
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

    /// What the verified caller of `call` may see, or a PermissionDenied naming its ID and
    /// the identities that would have been allowed.
    fn view<T>(&self, request: &Request<T>, call: Call) -> Result<View, Status> {
        let Some(Caller(id)) = request.extensions().get::<Caller>() else {
            return Err(Status::unauthenticated("no verified identity"));
        };
        view_for(&self.shared.settings, id, call).map_err(|denied| {
            tracing::warn!(caller = %id, call = call.name(), "route-sync refused a caller: {denied}");
            Status::permission_denied(format!("{}: {denied}", call.name()))
        })
    }
}

/// The RPC a caller makes; what it may see depends on it as well as on who it is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Call {
    Watch,
    List,
    Status,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::Watch => "Watch",
            Call::List => "List",
            Call::Status => "Status",
        }
    }

    /// The components of this cluster served by `self`: the gateway and the DNS shim consume
    /// the table; route-sync's own identity (which `isthmus-route-sync status` presents) only
    /// asks for Status. Any other component of this cluster gets nothing.
    fn local_components(self) -> Vec<Component> {
        match self {
            Call::Watch | Call::List => vec![Component::GATEWAY, Component::DNS_SHIM],
            Call::Status => vec![
                Component::GATEWAY,
                Component::DNS_SHIM,
                Component::ROUTE_SYNC,
            ],
        }
    }
}

/// Pure decision: a caller is served by its component, not by its cluster alone. A local
/// consumer gets the local view; a configured peer's route-sync (and nothing else of that
/// cluster: a stolen gateway or shim certificate must not import routes) gets the peer view.
fn view_for(settings: &NodeSettings, id: &SpiffeId, call: Call) -> Result<View, PolicyDenied> {
    let td = settings.trust_domain.as_str();
    let local =
        PeerPolicy::components(td, Some(settings.cluster.as_str()), call.local_components());
    let peer_route_sync = |cluster: &str| PeerRule::Component {
        trust_domain: td.to_owned(),
        cluster: Some(cluster.to_owned()),
        component: Component::ROUTE_SYNC,
    };
    let rules: Vec<(PeerRule, View)> = local
        .rules()
        .iter()
        .map(|rule| (rule.clone(), View::Local))
        .chain(
            settings
                .peers
                .iter()
                .map(|p| (peer_route_sync(p.cluster.as_str()), View::Peer)),
        )
        .collect();
    match rules.iter().find(|(rule, _)| rule.matches(id)) {
        Some((_, view)) => Ok(*view),
        None => Err(PolicyDenied {
            presented: id.clone(),
            policy: PeerPolicy::new(rules.into_iter().map(|(rule, _)| rule).collect()).to_string(),
        }),
    }
}

/// Who an answer is for: a local component, or the route-sync of one peer cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Audience {
    Local,
    Peer(ClusterName),
}

impl Audience {
    /// The audience of a request `view` admitted. A peer is known by the cluster of its
    /// verified identity (`view` checked it is a configured peer).
    fn of<T>(view: View, request: &Request<T>) -> Result<Self, Status> {
        match view {
            View::Local => Ok(Audience::Local),
            View::Peer => request
                .extensions()
                .get::<Caller>()
                .and_then(|Caller(id)| id.cluster())
                .and_then(|c| ClusterName::parse(c).ok())
                .map(Audience::Peer)
                .ok_or_else(|| Status::permission_denied("a peer without a cluster name")),
        }
    }
}

/// Whether `route` is one the audience may see: everything for a local component; for a
/// peer, only routes homed here, exported, that some caller of its cluster may use.
fn may_see(shared: &Shared, who: &Audience, route: &Route) -> bool {
    match who {
        Audience::Local => true,
        Audience::Peer(peer) => {
            route.home_cluster == shared.settings.cluster
                && route.admits_cluster(peer, &shared.settings.trust_domain)
        }
    }
}

fn visible(shared: &Shared, who: &Audience, route: &Route) -> Option<proto::Route> {
    may_see(shared, who, route).then(|| proto::Route::from_model(route, *who == Audience::Local))
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

type UpdateSender = tokio::sync::mpsc::Sender<Result<proto::Update, Status>>;

/// The wire form of the next route of `routes` this caller may see.
fn next_visible<'a>(
    shared: &Shared,
    view: &Audience,
    routes: &mut impl Iterator<Item = &'a Arc<Route>>,
) -> Option<proto::Route> {
    routes.find_map(|r| visible(shared, view, r))
}

/// Sends `table` as a snapshot in chunks of [`CHUNK`] routes, each built just before it is
/// sent: the wire form of the whole table is never held at once. False when the caller
/// went away.
async fn send_snapshot(
    shared: &Shared,
    view: &Audience,
    table: &RouteTable,
    tx: &UpdateSender,
) -> bool {
    let mut all = table.iter();
    let mut next = next_visible(shared, view, &mut all);
    loop {
        let mut u = header(shared, table.revision());
        u.snapshot = true;
        u.upserts.reserve(CHUNK);
        while u.upserts.len() < CHUNK
            && let Some(route) = next
        {
            u.upserts.push(route);
            next = next_visible(shared, view, &mut all);
        }
        u.more = next.is_some();
        let last = !u.more;
        if tx.send(Ok(u)).await.is_err() {
            return false;
        }
        if last {
            return true;
        }
    }
}

/// One entry of a delta as a caller sees it.
enum Change {
    Upsert(proto::Route),
    Removal(proto::RouteKey),
}

/// The next entry of a delta: a changed route this caller may see, a removal when it no
/// longer may (unexported, or not ours), then the removed keys.
fn next_change<'a>(
    shared: &Shared,
    view: &Audience,
    upserted: &mut impl Iterator<Item = &'a Arc<Route>>,
    removed: &mut impl Iterator<Item = &'a RouteKey>,
) -> Option<Change> {
    if let Some(route) = upserted.next() {
        return Some(match visible(shared, view, route) {
            Some(r) => Change::Upsert(r),
            None => Change::Removal(proto::RouteKey::from_model(&route.key)),
        });
    }
    removed
        .next()
        .map(|key| Change::Removal(proto::RouteKey::from_model(key)))
}

/// Sends `delta` (current to `revision`) in messages of at most [`CHUNK`] entries, each built
/// just before it is sent; all but the last say `more`, and the caller applies them together.
/// An empty delta is sent as one empty message only when `always`. False when the caller
/// went away.
async fn send_delta(
    shared: &Shared,
    view: &Audience,
    revision: u64,
    delta: &Delta,
    always: bool,
    tx: &UpdateSender,
) -> bool {
    let (mut upserted, mut removed) = (delta.upserted.iter(), delta.removed.iter());
    let mut next = next_change(shared, view, &mut upserted, &mut removed);
    if next.is_none() && !always {
        return true;
    }
    loop {
        let mut u = header(shared, revision);
        let mut entries = 0;
        while entries < CHUNK
            && let Some(change) = next
        {
            match change {
                Change::Upsert(r) => u.upserts.push(r),
                Change::Removal(k) => u.removals.push(k),
            }
            entries += 1;
            next = next_change(shared, view, &mut upserted, &mut removed);
        }
        u.more = next.is_some();
        let last = !u.more;
        if tx.send(Ok(u)).await.is_err() {
            return false;
        }
        if last {
            return true;
        }
    }
}

/// What changed in the merged table after `revision`; `None` when the caller needs a
/// snapshot: the log no longer reaches back, or more changed than half the table (and more
/// than a chunk), so the snapshot is the smaller answer. A peer connected before the first
/// load of the source gets the load as a snapshot this way.
fn changes(shared: &Shared, revision: u64) -> Option<(u64, Delta)> {
    let limit = (shared.merged.snapshot().len() / 2).max(CHUNK);
    shared.merged.changes_since_within(revision, limit)
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<proto::Update, Status>> + Send>>;

#[tonic::async_trait]
impl proto::route_sync_server::RouteSync for RouteSyncService {
    type WatchStream = UpdateStream;

    async fn watch(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let view = Audience::of(self.view(&request, Call::Watch)?, &request)?;
        let req = request.into_inner();
        let shared = Arc::clone(&self.shared);
        let (tx, rx): (UpdateSender, _) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            // Subscribe first, so no change between the first answer and the loop is lost.
            let mut watch = shared.merged.subscribe();
            let mut freshness = shared.freshness.subscribe();
            let resume = (req.epoch == shared.epoch)
                .then(|| changes(&shared, req.revision))
                .flatten();
            let mut sent = match resume {
                Some((revision, d)) => {
                    if !send_delta(&shared, &view, revision, &d, true, &tx).await {
                        return;
                    }
                    revision
                }
                None => {
                    let table = shared.merged.snapshot();
                    if !send_snapshot(&shared, &view, &table, &tx).await {
                        return;
                    }
                    table.revision()
                }
            };
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    () = shared.shutdown.cancelled() => return,
                    _ = watch.changed() => {}
                    Ok(()) = freshness.changed() => {
                        // Staleness alone changed: an update with no routes says so.
                        freshness.borrow_and_update();
                        if tx.send(Ok(header(&shared, sent))).await.is_err() {
                            return;
                        }
                        continue;
                    }
                }
                match changes(&shared, sent) {
                    Some((revision, d)) if d.is_empty() => {
                        sent = revision;
                    }
                    Some((revision, d)) => {
                        sent = revision;
                        if !send_delta(&shared, &view, revision, &d, false, &tx).await {
                            return;
                        }
                    }
                    None => {
                        let table = shared.merged.snapshot();
                        sent = table.revision();
                        if !send_snapshot(&shared, &view, &table, &tx).await {
                            return;
                        }
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
        let view = Audience::of(self.view(&request, Call::List)?, &request)?;
        let table = self.shared.merged.snapshot();
        let mut u = header(&self.shared, table.revision());
        u.snapshot = true;
        u.upserts = table
            .iter()
            .filter_map(|r| visible(&self.shared, &view, r))
            .collect();
        Ok(Response::new(u))
    }

    async fn status(
        &self,
        request: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusReply>, Status> {
        let view = Audience::of(self.view(&request, Call::Status)?, &request)?;
        Ok(Response::new(match view {
            Audience::Local => status(&self.shared),
            peer @ Audience::Peer(_) => peer_status(&self.shared, &peer),
        }))
    }
}

/// The status a peer gets: no more than its own view. The routes it may see (all homed
/// here), the revision and epoch it follows, staleness and this node's trust anchors; not
/// the other peers, not local-only routes, not conflicts (they name other clusters), not
/// VIPs (addresses in this cluster's own range).
fn peer_status(shared: &Shared, peer: &Audience) -> proto::StatusReply {
    let table = shared.merged.snapshot();
    let routes = table.iter().filter(|r| may_see(shared, peer, r)).count() as u64;
    proto::StatusReply {
        cluster: shared.settings.cluster.to_string(),
        identity: shared.settings.tls.local_id().to_string(),
        epoch: shared.epoch.clone(),
        revision: table.revision(),
        routes,
        local_routes: routes,
        stale: shared.stale(),
        trust_anchors: shared.settings.tls.trust_anchors(),
        ..proto::StatusReply::default()
    }
}

pub(super) fn status(shared: &Shared) -> proto::StatusReply {
    let table = shared.merged.snapshot();
    let merger = lock(&shared.merger);
    let vips = shared.vips.as_ref().map(|v| {
        let mut alloc = lock(v);
        alloc.expire(super::now_unix_ms());
        let counts = alloc.counts();
        proto::VipStatus {
            range: alloc.range().to_string(),
            hold_seconds: alloc.hold().as_secs(),
            assigned: counts.assigned,
            held: counts.held,
            free: counts.free,
            exhausted: counts.waiting,
            refused_total: counts.refused_total,
        }
    });
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
                    refused: s.refused,
                }
            })
            .collect(),
        mirror: lock(&shared.mirror_status).clone(),
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
        vips,
    }
}
