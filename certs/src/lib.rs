//! Isthmus identities: a mesh CA, SPIFFE IDs, and mutual-TLS configs that check the peer's
//! SPIFFE ID, reloaded live.
//!
//! # Role
//! Every Isthmus component (gateway, route-sync, …) proves who it is with an X.509 SVID whose
//! one URI SAN is `spiffe://<trust-domain>/cluster/<cluster>/<component>`, and decides whom to
//! talk to by the peer's SPIFFE ID. This crate owns:
//! - [`SpiffeId`]: the validated ID newtype, and [`PeerPolicy`]: deny-by-default peer rules.
//! - [`ca::MeshCa`]: generating a CA and issuing leaves (also the `isthmus-certs` CLI).
//! - [`Identity`] and [`TrustBundle`]: validated material loaded from PEM files.
//! - [`MeshTls`]: the live identity + bundle behind rustls [`ServerConfig`](rustls::ServerConfig)
//!   and [`ClientConfig`](rustls::ClientConfig)s, with hot reload from files
//!   ([`MeshTls::watch`]) that never disturbs established connections.
//!
//! # Must never
//! - accept TLS below 1.3, or use any crypto provider but `ring` (configs never rely on a
//!   process-default provider);
//! - accept a peer without verifying its chain against the current bundle *and* checking its
//!   SPIFFE ID against a policy (an empty policy allows nobody);
//! - accept a chain whose root does not vouch for the leaf's trust domain (a root vouches only
//!   for the one its `spiffe://<trust-domain>` URI SAN names, see [`RootScope`]);
//! - log or `Debug`-print private key material;
//! - replace working material with files that do not load: the last good material stays.

pub mod ca;
mod cert;
mod error;
mod fsutil;
mod material;
mod mesh;
mod pem;
mod policy;
mod reload;
mod spiffe;
mod verify;

use std::sync::{Arc, OnceLock};

pub use cert::{serial_of, spiffe_id_of};
pub use error::CertsError;
pub use material::{AnchorRefused, Identity, RootScope, TrustBundle};
pub use mesh::{MeshTls, ReloadStatus, TlsFiles};
pub use policy::{Component, PeerPolicy, PeerRule, PolicyDenied};
pub use spiffe::{SpiffeId, SpiffeIdError, validate_trust_domain};

/// The one crypto provider of the mesh: rustls' `ring` provider restricted to its TLS 1.3
/// cipher suites, shared by every config this crate builds. Other crates building rustls or
/// quinn configs should use it too: a config built on it cannot negotiate TLS 1.2 even if its
/// protocol versions are left at the default.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| {
        let mut provider = rustls::crypto::ring::default_provider();
        provider
            .cipher_suites
            .retain(|suite| suite.tls13().is_some());
        Arc::new(provider)
    }))
}

/// RFC 3339 form of a timestamp, for logs and the CLI.
pub(crate) fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}
