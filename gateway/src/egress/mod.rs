//! The egress role: carries local apps' connections to the route's home cluster.
//!
//! Which route a connection is for is decided by [`identify()`], a pure function of what the
//! connection showed (listener, local address, peeked Host or SNI) and the table: a
//! **dedicated** listener names its route; an **egress-port** listener names the route
//! carrying that `egress_port`; a local address that is a route's **VIP** (the
//! `vip` route-sync assigned, indexed by [`index`]) names that route; on a **shared**
//! address the HTTP/1.x `Host` or TLS SNI does, peeked within a byte and time bound and
//! replayed into the tunnel; anything else is refused. Never "the only route on this port".
//!
//! Listeners follow the route table: a shared listener (on `listen_address`) is open for
//! every port any route uses, local ones included, so a route that moves to another cluster
//! finds its port already open; with `bind_vips`, one listener per route `vip:port` as well;
//! with `bind_egress_ports`, one per route `egress_port` on `listen_address`, where the port
//! alone names the route (the Kubernetes mirror Services' target ports).
//! Each closes when no route needs it; connections already accepted are not touched. A
//! connection for a route the table does not know (yet), or knows only as local, waits up to
//! `route_wait` for the table to catch up before it is refused, and one for an exported
//! route homed here (it just came back) is served from the route's local backends: the DNS
//! shim and the egress follow route-sync separately, and either may see a move first.

pub mod identify;
pub mod index;
pub mod pool;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut as _, Bytes, BytesMut};
use isthmus_route_sync::vip::VipRange;
use isthmus_route_sync::{Route, RouteKey};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::EgressConfig;
use crate::metrics::{ConnLabels, Direction};
use crate::peek::{Peeked, Peeker};
use crate::{Context, Refusal};
use identify::{Facts, Identified, Listener, Peek, Unidentified, admit, identify};
use index::Index;
use pool::{OpenedStream, Pool};

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
    /// Addresses in this range are VIPs: never peeked, refused when no route carries them.
    vip_range: Option<VipRange>,
    /// The route table's VIPs and ports, kept in step with it.
    index: Index,
    /// Round-robin start among a local route's backends.
    next_backend: std::sync::atomic::AtomicUsize,
}

impl Egress {
    /// Binds the dedicated listeners and builds the pool. Shared and VIP listeners are bound
    /// by [`run`](Egress::run) from the route table.
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
        let index = Index::new(cfg.bind_vips);
        Ok(Self {
            shared: Arc::new(Shared {
                ctx,
                cfg,
                pool,
                limit,
                vip_range,
                index,
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
                Listener::Dedicated(key),
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
        if shared.cfg.listen_address.is_some() || shared.cfg.bind_vips {
            follow_table(&shared, &shutdown, &force, &tracker).await;
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

/// Listeners that follow the table: one set, keyed by what each is bound for.
struct Followers<K> {
    open: HashMap<K, CancellationToken>,
    /// The view generation they were last brought in step with; `None` forces a look (at
    /// start, and after a bind failed, so that it is retried on the next change).
    generation: Option<u64>,
}

impl<K: std::hash::Hash + Eq + Copy + std::fmt::Debug> Followers<K> {
    fn new() -> Self {
        Self {
            open: HashMap::new(),
            generation: None,
        }
    }

    /// Closes the listeners no longer wanted and returns what needs one, unless
    /// `generation` says the wanted set has not changed since the last look.
    fn plan(&mut self, generation: u64, wanted: impl Iterator<Item = K>) -> Vec<K> {
        if self.generation == Some(generation) {
            return Vec::new();
        }
        self.generation = Some(generation);
        let wanted: std::collections::HashSet<K> = wanted.collect();
        self.open.retain(|k, stop| {
            let keep = wanted.contains(k);
            if !keep {
                tracing::info!(listener = ?k, "no route needs this listener any more; closing it");
                stop.cancel();
            }
            keep
        });
        wanted
            .into_iter()
            .filter(|k| !self.open.contains_key(k))
            .collect()
    }

    /// Records the outcome of binding `k`.
    fn bound(&mut self, k: K, stop: Option<CancellationToken>) {
        match stop {
            Some(stop) => {
                self.open.insert(k, stop);
            }
            None => self.generation = None,
        }
    }
}

/// Keeps one shared listener per port of any route, with `bind_vips` one per route
/// `vip:port`, and with `bind_egress_ports` one per route egress port, in step with the
/// route table until `shutdown`.
async fn follow_table(
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    force: &CancellationToken,
    tracker: &TaskTracker,
) {
    let mut watch = shared.ctx.routes.subscribe();
    let mut ports = Followers::<u16>::new();
    let mut vips = Followers::<SocketAddr>::new();
    let open = async |addr: SocketAddr, kind: Listener| match TcpListener::bind(addr).await {
        Ok(bound) => {
            let stop = shutdown.child_token();
            tracing::info!(%addr, ?kind, "egress listening");
            tracker.spawn(accept_loop(
                Arc::clone(shared),
                bound,
                kind,
                stop.clone(),
                force.clone(),
                tracker.clone(),
            ));
            Some(stop)
        }
        Err(e) => {
            tracing::error!(%addr, "cannot bind egress listener (retried on the next table change): {e}");
            None
        }
    };
    let by_port = shared.cfg.bind_egress_ports;
    let mut egress_ports = Followers::<u16>::new();
    loop {
        let view = shared.index.view(&shared.ctx.routes);
        if let Some(address) = shared.cfg.listen_address {
            // A port that is some route's egress port belongs to its egress-port listener:
            // a shared one there would take its connections by Host instead. Both
            // generations only grow, so their sum moves whenever either set does.
            let generation = view.ports_generation() + view.egress_ports_generation();
            let wanted = view
                .ports()
                .filter(|p| !by_port || view.egress_port_owner(*p) == index::EgressPortOwner::None);
            for port in ports.plan(generation, wanted) {
                let stop = open(SocketAddr::new(address, port), Listener::Shared).await;
                ports.bound(port, stop);
            }
            if by_port {
                let wanted = view.egress_ports();
                for port in egress_ports.plan(view.egress_ports_generation(), wanted) {
                    let stop = open(SocketAddr::new(address, port), Listener::EgressPort).await;
                    egress_ports.bound(port, stop);
                }
            }
        }
        if shared.cfg.bind_vips {
            for addr in vips.plan(view.vip_addrs_generation(), view.vip_addrs()) {
                let stop = open(addr, Listener::Vip).await;
                vips.bound(addr, stop);
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = watch.changed() => {}
        }
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    kind: Listener,
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
                    let kind = kind.clone();
                    let force = force.clone();
                    tracker.spawn(async move {
                        handle(&shared, socket, peer, &kind, force).await;
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

/// Why a connection gets no route.
#[derive(Debug)]
enum Refused {
    /// Nothing it showed names a route.
    Unidentified(Unidentified),
    /// It names `key`, which the egress may not carry.
    Route(RouteKey, Refusal),
}

impl Refused {
    fn reason(&self) -> &'static str {
        match self {
            Refused::Unidentified(u) => u.reason(),
            Refused::Route(_, r) => r.reason(),
        }
    }

    /// Whether a newer table may decide otherwise.
    fn may_change(&self) -> bool {
        match self {
            Refused::Unidentified(u) => u.may_change(),
            // Every admission refusal may: the route may be arriving, or moving away.
            Refused::Route(..) => true,
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Unidentified(u) => u.fmt(f),
            Refused::Route(_, r) => r.fmt(f),
        }
    }
}

async fn handle(
    shared: &Shared,
    mut socket: TcpStream,
    peer: SocketAddr,
    listener: &Listener,
    force: CancellationToken,
) {
    let _ = socket.set_nodelay(true);
    let ctx = &shared.ctx;
    let (route, peeked) = match resolve(shared, &mut socket, listener).await {
        Ok(found) => found,
        Err(refused) => {
            let label = match (&refused, listener) {
                (_, Listener::Dedicated(key)) => key.to_string(),
                (Refused::Route(key, _), _) => {
                    crate::known_route_label(&ctx.routes.snapshot(), &key.to_string())
                }
                (Refused::Unidentified(_), _) => "unknown".to_string(),
            };
            ctx.metrics
                .refuse(&label, Direction::Egress, "unknown", refused.reason());
            tracing::warn!(%peer, reason = refused.reason(), "egress refused: {refused}");
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

/// Finds the route of a connection, and the bytes peeked to find it: gathers the facts
/// [`identify()`] and [`admit`] decide on (peeking only when the decision needs a name), and
/// while the refusal may change with the table, waits up to `route_wait` for it to.
async fn resolve(
    shared: &Shared,
    socket: &mut TcpStream,
    listener: &Listener,
) -> Result<(Arc<Route>, Bytes), Refused> {
    let ctx = &shared.ctx;
    let local = socket.local_addr().map_err(|e| {
        Refused::Unidentified(Unidentified::NoName {
            local: SocketAddr::from(([0, 0, 0, 0], 0)),
            detail: format!("the connection has no local address: {e}"),
        })
    })?;
    let mut peek = Peek::NotYet;
    let mut peeked = Bytes::new();
    let mut watch = None;
    let mut deadline = None;
    loop {
        // A dedicated listener needs no index: its route is known before any byte.
        let (identified, table) = match listener {
            Listener::Dedicated(key) => (Ok(Identified::Route(key.clone())), ctx.routes.snapshot()),
            Listener::Shared | Listener::Vip | Listener::EgressPort => {
                let view = shared.index.view(&ctx.routes);
                let facts = Facts {
                    listener,
                    local,
                    peek: &peek,
                };
                let identified = identify(&facts, shared.vip_range.as_ref(), &view);
                (identified, Arc::clone(&view.table))
            }
        };
        let decided = match identified {
            Ok(Identified::NeedsPeek) => {
                (peek, peeked) = peek_name(shared, socket).await;
                continue;
            }
            Ok(Identified::Route(key)) => match admit(&key, &table, &ctx.cluster) {
                Ok(route) => return Ok((route, peeked)),
                Err(refusal) => Refused::Route(key, refusal),
            },
            Err(unidentified) => Refused::Unidentified(unidentified),
        };
        if !decided.may_change() {
            return Err(decided);
        }
        // Subscribe before deciding again, so a change between the two is not missed.
        let Some(changes) = watch.as_mut() else {
            watch = Some(ctx.routes.subscribe());
            deadline = Some(tokio::time::Instant::now() + shared.cfg.route_wait.get());
            continue;
        };
        let deadline = deadline.unwrap_or_else(tokio::time::Instant::now);
        if tokio::time::timeout_at(deadline, changes.changed())
            .await
            .is_err()
        {
            return Err(decided);
        }
    }
}

/// Serves a connection for a route homed here from one of its backends, without a tunnel.
///
/// Apps reach a local route through the egress only in the moment a route moves back here:
/// the DNS shim answered with the egress just before the route came home. Serving it
/// locally, rather than refusing, keeps that moment free of failures. [`admit`] has checked
/// that the route is exported: this path must not reach what the ingress would refuse.
async fn hairpin(
    shared: &Shared,
    mut socket: TcpStream,
    peeked: Bytes,
    route: &Route,
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
        // Both ends see a reset, as through a tunnel: a clean FIN would let a raw-TCP upload
        // or an HTTP/1.0 body taken as complete.
        reset(socket);
        reset(backend);
    }
}

/// Reads the first bytes of a connection until they name a host or cannot, within
/// `peek_max_bytes` and `peek_timeout`. Returns what was found and every byte read.
async fn peek_name(shared: &Shared, socket: &mut TcpStream) -> (Peek, Bytes) {
    let max = shared.cfg.peek_max_bytes;
    let mut buf = BytesMut::with_capacity(1024.min(max));
    let mut peeker = Peeker::new(max);
    let found = timeout(shared.cfg.peek_timeout.get(), async {
        loop {
            match peeker.classify(&buf) {
                Peeked::Host(host) => return Peek::Host(host),
                Peeked::NotRecognised(why) => return Peek::NoName(why.to_string()),
                Peeked::NeedMore => {}
            }
            if buf.len() >= max {
                return Peek::NoName(format!("no Host or SNI in the first {max} bytes"));
            }
            buf.reserve(1024.min(max - buf.len()));
            let room = max - buf.len();
            let mut limited = (&mut buf).limit(room);
            match tokio::io::AsyncReadExt::read_buf(socket, &mut limited).await {
                Ok(0) => return Peek::NoName("connection closed before a Host or SNI".into()),
                Ok(_) => {}
                Err(e) => return Peek::NoName(format!("read failed: {e}")),
            }
        }
    })
    .await
    .unwrap_or(Peek::TimedOut);
    (found, buf.freeze())
}
