//! The ingress role: terminates tunnels from other clusters' egress gateways.
//!
//! One port, two transports: TLS 1.3 over TCP carrying HTTP/2 CONNECT streams, and QUIC on
//! the same port number over UDP carrying one bidirectional stream per tunneled connection.
//! Every stream goes through [`authorize`](authorize::authorize) before the ingress learns any
//! address, connects to a backend of the route, and only then answers 200.

pub mod authorize;
mod quic;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use isthmus_certs::SpiffeId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::IngressConfig;
use crate::metrics::{ConnLabels, Direction, PoolLabels};
use crate::tunnel::h2::{H2Recv, H2Send};
use crate::tunnel::liveness::{Heard, Watchdog, silent};
use crate::tunnel::status;
use crate::{Context, Refusal, handshake_reason};

/// ALPN of the TCP transport.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of the QUIC transport.
pub const ALPN_QUIC: &[u8] = b"isthmus/1";

/// A bound ingress, ready to [`run`](Ingress::run).
pub struct Ingress {
    tcp: TcpListener,
    quic: Option<quinn::Endpoint>,
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) ctx: Context,
    pub(crate) cfg: IngressConfig,
    limit: Arc<Semaphore>,
    /// Handshakes in progress, both transports (`max_handshakes`).
    handshakes: Arc<Semaphore>,
    next_backend: AtomicUsize,
    /// The shutdown token of [`Ingress::run`]: once it fired, streams that still arrive
    /// are refused `draining` (503), so the egress carries them through another replica.
    shutdown: std::sync::OnceLock<CancellationToken>,
}

/// What an admitted stream gets: the backend it is connected to, and its share of the limit.
pub(crate) struct Admitted {
    pub(crate) backend: TcpStream,
    pub(crate) labels: ConnLabels,
    _permit: OwnedSemaphorePermit,
}

impl Ingress {
    /// Binds TCP on `cfg.listen` and, with `cfg.quic`, UDP on the same port number (with port
    /// 0 the kernel's choice for TCP is reused for UDP).
    ///
    /// # Errors
    /// When either socket cannot be bound or the TLS configuration does not suit QUIC.
    pub async fn bind(ctx: Context, cfg: IngressConfig) -> io::Result<Self> {
        // Handshake-level policy: the allowed components (gateways by default) of any cluster.
        // Which of them may reach which route is decided per stream, with the route in hand.
        let policy = cfg.caller_policy(&ctx.trust_domain);
        let mut last_err = None;
        for _ in 0..16 {
            let tcp = TcpListener::bind(cfg.listen).await?;
            let addr = tcp.local_addr()?;
            if !cfg.quic {
                return Ok(Self::new(ctx, cfg, tcp, None));
            }
            let server_tls = ctx.tls.server_config(policy.clone(), &[ALPN_QUIC]);
            match quic::endpoint(server_tls, addr, &cfg) {
                Ok(endpoint) => return Ok(Self::new(ctx, cfg, tcp, Some(endpoint))),
                // Port 0: the UDP twin of the kernel's TCP port may be taken; try another.
                Err(e) if cfg.listen.port() == 0 => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("could not bind the QUIC port")))
    }

    fn new(
        ctx: Context,
        cfg: IngressConfig,
        tcp: TcpListener,
        quic: Option<quinn::Endpoint>,
    ) -> Self {
        let limit = Arc::new(Semaphore::new(cfg.max_connections));
        let handshakes = Arc::new(Semaphore::new(cfg.max_handshakes));
        Self {
            tcp,
            quic,
            shared: Arc::new(Shared {
                ctx,
                cfg,
                limit,
                handshakes,
                next_backend: AtomicUsize::new(0),
                shutdown: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The TCP tunnel address (the QUIC one has the same port).
    ///
    /// # Errors
    /// If the socket has no local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The QUIC address, when QUIC is on.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic.as_ref().and_then(|e| e.local_addr().ok())
    }

    /// Serves until `shutdown`, then drains: stops accepting, tells every tunnel connection
    /// to open no new stream (h2 GOAWAY; on QUIC the [`GOAWAY`](crate::tunnel::quic::GOAWAY)
    /// control stream), answers streams that still arrive `draining` (503), closes each
    /// connection once its streams finished, and returns when all have. `force` aborts the
    /// streams left (the drain deadline).
    pub async fn run(self, shutdown: CancellationToken, force: CancellationToken) {
        let _ = self.shared.shutdown.set(shutdown.clone());
        let tracker = TaskTracker::new();
        let tls = self.shared.ctx.tls.server_config(
            self.shared.cfg.caller_policy(&self.shared.ctx.trust_domain),
            &[ALPN_H2],
        );
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        // Not in `tracker`: while the connections in it drain, the QUIC accept loop goes on
        // refusing new ones, and stops once they are done.
        let drained = CancellationToken::new();
        let quic_accept = self.quic.clone().map(|endpoint| {
            tokio::spawn(quic::serve(
                Arc::clone(&self.shared),
                endpoint,
                shutdown.clone(),
                drained.clone(),
                force.clone(),
                tracker.clone(),
            ))
        });
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.tcp.accept() => match accepted {
                    Ok((socket, peer)) => {
                        let Some(handshake) = self.shared.handshake_slot(&peer) else {
                            let _ = socket.set_zero_linger();
                            continue;
                        };
                        tracker.spawn(serve_tcp(
                            Arc::clone(&self.shared),
                            acceptor.clone(),
                            handshake,
                            socket,
                            peer,
                            shutdown.clone(),
                            force.clone(),
                            tracker.clone(),
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "ingress accept failed; continuing");
                        // Out of file descriptors: give in-flight work a moment to free some.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        }
        drop(self.tcp);
        tracker.close();
        tracker.wait().await;
        drained.cancel();
        if let Some(accept) = quic_accept {
            let _ = accept.await;
        }
        if let Some(endpoint) = self.quic {
            endpoint.wait_idle().await;
        }
    }
}

impl Shared {
    /// A share of `max_handshakes` for a connection from `peer`, or `None` (counted, logged)
    /// when all are taken.
    pub(crate) fn handshake_slot(&self, peer: &SocketAddr) -> Option<OwnedSemaphorePermit> {
        match Arc::clone(&self.handshakes).try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                self.ctx
                    .metrics
                    .handshake_failed("ingress", "handshake_limit");
                tracing::warn!(%peer, limit = self.cfg.max_handshakes, "too many handshakes in progress; connection refused");
                None
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_tcp(
    shared: Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    handshake: OwnedSemaphorePermit,
    socket: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
) {
    let metrics = &shared.ctx.metrics;
    let _ = socket.set_nodelay(true);
    let tls = match timeout(shared.cfg.handshake_timeout.get(), acceptor.accept(socket)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            // A bare TCP connect (a load balancer's or kubelet's probe): not worth a warning.
            metrics.handshake_failed("ingress", "eof");
            tracing::debug!(%peer, "connection closed before a TLS handshake");
            return;
        }
        Ok(Err(e)) => {
            let reason = handshake_reason(&e);
            metrics.handshake_failed("ingress", reason);
            tracing::warn!(%peer, reason, error = %e, "tunnel handshake refused");
            return;
        }
        Err(_) => {
            metrics.handshake_failed("ingress", "timeout");
            tracing::warn!(%peer, "tunnel handshake timed out");
            return;
        }
    };
    let caller = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        Some(cert) => match isthmus_certs::spiffe_id_of(cert) {
            Ok(id) => id,
            Err(e) => {
                metrics.handshake_failed("ingress", "no_spiffe_id");
                tracing::warn!(%peer, error = %e, "tunnel peer has no SPIFFE ID");
                return;
            }
        },
        None => return,
    };
    let cfg = &shared.cfg;
    let (tls, heard) = Heard::new(tls);
    let mut conn = match h2::server::Builder::new()
        .initial_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_concurrent_streams(cfg.max_streams_per_connection)
        .max_header_list_size(cfg.max_header_bytes)
        .max_send_buffer_size(256 * 1024)
        .handshake::<_, Bytes>(tls)
        .await
    {
        Ok(conn) => conn,
        Err(e) => {
            metrics.handshake_failed("ingress", "h2");
            tracing::warn!(%peer, %caller, error = %e, "tunnel h2 handshake failed");
            return;
        }
    };
    drop(handshake);
    let gauge = metrics
        .ingress_connections
        .get_or_create(&PoolLabels {
            peer_cluster: caller.cluster().unwrap_or("unknown").to_string(),
            transport: "tcp",
        })
        .clone();
    gauge.inc();
    tracing::debug!(%peer, %caller, "tunnel connection up");
    let streams = Arc::new(AtomicUsize::new(0));
    // An egress that vanished without a reset (host gone, partition) is noticed here, and
    // its streams' backend connections are closed, instead of waiting on TCP retransmits.
    let mut watchdog = conn
        .ping_pong()
        .map(|pings| Watchdog::new(heard, pings, liveness(cfg)));
    let mut idle = tokio::time::interval(cfg.idle_timeout.get());
    idle.tick().await;
    let mut busy_since_tick = false;
    let mut draining = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    busy_since_tick = true;
                    let shared = Arc::clone(&shared);
                    let caller = caller.clone();
                    let force = force.clone();
                    let streams = Arc::clone(&streams);
                    streams.fetch_add(1, Ordering::Relaxed);
                    tracker.spawn(async move {
                        h2_stream(shared, caller, peer, request, respond, force).await;
                        streams.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(%peer, %caller, error = %e, "tunnel connection ended with an error");
                    break;
                }
                None => break,
            },
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            _ = idle.tick(), if !draining => {
                if !busy_since_tick && streams.load(Ordering::Relaxed) == 0 {
                    draining = true;
                    conn.graceful_shutdown();
                }
                busy_since_tick = false;
            }
            () = force.cancelled() => break,
            () = silent(watchdog.as_mut()) => {
                tracing::warn!(%peer, %caller, "tunnel connection silent for {:?}: closed as dead", liveness(cfg).dead_after);
                break;
            }
        }
    }
    gauge.dec();
}

/// How the ingress notices a silent egress, on either transport. The egress's own
/// `pool.dead_after` is usually far shorter (it picks how fast a dead ingress is noticed, and
/// its keep-alives keep this side hearing); this reclaims what a vanished egress left behind.
fn liveness(cfg: &IngressConfig) -> crate::Liveness {
    crate::Liveness::after(cfg.dead_after.get())
}

async fn h2_stream(
    shared: Arc<Shared>,
    caller: SpiffeId,
    peer: SocketAddr,
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    force: CancellationToken,
) {
    let authority = request.uri().authority().map(|a| a.as_str().to_string());
    let malformed = if request.method() != http::Method::CONNECT {
        Some(format!("method {}, expected CONNECT", request.method()))
    } else if request.extensions().get::<h2::ext::Protocol>().is_some() {
        Some("extended CONNECT is not supported".to_string())
    } else if authority.is_none() {
        Some("missing :authority".to_string())
    } else {
        None
    };
    let admitted = match (malformed, &authority) {
        (None, Some(authority)) => {
            let forwarded = request
                .headers()
                .get("forwarded")
                .and_then(|v| v.to_str().ok());
            admit(&shared, &caller, authority, forwarded).await
        }
        (why, _) => {
            let refusal = Refusal::BadRequest(why.unwrap_or_default());
            refuse_malformed(&shared, &caller, &refusal);
            Err(refusal)
        }
    };
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => {
            let response = http::Response::builder()
                .status(refusal.status())
                .header("isthmus-reason", refusal.reason())
                .body(())
                .unwrap_or_default();
            let _ = respond.send_response(response, true);
            tracing::debug!(%peer, "refused stream answered");
            return;
        }
    };
    let response = http::Response::builder()
        .status(status::OK)
        .body(())
        .unwrap_or_default();
    let send = match respond.send_response(response, false) {
        Ok(send) => send,
        Err(e) => {
            fail(&shared, &admitted.labels, "caller_gone", &e.to_string());
            admitted.abort();
            return;
        }
    };
    carry(
        &shared,
        admitted,
        Bytes::new(),
        H2Send(send),
        H2Recv(request.into_body()),
        force,
    )
    .await;
}

/// Counts and logs a request refused before it named a route (bad method, bad head).
pub(crate) fn refuse_malformed(shared: &Shared, caller: &SpiffeId, refusal: &Refusal) {
    shared.ctx.metrics.refuse(
        "unknown",
        Direction::Ingress,
        caller.cluster().unwrap_or("unknown"),
        refusal.reason(),
    );
    tracing::warn!(%caller, reason = refusal.reason(), "ingress refused: {refusal}");
}

/// Authorizes, takes a share of the connection limit, and connects a backend. Refusals are
/// counted and logged here, once.
pub(crate) async fn admit(
    shared: &Shared,
    caller: &SpiffeId,
    authority: &str,
    forwarded: Option<&str>,
) -> Result<Admitted, Refusal> {
    let ctx = &shared.ctx;
    let caller_cluster = caller.cluster().unwrap_or("unknown");
    let table = ctx.routes.snapshot();
    let result: Result<_, Refusal> = async {
        // Both before the route is looked up: a draining or not-yet-loaded replica must not
        // give a final answer (404) that another replica would not give.
        if shared
            .shutdown
            .get()
            .is_some_and(CancellationToken::is_cancelled)
        {
            return Err(Refusal::Draining);
        }
        if !ctx.loaded.get() {
            return Err(Refusal::NotReady);
        }
        let route =
            authorize::authorize(&table, &ctx.cluster, &ctx.trust_domain, authority, caller)?;
        let permit = Arc::clone(&shared.limit)
            .try_acquire_owned()
            .map_err(|_| Refusal::Overloaded)?;
        let backend = connect_backend(shared, &route).await?;
        Ok((route, backend, permit))
    }
    .await;
    match result {
        Ok((route, backend, permit)) => Ok(Admitted {
            backend,
            labels: ConnLabels {
                route: route.key.to_string(),
                direction: Direction::Ingress,
                peer_cluster: caller_cluster.to_string(),
            },
            _permit: permit,
        }),
        Err(refusal) => {
            // Label with the route only when it is one we know, never with caller text.
            let route = crate::known_route_label(&table, authority);
            if refusal.is_failure() {
                ctx.metrics
                    .fail(&route, Direction::Ingress, caller_cluster, refusal.reason());
            } else {
                ctx.metrics
                    .refuse(&route, Direction::Ingress, caller_cluster, refusal.reason());
            }
            tracing::warn!(
                %caller,
                authority = %authority.escape_debug(),
                forwarded = forwarded.unwrap_or(""),
                reason = refusal.reason(),
                "ingress refused: {refusal}"
            );
            Err(refusal)
        }
    }
}

impl Admitted {
    /// Gives up on the stream before any byte was carried: the backend sees a reset, not a
    /// connection that was opened and cleanly closed.
    pub(crate) fn abort(self) {
        let _ = self.backend.set_zero_linger();
    }
}

async fn connect_backend(
    shared: &Shared,
    route: &isthmus_route_sync::Route,
) -> Result<TcpStream, Refusal> {
    let n = route.backends.len();
    let start = shared.next_backend.fetch_add(1, Ordering::Relaxed);
    let mut last_error = String::new();
    for i in 0..n {
        let backend = &route.backends[(start + i) % n];
        let attempt = timeout(
            shared.cfg.connect_timeout.get(),
            TcpStream::connect((backend.host(), backend.port())),
        )
        .await;
        match attempt {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last_error = format!("{backend}: {e}"),
            Err(_) => last_error = format!("{backend}: connect timed out"),
        }
        tracing::debug!(route = %route.key, "backend attempt failed: {last_error}");
    }
    Err(Refusal::BackendUnreachable {
        route: route.key.to_string(),
        last_error,
    })
}

/// Pumps an admitted stream to its backend, with metrics, until done or `force`.
pub(crate) async fn carry<S: crate::tunnel::StreamSend, R: crate::tunnel::StreamRecv>(
    shared: &Shared,
    admitted: Admitted,
    first: Bytes,
    send: S,
    recv: R,
    force: CancellationToken,
) {
    let Admitted {
        backend,
        labels,
        _permit,
    } = admitted;
    crate::carry_counted(
        &shared.ctx.metrics,
        labels,
        backend,
        first,
        send,
        recv,
        force,
    )
    .await;
}

fn fail(shared: &Shared, labels: &ConnLabels, reason: &'static str, detail: &str) {
    shared.ctx.metrics.fail(
        &labels.route,
        labels.direction,
        &labels.peer_cluster,
        reason,
    );
    tracing::warn!(route = %labels.route, reason, "ingress stream failed: {detail}");
}
