//! The mesh identity section every component's config has.

use std::path::PathBuf;

use serde::Deserialize;

use super::HumanDuration;

/// A component's mesh identity: PEM files, polled for changes and used without a restart.
///
/// ```yaml
/// tls: {cert: cert.pem, key: key.pem, bundle: ca.pem, reload_interval: 500ms}
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key of the leaf.
    pub key: PathBuf,
    /// Trust bundle: one or more CA certificates.
    pub bundle: PathBuf,
    /// How often the files are checked for changes.
    #[serde(default = "default_reload")]
    pub reload_interval: HumanDuration,
}

fn default_reload() -> HumanDuration {
    HumanDuration::from_millis(500)
}

impl TlsConfig {
    /// The files, as `isthmus_certs` loads and watches them.
    pub fn files(&self) -> isthmus_certs::TlsFiles {
        isthmus_certs::TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            bundle: self.bundle.clone(),
        }
    }
}
