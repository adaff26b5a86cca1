//! Importing one peer cluster's exported routes: dial its endpoints in turn, Watch from the
//! last applied (epoch, revision), apply snapshots and deltas, reconnect with backoff.
//! Imported routes stay (last known good) while the peer is unreachable.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use isthmus_certs::{Component, PeerPolicy};
use tokio_util::sync::CancellationToken;

use super::{Shared, lock};
use crate::model::{Route, RouteKey};
use crate::proto;
use crate::source::Rejected;

const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub(super) async fn run(shared: Arc<Shared>, index: usize, cancel: CancellationToken) {
    let (spec, _) = &shared.peers[index];
    // Only the peer's route-sync speaks for its routes; its gateway or shim must not.
    let policy = PeerPolicy::component(
        &shared.settings.trust_domain,
        spec.cluster.as_str(),
        Component::ROUTE_SYNC,
    );
    let tls = shared.settings.tls.client_config(policy, &[b"h2"]);
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 0usize;
    loop {
        let addr = spec.endpoints[attempt % spec.endpoints.len()];
        {
            let mut s = lock(&shared.peers[index].1);
            s.state = "connecting";
            s.endpoint = addr.to_string();
        }
        shared.note_freshness();
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            r = follow(&shared, index, addr, Arc::clone(&tls), &mut backoff) => r,
        };
        let error = match result {
            Ok(()) => "the peer closed the stream".to_string(),
            Err(e) => e,
        };
        tracing::warn!(peer = %spec.cluster, endpoint = %addr, "peer stream ended: {error}");
        {
            let mut s = lock(&shared.peers[index].1);
            s.state = "disconnected";
            s.last_error = error;
        }
        shared.note_freshness();
        shared
            .metrics
            .peer_connected
            .get_or_create(&super::metrics::PeerLabel {
                peer: spec.cluster.to_string(),
            })
            .set(0);
        attempt += 1;
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn follow(
    shared: &Shared,
    index: usize,
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    backoff: &mut Duration,
) -> Result<(), String> {
    let (spec, state) = &shared.peers[index];
    let channel = crate::grpc::channel(addr, tls).map_err(|e| e.to_string())?;
    let mut client =
        proto::route_sync_client::RouteSyncClient::new(channel).max_decoding_message_size(64 << 20);
    let (epoch, revision) = {
        let s = lock(state);
        (s.epoch.clone(), s.revision)
    };
    let mut stream = client
        .watch(proto::WatchRequest { epoch, revision })
        .await
        .map_err(|e| format!("watch refused: {}", e.message()))?
        .into_inner();
    // What trust anchors the peer uses, for `status` (best effort).
    if let Ok(status) = client.status(proto::StatusRequest {}).await {
        lock(state).trust_anchors = status.into_inner().trust_anchors;
    }
    let label = super::metrics::PeerLabel {
        peer: spec.cluster.to_string(),
    };
    let mut names = proto::Names::default();
    let mut batch: Option<Batch> = None;
    let limits = shared.settings.limits;
    loop {
        let mut update = match stream.message().await {
            Ok(Some(u)) => u,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("stream failed: {}", e.message())),
        };
        *backoff = Duration::from_millis(100);
        shared.metrics.peer_updates.get_or_create(&label).inc();
        shared.metrics.peer_connected.get_or_create(&label).set(1);
        let b = batch.get_or_insert_with(|| Batch {
            snapshot: update.snapshot,
            ..Batch::default()
        });
        b.decode(&spec.cluster, &mut names, &update);
        update.upserts = Vec::new();
        if update.more {
            // A chain that never ends would hold ever more routes here: bounded, and the
            // stream dropped (the imports applied so far stay) once it goes beyond.
            b.chunks += 1;
            if b.chunks > limits.max_batch_chunks {
                *backoff = MAX_BACKOFF;
                return Err(refuse(
                    shared,
                    index,
                    "batch_chunks",
                    format!(
                        "refused an update of more than {} chunks (limits.max_batch_chunks); the imported routes are kept",
                        limits.max_batch_chunks
                    ),
                ));
            }
            if b.entries() > limits.max_batch_routes {
                *backoff = MAX_BACKOFF;
                return Err(refuse(
                    shared,
                    index,
                    "batch_routes",
                    format!(
                        "refused an update of more than {} routes before its last chunk (limits.max_batch_routes); the imported routes are kept",
                        limits.max_batch_routes
                    ),
                ));
            }
            continue;
        }
        let Batch {
            snapshot,
            routes,
            removals,
            mut rejected,
            ..
        } = batch.take().unwrap_or_default();
        let mut merger = lock(&shared.merger);
        let after = if snapshot {
            routes.len()
        } else {
            merger.imported_after_delta(&spec.cluster, &routes, &removals)
        };
        if after > limits.max_routes_per_peer {
            drop(merger);
            *backoff = MAX_BACKOFF;
            return Err(refuse(
                shared,
                index,
                "routes_per_peer",
                format!(
                    "refused an update that would import {after} routes, more than {} (limits.max_routes_per_peer); the imported routes are kept",
                    limits.max_routes_per_peer
                ),
            ));
        }
        let (keys, more_rejected) = if snapshot {
            lock(state).snapshots += 1;
            merger.import_snapshot(&spec.cluster, routes)
        } else {
            // An update without routes only says the peer's staleness changed: not a delta.
            if !routes.is_empty() || !removals.is_empty() || !rejected.is_empty() {
                lock(state).deltas += 1;
            }
            merger.import_delta(&spec.cluster, routes, removals)
        };
        rejected.extend(more_rejected);
        shared.apply_merge(&merger, keys, rejected);
        shared
            .metrics
            .routes
            .get_or_create(&super::metrics::OriginLabel {
                origin: spec.cluster.to_string(),
            })
            .set(merger.imported_count(&spec.cluster) as i64);
        drop(merger);
        let now = now_ms();
        if update.sent_at_unix_ms > 0 {
            let lag = (now - update.sent_at_unix_ms).max(0) as f64 / 1000.0;
            shared.metrics.propagation_lag.observe(lag);
        }
        let mut s = lock(state);
        if s.state != "connected" {
            tracing::info!(peer = %spec.cluster, endpoint = %addr, "peer connected");
        }
        s.state = "connected";
        s.ever_connected = true;
        s.epoch = update.epoch;
        s.revision = update.revision;
        s.last_update_unix_ms = now;
        s.last_error.clear();
        drop(s);
        shared.note_freshness();
        shared.dirty.notify_one();
        let _ = shared.rejected.load(Ordering::Relaxed);
    }
}

/// An update being received: one message, or the messages of a chunked snapshot or delta
/// (`more`), applied together. Each message is decoded as it arrives, so only validated
/// routes are held, never the wire form of the whole update.
#[derive(Default)]
struct Batch {
    snapshot: bool,
    routes: Vec<Arc<Route>>,
    removals: Vec<RouteKey>,
    rejected: Vec<Rejected>,
    /// Messages received that said `more`.
    chunks: usize,
}

/// Counts and logs an update refused for breaking a limit; returns the reason, which ends
/// the stream and shows as the peer's last error.
fn refuse(shared: &Shared, index: usize, limit: &'static str, reason: String) -> String {
    let (spec, state) = &shared.peers[index];
    tracing::warn!(peer = %spec.cluster, limit, "{reason}");
    shared
        .metrics
        .peer_refused
        .get_or_create(&super::metrics::RefusedLabel {
            peer: spec.cluster.to_string(),
            reason: limit,
        })
        .inc();
    lock(state).refused += 1;
    reason
}

impl Batch {
    /// Routes and removals held so far, refused ones included.
    fn entries(&self) -> usize {
        self.routes.len() + self.removals.len() + self.rejected.len()
    }

    /// Decodes one message into the batch, refusing (with a reason) any route the model
    /// refuses.
    fn decode(&mut self, peer: &crate::ClusterName, names: &mut proto::Names, u: &proto::Update) {
        let first = self.routes.len() + self.rejected.len();
        self.routes.reserve(u.upserts.len());
        for (i, r) in u.upserts.iter().enumerate() {
            match r.to_model_with(names) {
                Ok(route) => self.routes.push(Arc::new(route)),
                Err(e) => self.rejected.push(Rejected {
                    entry: format!("peer {peer} update entry {}", first + i),
                    route: Some(format!("{:?}:{}", r.name, r.port)),
                    reason: e.to_string(),
                }),
            }
        }
        self.removals
            .extend(u.removals.iter().filter_map(|k| k.to_model().ok()));
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
