//! The egress role: carries local apps' connections to the route's home cluster.
//!
//! Three ways to know the route of an accepted connection:
//! - a **dedicated** listener is bound to one route;
//! - on a **shared** listener (one per port of any route homed elsewhere, bound on
//!   `listen_address`), the local address the connection arrived on, when it lies in the VIP
//!   range, names the route through the same deterministic [`VipMap`] the DNS shim uses;
//! - a port that exactly one remote route uses names that route: raw TCP and
//!   server-speaks-first protocols need no Host or SNI on the shared address;
//! - otherwise the gateway peeks the HTTP/1.x `Host` header or the TLS SNI (bounded in time
//!   and bytes) and replays the peeked bytes into the tunnel.
//!
//! Shared listeners follow the route table: a port is open while any route uses it, local
//! ones included, so a route that moves to another cluster finds its port already open; it
//! closes when no route does; connections already accepted are not touched. A connection
//! for a route the table does not know (yet) waits up to `route_wait` for the table to
//! catch up before it is refused, and one for a route homed here (it just came back) is
//! served from the route's local backends: the DNS shim and the egress follow route-sync
//! separately, and either may see a move first.

pub mod pool;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::{BufMut as _, Bytes, BytesMut};
use isthmus_route_sync::vip::{VipMap, VipRange};
use isthmus_route_sync::{RouteKey, RouteName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::EgressConfig;
use crate::metrics::{ConnLabels, Direction};
use crate::peek::{self, Peeked};
use crate::{Context, Refusal};
use pool::{OpenedStream, Pool};

/// How a listener knows the route of its connections.
#[derive(Clone, Debug)]
enum Mode {
    Dedicated(RouteKey),
    Shared,
}

/// A bound egress, ready to [`run`](Egress::run).
pub struct Egress {
    shared: Arc<Shared>,
    dedicated: Vec<(TcpListener, RouteKey)>,
}

struct Shared {
    ctx: Context,
    cfg: EgressConfig,
    pool: Pool,
    limit: Arc<Semaphore>,
    vip_range: Option<VipRange>,
    vips: ArcSwapOption<VipMap>,
    /// Ports that exactly one remote route uses, and that route.
    sole: ArcSwap<HashMap<u16, RouteKey>>,
    /// Round-robin start among a local route's backends.
    next_backend: std::sync::atomic::AtomicUsize,
}

impl Egress {
    /// Binds the dedicated listeners and builds the pool. Shared listeners are bound by
    /// [`run`](Egress::run) from the route table.
    ///
    /// # Errors
    /// When a dedicated listener cannot be bound, or the pool cannot be built.
    pub async fn bind(ctx: Context, cfg: EgressConfig) -> io::Result<Self> {
        let mut dedicated = Vec::new();
        for d in &cfg.dedicated {
            let key = RouteKey::parse_authority(&d.route)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let listener = TcpListener::bind(d.listen).await.map_err(|e| {
                io::Error::new(e.kind(), format!("cannot bind {} for {key}: {e}", d.listen))
            })?;
            dedicated.push((listener, key));
        }
        let vip_range = cfg
            .vip_range
            .as_deref()
            .map(VipRange::parse)
            .transpose()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let pool = Pool::new(ctx.clone(), cfg.pool.clone(), &cfg.peers)?;
        let limit = Arc::new(Semaphore::new(cfg.max_connections));
        Ok(Self {
            shared: Arc::new(Shared {
                ctx,
                cfg,
                pool,
                limit,
                vip_range,
                vips: ArcSwapOption::empty(),
                sole: ArcSwap::default(),
                next_backend: std::sync::atomic::AtomicUsize::new(0),
            }),
            dedicated,
        })
    }

    /// The dedicated listeners' addresses, with their routes.
    pub fn dedicated_addrs(&self) -> Vec<(RouteKey, SocketAddr)> {
        self.dedicated
            .iter()
            .filter_map(|(l, k)| Some((k.clone(), l.local_addr().ok()?)))
            .collect()
    }

    /// A handle on the pool, for status and tests.
    pub fn pool_connections(&self, cluster: &str) -> usize {
        self.shared.pool.connection_count(cluster)
    }

    /// Serves until `shutdown`, then drains: listeners close, connections in flight run
    /// until they end or `force` fires.
    pub async fn run(self, shutdown: CancellationToken, force: CancellationToken) {
        let tracker = TaskTracker::new();
        let shared = self.shared;
        for (listener, key) in self.dedicated {
            tracker.spawn(accept_loop(
                Arc::clone(&shared),
                listener,
                Mode::Dedicated(key),
                shutdown.clone(),
                force.clone(),
                tracker.clone(),
            ));
        }
        let reaper = {
            let shared = Arc::clone(&shared);
            let stop = force.clone();
            tokio::spawn(async move { shared.pool.reap_idle(stop).await })
        };
        if let Some(address) = shared.cfg.listen_address {
            follow_table(&shared, address, &shutdown, &force, &tracker).await;
        } else {
            shutdown.cancelled().await;
        }
        tracker.close();
        tokio::select! {
            () = tracker.wait() => {}
            () = force.cancelled() => tracker.wait().await,
        }
        reaper.abort();
        shared.pool.close_all().await;
    }
}

/// Keeps one shared listener per port of any route, and the VIP map, in step with the
/// route table until `shutdown`.
async fn follow_table(
    shared: &Arc<Shared>,
    address: IpAddr,
    shutdown: &CancellationToken,
    force: &CancellationToken,
    tracker: &TaskTracker,
) {
    let mut watch = shared.ctx.routes.subscribe();
    let mut listeners: HashMap<u16, CancellationToken> = HashMap::new();
    let mut table = watch.current();
    loop {
        let remote: Vec<_> = table
            .iter()
            .filter(|r| r.home_cluster != shared.ctx.cluster)
            .collect();
        if let Some(range) = &shared.vip_range {
            match VipMap::allocate(range, remote.iter().map(|r| r.key.name.as_str())) {
                Ok(map) => shared.vips.store(Some(Arc::new(map))),
                Err(e) => tracing::error!("VIP allocation failed, keeping the previous map: {e}"),
            }
        }
        let wanted: std::collections::BTreeSet<u16> = table.iter().map(|r| r.key.port).collect();
        shared.sole.store(Arc::new(sole_routes(&remote)));
        listeners.retain(|port, stop| {
            let keep = wanted.contains(port);
            if !keep {
                tracing::info!(
                    port,
                    "no remote route uses this port any more; closing its listener"
                );
                stop.cancel();
            }
            keep
        });
        for port in wanted {
            if listeners.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(address, port);
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    let stop = shutdown.child_token();
                    tracing::info!(%addr, "egress listening");
                    tracker.spawn(accept_loop(
                        Arc::clone(shared),
                        listener,
                        Mode::Shared,
                        stop.clone(),
                        force.clone(),
                        tracker.clone(),
                    ));
                    listeners.insert(port, stop);
                }
                Err(e) => tracing::error!(%addr, "cannot bind egress listener: {e}"),
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            next = watch.changed() => table = next,
        }
    }
}

/// The ports exactly one of `remote` uses, each with its route.
fn sole_routes(remote: &[&Arc<isthmus_route_sync::Route>]) -> HashMap<u16, RouteKey> {
    let mut by_port: HashMap<u16, Option<RouteKey>> = HashMap::new();
    for r in remote {
        by_port
            .entry(r.key.port)
            .and_modify(|only| *only = None)
            .or_insert_with(|| Some(r.key.clone()));
    }
    by_port
        .into_iter()
        .filter_map(|(port, only)| Some((port, only?)))
        .collect()
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    mode: Mode,
    stop: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    let Ok(permit) = Arc::clone(&shared.limit).try_acquire_owned() else {
                        shared.ctx.metrics.refuse("unknown", Direction::Egress, "unknown", "overloaded");
                        tracing::warn!(%peer, "egress at its connection limit; closing");
                        reset(socket);
                        continue;
                    };
                    let shared = Arc::clone(&shared);
                    let mode = mode.clone();
                    let force = force.clone();
                    tracker.spawn(async move {
                        handle(&shared, socket, peer, mode, force).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "egress accept failed; continuing");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Closes with a reset, so the app sees a failure rather than an empty, clean reply.
fn reset(socket: TcpStream) {
    let _ = socket.set_zero_linger();
    drop(socket);
}

async fn handle(
    shared: &Shared,
    mut socket: TcpStream,
    peer: SocketAddr,
    mode: Mode,
    force: CancellationToken,
) {
    let _ = socket.set_nodelay(true);
    let ctx = &shared.ctx;
    let found = match identify(shared, &mut socket, &mode).await {
        Ok((key, peeked)) => find_route(shared, &key).await.map(|route| (route, peeked)),
        Err(refusal) => Err(refusal),
    };
    let (route, peeked) = match found {
        Ok(found) => found,
        Err(refusal) => {
            let label = match &mode {
                Mode::Dedicated(key) => key.to_string(),
                Mode::Shared => "unknown".to_string(),
            };
            ctx.metrics
                .refuse(&label, Direction::Egress, "unknown", refusal.reason());
            tracing::warn!(%peer, reason = refusal.reason(), "egress refused: {refusal}");
            reset(socket);
            return;
        }
    };
    if route.home_cluster == ctx.cluster {
        hairpin(shared, socket, peeked, &route, force).await;
        return;
    }
    let labels = ConnLabels {
        route: route.key.to_string(),
        direction: Direction::Egress,
        peer_cluster: route.home_cluster.to_string(),
    };
    let mut opened = match shared.pool.open(&route, peer).await {
        Ok(opened) => opened,
        Err(refusal) => {
            if refusal.is_failure() {
                ctx.metrics.fail(
                    &labels.route,
                    Direction::Egress,
                    &labels.peer_cluster,
                    refusal.reason(),
                );
            } else {
                ctx.metrics.refuse(
                    &labels.route,
                    Direction::Egress,
                    &labels.peer_cluster,
                    refusal.reason(),
                );
            }
            tracing::warn!(%peer, route = %labels.route, reason = refusal.reason(), "egress could not open a tunnel: {refusal}");
            reset(socket);
            return;
        }
    };
    if opened.write_leftover(&mut socket).await.is_err() {
        return;
    }
    match std::mem::replace(&mut opened.stream, OpenedStream::Closed) {
        OpenedStream::H2(send, recv) => {
            crate::carry_counted(&ctx.metrics, labels, socket, peeked, send, recv, force).await;
        }
        OpenedStream::Quic(send, recv) => {
            crate::carry_counted(&ctx.metrics, labels, socket, peeked, send, recv, force).await;
        }
        OpenedStream::Closed => {}
    }
    drop(opened);
}

/// The route `key` names: a remote one, or a local one with backends (served here without
/// a tunnel). Anything else waits up to `route_wait` for the table to catch up.
async fn find_route(
    shared: &Shared,
    key: &RouteKey,
) -> Result<Arc<isthmus_route_sync::Route>, Refusal> {
    let ctx = &shared.ctx;
    let check = |table: &isthmus_route_sync::RouteTable| match table.get(key) {
        None => Err(Refusal::NoRoute(format!("{key} is not a known route"))),
        Some(route) if route.home_cluster == ctx.cluster && route.backends.is_empty() => {
            Err(Refusal::LocalRoute(key.to_string()))
        }
        Some(route) => Ok(Arc::clone(route)),
    };
    let mut watch = ctx.routes.subscribe();
    let mut verdict = check(&watch.current());
    if verdict.is_ok() {
        return verdict;
    }
    let deadline = tokio::time::Instant::now() + shared.cfg.route_wait.get();
    while verdict.is_err() {
        match tokio::time::timeout_at(deadline, watch.changed()).await {
            Ok(table) => verdict = check(&table),
            Err(_) => break,
        }
    }
    verdict
}

/// Serves a connection for a route homed here from one of its backends, without a tunnel.
///
/// Apps reach a local route through the egress only in the moment a route moves back here:
/// the DNS shim answered with the egress just before the route came home. Serving it
/// locally, rather than refusing, keeps that moment free of failures.
async fn hairpin(
    shared: &Shared,
    mut socket: TcpStream,
    peeked: Bytes,
    route: &isthmus_route_sync::Route,
    force: CancellationToken,
) {
    let ctx = &shared.ctx;
    let route_label = route.key.to_string();
    let n = route.backends.len();
    let start = shared
        .next_backend
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut backend = None;
    for i in 0..n {
        let b = &route.backends[(start + i) % n];
        match timeout(
            shared.cfg.pool.connect_timeout.get(),
            TcpStream::connect((b.host(), b.port())),
        )
        .await
        {
            Ok(Ok(stream)) => {
                backend = Some(stream);
                break;
            }
            Ok(Err(e)) => tracing::debug!(route = %route_label, "local backend {b}: {e}"),
            Err(_) => tracing::debug!(route = %route_label, "local backend {b}: connect timed out"),
        }
    }
    let Some(mut backend) = backend else {
        ctx.metrics.fail(
            &route_label,
            Direction::Egress,
            ctx.cluster.as_str(),
            "backend_unreachable",
        );
        tracing::warn!(route = %route_label, "no local backend of a route that came home answered");
        reset(socket);
        return;
    };
    let _ = backend.set_nodelay(true);
    tracing::debug!(route = %route_label, "route is homed here; serving it without a tunnel");
    let labels = ConnLabels {
        route: route_label,
        direction: Direction::Egress,
        peer_cluster: ctx.cluster.to_string(),
    };
    ctx.metrics.opened.get_or_create(&labels).inc();
    let carried = async {
        tokio::io::AsyncWriteExt::write_all(&mut backend, &peeked).await?;
        tokio::io::copy_bidirectional(&mut socket, &mut backend).await
    };
    let result = tokio::select! {
        r = carried => r.map(|_| ()),
        () = force.cancelled() => Err(io::Error::other("closed by drain deadline")),
    };
    ctx.metrics.closed.get_or_create(&labels).inc();
    if let Err(e) = result {
        ctx.metrics.fail(
            &labels.route,
            Direction::Egress,
            &labels.peer_cluster,
            "stream_error",
        );
        tracing::info!(route = %labels.route, "hairpinned connection broke: {e}");
    }
}

/// Finds the route key of a connection, and the bytes peeked to find it.
async fn identify(
    shared: &Shared,
    socket: &mut TcpStream,
    mode: &Mode,
) -> Result<(RouteKey, Bytes), Refusal> {
    let local = socket
        .local_addr()
        .map_err(|e| Refusal::NoRoute(format!("no local address: {e}")))?;
    match mode {
        Mode::Dedicated(key) => return Ok((key.clone(), Bytes::new())),
        Mode::Shared => {}
    }
    if let Some(range) = &shared.vip_range
        && range.contains(local.ip())
    {
        let vips = shared.vips.load();
        let name = vips
            .as_ref()
            .and_then(|m| m.name_of(local.ip()))
            .ok_or_else(|| Refusal::NoRoute(format!("VIP {} names no route", local.ip())))?;
        let name = RouteName::parse(name).map_err(|e| Refusal::NoRoute(e.to_string()))?;
        return Ok((RouteKey::new(name, local.port()), Bytes::new()));
    }
    if let Some(key) = shared.sole.load().get(&local.port()) {
        return Ok((key.clone(), Bytes::new()));
    }
    let max = shared.cfg.peek_max_bytes;
    let peeked = timeout(shared.cfg.peek_timeout.get(), async {
        let mut buf = BytesMut::with_capacity(1024);
        loop {
            match peek::classify(&buf, max) {
                Peeked::Host(host) => return Ok((host, buf.freeze())),
                Peeked::NotRecognised(why) => return Err(Refusal::NoRoute(why.to_string())),
                Peeked::NeedMore => {}
            }
            if buf.len() >= max {
                return Err(Refusal::NoRoute(format!(
                    "no Host or SNI in the first {max} bytes"
                )));
            }
            buf.reserve(1024.min(max - buf.len()));
            let room = max - buf.len();
            let mut limited = (&mut buf).limit(room);
            match tokio::io::AsyncReadExt::read_buf(socket, &mut limited).await {
                Ok(0) => {
                    return Err(Refusal::NoRoute(
                        "connection closed before a Host or SNI".into(),
                    ));
                }
                Ok(_) => {}
                Err(e) => return Err(Refusal::NoRoute(format!("read failed: {e}"))),
            }
        }
    })
    .await
    .map_err(|_| Refusal::NoRoute("no Host or SNI before the peek timeout".into()))??;
    let (host, bytes) = peeked;
    let name = RouteName::parse(&host).map_err(|e| Refusal::NoRoute(e.to_string()))?;
    Ok((RouteKey::new(name, local.port()), bytes))
}
