//! Pooled, multiplexed tunnel connections to peer clusters' ingress gateways.
//!
//! Each app connection becomes one stream on a pooled connection: no TLS handshake per app
//! connection. A connection carries up to `max_streams_per_connection` streams; past that a
//! new one is dialled. Dials to one endpoint are serialised, so a burst of app connections
//! shares the connection the first of them dials instead of each dialling its own. An
//! endpoint that fails is skipped for a while (others first); a stream that fails to open
//! before any byte was sent is retried on the next endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use isthmus_certs::{Component, PeerPolicy};
use isthmus_route_sync::{ClusterName, Route};
use prometheus_client::metrics::gauge::Gauge;
use quinn::crypto::rustls::QuicClientConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::config::{PeerConfig, PoolConfig, Transport};
use crate::frame::{self, Parsed, RequestHead};
use crate::ingress::{ALPN_H2, ALPN_QUIC};
use crate::metrics::PoolLabels;
use crate::tunnel::h2::{H2Recv, H2Send};
use crate::tunnel::liveness::{Heard, Watchdog, silent};
use crate::tunnel::quic::{QuicRecv, QuicSend};
use crate::tunnel::status;
use crate::{Context, Refusal};

/// How long an endpoint that failed is tried only after the healthy ones.
const ENDPOINT_BACKOFF: Duration = Duration::from_secs(2);
/// How long an endpoint whose QUIC handshake failed is reached over TCP instead.
const QUIC_RETRY_AFTER: Duration = Duration::from_secs(60);

/// A stream open to an ingress, answered 200.
pub struct Opened {
    /// The stream's halves.
    pub stream: OpenedStream,
    /// Payload bytes that arrived with the response head (QUIC), to write first.
    pub leftover: Bytes,
    /// Which transport carries it.
    pub transport: &'static str,
    _guard: StreamGuard,
}

/// The stream halves, by transport.
pub enum OpenedStream {
    /// HTTP/2 CONNECT over TLS over TCP.
    H2(H2Send, H2Recv),
    /// A QUIC bidirectional stream.
    Quic(QuicSend, QuicRecv),
    /// Taken: the halves were moved out to be pumped.
    Closed,
}

/// The egress connection pool.
pub struct Pool {
    ctx: Context,
    cfg: PoolConfig,
    peers: HashMap<ClusterName, Peer>,
    quic: Option<quinn::Endpoint>,
}

struct Peer {
    cluster: ClusterName,
    endpoints: Vec<Arc<Endpoint>>,
    transport: Transport,
    fallback: bool,
    tls: Arc<rustls::ClientConfig>,
    quic: Option<quinn::ClientConfig>,
    next: AtomicUsize,
}

struct Endpoint {
    addr: SocketAddr,
    conns: Mutex<Vec<Arc<Conn>>>,
    dial: tokio::sync::Mutex<()>,
    down_until: Mutex<Option<Instant>>,
    /// How many times it was marked down: a dial waiting behind a failing one gives up.
    failures: AtomicU64,
    quic_broken_until: Mutex<Option<Instant>>,
}

impl Endpoint {
    /// Tried only after the healthy endpoints for [`ENDPOINT_BACKOFF`].
    fn mark_down(&self) {
        *lock(&self.down_until) = Some(Instant::now() + ENDPOINT_BACKOFF);
        self.failures.fetch_add(1, Ordering::AcqRel);
    }
}

enum ConnKind {
    H2(h2::client::SendRequest<Bytes>),
    Quic(quinn::Connection),
}

struct Conn {
    kind: ConnKind,
    streams: AtomicU32,
    closed: Arc<AtomicBool>,
    /// The ingress is draining it (QUIC GOAWAY, or a `draining` refusal): no new stream
    /// here; those in flight run on until they end.
    draining: Arc<AtomicBool>,
    /// Whether the pool has noted the drain (endpoint put behind the others), once.
    drain_noted: AtomicBool,
    /// Closed by the pool itself (idle), not by the peer or the network.
    reaped: AtomicBool,
    idle_since: Mutex<Instant>,
    stream_gauge: Gauge,
}

impl Conn {
    fn is_closed(&self) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return true;
        }
        match &self.kind {
            ConnKind::Quic(c) => c.close_reason().is_some(),
            ConnKind::H2(_) => false,
        }
    }

    fn close(&self) {
        self.reaped.store(true, Ordering::Release);
        self.closed.store(true, Ordering::Release);
        if let ConnKind::Quic(c) = &self.kind {
            c.close(quinn::VarInt::from_u32(0), b"idle");
        }
    }
}

/// Holds one stream slot on a pooled connection; frees it on drop.
struct StreamGuard(Arc<Conn>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.stream_gauge.dec();
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

enum Attempt {
    /// The ingress answered with a final refusal: do not try elsewhere.
    Refused(u16),
    /// The endpoint or connection failed (no status), or the ingress answered 503/429 (with
    /// its status and `isthmus-reason`): try the next endpoint.
    Retry(String, Option<(u16, &'static str)>),
}

impl Pool {
    /// A pool for these peers. QUIC peers share one client UDP socket.
    ///
    /// # Errors
    /// When the QUIC client socket cannot be bound or the TLS config does not suit QUIC.
    pub fn new(ctx: Context, cfg: PoolConfig, peers: &[PeerConfig]) -> std::io::Result<Self> {
        let any_quic = peers.iter().any(|p| p.transport == Transport::Quic);
        let quic = if any_quic {
            Some(quinn::Endpoint::client(SocketAddr::from((
                [0, 0, 0, 0],
                0,
            )))?)
        } else {
            None
        };
        let mut map = HashMap::new();
        for peer in peers {
            let cluster = ClusterName::parse(&peer.cluster)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            // The ingress must prove it is the gateway of the cluster we mean to reach: any
            // other component of that cluster (its DNS shim, say) would see app bytes in clear.
            let policy =
                PeerPolicy::component(&ctx.trust_domain, cluster.as_str(), Component::GATEWAY);
            let tls = ctx.tls.client_config(policy.clone(), &[ALPN_H2]);
            let quic_cfg = if peer.transport == Transport::Quic {
                let crypto =
                    QuicClientConfig::try_from(ctx.tls.client_config(policy, &[ALPN_QUIC]))
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let mut client = quinn::ClientConfig::new(Arc::new(crypto));
                let mut transport = crate::quic_transport(
                    cfg.max_streams_per_connection,
                    cfg.stream_window,
                    cfg.connection_window,
                    crate::Liveness::after(cfg.dead_after.get()),
                );
                // One unidirectional stream for the ingress's GOAWAY (its drain signal).
                transport.max_concurrent_uni_streams(1u32.into());
                client.transport_config(Arc::new(transport));
                Some(client)
            } else {
                None
            };
            let endpoints = peer
                .endpoints
                .iter()
                .map(|addr| {
                    Arc::new(Endpoint {
                        addr: *addr,
                        conns: Mutex::new(Vec::new()),
                        dial: tokio::sync::Mutex::new(()),
                        down_until: Mutex::new(None),
                        failures: AtomicU64::new(0),
                        quic_broken_until: Mutex::new(None),
                    })
                })
                .collect();
            map.insert(
                cluster.clone(),
                Peer {
                    cluster,
                    endpoints,
                    transport: peer.transport,
                    fallback: peer.fallback_to_tcp,
                    tls,
                    quic: quic_cfg,
                    next: AtomicUsize::new(0),
                },
            );
        }
        Ok(Self {
            ctx,
            cfg,
            peers: map,
            quic,
        })
    }

    /// Open tunnel connections to `cluster`, by transport (for tests and status).
    pub fn connection_count(&self, cluster: &str) -> usize {
        self.peers
            .iter()
            .filter(|(c, _)| c.as_str() == cluster)
            .flat_map(|(_, p)| &p.endpoints)
            .map(|e| lock(&e.conns).iter().filter(|c| !c.is_closed()).count())
            .sum()
    }

    /// Opens a stream for `route` to an ingress of its home cluster.
    ///
    /// # Errors
    /// [`Refusal::NoPeer`] when no peer is configured for the home cluster,
    /// [`Refusal::RemoteRefused`] when an ingress refused the stream (400, 401, 404), and
    /// [`Refusal::PeerUnreachable`] when every endpoint failed.
    pub async fn open(&self, route: &Route, src: SocketAddr) -> Result<Opened, Refusal> {
        let Some(peer) = self.peers.get(&route.home_cluster) else {
            return Err(Refusal::NoPeer {
                route: route.key.to_string(),
                cluster: route.home_cluster.to_string(),
            });
        };
        let now = Instant::now();
        let n = peer.endpoints.len();
        let start = peer.next.fetch_add(1, Ordering::Relaxed);
        let rotated = (0..n).map(|i| &peer.endpoints[(start + i) % n]);
        let (healthy, down): (Vec<_>, Vec<_>) =
            rotated.partition(|e| lock(&e.down_until).is_none_or(|t| t <= now));
        let mut last_error = String::from("no endpoint");
        let mut last_status = None;
        for endpoint in healthy.into_iter().chain(down) {
            match self.try_endpoint(peer, endpoint, route, src).await {
                Ok(opened) => {
                    *lock(&endpoint.down_until) = None;
                    return Ok(opened);
                }
                Err(Attempt::Refused(status)) => {
                    return Err(Refusal::RemoteRefused {
                        route: route.key.to_string(),
                        status,
                    });
                }
                Err(Attempt::Retry(error, refused)) => {
                    match refused {
                        Some((_, reason)) => {
                            // Not ready, draining, busy: that replica said so, another may
                            // carry the call. Counted per attempt, the call may still succeed.
                            self.ctx
                                .metrics
                                .attempt_refused(peer.cluster.as_str(), reason);
                            if matches!(reason, "not_ready" | "draining") {
                                endpoint.mark_down();
                            }
                        }
                        // Broken, not busy: prefer the other endpoints for a while.
                        None => endpoint.mark_down(),
                    }
                    tracing::debug!(endpoint = %endpoint.addr, route = %route.key, "{error}");
                    last_error = format!("{}: {error}", endpoint.addr);
                    last_status = refused.map(|(status, _)| status);
                }
            }
        }
        match last_status {
            Some(status) => Err(Refusal::RemoteRefused {
                route: route.key.to_string(),
                status,
            }),
            None => Err(Refusal::PeerUnreachable {
                route: route.key.to_string(),
                cluster: peer.cluster.to_string(),
                last_error,
            }),
        }
    }

    async fn try_endpoint(
        &self,
        peer: &Peer,
        endpoint: &Arc<Endpoint>,
        route: &Route,
        src: SocketAddr,
    ) -> Result<Opened, Attempt> {
        let conn = self.checkout(peer, endpoint).await.map_err(|e| {
            endpoint.mark_down();
            Attempt::Retry(e, None)
        })?;
        let guard = StreamGuard(Arc::clone(&conn));
        let authority = route.key.to_string();
        let forwarded = format!("for=\"{src}\"");
        let baggage = format!("k8s.cluster.name={}", self.ctx.cluster);
        let response_timeout = self.cfg.response_timeout.get();
        match &conn.kind {
            ConnKind::H2(send_request) => {
                let broken = |e: &dyn std::fmt::Display| {
                    conn.closed.store(true, Ordering::Release);
                    Attempt::Retry(format!("tunnel connection broken: {e}"), None)
                };
                let mut ready = timeout(response_timeout, send_request.clone().ready())
                    .await
                    .map_err(|_| broken(&"stream slot wait timed out"))?
                    .map_err(|e| broken(&e))?;
                let request = http::Request::builder()
                    .method(http::Method::CONNECT)
                    .uri(authority.as_str())
                    .header("forwarded", forwarded)
                    .header("baggage", baggage)
                    .body(())
                    .map_err(|e| Attempt::Retry(format!("cannot build request: {e}"), None))?;
                let (response, send) =
                    ready.send_request(request, false).map_err(|e| broken(&e))?;
                let response = timeout(response_timeout, response)
                    .await
                    .map_err(|_| Attempt::Retry("ingress did not answer in time".into(), None))?
                    .map_err(|e| Attempt::Retry(format!("stream failed: {e}"), None))?;
                let status = response.status().as_u16();
                let reason = response
                    .headers()
                    .get(REASON_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if reason == "draining" {
                    conn.draining.store(true, Ordering::Release);
                }
                check_status(status, reason)?;
                Ok(Opened {
                    stream: OpenedStream::H2(H2Send(send), H2Recv(response.into_body())),
                    leftover: Bytes::new(),
                    transport: "tcp",
                    _guard: guard,
                })
            }
            ConnKind::Quic(connection) => {
                let (mut send, mut recv) = timeout(response_timeout, connection.open_bi())
                    .await
                    .map_err(|_| Attempt::Retry("stream slot wait timed out".into(), None))?
                    .map_err(|e| {
                        conn.closed.store(true, Ordering::Release);
                        Attempt::Retry(format!("tunnel connection broken: {e}"), None)
                    })?;
                let head = RequestHead {
                    authority,
                    headers: vec![("forwarded".into(), forwarded), ("baggage".into(), baggage)],
                };
                let bytes = head
                    .encode()
                    .map_err(|e| Attempt::Retry(format!("cannot encode request: {e}"), None))?;
                send.write_all(&bytes)
                    .await
                    .map_err(|e| Attempt::Retry(format!("stream failed: {e}"), None))?;
                let (status, reason, leftover) =
                    timeout(response_timeout, read_response(&mut recv))
                        .await
                        .map_err(|_| {
                            Attempt::Retry("ingress did not answer in time".into(), None)
                        })??;
                if reason == "draining" {
                    // The GOAWAY may still be on its way: learn the drain from the refusal.
                    conn.draining.store(true, Ordering::Release);
                }
                check_status(status, &reason)?;
                Ok(Opened {
                    stream: OpenedStream::Quic(QuicSend(send), QuicRecv(recv)),
                    leftover,
                    transport: "quic",
                    _guard: guard,
                })
            }
        }
    }

    /// A connection to `endpoint` with a free stream slot (taken), dialling one if needed.
    async fn checkout(&self, peer: &Peer, endpoint: &Arc<Endpoint>) -> Result<Arc<Conn>, String> {
        if let Some(conn) = self.take_slot(endpoint) {
            return Ok(conn);
        }
        if draining(endpoint) {
            // Its replica is going away (GOAWAY): a new connection there would be refused
            // or dropped, so carry this stream through another endpoint.
            return Err("the endpoint is draining".into());
        }
        let failures = endpoint.failures.load(Ordering::Acquire);
        let _dialling = endpoint.dial.lock().await;
        // Someone may have dialled while we waited.
        if let Some(conn) = self.take_slot(endpoint) {
            return Ok(conn);
        }
        // Or failed: one stalled dial to a dead endpoint is enough; go elsewhere.
        if endpoint.failures.load(Ordering::Acquire) != failures {
            return Err("the endpoint failed while this stream waited to dial it".into());
        }
        let conn = Arc::new(self.dial(peer, endpoint).await?);
        conn.streams.store(1, Ordering::Release);
        conn.stream_gauge.inc();
        lock(&endpoint.conns).push(Arc::clone(&conn));
        Ok(conn)
    }

    fn take_slot(&self, endpoint: &Endpoint) -> Option<Arc<Conn>> {
        let max = self.cfg.max_streams_per_connection;
        let mut conns = lock(&endpoint.conns);
        conns.retain(|c| {
            let closed = c.is_closed();
            if closed && !c.reaped.load(Ordering::Acquire) {
                // It died under us (peer gone, reset, drained): other endpoints first.
                endpoint.mark_down();
            }
            if c.draining.load(Ordering::Acquire) && !c.drain_noted.swap(true, Ordering::AcqRel) {
                // Its replica is going away: other endpoints first.
                endpoint.mark_down();
            }
            !closed
        });
        // Fill the busiest connection that has room: keeps the number of connections low
        // and lets idle ones age out. A draining one takes no new stream.
        let mut best: Option<&Arc<Conn>> = None;
        for c in conns.iter().filter(|c| !c.draining.load(Ordering::Acquire)) {
            let n = c.streams.load(Ordering::Acquire);
            if n < max && best.is_none_or(|b| b.streams.load(Ordering::Acquire) < n) {
                best = Some(c);
            }
        }
        let conn = best?;
        conn.streams.fetch_add(1, Ordering::AcqRel);
        conn.stream_gauge.inc();
        Some(Arc::clone(conn))
    }

    async fn dial(&self, peer: &Peer, endpoint: &Endpoint) -> Result<Conn, String> {
        if peer.transport == Transport::Quic {
            let broken = lock(&endpoint.quic_broken_until).is_some_and(|t| t > Instant::now());
            if !broken {
                match self.dial_quic(peer, endpoint).await {
                    Ok(conn) => return Ok(conn),
                    Err(e) if peer.fallback => {
                        tracing::warn!(
                            endpoint = %endpoint.addr,
                            cluster = %peer.cluster,
                            "QUIC failed ({e}); falling back to TCP for {}s",
                            QUIC_RETRY_AFTER.as_secs()
                        );
                        *lock(&endpoint.quic_broken_until) =
                            Some(Instant::now() + QUIC_RETRY_AFTER);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.dial_h2(peer, endpoint).await
    }

    async fn dial_h2(&self, peer: &Peer, endpoint: &Endpoint) -> Result<Conn, String> {
        let metrics = &self.ctx.metrics;
        let tcp = timeout(
            self.cfg.connect_timeout.get(),
            TcpStream::connect(endpoint.addr),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect failed: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&peer.tls));
        // The name is not used for authorization: the verifier checks the SPIFFE ID.
        let name = rustls::pki_types::ServerName::IpAddress(endpoint.addr.ip().into());
        let tls = match timeout(
            self.cfg.handshake_timeout.get(),
            connector.connect(name, tcp),
        )
        .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                metrics.handshake_failed("egress", crate::handshake_reason(&e));
                return Err(format!("TLS handshake failed: {e}"));
            }
            Err(_) => {
                metrics.handshake_failed("egress", "timeout");
                return Err("TLS handshake timed out".into());
            }
        };
        let (tls, heard) = Heard::new(tls);
        let (send_request, mut connection) = h2::client::Builder::new()
            .initial_window_size(self.cfg.stream_window)
            .initial_connection_window_size(self.cfg.connection_window)
            .max_concurrent_streams(0)
            .max_send_buffer_size(256 * 1024)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| format!("h2 handshake failed: {e}"))?;
        let closed = Arc::new(AtomicBool::new(false));
        let labels = PoolLabels {
            peer_cluster: peer.cluster.to_string(),
            transport: "tcp",
        };
        let gauge = metrics.pool_connections.get_or_create(&labels).clone();
        gauge.inc();
        let done = Arc::clone(&closed);
        let addr = endpoint.addr;
        let dead_after = self.cfg.dead_after.get();
        // TCP has no idle timeout of its own: an ingress that vanished without a reset would
        // hold every stream of this connection until the kernel gives up retransmitting.
        let mut watchdog = connection
            .ping_pong()
            .map(|pings| Watchdog::new(heard, pings, crate::Liveness::after(dead_after)));
        tokio::spawn(async move {
            tokio::select! {
                biased;
                ended = &mut connection => if let Err(e) = ended {
                    tracing::debug!(endpoint = %addr, "tunnel connection ended: {e}");
                },
                () = silent(watchdog.as_mut()) => tracing::warn!(
                    endpoint = %addr,
                    "tunnel connection silent for {dead_after:?}: closed as dead"
                ),
            }
            // Dropping the connection fails its streams, so their app connections close.
            drop(connection);
            done.store(true, Ordering::Release);
            gauge.dec();
        });
        Ok(Conn {
            kind: ConnKind::H2(send_request),
            streams: AtomicU32::new(0),
            closed,
            // h2 has GOAWAY: a stream opened after it fails `ready()` and is retried elsewhere.
            draining: Arc::new(AtomicBool::new(false)),
            drain_noted: AtomicBool::new(false),
            reaped: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            stream_gauge: metrics.pool_streams.get_or_create(&labels).clone(),
        })
    }

    async fn dial_quic(&self, peer: &Peer, endpoint: &Endpoint) -> Result<Conn, String> {
        let (Some(client), Some(cfg)) = (&self.quic, &peer.quic) else {
            return Err("QUIC is not configured".into());
        };
        let connecting = client
            .connect_with(cfg.clone(), endpoint.addr, "isthmus-ingress")
            .map_err(|e| format!("QUIC connect failed: {e}"))?;
        let metrics = &self.ctx.metrics;
        let connection = match timeout(self.cfg.handshake_timeout.get(), connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                metrics.handshake_failed("egress", crate::quic_handshake_reason(&e));
                return Err(format!("QUIC handshake failed: {e}"));
            }
            Err(_) => {
                metrics.handshake_failed("egress", "timeout");
                return Err("QUIC handshake timed out".into());
            }
        };
        let labels = PoolLabels {
            peer_cluster: peer.cluster.to_string(),
            transport: "quic",
        };
        let gauge = metrics.pool_connections.get_or_create(&labels).clone();
        gauge.inc();
        let closed = Arc::new(AtomicBool::new(false));
        let draining = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&closed);
        let watched = connection.clone();
        let (goaway, addr) = (Arc::clone(&draining), endpoint.addr);
        tokio::spawn(async move {
            tokio::select! {
                reason = watched.closed() => {
                    tracing::debug!("QUIC tunnel connection ended: {reason}");
                }
                () = watch_goaway(&watched, &goaway) => {
                    tracing::debug!(endpoint = %addr, "ingress is draining this QUIC connection");
                    let reason = watched.closed().await;
                    tracing::debug!("QUIC tunnel connection ended: {reason}");
                }
            }
            done.store(true, Ordering::Release);
            gauge.dec();
        });
        Ok(Conn {
            kind: ConnKind::Quic(connection),
            streams: AtomicU32::new(0),
            closed,
            draining,
            drain_noted: AtomicBool::new(false),
            reaped: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            stream_gauge: metrics.pool_streams.get_or_create(&labels).clone(),
        })
    }

    /// Closes pooled connections idle longer than the idle timeout, every quarter of it,
    /// until `cancel`.
    pub async fn reap_idle(&self, cancel: CancellationToken) {
        let idle = self.cfg.idle_timeout.get();
        let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(10)));
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            for endpoint in self.peers.values().flat_map(|p| &p.endpoints) {
                lock(&endpoint.conns).retain(|c| {
                    let idle_for = now - *lock(&c.idle_since);
                    let expired = c.streams.load(Ordering::Acquire) == 0 && idle_for >= idle;
                    if expired {
                        // Dropping the last SendRequest lets h2 close with GOAWAY.
                        c.close();
                    }
                    !expired && !c.is_closed()
                });
            }
        }
    }

    /// Closes every pooled connection (shutdown), and waits (at most 2 s) until the QUIC
    /// close frames are out: without it, an exiting process leaves the far ingress holding
    /// connections until its idle timeout.
    pub async fn close_all(&self) {
        for endpoint in self.peers.values().flat_map(|p| &p.endpoints) {
            for c in lock(&endpoint.conns).drain(..) {
                c.close();
            }
        }
        if let Some(q) = &self.quic {
            q.close(quinn::VarInt::from_u32(0), b"shutdown");
            let _ = timeout(Duration::from_secs(2), q.wait_idle()).await;
        }
    }
}

/// The h2 response header naming why an ingress refused (QUIC: the reason phrase).
const REASON_HEADER: &str = "isthmus-reason";

/// Whether a stream the ingress answered is open, final, or worth another endpoint. 503
/// (not ready, draining, no backend reachable from that replica) and 429 are that
/// replica's state; 400, 401 and 404 come from a loaded table and stay final.
fn check_status(status: u16, reason: &str) -> Result<(), Attempt> {
    match status {
        status::OK => Ok(()),
        status::UNAVAILABLE | status::OVERLOADED => Err(Attempt::Retry(
            format!("ingress answered {status} ({})", reason.escape_debug()),
            Some((status, remote_reason(status, reason))),
        )),
        other => Err(Attempt::Refused(other)),
    }
}

/// A retryable refusal's reason as a fixed metric label, never the peer's text.
fn remote_reason(status: u16, reason: &str) -> &'static str {
    match reason {
        "not_ready" => "not_ready",
        "draining" => "draining",
        "overloaded" => "overloaded",
        "no_backend" => "no_backend",
        "backend_unreachable" => "backend_unreachable",
        _ if status == status::OVERLOADED => "overloaded",
        _ => "unavailable",
    }
}

/// Resolves when the ingress announces its drain on a unidirectional stream
/// ([`crate::tunnel::quic::GOAWAY`]), after marking `draining`; never if it does not.
async fn watch_goaway(conn: &quinn::Connection, draining: &AtomicBool) {
    loop {
        let Ok(mut recv) = conn.accept_uni().await else {
            return std::future::pending().await;
        };
        let goaway = crate::tunnel::quic::GOAWAY;
        let read = timeout(Duration::from_secs(1), recv.read_to_end(goaway.len())).await;
        match read {
            Ok(Ok(message)) if message == goaway => {
                draining.store(true, Ordering::Release);
                return;
            }
            _ => tracing::debug!("ignoring an unknown control stream from an ingress"),
        }
    }
}

async fn read_response(recv: &mut quinn::RecvStream) -> Result<(u16, String, Bytes), Attempt> {
    let mut buf = BytesMut::new();
    loop {
        match frame::parse_response(&buf) {
            Ok(Parsed::Complete { head, consumed }) => {
                return Ok((head.status, head.reason, buf.split_off(consumed).freeze()));
            }
            Ok(Parsed::NeedMore) => {}
            Err(e) => return Err(Attempt::Retry(format!("bad response head: {e}"), None)),
        }
        let limit = frame::MAX_HEAD + 1 - buf.len().min(frame::MAX_HEAD);
        match recv.read_chunk(limit, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(Attempt::Retry(
                    "stream ended before a response".into(),
                    None,
                ));
            }
            Err(e) => return Err(Attempt::Retry(format!("stream failed: {e}"), None)),
        }
    }
}

/// Whether a live connection to `endpoint` is draining.
fn draining(endpoint: &Endpoint) -> bool {
    lock(&endpoint.conns)
        .iter()
        .any(|c| c.draining.load(Ordering::Acquire) && !c.is_closed())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Opened {
    /// A stream dropped without being pumped (the app went away first) is reset, so the
    /// ingress and the backend see a failure: a QUIC send stream dropped as it is would
    /// finish cleanly, and the backend would read a clean end.
    fn drop(&mut self) {
        use crate::tunnel::StreamSend as _;
        match std::mem::replace(&mut self.stream, OpenedStream::Closed) {
            OpenedStream::H2(mut send, _) => send.reset(),
            OpenedStream::Quic(mut send, _) => send.reset(),
            OpenedStream::Closed => {}
        }
    }
}

impl Opened {
    /// Writes the payload that came with the response head to the app socket.
    ///
    /// # Errors
    /// When the socket write fails.
    pub async fn write_leftover(&mut self, socket: &mut TcpStream) -> std::io::Result<()> {
        if !self.leftover.is_empty() {
            socket.write_all(&self.leftover).await?;
            self.leftover = Bytes::new();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replicas_own_state_is_retried_and_an_answer_from_the_table_is_final() {
        for (status, reason, label) in [
            (503, "not_ready", "not_ready"),
            (503, "draining", "draining"),
            (503, "backend_unreachable", "backend_unreachable"),
            (503, "", "unavailable"),
            (429, "", "overloaded"),
            (503, "caller text\r\n", "unavailable"),
        ] {
            match check_status(status, reason) {
                Err(Attempt::Retry(_, Some((s, r)))) => assert_eq!((s, r), (status, label)),
                _ => panic!("{status} {reason:?} should be retried"),
            }
        }
        for status in [400, 401, 404, 418] {
            assert!(matches!(
                check_status(status, "not_ready"),
                Err(Attempt::Refused(s)) if s == status
            ));
        }
        assert!(check_status(200, "").is_ok());
    }
}
