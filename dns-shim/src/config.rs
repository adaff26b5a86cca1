//! The shim's configuration file.
//!
//! ```yaml
//! cluster: diego                    # this cluster, as in routes' home_cluster
//! domains: [apps.internal]          # the internal domains the shim is delegated
//! listen: "0.0.0.0:53"              # UDP and TCP on the same port
//! ttl: 0                            # seconds, for answers pointing at the egress
//! negative_ttl: 0                   # seconds, SOA minimum of negative answers
//! answer:
//!   vip: true                       # each name's VIP, as route-sync assigned it (route.vip)
//!   # egress: [10.0.4.7, "fd00::7"] # ...or one shared egress address per family
//! upstream:                         # where every other name in the domains goes
//!   kind: dns                       # dns | sdc | bosh-dns-http
//!   servers: ["169.254.0.2", "10.0.8.6:5353"]
//!   # kind: sdc
//!   # url: https://service-discovery-controller.service.cf.internal:8054
//!   # ca: /var/vcap/jobs/isthmus-dns-shim/config/certs/sdc_ca.crt
//!   # cert: /var/vcap/jobs/isthmus-dns-shim/config/certs/sdc_client.crt
//!   # key: /var/vcap/jobs/isthmus-dns-shim/config/certs/sdc_client.key
//!   # server_name: service-discovery-controller.service.cf.internal  # when url names an IP
//!   # kind: bosh-dns-http
//!   # url: http://127.0.0.1:8053
//! upstream_timeout: 2s
//! tcp_idle_timeout: 10s
//! routes: {file: /var/vcap/store/isthmus/routes.yaml, poll_interval: 500ms}
//! admin: {listen: "127.0.0.1:15021"}
//! ```
//!
//! Parsing has no side effects; [`Validate`] checks what serde cannot. Tests build these
//! structs as values.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use isthmus_route_sync::{ClusterName, RouteName};
use isthmus_runtime::config::{FieldError, HumanDuration, TlsConfig, Validate};
use serde::{Deserialize, Deserializer};

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsShimConfig {
    /// This cluster's name (`diego`, `k8s`). A route whose `home_cluster` differs is answered
    /// with the local egress address.
    pub cluster: String,
    /// The internal domains the shim is authoritative for. Names outside them are refused.
    #[serde(default = "default_domains")]
    pub domains: Vec<String>,
    /// Address for DNS over UDP and TCP (the same port for both).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// TTL in seconds of answers pointing at the egress. 0, like Diego's resolver, makes
    /// clients see a route move at once (see docs/dns-shim.md).
    #[serde(default)]
    pub ttl: u32,
    /// TTL in seconds of negative answers the shim makes (the SOA minimum). 0 keeps a route
    /// that appears from being hidden by a cached NXDOMAIN.
    #[serde(default)]
    pub negative_ttl: u32,
    /// What names homed in another cluster resolve to.
    pub answer: AnswerConfig,
    /// Where every other name in the domains is forwarded.
    pub upstream: UpstreamConfig,
    /// How long a forwarded query may take before the client gets SERVFAIL.
    #[serde(default = "default_upstream_timeout")]
    pub upstream_timeout: HumanDuration,
    /// A TCP client connection with no query for this long is closed.
    #[serde(default = "default_tcp_idle")]
    pub tcp_idle_timeout: HumanDuration,
    /// Where routes come from.
    pub routes: RoutesConfig,
    /// The admin server (`/healthz`, `/readyz`, `/metrics`).
    #[serde(default)]
    pub admin: AdminConfig,
    /// UDP sockets bound with `SO_REUSEPORT` on `listen`, each served by its own task; 0
    /// means one per CPU.
    #[serde(default)]
    pub udp_sockets: usize,
    /// The EDNS UDP payload size the shim advertises and the largest UDP answer it sends
    /// (DNS flag day 2020 value by default). Clients' smaller sizes are honoured.
    #[serde(default = "default_payload")]
    pub edns_udp_payload: u16,
    /// Forwarded queries waiting on the upstream at once; beyond it queries get SERVFAIL
    /// at once instead of queueing.
    #[serde(default = "default_in_flight")]
    pub max_forwarded_in_flight: usize,
    /// Open TCP client connections at once; beyond it new ones are closed.
    #[serde(default = "default_tcp_connections")]
    pub max_tcp_connections: usize,
    /// How long queries in flight may run after SIGTERM.
    #[serde(default = "default_drain")]
    pub drain_timeout: HumanDuration,
}

fn default_domains() -> Vec<String> {
    vec!["apps.internal".to_string()]
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 53))
}
fn default_upstream_timeout() -> HumanDuration {
    HumanDuration::from_secs(2)
}
fn default_tcp_idle() -> HumanDuration {
    HumanDuration::from_secs(10)
}
fn default_payload() -> u16 {
    1232
}
fn default_in_flight() -> usize {
    4096
}
fn default_tcp_connections() -> usize {
    1024
}
fn default_drain() -> HumanDuration {
    HumanDuration::from_secs(5)
}
fn default_poll() -> HumanDuration {
    HumanDuration::from_millis(500)
}
fn default_vip() -> bool {
    false
}
fn default_admin() -> SocketAddr {
    // 15020 is the gateway's; the shim often shares the egress VM with it.
    SocketAddr::from(([0, 0, 0, 0], 15021))
}

/// What names homed elsewhere resolve to: exactly one of the two fields.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerConfig {
    /// True: each remote route name is answered with its own VIP, the `vip` its routes carry
    /// (assigned by this cluster's route-sync, read by the egress from the same table; the
    /// shim computes none). An IPv4 VIP answers A queries, an IPv6 one AAAA queries; a remote
    /// name whose routes carry no VIP is answered SERVFAIL.
    #[serde(default = "default_vip")]
    pub vip: bool,
    /// One or more shared egress addresses: IPv4 ones answer A queries, IPv6 ones AAAA
    /// queries. The egress then tells routes apart by port, Host header or SNI.
    #[serde(default)]
    pub egress: Vec<IpAddr>,
}

/// The platform resolver every name not homed elsewhere is forwarded to.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum UpstreamConfig {
    /// Any DNS server (bosh-dns, CoreDNS, the SDC's own DNS front): UDP, retried over TCP
    /// when the reply is truncated.
    Dns {
        /// Servers as `ip` or `ip:port` (port 53 when left out), tried in turn.
        servers: Vec<DnsServer>,
    },
    /// Cloud Foundry's service-discovery-controller over mutual TLS
    /// (`GET /v1/registration/<name>`), as bosh-dns-adapter calls it.
    Sdc {
        /// Base URL, `https://service-discovery-controller.service.cf.internal:8054`.
        url: String,
        /// PEM CA that signed the SDC's server certificate (`cf_app_sd_ca`).
        ca: PathBuf,
        /// PEM client certificate chain, leaf first.
        cert: PathBuf,
        /// PEM private key of the client certificate.
        key: PathBuf,
        /// The name the SDC's certificate is checked against, when `url` names the SDC by
        /// address (default: the URL's host).
        #[serde(default)]
        server_name: Option<String>,
    },
    /// bosh-dns-adapter, or anything speaking bosh-dns' HTTP handler protocol
    /// (`GET {url}/?name=<qname.>&type=<n>`).
    BoshDnsHttp {
        /// Base URL, `http://127.0.0.1:8053`.
        url: String,
    },
}

impl UpstreamConfig {
    /// The config name of the kind, as in metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamConfig::Dns { .. } => "dns",
            UpstreamConfig::Sdc { .. } => "sdc",
            UpstreamConfig::BoshDnsHttp { .. } => "bosh-dns-http",
        }
    }
}

/// A DNS server address: `10.0.8.5`, `10.0.8.6:5353`, `fd00::5` or `[fd00::5]:5353`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsServer(pub SocketAddr);

impl DnsServer {
    /// What a valid server looks like, for error messages.
    pub const EXPECTED: &'static str =
        "an IP address with an optional port, e.g. 10.0.8.5, 10.0.8.6:5353 or [fd00::5]:53";
}

impl FromStr for DnsServer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let addr = if let Ok(ip) = s.parse::<IpAddr>() {
            SocketAddr::new(ip, 53)
        } else {
            s.parse::<SocketAddr>()
                .map_err(|_| format!("invalid DNS server {s:?}: expected {}", Self::EXPECTED))?
        };
        if addr.port() == 0 {
            return Err(format!("invalid DNS server {s:?}: port 0"));
        }
        Ok(Self(addr))
    }
}

impl fmt::Display for DnsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for DnsServer {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The route source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesConfig {
    /// A YAML route file (see `isthmus_route_sync::source::file`), watched for changes.
    /// Exactly one of `file` and `route_sync`.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// How often the file is checked for changes.
    #[serde(default = "default_poll")]
    pub poll_interval: HumanDuration,
    /// Follow this cluster's route-sync instead of a file.
    #[serde(default)]
    pub route_sync: Option<RouteSyncSourceConfig>,
}

/// Following the local route-sync over mesh mTLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSyncSourceConfig {
    /// Its replicas' gRPC addresses, tried in turn.
    pub endpoints: Vec<std::net::SocketAddr>,
    /// The mesh trust domain.
    pub trust_domain: String,
    /// The shim's mesh identity: `spiffe://<td>/cluster/<cluster>/dns-shim`.
    pub tls: TlsConfig,
    /// Where the last table is kept, served (marked stale) after a restart.
    #[serde(default)]
    pub cache: Option<PathBuf>,
}

/// The admin server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to listen on (default port 15021, one above the gateway's, since the two
    /// often share a VM).
    #[serde(default = "default_admin")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin(),
        }
    }
}

impl DnsShimConfig {
    /// A configuration with every default, for tests and embedding.
    pub fn new(
        cluster: &str,
        answer: AnswerConfig,
        upstream: UpstreamConfig,
        routes: RoutesConfig,
    ) -> Self {
        Self {
            cluster: cluster.to_string(),
            domains: default_domains(),
            listen: default_listen(),
            ttl: 0,
            negative_ttl: 0,
            answer,
            upstream,
            upstream_timeout: default_upstream_timeout(),
            tcp_idle_timeout: default_tcp_idle(),
            routes,
            admin: AdminConfig::default(),
            udp_sockets: 0,
            edns_udp_payload: default_payload(),
            max_forwarded_in_flight: default_in_flight(),
            max_tcp_connections: default_tcp_connections(),
            drain_timeout: default_drain(),
        }
    }
}

impl RoutesConfig {
    /// A route file polled at the default interval.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            file: Some(path.into()),
            poll_interval: default_poll(),
            route_sync: None,
        }
    }
}

/// The longest TTL RFC 2181 allows.
const MAX_TTL: u32 = i32::MAX as u32;

fn positive(field: &str, d: HumanDuration) -> Result<(), FieldError> {
    if d.get().is_zero() {
        Err(FieldError::new(field, "a duration above 0, e.g. 2s"))
    } else {
        Ok(())
    }
}

impl Validate for DnsShimConfig {
    fn validate(&self) -> Result<(), FieldError> {
        ClusterName::parse(&self.cluster)
            .map_err(|_| FieldError::new("cluster", "1 to 63 characters of a-z, 0-9 and '-'"))?;
        if self.domains.is_empty() {
            return Err(FieldError::new(
                "domains",
                "at least one domain, e.g. apps.internal",
            ));
        }
        let mut seen = Vec::new();
        for (i, d) in self.domains.iter().enumerate() {
            let name = RouteName::parse(d).map_err(|_| {
                FieldError::new(
                    format!("domains[{i}]"),
                    "a domain of two or more labels such as apps.internal",
                )
            })?;
            if seen.contains(&name) {
                return Err(FieldError::new(
                    format!("domains[{i}]"),
                    "each domain listed once",
                ));
            }
            seen.push(name);
        }
        for (field, ttl) in [("ttl", self.ttl), ("negative_ttl", self.negative_ttl)] {
            if ttl > MAX_TTL {
                return Err(FieldError::new(field, "seconds from 0 to 2147483647"));
            }
        }
        self.answer.validate().map_err(|e| e.within("answer"))?;
        self.upstream.validate().map_err(|e| e.within("upstream"))?;
        positive("upstream_timeout", self.upstream_timeout)?;
        positive("tcp_idle_timeout", self.tcp_idle_timeout)?;
        positive("routes.poll_interval", self.routes.poll_interval)?;
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
        if self.udp_sockets > 64 {
            return Err(FieldError::new("udp_sockets", "0 (one per CPU) to 64"));
        }
        if !(512..=4096).contains(&self.edns_udp_payload) {
            return Err(FieldError::new("edns_udp_payload", "512 to 4096 bytes"));
        }
        if self.max_forwarded_in_flight == 0 {
            return Err(FieldError::new(
                "max_forwarded_in_flight",
                "a number above 0",
            ));
        }
        if self.max_tcp_connections == 0 {
            return Err(FieldError::new("max_tcp_connections", "a number above 0"));
        }
        Ok(())
    }
}

impl Validate for AnswerConfig {
    fn validate(&self) -> Result<(), FieldError> {
        match (self.vip, self.egress.is_empty()) {
            (true, true) => Ok(()),
            (false, false) => {
                for (i, ip) in self.egress.iter().enumerate() {
                    if ip.is_unspecified() || ip.is_multicast() {
                        return Err(FieldError::new(
                            format!("egress[{i}]"),
                            "a unicast address apps can connect to",
                        ));
                    }
                }
                Ok(())
            }
            _ => Err(FieldError::new(
                "vip",
                "exactly one of `vip: true` (each route's VIP) or `egress` (shared addresses)",
            )),
        }
    }
}

fn check_url(url: &str, scheme: &str) -> Result<(), &'static str> {
    let uri: http::Uri = url.parse().map_err(|_| "not a URL")?;
    if uri.scheme_str() != Some(scheme) {
        return Err(if scheme == "https" {
            "the scheme must be https (the SDC requires mutual TLS)"
        } else {
            "the scheme must be http"
        });
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the host is missing");
    }
    if uri.query().is_some() {
        return Err("a query string is not allowed");
    }
    Ok(())
}

impl Validate for UpstreamConfig {
    fn validate(&self) -> Result<(), FieldError> {
        match self {
            UpstreamConfig::Dns { servers } => {
                if servers.is_empty() {
                    return Err(FieldError::new("servers", "at least one DNS server"));
                }
            }
            UpstreamConfig::Sdc {
                url, server_name, ..
            } => {
                if let Some(name) = server_name
                    && rustls_pki_types::ServerName::try_from(name.as_str()).is_err()
                {
                    return Err(FieldError::new(
                        "server_name",
                        "a DNS name or IP address such as service-discovery-controller.service.cf.internal",
                    ));
                }
                check_url(url, "https").map_err(|why| {
                    FieldError::new(
                        "url",
                        format!("a URL like https://service-discovery-controller.service.cf.internal:8054 ({why})"),
                    )
                })?;
            }
            UpstreamConfig::BoshDnsHttp { url } => {
                check_url(url, "http").map_err(|why| {
                    FieldError::new("url", format!("a URL like http://127.0.0.1:8053 ({why})"))
                })?;
            }
        }
        Ok(())
    }
}
