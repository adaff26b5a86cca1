//! The admin HTTP endpoint: `/healthz`, `/readyz` and `/metrics`.
//!
//! Admin is control plane. It runs on the same tokio runtime as the data plane, so it is built
//! to cost the data plane nothing: handlers are synchronous and short (a mutex held for a field
//! copy, one text encoding of the registry), no lock is held across an `.await`, a slow client
//! is cut off by a header read timeout, and connections get a bounded drain at shutdown.
//!
//! | route         | answer                                                        |
//! |---------------|---------------------------------------------------------------|
//! | `GET /healthz`| `200 ok` (`ok (stale)` while serving last-known-good data)    |
//! | `GET /readyz` | `200 ready`, or `503 not ready: <reason>`                     |
//! | `GET /metrics`| `200` with the registry: OpenMetrics text when the `Accept`   |
//! |               | header asks for it (as Prometheus does), else Prometheus text |
//! |               | format 0.0.4 (`curl`, `promtool check metrics`, older agents) |
//! | other path    | `404`                                                         |
//! | other method  | `405` on the paths above                                      |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, ALLOW, CONTENT_TYPE, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long a client may take to send its request headers, unless
/// [`AdminServer::with_header_read_timeout`] says otherwise.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// After cancellation, how long open connections get to finish their current response before
/// they are dropped.
const CONNECTION_DRAIN: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

const TEXT: &str = "text/plain; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Health a process reports on `/healthz` and `/readyz`; cheap to clone, all clones share state.
///
/// A process that answers at all is live, so there is no liveness switch. Readiness starts false
/// with reason `starting`; the process calls [`Health::set_ready`] once it can serve.
#[derive(Debug, Clone)]
pub struct Health {
    state: Arc<Mutex<HealthState>>,
}

#[derive(Debug)]
struct HealthState {
    /// `None` when ready; otherwise why not.
    not_ready: Option<String>,
    /// Serving last-known-good data because the source of fresh data is unavailable.
    stale: bool,
}

impl Health {
    /// Live, not ready (reason `starting`), not stale.
    pub fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(HealthState {
                not_ready: Some("starting".to_owned()),
                stale: false,
            })),
        }
    }

    /// `/readyz` answers 200 from now on.
    pub fn set_ready(&self) {
        self.lock().not_ready = None;
    }

    /// `/readyz` answers 503 with `reason` from now on.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        self.lock().not_ready = Some(reason.into());
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.lock().not_ready.is_none()
    }

    /// Why the process is not ready, or `None` if it is.
    pub fn not_ready_reason(&self) -> Option<String> {
        self.lock().not_ready.clone()
    }

    /// Marks whether the process is serving last-known-good data. Stale is still healthy and
    /// does not change readiness (restarting would lose the data being served); `/healthz` says
    /// `ok (stale)` so that an operator can see it.
    pub fn set_stale(&self, stale: bool) {
        self.lock().stale = stale;
    }

    /// Whether the process is serving last-known-good data.
    pub fn is_stale(&self) -> bool {
        self.lock().stale
    }

    fn lock(&self) -> MutexGuard<'_, HealthState> {
        // The state is two plain fields, valid after any panic, so a poisoned lock is still good.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

/// The admin HTTP server, bound and ready to [`serve`](AdminServer::serve).
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    header_read_timeout: Duration,
    state: Arc<State>,
}

#[derive(Debug)]
struct State {
    registry: Arc<Registry>,
    health: Health,
}

impl AdminServer {
    /// Binds `addr` (port 0 picks a free port; see [`local_addr`](AdminServer::local_addr)).
    ///
    /// # Errors
    ///
    /// The bind error, e.g. address in use or permission denied.
    pub async fn bind(
        addr: SocketAddr,
        registry: Arc<Registry>,
        health: Health,
    ) -> std::io::Result<AdminServer> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        Ok(Self {
            listener,
            local_addr,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            state: Arc::new(State { registry, health }),
        })
    }

    /// Sets how long a client may take to send its request headers before the connection is
    /// closed (default [`DEFAULT_HEADER_READ_TIMEOUT`]).
    #[must_use]
    pub fn with_header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `cancel` fires, then stops accepting, lets open connections finish their
    /// current response (closing idle keep-alive ones at once), and returns.
    pub async fn serve(self, cancel: CancellationToken) {
        let Self {
            listener,
            local_addr,
            header_read_timeout,
            state,
        } = self;
        tracing::info!(%local_addr, "admin server listening");
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                // Reap finished connections as we go so the set does not grow without bound.
                Some(joined) = connections.join_next() => log_panic(joined),
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        connections.spawn(serve_connection(
                            stream,
                            peer,
                            Arc::clone(&state),
                            header_read_timeout,
                            cancel.clone(),
                        ));
                    }
                    Err(error) => {
                        tracing::warn!(%local_addr, %error, "admin accept failed; continuing");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    }
                },
            }
        }
        drop(listener);
        // Every connection saw the same token and is closing gracefully; bound how long that may
        // take so a client that stops reading cannot hold shutdown up.
        let drained = tokio::time::timeout(CONNECTION_DRAIN, async {
            while let Some(joined) = connections.join_next().await {
                log_panic(joined);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                remaining = connections.len(),
                "admin connections still open after drain; closing them"
            );
            connections.shutdown().await;
        }
        tracing::info!(%local_addr, "admin server stopped");
    }
}

fn log_panic(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined
        && error.is_panic()
    {
        tracing::error!(%error, "admin connection task panicked");
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    header_read_timeout: Duration,
    cancel: CancellationToken,
) {
    let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let openmetrics = request
            .headers()
            .get_all(ACCEPT)
            .iter()
            .any(|v| v.to_str().is_ok_and(wants_openmetrics));
        let response = respond(&state, request.method(), request.uri().path(), openmetrics);
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = cancel.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        // Timeouts and resets are what clients do; not worth more than debug.
        tracing::debug!(%peer, %error, "admin connection ended with an error");
    }
}

/// The whole routing table; synchronous so it cannot hold the runtime up.
fn respond(state: &State, method: &Method, path: &str, openmetrics: bool) -> Response<Full<Bytes>> {
    if !matches!(path, "/healthz" | "/readyz" | "/metrics") {
        return text(StatusCode::NOT_FOUND, "not found\n".to_owned());
    }
    if method != Method::GET {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".to_owned(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    match path {
        "/healthz" if state.health.is_stale() => text(StatusCode::OK, "ok (stale)\n".to_owned()),
        "/healthz" => text(StatusCode::OK, "ok\n".to_owned()),
        "/readyz" => match state.health.not_ready_reason() {
            None => text(StatusCode::OK, "ready\n".to_owned()),
            Some(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
        _ => metrics(&state.registry, openmetrics),
    }
}

/// Whether an `Accept` value lists OpenMetrics text with a non-zero quality.
fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let kind = parts.next().unwrap_or("");
        kind.eq_ignore_ascii_case("application/openmetrics-text")
            && !parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            })
    })
}

fn metrics(registry: &Registry, openmetrics: bool) -> Response<Full<Bytes>> {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) if openmetrics => with_type(StatusCode::OK, OPENMETRICS, body),
        Ok(()) => with_type(
            StatusCode::OK,
            PROMETHEUS_TEXT,
            crate::metrics::prometheus_text(&body),
        ),
        Err(error) => {
            // Only a custom metric's encoder can fail; say so instead of sending half a page.
            tracing::error!(%error, "cannot encode metrics");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode metrics\n".to_owned(),
            )
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_type(status, TEXT, body)
}

fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_when_asked_for() {
        // What Prometheus 2.x sends by default.
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
             version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(wants_openmetrics("Application/OpenMetrics-Text"));
        assert!(!wants_openmetrics("application/openmetrics-text;q=0"));
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics("*/*"));
    }

    #[test]
    fn health_starts_live_but_not_ready() {
        let health = Health::new();
        assert!(!health.is_ready());
        assert_eq!(health.not_ready_reason().as_deref(), Some("starting"));
        assert!(!health.is_stale());

        let clone = health.clone();
        clone.set_ready();
        assert!(health.is_ready());
        assert_eq!(health.not_ready_reason(), None);
        clone.set_not_ready("route-sync disconnected");
        assert_eq!(
            health.not_ready_reason().as_deref(),
            Some("route-sync disconnected")
        );
        clone.set_stale(true);
        assert!(health.is_stale());
    }
}
