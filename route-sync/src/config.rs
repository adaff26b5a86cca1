//! The route-sync configuration file.
//!
//! ```yaml
//! cluster: k8s
//! trust_domain: mesh.local
//! tls: {cert: certs/cert.pem, key: certs/key.pem, bundle: certs/ca.pem}
//! listen: "0.0.0.0:15010"          # gRPC for peers and local consumers
//! admin: {listen: "0.0.0.0:15021"}
//! source: {file: routes.yaml}       # this cluster's routes (homed here); or:
//! # source:
//! #   kubernetes:
//! #     namespaces: [apps]          # default: all namespaces
//! #     kubeconfig: /etc/kube.yaml  # default: in-cluster, else $KUBECONFIG / ~/.kube/config
//! # mirror:                          # Kubernetes only: imported routes as Services
//! #   namespace: isthmus
//! #   egress_selector: {app.kubernetes.io/name: isthmus-egress}
//! #   egress_ports: 20000-29999      # one egress target port per imported route
//! #   lease: {name: isthmus-route-sync, duration: 15s}
//! peers:
//!   - {cluster: diego, endpoints: ["10.0.16.5:15010", "10.0.16.6:15010"]}
//! state_dir: /var/lib/isthmus/route-sync   # last known good
//! vips: {range: 100.64.0.0/16, hold: 1h}   # optional: per-route VIPs, assigned here
//! limits:                                  # what a peer may send (defaults shown)
//!   max_batch_chunks: 256
//!   max_batch_routes: 1000000
//!   max_routes_per_peer: 500000
//! keepalive: {interval: 10s, timeout: 5s}  # HTTP/2 PINGs to every caller of the server
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use isthmus_runtime::config::{FieldError, HumanDuration, TlsConfig, Validate};
use serde::Deserialize;

use crate::model::ClusterName;
use crate::vip::VipRange;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSyncConfig {
    /// This cluster's name.
    pub cluster: String,
    /// The mesh trust domain.
    pub trust_domain: String,
    /// This node's identity and trust bundle.
    pub tls: TlsConfig,
    /// gRPC address for peers and local consumers.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The admin server.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Where this cluster's routes come from.
    pub source: SourceConfig,
    /// Peer clusters to import exported routes from (and to export ours to).
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Directory for last-known-good state; none keeps nothing across restarts.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Per-route VIPs assigned by this node and carried with every route it serves to local
    /// consumers. None (the default): routes carry no VIP.
    #[serde(default)]
    pub vips: Option<VipConfig>,
    /// Imported routes kept as Kubernetes Services (needs `source.kubernetes`; excludes
    /// `vips`: the Services' ClusterIPs are the addresses).
    #[serde(default)]
    pub mirror: Option<MirrorConfig>,
    /// Bounds on what a peer may send.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// HTTP/2 keepalive of the gRPC server, so callers that vanished free their streams.
    #[serde(default)]
    pub keepalive: KeepaliveConfig,
}

/// The VIP allocation (see [`crate::vip::VipAllocator`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    /// The CIDR VIPs are drawn from, e.g. `100.64.0.0/16` (IPv4: A answers; IPv6: AAAA).
    pub range: String,
    /// How long a VIP stays reserved for a name that left, so that the name gets it back if
    /// it returns in time (clients may cache a VIP long past its TTL).
    #[serde(default = "default_vip_hold")]
    pub hold: HumanDuration,
}

fn default_vip_hold() -> HumanDuration {
    HumanDuration::from_secs(3600)
}

/// Bounds on what one peer may send; beyond them the update is refused with a reason (in
/// logs, metrics and status) and the last good imports are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Chunks a chunked snapshot or delta (`more`) may have before its final one; a longer
    /// chain ends the stream.
    #[serde(default = "default_max_batch_chunks")]
    pub max_batch_chunks: usize,
    /// Routes and removals a chunked snapshot or delta may carry before its final chunk; a
    /// longer one ends the stream.
    #[serde(default = "default_max_batch_routes")]
    pub max_batch_routes: usize,
    /// Routes imported from one peer; an update that would go beyond is refused.
    #[serde(default = "default_max_routes_per_peer")]
    pub max_routes_per_peer: usize,
}

fn default_max_batch_chunks() -> usize {
    crate::node::PeerLimits::default().max_batch_chunks
}

fn default_max_batch_routes() -> usize {
    crate::node::PeerLimits::default().max_batch_routes
}

fn default_max_routes_per_peer() -> usize {
    crate::node::PeerLimits::default().max_routes_per_peer
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_batch_chunks: default_max_batch_chunks(),
            max_batch_routes: default_max_batch_routes(),
            max_routes_per_peer: default_max_routes_per_peer(),
        }
    }
}

/// HTTP/2 keepalive of the gRPC server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveConfig {
    /// A PING is sent to a caller after this long without hearing from it.
    #[serde(default = "default_keepalive_interval")]
    pub interval: HumanDuration,
    /// A caller that does not answer a PING within this is dropped, with its streams.
    #[serde(default = "default_keepalive_timeout")]
    pub timeout: HumanDuration,
}

fn default_keepalive_interval() -> HumanDuration {
    HumanDuration::from_secs(10)
}

fn default_keepalive_timeout() -> HumanDuration {
    HumanDuration::from_secs(5)
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        Self {
            interval: default_keepalive_interval(),
            timeout: default_keepalive_timeout(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15010))
}

fn default_poll() -> HumanDuration {
    HumanDuration::from_millis(500)
}

/// The admin server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to listen on.
    #[serde(default = "default_admin")]
    pub listen: SocketAddr,
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15021))
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin(),
        }
    }
}

/// The local route source: exactly one of `file` and `kubernetes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// A YAML route file of routes homed in this cluster.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// How often the file is checked for changes.
    #[serde(default = "default_poll")]
    pub poll_interval: HumanDuration,
    /// Routes from the Kubernetes API: annotated Services, their EndpointSlices and
    /// ServiceExports.
    #[serde(default)]
    pub kubernetes: Option<KubernetesConfig>,
}

/// Where and how the Kubernetes source reads the cluster's API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The namespaces whose Services may be routes; empty (the default) means all.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// A kubeconfig file. None (the default): what kube-rs infers, the in-cluster service
    /// account first, then `$KUBECONFIG` or `~/.kube/config`.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context; default its current context.
    #[serde(default)]
    pub context: Option<String>,
}

/// Imported routes as Kubernetes Services, written by the holder of a Lease.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// The namespace the mirror Services (and the Lease) live in: Isthmus's own.
    pub namespace: String,
    /// The labels of the egress gateway pods: every mirror Service selects them.
    pub egress_selector: std::collections::BTreeMap<String, String>,
    /// The egress target ports handed out, one per imported route, `first-last`.
    #[serde(default = "default_egress_ports")]
    pub egress_ports: String,
    /// Who writes.
    #[serde(default)]
    pub lease: LeaseConfig,
}

fn default_egress_ports() -> String {
    "20000-29999".to_string()
}

/// The coordination.k8s.io Lease that elects the one replica that writes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseConfig {
    /// The Lease's name, in the mirror namespace.
    #[serde(default = "default_lease_name")]
    pub name: String,
    /// How long a holder's claim lasts without renewal; renewed every third of it.
    #[serde(default = "default_lease_duration")]
    pub duration: HumanDuration,
    /// This replica's identity in the Lease; default `$POD_NAME`, else the host name.
    #[serde(default)]
    pub identity: Option<String>,
}

fn default_lease_name() -> String {
    "isthmus-route-sync".to_string()
}

fn default_lease_duration() -> HumanDuration {
    HumanDuration::from_secs(15)
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            name: default_lease_name(),
            duration: default_lease_duration(),
            identity: None,
        }
    }
}

/// Parses `first-last` (both inclusive, `first` <= `last`, neither 0).
///
/// # Errors
/// Anything else, as a message naming what was expected.
pub fn parse_port_range(text: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let expected = || format!("`{text}`: expected a port range `first-last`, e.g. 20000-29999");
    let (a, b) = text.split_once('-').ok_or_else(expected)?;
    let a: u16 = a.trim().parse().map_err(|_| expected())?;
    let b: u16 = b.trim().parse().map_err(|_| expected())?;
    if a == 0 || a > b {
        return Err(expected());
    }
    Ok(a..=b)
}

/// A peer cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its cluster name.
    pub cluster: String,
    /// Its route-sync replicas.
    pub endpoints: Vec<SocketAddr>,
}

impl Validate for RouteSyncConfig {
    fn validate(&self) -> Result<(), FieldError> {
        let cluster = ClusterName::parse(&self.cluster)
            .map_err(|_| FieldError::new("cluster", "1 to 63 characters of a-z, 0-9 and '-'"))?;
        isthmus_certs::SpiffeId::for_component(&self.trust_domain, &self.cluster, "route-sync")
            .map_err(|_| {
                FieldError::new("trust_domain", "a trust domain of a-z, 0-9, '.', '-', '_'")
            })?;
        for (i, peer) in self.peers.iter().enumerate() {
            let p = ClusterName::parse(&peer.cluster).map_err(|_| {
                FieldError::new(
                    format!("peers[{i}].cluster"),
                    "1 to 63 characters of a-z, 0-9 and '-'",
                )
            })?;
            if p == cluster {
                return Err(FieldError::new(
                    format!("peers[{i}].cluster"),
                    "another cluster than this one",
                ));
            }
            if peer.endpoints.is_empty() {
                return Err(FieldError::new(
                    format!("peers[{i}].endpoints"),
                    "at least one address",
                ));
            }
            if self.peers[..i].iter().any(|q| q.cluster == peer.cluster) {
                return Err(FieldError::new(
                    format!("peers[{i}].cluster"),
                    "each peer listed once",
                ));
            }
        }
        match (&self.source.file, &self.source.kubernetes) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(FieldError::new(
                    "source",
                    "exactly one of `file` and `kubernetes`",
                ));
            }
            _ => {}
        }
        if let Some(k) = &self.source.kubernetes {
            for (i, ns) in k.namespaces.iter().enumerate() {
                if !is_dns_label(ns) {
                    return Err(FieldError::new(
                        format!("source.kubernetes.namespaces[{i}]"),
                        "a namespace name: 1 to 63 of a-z, 0-9 and '-'",
                    ));
                }
            }
        }
        if let Some(m) = &self.mirror {
            if self.source.kubernetes.is_none() {
                return Err(FieldError::new(
                    "mirror",
                    "no mirror section unless `source.kubernetes` is set",
                ));
            }
            if self.vips.is_some() {
                return Err(FieldError::new(
                    "vips",
                    "no `vips` with `mirror`: the mirror Services' ClusterIPs are the VIPs",
                ));
            }
            if !is_dns_label(&m.namespace) {
                return Err(FieldError::new(
                    "mirror.namespace",
                    "a namespace name: 1 to 63 of a-z, 0-9 and '-'",
                ));
            }
            if m.egress_selector.is_empty() {
                return Err(FieldError::new(
                    "mirror.egress_selector",
                    "at least one label of the egress pods",
                ));
            }
            parse_port_range(&m.egress_ports)
                .map_err(|e| FieldError::new("mirror.egress_ports", e))?;
            if !is_dns_label(&m.lease.name) {
                return Err(FieldError::new(
                    "mirror.lease.name",
                    "a Lease name: 1 to 63 of a-z, 0-9 and '-'",
                ));
            }
            if m.lease.duration.get() < std::time::Duration::from_secs(1) {
                return Err(FieldError::new(
                    "mirror.lease.duration",
                    "a duration of at least 1s, e.g. 15s",
                ));
            }
        }
        if let Some(vips) = &self.vips {
            let range = VipRange::parse(&vips.range).map_err(|_| {
                FieldError::new(
                    "vips.range",
                    "a network in CIDR notation with its host bits clear, e.g. 100.64.0.0/16",
                )
            })?;
            if range.capacity() == 0 {
                return Err(FieldError::new(
                    "vips.range",
                    "a range with at least one usable address (/31 or shorter for IPv4)",
                ));
            }
        }
        for (field, value) in [
            ("limits.max_batch_chunks", self.limits.max_batch_chunks),
            ("limits.max_batch_routes", self.limits.max_batch_routes),
            (
                "limits.max_routes_per_peer",
                self.limits.max_routes_per_peer,
            ),
        ] {
            if value == 0 {
                return Err(FieldError::new(field, "a number above 0"));
            }
        }
        for (field, value) in [
            ("keepalive.interval", self.keepalive.interval),
            ("keepalive.timeout", self.keepalive.timeout),
        ] {
            if value.get().is_zero() {
                return Err(FieldError::new(field, "a duration above 0, e.g. 10s"));
            }
        }
        Ok(())
    }
}

/// An RFC 1123 label, as Kubernetes names namespaces.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "cluster: k8s
trust_domain: mesh.local
tls: {cert: c.pem, key: k.pem, bundle: ca.pem}
source: {file: routes.yaml}
";

    fn parse(extra: &str) -> RouteSyncConfig {
        serde_norway::from_str(&format!("{BASE}{extra}")).unwrap()
    }

    #[test]
    fn defaults_without_the_optional_sections() {
        let cfg = parse("");
        assert!(cfg.vips.is_none(), "no section, no VIPs");
        assert_eq!(
            cfg.limits.max_batch_chunks,
            crate::node::PeerLimits::default().max_batch_chunks
        );
        assert_eq!(cfg.keepalive.interval.get().as_secs(), 10);
        assert_eq!(cfg.keepalive.timeout.get().as_secs(), 5);
        cfg.validate().unwrap();
        let cfg = parse("vips: {range: 100.64.0.0/16}\n");
        assert_eq!(cfg.vips.unwrap().hold.get().as_secs(), 3600);
    }

    #[test]
    fn bad_values_name_their_field() {
        for (extra, field) in [
            ("vips: {range: 100.64.1.0/16}\n", "vips.range"),
            ("vips: {range: orders}\n", "vips.range"),
            ("vips: {range: 10.0.0.1/32}\n", "vips.range"),
            ("limits: {max_batch_chunks: 0}\n", "limits.max_batch_chunks"),
            ("limits: {max_batch_routes: 0}\n", "limits.max_batch_routes"),
            (
                "limits: {max_routes_per_peer: 0}\n",
                "limits.max_routes_per_peer",
            ),
            ("keepalive: {interval: 0s}\n", "keepalive.interval"),
            ("keepalive: {timeout: 0s}\n", "keepalive.timeout"),
        ] {
            let err = parse(extra).validate().unwrap_err();
            assert_eq!(err.field, field, "{extra}");
        }
        let unknown: Result<RouteSyncConfig, _> =
            serde_norway::from_str(&format!("{BASE}vips: {{range: 100.64.0.0/16, hld: 1h}}\n"));
        assert!(unknown.unwrap_err().to_string().contains("hld"));
    }
}
