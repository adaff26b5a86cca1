//! The route-sync configuration file.
//!
//! ```yaml
//! cluster: k8s
//! trust_domain: mesh.local
//! tls: {cert: certs/cert.pem, key: certs/key.pem, bundle: certs/ca.pem}
//! listen: "0.0.0.0:15010"          # gRPC for peers and local consumers
//! admin: {listen: "0.0.0.0:15021"}
//! source: {file: routes.yaml}       # this cluster's routes (homed here)
//! peers:
//!   - {cluster: diego, endpoints: ["10.0.16.5:15010", "10.0.16.6:15010"]}
//! state_dir: /var/lib/isthmus/route-sync   # last known good
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use isthmus_runtime::config::{FieldError, HumanDuration, TlsConfig, Validate};
use serde::Deserialize;

use crate::model::ClusterName;

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

/// The local route source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// A YAML route file of routes homed in this cluster.
    pub file: PathBuf,
    /// How often the file is checked for changes.
    #[serde(default = "default_poll")]
    pub poll_interval: HumanDuration,
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
        Ok(())
    }
}
