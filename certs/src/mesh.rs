//! [`MeshTls`]: the live, swappable identity and trust bundle of one component, and the rustls
//! configs built on it.
//!
//! The material sits in an `ArcSwap`. Configs are built once; their resolvers and verifiers
//! load the current material on every handshake, so a swap applies to the next handshake and
//! established connections keep the keys they negotiated with.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use rustls::client::Resumption;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tracing::info;

use crate::error::CertsError;
use crate::material::{Identity, TrustBundle};
use crate::policy::PeerPolicy;
use crate::spiffe::SpiffeId;
use crate::verify::{CurrentCert, SpiffeClientVerifier, SpiffeServerVerifier};

/// Where a component's TLS files live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first (`cert.pem`).
    pub cert: PathBuf,
    /// Private key of the leaf (`key.pem`).
    pub key: PathBuf,
    /// Trust bundle of root CAs (`ca.pem`).
    pub bundle: PathBuf,
}

impl TlsFiles {
    /// The layout `isthmus-certs issue --out DIR` writes: `DIR/cert.pem`, `DIR/key.pem`,
    /// `DIR/ca.pem` (also the key names of the Kubernetes Secret the manifests mount).
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        TlsFiles {
            cert: dir.join(crate::ca::LEAF_CERT_FILE),
            key: dir.join(crate::ca::LEAF_KEY_FILE),
            bundle: dir.join(crate::ca::CA_CERT_FILE),
        }
    }
}

/// One immutable generation of material, with what handshakes derive from it.
pub(crate) struct Material {
    pub(crate) identity: Identity,
    pub(crate) bundle: TrustBundle,
    pub(crate) roots: Arc<RootCertStore>,
    /// rustls' client-chain verifier for this bundle, built once per generation. The
    /// verifiers use it only to name a chain refusal the way rustls does.
    pub(crate) client_chain: Arc<dyn ClientCertVerifier>,
    pub(crate) generation: u64,
}

impl Material {
    fn new(identity: Identity, bundle: TrustBundle, generation: u64) -> Self {
        // Loading such a bundle is not an error (its other roots still work), but every peer
        // chaining to that root will be refused: say so once, here, rather than per handshake.
        for (subject, why) in bundle.unanchored() {
            tracing::warn!(
                root = subject,
                "trust bundle root anchors no trust domain: {why}"
            );
        }
        let roots = bundle.root_store();
        let client_chain = WebPkiClientVerifier::builder_with_provider(
            Arc::clone(&roots),
            crate::crypto_provider(),
        )
        .build()
        // Only fails for an empty root store, and a TrustBundle is never empty.
        .expect("a TrustBundle always has at least one root");
        Material {
            identity,
            bundle,
            roots,
            client_chain,
            generation,
        }
    }
}

/// What reloading did so far, as [`MeshTls::reload_status`] reports it: the generation in use
/// and the reload attempts ([`MeshTls::reload_from`], which the watcher calls) that failed.
///
/// This crate only keeps the numbers; it serves no health check or metric itself. A component
/// that wants reload failures in its `/metrics` or `/healthz` reads them from here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Generation of the material in use; starts at 1 and grows by one per swap.
    pub generation: u64,
    /// Reload attempts that failed and kept the previous material, since start.
    pub failures: u64,
    /// Why the most recent reload attempt failed, if it did (cleared by a later attempt that
    /// loads, whether or not the files changed, and by [`MeshTls::replace`]).
    pub last_error: Option<String>,
}

pub(crate) struct Shared {
    pub(crate) material: ArcSwap<Material>,
    /// Serialises swaps so that two reloaders cannot store out of order.
    swap: Mutex<ReloadStatus>,
    generation: AtomicU64,
}

/// The live TLS state of one mesh component: its identity and trust bundle, swappable at run
/// time, plus factories for server and client configs that check peers' SPIFFE IDs.
///
/// Clones share the same state.
#[derive(Clone)]
pub struct MeshTls {
    pub(crate) shared: Arc<Shared>,
}

impl MeshTls {
    /// Starts with the given material.
    pub fn new(identity: Identity, bundle: TrustBundle) -> Self {
        let status = ReloadStatus {
            generation: 1,
            ..ReloadStatus::default()
        };
        MeshTls {
            shared: Arc::new(Shared {
                material: ArcSwap::from_pointee(Material::new(identity, bundle, 1)),
                swap: Mutex::new(status),
                generation: AtomicU64::new(1),
            }),
        }
    }

    /// Loads the three files and starts with them.
    ///
    /// # Errors
    /// As [`Identity::load`] and [`TrustBundle::load`].
    pub fn load(files: &TlsFiles) -> Result<Self, CertsError> {
        let identity = Identity::load(&files.cert, &files.key)?;
        let bundle = TrustBundle::load(&files.bundle)?;
        Ok(MeshTls::new(identity, bundle))
    }

    /// Swaps in new material for all handshakes that start from now on.
    pub fn replace(&self, identity: Identity, bundle: TrustBundle) {
        let mut status = self.lock_status();
        self.swap(&mut status, identity, bundle);
    }

    /// Stores new material; the caller holds the swap lock.
    pub(crate) fn swap(&self, status: &mut ReloadStatus, identity: Identity, bundle: TrustBundle) {
        let generation = self.shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
        info!(
            id = %identity.id(),
            serial = identity.serial(),
            not_after = %crate::rfc3339(identity.not_after()),
            roots = bundle.roots().len(),
            generation,
            "TLS material updated"
        );
        self.shared
            .material
            .store(Arc::new(Material::new(identity, bundle, generation)));
        status.generation = generation;
        status.last_error = None;
    }

    pub(crate) fn lock_status(&self) -> MutexGuard<'_, ReloadStatus> {
        // The guarded data stays consistent even if a holder panicked: recover it.
        self.shared
            .swap
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The SPIFFE ID of the current identity.
    pub fn local_id(&self) -> SpiffeId {
        self.shared.material.load().identity.id().clone()
    }

    /// The serial of the current leaf, lowercase hex.
    pub fn serial(&self) -> String {
        self.shared.material.load().identity.serial().to_owned()
    }

    /// The current identity.
    pub fn identity(&self) -> Identity {
        self.shared.material.load().identity.clone()
    }

    /// The current trust bundle.
    pub fn bundle(&self) -> TrustBundle {
        self.shared.material.load().bundle.clone()
    }

    /// The roots of the current bundle as `"<subject> sha256:<hex>"`, for status output that
    /// compares the anchors each side actually uses.
    pub fn trust_anchors(&self) -> Vec<String> {
        self.bundle().anchors()
    }

    /// Generation, failure count and last reload error (see [`ReloadStatus`]).
    pub fn reload_status(&self) -> ReloadStatus {
        self.lock_status().clone()
    }

    /// A TLS 1.3-only server config that requires a client certificate chaining to the current
    /// bundle and whose SPIFFE ID satisfies `policy`, and presents the current identity.
    ///
    /// Built once, valid across reloads. Session resumption is off: a resumed session skips
    /// certificate verification, so it would outlive a bundle change; mesh connections are
    /// long-lived and pooled, so full handshakes cost little. Early data is off
    /// (`max_early_data_size = 0`). Usable by quinn's `QuicServerConfig::try_from`.
    pub fn server_config(&self, policy: PeerPolicy, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(crate::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
                Arc::clone(&self.shared),
                policy,
            )))
            .with_cert_resolver(Arc::new(CurrentCert::new(Arc::clone(&self.shared))));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.max_early_data_size = 0;
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Arc::new(config)
    }

    /// A TLS 1.3-only client config that verifies the server's chain against the current
    /// bundle and its SPIFFE ID against `policy`, and presents the current identity.
    ///
    /// The `ServerName` given to `connect` is **not** used for authorization: no host-name
    /// check is made, only the SPIFFE ID decides. It is still sent as SNI when it is a DNS
    /// name. Session resumption is off, as for [`MeshTls::server_config`].
    pub fn client_config(&self, policy: PeerPolicy, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut config = ClientConfig::builder_with_provider(crate::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                Arc::clone(&self.shared),
                policy,
            )))
            .with_client_cert_resolver(Arc::new(CurrentCert::new(Arc::clone(&self.shared))));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.resumption = Resumption::disabled();
        Arc::new(config)
    }
}

impl fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let material = self.shared.material.load();
        f.debug_struct("MeshTls")
            .field("id", &material.identity.id().as_str())
            .field("serial", &material.identity.serial())
            .field("roots", &material.bundle.roots().len())
            .field("generation", &material.generation)
            .finish()
    }
}
