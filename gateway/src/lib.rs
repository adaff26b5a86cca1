//! The Isthmus gateway: one binary, two roles.
//!
//! - **egress** ([`egress`]) accepts plain TCP from local apps and carries each connection as
//!   one stream over a pooled, multiplexed mutual-TLS tunnel (HTTP/2 CONNECT over TLS over
//!   TCP, or a QUIC stream) to an ingress gateway of the route's home cluster;
//! - **ingress** ([`ingress`]) terminates those tunnels, checks the caller's SPIFFE identity
//!   against the route's policy (deny by default) and connects only to backends of routes
//!   this cluster exports.
//!
//! It must never become an open proxy: the ingress connects only to backends named by an
//! exported route of its own cluster, never to an address a caller supplied. Control-plane
//! work (route table updates, certificate reloads, admin) never runs on the byte path: the
//! data path reads the route table with one atomic load per connection.

pub mod config;
pub mod egress;
pub mod frame;
pub mod ingress;
pub mod metrics;
pub mod peek;
mod refusal;
pub mod server;
pub mod tunnel;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use isthmus_certs::{MeshTls, SpiffeId};
use isthmus_route_sync::{ClusterName, RouteKey, RouteStore, RouteTable};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub use refusal::Refusal;

use metrics::{ConnLabels, HandshakeLabels, Metrics};
use tunnel::pump::{Moved, pump};
use tunnel::{StreamRecv, StreamSend};

/// What both roles share: who we are, the routes, the identity, the metrics.
#[derive(Clone)]
pub struct Context {
    /// This cluster.
    pub cluster: ClusterName,
    /// The mesh trust domain.
    pub trust_domain: String,
    /// The route table.
    pub routes: RouteStore,
    /// This gateway's live identity and trust bundle.
    pub tls: MeshTls,
    /// Metrics.
    pub metrics: Metrics,
    /// Whether `routes` has been loaded since start (source or cache).
    pub loaded: TableLoaded,
}

/// Whether the route table has been loaded, from its source or its cache, since start.
///
/// Until it has, an empty table means "not known yet", not "nothing is exported": the
/// ingress answers `not_ready` (503, which the egress retries on another replica) rather
/// than a final 404, and `/readyz` says not ready.
#[derive(Clone, Debug)]
pub struct TableLoaded(Arc<tokio::sync::watch::Sender<bool>>);

impl TableLoaded {
    /// A flag that starts as `loaded`.
    pub fn new(loaded: bool) -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(loaded)))
    }

    /// Marks the table loaded (for good: a later source outage serves it as stale).
    pub fn set(&self) {
        self.0
            .send_if_modified(|loaded| !std::mem::replace(loaded, true));
    }

    /// Whether the table has been loaded.
    pub fn get(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the table has been loaded.
    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|loaded| *loaded).await;
    }
}

impl Metrics {
    /// Counts a handshake failure.
    pub fn handshake_failed(&self, role: &'static str, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels { role, reason })
            .inc();
    }
}

/// The metric label for a route a caller named: its `name:port` if the table has it, else
/// `unknown`, so caller-chosen text never becomes a label.
pub(crate) fn known_route_label(table: &RouteTable, authority: &str) -> String {
    RouteKey::parse_authority(authority)
        .ok()
        .filter(|k| table.get(k).is_some())
        .map_or_else(|| "unknown".to_string(), |k| k.to_string())
}

/// A short reason for a TLS handshake failure.
pub(crate) fn handshake_reason(e: &std::io::Error) -> &'static str {
    let Some(inner) = e.get_ref() else {
        return "io";
    };
    match inner.downcast_ref::<rustls::Error>() {
        Some(rustls::Error::InvalidCertificate(cert)) => match cert {
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => {
                "expired"
            }
            rustls::CertificateError::NotValidYet
            | rustls::CertificateError::NotValidYetContext { .. } => "not_yet_valid",
            rustls::CertificateError::UnknownIssuer => "unknown_ca",
            rustls::CertificateError::ApplicationVerificationFailure
            | rustls::CertificateError::Other(_) => "refused_identity",
            _ => "bad_certificate",
        },
        Some(rustls::Error::NoCertificatesPresented) => "no_client_certificate",
        Some(rustls::Error::AlertReceived(_)) => "alert_received",
        Some(rustls::Error::NoApplicationProtocol) => "alpn",
        Some(_) => "tls",
        None => "io",
    }
}

/// A short reason for a QUIC handshake failure.
pub(crate) fn quic_handshake_reason(e: &quinn::ConnectionError) -> &'static str {
    match e {
        quinn::ConnectionError::TimedOut => "timeout",
        quinn::ConnectionError::TransportError(_) | quinn::ConnectionError::ConnectionClosed(_) => {
            "tls"
        }
        _ => "io",
    }
}

/// The verified SPIFFE ID of a QUIC peer.
pub(crate) fn quic_peer_id(conn: &quinn::Connection) -> Option<SpiffeId> {
    let identity = conn.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    isthmus_certs::spiffe_id_of(certs.first()?).ok()
}

/// QUIC transport parameters shared by both roles.
pub(crate) fn quic_transport(
    max_streams: u32,
    stream_window: u32,
    connection_window: u32,
    liveness: Liveness,
) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(max_streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(stream_window.into());
    t.receive_window(connection_window.into());
    t.send_window(u64::from(connection_window));
    // Keep-alives well inside the idle timeout keep a pooled connection up while it carries
    // long-lived, quiet streams; the pool closes connections idle of streams itself. The
    // idle timeout is what notices a peer that vanished (a killed replica sends no close;
    // UDP gets no reset).
    t.keep_alive_interval(Some(liveness.keep_alive));
    if let Ok(idle) = quinn::IdleTimeout::try_from(liveness.dead_after) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// How a tunnel connection (QUIC, or HTTP/2 over TLS) keeps itself alive and notices a dead
/// peer.
#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    /// A PING after this long without traffic (QUIC: sent; HTTP/2: heard).
    pub keep_alive: Duration,
    /// Closed as dead after hearing nothing for this long (the lower of both sides' wins).
    pub dead_after: Duration,
}

impl Liveness {
    /// Dead after `dead_after` of silence, keep-alives after a quarter of it.
    pub fn after(dead_after: Duration) -> Self {
        Self {
            keep_alive: dead_after / 4,
            dead_after,
        }
    }
}

/// Pumps one tunneled connection with its metrics: opened/active/closed, bytes, and a
/// failure if it broke mid-stream. `force` aborts it (the drain deadline).
pub(crate) async fn carry_counted<S: StreamSend, R: StreamRecv>(
    metrics: &Metrics,
    labels: ConnLabels,
    socket: TcpStream,
    first: Bytes,
    send: S,
    recv: R,
    force: CancellationToken,
) {
    metrics.opened.get_or_create(&labels).inc();
    let active = metrics.active.get_or_create(&labels).clone();
    active.inc();
    let moved = Arc::new(Moved::default());
    let result = pump(socket, first, send, recv, Arc::clone(&moved), &force).await;
    active.dec();
    let (to_backend, from_backend) = match labels.direction {
        metrics::Direction::Egress => (&moved.into_tunnel, &moved.out_of_tunnel),
        metrics::Direction::Ingress => (&moved.out_of_tunnel, &moved.into_tunnel),
    };
    let to_backend = to_backend.load(std::sync::atomic::Ordering::Relaxed);
    let from_backend = from_backend.load(std::sync::atomic::Ordering::Relaxed);
    metrics
        .bytes_to_backend
        .get_or_create(&labels)
        .inc_by(to_backend);
    metrics
        .bytes_from_backend
        .get_or_create(&labels)
        .inc_by(from_backend);
    metrics.closed.get_or_create(&labels).inc();
    if let Err(e) = result {
        metrics.fail(
            &labels.route,
            labels.direction,
            &labels.peer_cluster,
            "stream_error",
        );
        tracing::info!(route = %labels.route, direction = ?labels.direction, "tunneled connection broke: {e}");
    }
}
