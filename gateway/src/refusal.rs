//! Why a tunneled connection was refused or failed, with its wire status and metric reason.

use crate::tunnel::status;

/// A connection the gateway would not or could not carry. Each is counted under
/// [`Refusal::reason`] and logged once with its `Display` text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The request is malformed: not CONNECT, a bad head, or an authority that is not a
    /// route name with a port (IP literals and `localhost` land here).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// No route by that name and port is homed in this cluster and exported.
    #[error("route {0} is not exported by this cluster")]
    NotExported(String),
    /// The caller's identity is not among the route's allowed peers.
    #[error("{caller} is not allowed to reach {route}")]
    Denied {
        /// The route.
        route: String,
        /// The verified SPIFFE ID of the caller.
        caller: String,
    },
    /// The route has no backend in this cluster.
    #[error("route {0} has no backend")]
    NoBackend(String),
    /// Every backend of the route refused or timed out.
    #[error("no backend of {route} could be reached: {last_error}")]
    BackendUnreachable {
        /// The route.
        route: String,
        /// The last connect error.
        last_error: String,
    },
    /// The gateway is at its connection limit.
    #[error("connection limit reached")]
    Overloaded,
    /// (ingress) The route table is not loaded yet (route-sync not answered, no cache): a
    /// "not exported" now could be wrong, so the caller should try another replica.
    #[error("the route table is not loaded yet")]
    NotReady,
    /// (ingress) The gateway is draining: it takes no new streams; another replica should.
    #[error("draining: no new streams")]
    Draining,
    /// (egress) The connection matched no route: no VIP, Host or SNI that names one.
    #[error("no route for this connection: {0}")]
    NoRoute(String),
    /// (egress) The route is homed in this cluster; its callers should reach it directly.
    #[error("route {0} is homed in this cluster, not tunnelled")]
    LocalRoute(String),
    /// (egress) No peer cluster is configured for the route's home.
    #[error("no peer configured for cluster {cluster} (route {route})")]
    NoPeer {
        /// The route.
        route: String,
        /// Its home cluster.
        cluster: String,
    },
    /// (egress) Every ingress endpoint of the home cluster failed.
    #[error("no ingress of cluster {cluster} could carry {route}: {last_error}")]
    PeerUnreachable {
        /// The route.
        route: String,
        /// Its home cluster.
        cluster: String,
        /// The last error.
        last_error: String,
    },
    /// (egress) The remote ingress refused the stream with this status.
    #[error("ingress refused {route} with status {status}")]
    RemoteRefused {
        /// The route.
        route: String,
        /// The status it answered.
        status: u16,
    },
}

impl Refusal {
    /// The status an ingress answers with.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::BadRequest(_) | Refusal::NoRoute(_) => status::BAD_REQUEST,
            Refusal::Denied { .. } => status::DENIED,
            Refusal::NotExported(_) | Refusal::LocalRoute(_) | Refusal::NoPeer { .. } => {
                status::NOT_FOUND
            }
            Refusal::Overloaded => status::OVERLOADED,
            Refusal::NotReady | Refusal::Draining => status::UNAVAILABLE,
            Refusal::NoBackend(_)
            | Refusal::BackendUnreachable { .. }
            | Refusal::PeerUnreachable { .. } => status::UNAVAILABLE,
            Refusal::RemoteRefused { status, .. } => *status,
        }
    }

    /// The fixed metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadRequest(_) => "bad_request",
            Refusal::NotExported(_) => "not_exported",
            Refusal::Denied { .. } => "denied",
            Refusal::NoBackend(_) => "no_backend",
            Refusal::BackendUnreachable { .. } => "backend_unreachable",
            Refusal::Overloaded => "overloaded",
            Refusal::NotReady => "not_ready",
            Refusal::Draining => "draining",
            Refusal::NoRoute(_) => "no_route",
            Refusal::LocalRoute(_) => "local_route",
            Refusal::NoPeer { .. } => "no_peer",
            Refusal::PeerUnreachable { .. } => "peer_unreachable",
            Refusal::RemoteRefused { status, .. } => match *status {
                status::BAD_REQUEST => "remote_bad_request",
                status::DENIED => "remote_denied",
                status::NOT_FOUND => "remote_not_exported",
                status::OVERLOADED => "remote_overloaded",
                status::UNAVAILABLE => "remote_unavailable",
                _ => "remote_refused",
            },
        }
    }

    /// Whether this is a failure to carry (counted as failed) rather than a policy or
    /// validation refusal (counted as refused).
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Refusal::BackendUnreachable { .. }
                | Refusal::PeerUnreachable { .. }
                | Refusal::NoBackend(_)
        ) || matches!(self, Refusal::RemoteRefused { status, .. } if *status == status::UNAVAILABLE)
    }
}
