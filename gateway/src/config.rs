//! The gateway's configuration file.
//!
//! ```yaml
//! cluster: diego                 # this cluster, as in SPIFFE IDs and route home clusters
//! trust_domain: mesh.local
//! tls: {cert: certs/cert.pem, key: certs/key.pem, bundle: certs/ca.pem}
//! routes: {file: routes.yaml}
//! admin: {listen: "127.0.0.1:15020"}
//! ingress: {listen: "0.0.0.0:15008", quic: true, allowed_callers: [gateway]}
//! egress:
//!   peers:
//!     - {cluster: k8s, endpoints: ["10.0.8.5:15008", "10.0.8.6:15008"], transport: quic}
//!   listen_address: 0.0.0.0      # one listener per port of any route (VIP, Host, SNI)
//!   vip_range: 100.64.0.0/16     # addresses here are VIPs: never peeked
//!   bind_vips: false             # true: also one listener per route vip:port
//!   bind_egress_ports: false     # true: one listener per route egress_port (Kubernetes mirror)
//!   dedicated:
//!     - {listen: "127.0.0.1:18080", route: "orders.apps.internal:8080"}
//! ```
//!
//! Parsing has no side effects; [`Validate`] checks what serde cannot. Tests build these
//! structs as values (every section has a `Default`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use isthmus_route_sync::{ClusterName, RouteKey};
use isthmus_runtime::config::{FieldError, HumanDuration, TlsConfig, Validate};
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// This cluster's name (`diego`, `k8s`): the `<cluster>` of SPIFFE IDs and the
    /// `home_cluster` of routes served here.
    pub cluster: String,
    /// The mesh trust domain (`mesh.local`).
    pub trust_domain: String,
    /// This gateway's identity and trust bundle.
    pub tls: TlsConfig,
    /// Where routes come from.
    pub routes: RoutesConfig,
    /// The admin server.
    #[serde(default)]
    pub admin: AdminConfig,
    /// How long in-flight connections may run after SIGTERM before they are closed.
    #[serde(default = "default_drain")]
    pub drain_timeout: HumanDuration,
    /// The ingress role; absent means this gateway does not accept tunnels.
    #[serde(default)]
    pub ingress: Option<IngressConfig>,
    /// The egress role; absent means this gateway does not carry local apps out.
    #[serde(default)]
    pub egress: Option<EgressConfig>,
}

fn default_drain() -> HumanDuration {
    HumanDuration::from_secs(30)
}

fn default_poll() -> HumanDuration {
    HumanDuration::from_millis(500)
}

/// The route source: a file, or the cluster's route-sync (exactly one).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesConfig {
    /// A YAML route file (see `isthmus_route_sync::source::file`).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// How often the file is checked for changes.
    #[serde(default = "default_poll")]
    pub poll_interval: HumanDuration,
    /// This cluster's route-sync.
    #[serde(default)]
    pub route_sync: Option<RouteSyncSourceConfig>,
}

/// Following the local route-sync.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSyncSourceConfig {
    /// Its replicas' gRPC addresses, tried in turn.
    pub endpoints: Vec<SocketAddr>,
    /// Where the last table is kept, served (marked stale) after a restart until route-sync
    /// answers.
    #[serde(default)]
    pub cache: Option<PathBuf>,
}

/// The admin server (`/healthz`, `/readyz`, `/metrics`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to listen on.
    #[serde(default = "default_admin")]
    pub listen: SocketAddr,
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15020))
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin(),
        }
    }
}

/// The ingress role: terminates tunnels from other clusters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressConfig {
    /// Tunnel address: TCP (TLS, h2 CONNECT) and, with `quic`, UDP on the same port.
    #[serde(default = "default_tunnel")]
    pub listen: SocketAddr,
    /// Also accept QUIC on the same port number over UDP.
    #[serde(default = "yes")]
    pub quic: bool,
    /// Components of the trust domain (any cluster) whose certificates may open a tunnel
    /// connection, checked at the TLS handshake, e.g. `[gateway]`. Only gateways call an
    /// ingress in the mesh, so any other component's certificate (a DNS shim's, say) is
    /// refused before it can ask for a route; each route's `allowed_peers` then decides per
    /// stream as before. Add a component here only for a caller that needs tunnels.
    #[serde(default = "default_allowed_callers")]
    pub allowed_callers: Vec<CallerComponent>,
    /// Time allowed for one backend connect attempt.
    #[serde(default = "default_connect")]
    pub connect_timeout: HumanDuration,
    /// Time allowed for a TLS or QUIC handshake (slowloris guard).
    #[serde(default = "default_handshake")]
    pub handshake_timeout: HumanDuration,
    /// Time allowed for a QUIC stream's request head to arrive.
    #[serde(default = "default_handshake")]
    pub request_timeout: HumanDuration,
    /// Concurrent streams one tunnel connection may open.
    #[serde(default = "default_server_streams")]
    pub max_streams_per_connection: u32,
    /// Concurrent tunneled connections, all callers together; beyond it streams get 429.
    #[serde(default = "default_max_conns")]
    pub max_connections: usize,
    /// TLS and QUIC handshakes in progress at once, both transports together. A connection
    /// arriving beyond it is refused at once (TCP reset; QUIC refused) and counted as a
    /// handshake failure `handshake_limit`, so a flood of slow or bogus handshakes cannot
    /// take the CPU and memory that the tunnels in use need. Egresses retry another replica.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// Largest request header block accepted, in bytes.
    #[serde(default = "default_header")]
    pub max_header_bytes: u32,
    /// Flow-control window per stream, in bytes.
    #[serde(default = "default_stream_window")]
    pub stream_window: u32,
    /// Flow-control window per tunnel connection, in bytes.
    #[serde(default = "default_conn_window")]
    pub connection_window: u32,
    /// A tunnel connection with no stream for this long is closed.
    #[serde(default = "default_idle")]
    pub idle_timeout: HumanDuration,
    /// A tunnel connection that hears nothing from its egress for this long (an egress host
    /// gone, a partition: no reset arrives) is closed with its streams and their backend
    /// connections; a PING goes out after a quarter of it in silence. The egress notices a
    /// dead ingress far sooner, with its own `pool.dead_after`.
    #[serde(default = "default_ingress_dead_after")]
    pub dead_after: HumanDuration,
}

fn default_ingress_dead_after() -> HumanDuration {
    HumanDuration::from_secs(30)
}

/// A component name in `ingress.allowed_callers`, checked as it is parsed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct CallerComponent(pub isthmus_certs::Component);

impl TryFrom<String> for CallerComponent {
    type Error = String;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        isthmus_certs::Component::parse(&name)
            .map(CallerComponent)
            .map_err(|_| {
                format!(
                    "{name:?} is not a component name: expected one path segment of \
                     letters, digits, '.', '-' and '_', such as gateway"
                )
            })
    }
}

impl IngressConfig {
    /// The handshake-level policy: the allowed components of any cluster of `trust_domain`.
    pub fn caller_policy(&self, trust_domain: &str) -> isthmus_certs::PeerPolicy {
        isthmus_certs::PeerPolicy::components(
            trust_domain,
            None,
            self.allowed_callers.iter().map(|c| c.0.clone()),
        )
    }
}

fn default_allowed_callers() -> Vec<CallerComponent> {
    vec![CallerComponent(isthmus_certs::Component::GATEWAY)]
}

fn yes() -> bool {
    true
}
fn default_tunnel() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15008))
}
fn default_connect() -> HumanDuration {
    HumanDuration::from_secs(2)
}
fn default_handshake() -> HumanDuration {
    HumanDuration::from_secs(5)
}
fn default_server_streams() -> u32 {
    200
}
fn default_client_streams() -> u32 {
    100
}
fn default_max_conns() -> usize {
    20_000
}
fn default_max_handshakes() -> usize {
    256
}
fn default_header() -> u32 {
    16 * 1024
}
fn default_stream_window() -> u32 {
    4 * 1024 * 1024
}
fn default_conn_window() -> u32 {
    16 * 1024 * 1024
}
fn default_idle() -> HumanDuration {
    HumanDuration::from_secs(300)
}
fn default_route_wait() -> HumanDuration {
    HumanDuration::from_secs(1)
}
fn default_peek_bytes() -> usize {
    16 * 1024
}
fn default_bind_vips() -> bool {
    false
}
fn default_bind_egress_ports() -> bool {
    false
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            listen: default_tunnel(),
            quic: true,
            allowed_callers: default_allowed_callers(),
            connect_timeout: default_connect(),
            handshake_timeout: default_handshake(),
            request_timeout: default_handshake(),
            max_streams_per_connection: default_server_streams(),
            max_connections: default_max_conns(),
            max_handshakes: default_max_handshakes(),
            max_header_bytes: default_header(),
            stream_window: default_stream_window(),
            connection_window: default_conn_window(),
            idle_timeout: default_idle(),
            dead_after: default_ingress_dead_after(),
        }
    }
}

/// How the egress reaches a peer cluster's ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// TLS over TCP, HTTP/2 CONNECT.
    #[default]
    Tcp,
    /// QUIC, one bidirectional stream per connection.
    Quic,
}

/// A peer cluster's ingress endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer cluster's name: routes homed there go to these endpoints.
    pub cluster: String,
    /// Its ingress gateways' tunnel addresses, tried in turn.
    pub endpoints: Vec<SocketAddr>,
    /// tcp or quic.
    #[serde(default)]
    pub transport: Transport,
    /// With `quic`, fall back to tcp for an endpoint whose QUIC handshake fails (UDP blocked).
    #[serde(default = "yes")]
    pub fallback_to_tcp: bool,
}

/// A listener bound to one route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedicatedListener {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The route every connection to it goes to, `name:port`.
    pub route: String,
}

/// The egress role: carries local apps' connections to other clusters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// Peer clusters and their ingress endpoints.
    pub peers: Vec<PeerConfig>,
    /// Bind one shared listener on this address for every port any route uses (local ones
    /// too, so a route moving away finds its port open). A connection's route is the route
    /// whose VIP it arrived on (a wildcard address catches VIP traffic routed to the host),
    /// else the one its HTTP/1.x Host header or TLS SNI names; raw TCP on a shared address
    /// that is no VIP is refused (`unidentified`).
    #[serde(default)]
    pub listen_address: Option<IpAddr>,
    /// The CIDR route-sync assigns VIPs from. An address in it is taken as a VIP: it is
    /// never peeked, and a connection to one that no route carries (yet) waits `route_wait`
    /// for the table, then is refused (`unknown_vip`). The VIPs themselves come only from
    /// the routes' `vip` field. Absent: only addresses that are some route's VIP count.
    #[serde(default)]
    pub vip_range: Option<String>,
    /// Also bind one listener on each route's `vip:port` (local routes too), following the
    /// table, for hosts where a wildcard `listen_address` cannot catch VIP traffic (several
    /// test worlds on one machine, each on its own loopback addresses). Needs the VIPs to be
    /// local addresses of the host; `listen_address`, if set, must then be a specific address.
    #[serde(default = "default_bind_vips")]
    pub bind_vips: bool,
    /// Bind one listener on `listen_address:<egress_port>` for every route carrying an
    /// `egress_port` (route-sync's mirror Services on Kubernetes give each imported route
    /// one: the Service's target port), following the table. A connection on such a
    /// listener is for the route owning that port; one on a port no route owns (yet) waits
    /// `route_wait` for the table, then is refused (`unknown_egress_port`). kube-proxy
    /// translates a call to the mirror Service's ClusterIP to this pod's address and the
    /// target port, so the port is all the egress sees of which route was called. Needs
    /// `listen_address`.
    #[serde(default = "default_bind_egress_ports")]
    pub bind_egress_ports: bool,
    /// Listeners bound to one route each.
    #[serde(default)]
    pub dedicated: Vec<DedicatedListener>,
    /// Time allowed for a Host header or SNI to arrive on a shared listener.
    #[serde(default = "default_handshake")]
    pub peek_timeout: HumanDuration,
    /// Bytes read at most to find a Host header or SNI.
    #[serde(default = "default_peek_bytes")]
    pub peek_max_bytes: usize,
    /// How long a connection for a route this gateway does not know as remote (yet) waits
    /// for the route table to catch up before it is refused. The DNS shim and the egress
    /// follow route-sync separately; when a route moves here to another cluster, the shim
    /// may answer with the egress a moment before the egress's own table has moved.
    #[serde(default = "default_route_wait")]
    pub route_wait: HumanDuration,
    /// Concurrent app connections; beyond it new ones are closed at once.
    #[serde(default = "default_max_conns")]
    pub max_connections: usize,
    /// The tunnel connection pool.
    #[serde(default)]
    pub pool: PoolConfig,
}

/// Pooled tunnel connections to peer ingresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Streams per pooled connection before another is opened.
    #[serde(default = "default_client_streams")]
    pub max_streams_per_connection: u32,
    /// A pooled connection with no stream for this long is closed.
    #[serde(default = "default_idle")]
    pub idle_timeout: HumanDuration,
    /// Time allowed for a TCP connect to an ingress.
    #[serde(default = "default_connect")]
    pub connect_timeout: HumanDuration,
    /// Time allowed for the TLS or QUIC handshake with an ingress.
    #[serde(default = "default_handshake")]
    pub handshake_timeout: HumanDuration,
    /// Time allowed for the ingress to answer a stream's request.
    #[serde(default = "default_handshake")]
    pub response_timeout: HumanDuration,
    /// Flow-control window per stream, in bytes.
    #[serde(default = "default_stream_window")]
    pub stream_window: u32,
    /// Flow-control window per connection, in bytes.
    #[serde(default = "default_conn_window")]
    pub connection_window: u32,
    /// A tunnel connection (QUIC or TCP) that hears nothing from its ingress for this long
    /// is closed as dead, and its endpoint tried after the others for a while; keep-alives
    /// (QUIC PING frames, HTTP/2 PINGs) go out after a quarter of it in silence. A killed
    /// replica sends no close over UDP, and a vanished host or a partition sends no TCP reset
    /// either, so this is how fast the pool moves to another replica. Streams of a connection declared dead
    /// break, so keep it above the worst pause the link between the clusters may have.
    #[serde(default = "default_dead_after")]
    pub dead_after: HumanDuration,
}

fn default_dead_after() -> HumanDuration {
    HumanDuration::from_secs(1)
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams_per_connection: default_client_streams(),
            idle_timeout: default_idle(),
            connect_timeout: default_connect(),
            handshake_timeout: default_handshake(),
            response_timeout: default_handshake(),
            stream_window: default_stream_window(),
            connection_window: default_conn_window(),
            dead_after: default_dead_after(),
        }
    }
}

impl EgressConfig {
    /// An egress with these peers and nothing else configured.
    pub fn with_peers(peers: Vec<PeerConfig>) -> Self {
        Self {
            peers,
            listen_address: None,
            vip_range: None,
            bind_vips: default_bind_vips(),
            bind_egress_ports: default_bind_egress_ports(),
            dedicated: Vec::new(),
            peek_timeout: default_handshake(),
            peek_max_bytes: default_peek_bytes(),
            route_wait: default_route_wait(),
            max_connections: default_max_conns(),
            pool: PoolConfig::default(),
        }
    }
}

/// h2 accepts windows of 65,535 ..= 2^31-1 bytes.
fn check_window(field: &str, value: u32) -> Result<(), FieldError> {
    if (65_535..=i32::MAX as u32).contains(&value) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            "a window of 65535 to 2147483647 bytes",
        ))
    }
}

fn check_positive(field: &str, value: u64) -> Result<(), FieldError> {
    if value > 0 {
        Ok(())
    } else {
        Err(FieldError::new(field, "a number above 0"))
    }
}

impl Validate for GatewayConfig {
    fn validate(&self) -> Result<(), FieldError> {
        ClusterName::parse(&self.cluster)
            .map_err(|_| FieldError::new("cluster", "1 to 63 characters of a-z, 0-9 and '-'"))?;
        isthmus_certs::SpiffeId::for_component(&self.trust_domain, &self.cluster, "gateway")
            .map_err(|_| {
                FieldError::new("trust_domain", "a trust domain of a-z, 0-9, '.', '-', '_'")
            })?;
        match (&self.routes.file, &self.routes.route_sync) {
            (Some(_), None) => {}
            (None, Some(rs)) if !rs.endpoints.is_empty() => {}
            (None, Some(_)) => {
                return Err(FieldError::new(
                    "routes.route_sync.endpoints",
                    "at least one route-sync address",
                ));
            }
            _ => {
                return Err(FieldError::new(
                    "routes",
                    "exactly one of `file` or `route_sync`",
                ));
            }
        }
        if self.ingress.is_none() && self.egress.is_none() {
            return Err(FieldError::new(
                "ingress",
                "an `ingress` or an `egress` section (or both): a gateway needs a role",
            ));
        }
        if let Some(ingress) = &self.ingress {
            check_window("ingress.stream_window", ingress.stream_window)?;
            check_window("ingress.connection_window", ingress.connection_window)?;
            check_positive(
                "ingress.max_streams_per_connection",
                ingress.max_streams_per_connection.into(),
            )?;
            check_positive("ingress.max_connections", ingress.max_connections as u64)?;
            check_positive("ingress.max_handshakes", ingress.max_handshakes as u64)?;
            if ingress.dead_after.get() < std::time::Duration::from_millis(100) {
                return Err(FieldError::new("ingress.dead_after", "at least 100ms"));
            }
            if ingress.allowed_callers.is_empty() {
                return Err(FieldError::new(
                    "ingress.allowed_callers",
                    "at least one component, e.g. [gateway]: an empty list admits nobody",
                ));
            }
        }
        if let Some(egress) = &self.egress {
            egress.validate().map_err(|e| e.within("egress"))?;
        }
        Ok(())
    }
}

impl Validate for EgressConfig {
    fn validate(&self) -> Result<(), FieldError> {
        for (i, peer) in self.peers.iter().enumerate() {
            let at = format!("peers[{i}]");
            ClusterName::parse(&peer.cluster).map_err(|_| {
                FieldError::new(
                    format!("{at}.cluster"),
                    "1 to 63 characters of a-z, 0-9 and '-'",
                )
            })?;
            if peer.endpoints.is_empty() {
                return Err(FieldError::new(
                    format!("{at}.endpoints"),
                    "at least one ingress address",
                ));
            }
            if self.peers[..i].iter().any(|p| p.cluster == peer.cluster) {
                return Err(FieldError::new(
                    format!("{at}.cluster"),
                    "each peer cluster listed once",
                ));
            }
        }
        for (i, d) in self.dedicated.iter().enumerate() {
            RouteKey::parse_authority(&d.route).map_err(|_| {
                FieldError::new(
                    format!("dedicated[{i}].route"),
                    "a route as name:port, e.g. orders.apps.internal:8080",
                )
            })?;
        }
        if let Some(range) = &self.vip_range {
            isthmus_route_sync::vip::VipRange::parse(range)
                .map_err(|_| FieldError::new("vip_range", "a CIDR such as 100.64.0.0/16"))?;
            if self.listen_address.is_none() && !self.bind_vips {
                return Err(FieldError::new(
                    "listen_address",
                    "an address to bind (e.g. 0.0.0.0), or bind_vips: true, when vip_range is set",
                ));
            }
        }
        if self.bind_vips && self.listen_address.is_some_and(|a| a.is_unspecified()) {
            return Err(FieldError::new(
                "listen_address",
                "a specific address (or none) with bind_vips: true; a wildcard address \
                 already holds every port, so per-VIP listeners could not bind",
            ));
        }
        if self.bind_egress_ports && self.listen_address.is_none() {
            return Err(FieldError::new(
                "listen_address",
                "an address to bind the egress-port listeners on (e.g. 0.0.0.0) with \
                 bind_egress_ports: true",
            ));
        }
        if self.pool.dead_after.get() < std::time::Duration::from_millis(100) {
            return Err(FieldError::new("pool.dead_after", "at least 100ms"));
        }
        if self.peek_max_bytes < 512 {
            return Err(FieldError::new("peek_max_bytes", "at least 512 bytes"));
        }
        check_positive("max_connections", self.max_connections as u64)?;
        check_positive(
            "pool.max_streams_per_connection",
            self.pool.max_streams_per_connection.into(),
        )?;
        check_window("pool.stream_window", self.pool.stream_window)?;
        check_window("pool.connection_window", self.pool.connection_window)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses and validates an egress section as the file gives it (`peers: []` added).
    fn egress(yaml: &str) -> Result<EgressConfig, String> {
        let text = format!("peers: []\n{yaml}");
        isthmus_runtime::config::from_str::<EgressConfig>(&text, std::path::Path::new("g.yaml"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn vip_options_are_validated() {
        assert!(
            !EgressConfig::with_peers(Vec::new()).bind_vips,
            "off by default"
        );
        assert!(egress("listen_address: 0.0.0.0\nvip_range: 100.64.0.0/16").is_ok());
        assert!(egress("bind_vips: true\nvip_range: 127.77.0.0/16").is_ok());
        assert!(egress("bind_vips: true\nlisten_address: 127.0.0.1").is_ok());
        let err = egress("vip_range: 100.64.0.0/16").unwrap_err();
        assert!(
            err.contains("listen_address") && err.contains("bind_vips"),
            "{err}"
        );
        let err = egress("vip_range: 100.64.1.0/16\nlisten_address: 0.0.0.0").unwrap_err();
        assert!(err.contains("vip_range"), "{err}");
        assert!(
            !EgressConfig::with_peers(Vec::new()).bind_egress_ports,
            "egress-port listeners are opt-in"
        );
        assert!(egress("bind_egress_ports: true\nlisten_address: 0.0.0.0").is_ok());
        let err = egress("bind_egress_ports: true").unwrap_err();
        assert!(
            err.contains("listen_address") && err.contains("bind_egress_ports"),
            "{err}"
        );
        let err = egress("bind_vips: true\nlisten_address: 0.0.0.0").unwrap_err();
        assert!(
            err.contains("listen_address") && err.contains("wildcard"),
            "{err}"
        );
        let err = egress("bind_vips: true\nlisten_address: \"::\"").unwrap_err();
        assert!(err.contains("wildcard"), "{err}");
    }
}
