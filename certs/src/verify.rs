//! The rustls hooks behind [`MeshTls`](crate::MeshTls) configs: peer verifiers that check the
//! chain against the *current* trust bundle and then the peer's SPIFFE ID against a
//! [`PeerPolicy`], and certificate resolvers that hand out the *current* identity.
//!
//! Each hook loads the material from the shared `ArcSwap` once per handshake, so a reload takes
//! effect on the next handshake without rebuilding any config.
//!
//! The chain is verified by webpki directly, not through rustls' verifiers, because only
//! webpki's verified path says which root the chain ended at: a root vouches only for the
//! trust domain of its own SPIFFE URI SAN ([`RootScope`](crate::RootScope)), so a path is
//! accepted only when its root vouches for the leaf's trust domain. A path refused for that
//! reason lets webpki try the next candidate root, so a leaf that chains to roots of two
//! domains is judged by the right one.
//!
//! Refusals keep rustls' own error kinds for chain problems (expired, not yet valid, unknown
//! issuer, …; a missing client certificate never reaches us: rustls reports
//! `NoCertificatesPresented`): when webpki refuses for such a reason, rustls' own verifier runs
//! on the same input to name it. A root of the wrong trust domain is
//! `InvalidCertificate(Other(..))` carrying an [`AnchorRefused`] that names the leaf's ID and
//! domain and the root's subject and domain. A policy refusal is `InvalidCertificate(Other(..))`
//! carrying a [`PolicyDenied`](crate::PolicyDenied) that names the presented ID and the rules.
//! Every refusal is logged once here at `warn`, with the presented SPIFFE ID when the
//! certificate has one.

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
};
use tracing::warn;
use webpki::{EndEntityCert, KeyUsage};

use crate::cert::spiffe_id_of;
use crate::error::CertsError;
use crate::material::{AnchorRefused, RootScope};
use crate::mesh::{Material, Shared};
use crate::policy::PeerPolicy;
use crate::spiffe::SpiffeId;

/// Which side of the handshake we verify, for log lines.
#[derive(Clone, Copy)]
enum PeerRole {
    Client,
    Server,
}

impl fmt::Display for PeerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerRole::Client => "client",
            PeerRole::Server => "server",
        })
    }
}

/// The policy half shared by both verifiers.
struct PeerCheck {
    shared: Arc<Shared>,
    policy: PeerPolicy,
    algorithms: WebPkiSupportedAlgorithms,
    role: PeerRole,
}

impl PeerCheck {
    fn new(shared: Arc<Shared>, policy: PeerPolicy, role: PeerRole) -> Self {
        PeerCheck {
            shared,
            policy,
            algorithms: crate::crypto_provider().signature_verification_algorithms,
            role,
        }
    }

    /// Verifies the chain against the current bundle, accepting only a path whose root vouches
    /// for the leaf's trust domain, then the leaf's SPIFFE ID against the policy.
    ///
    /// `name_refusal` runs rustls' own verifier on the same input, only after webpki refused
    /// the chain for a reason other than the root's trust domain, so that the error keeps the
    /// kind rustls would have given it (expired, unknown issuer, …).
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
        name_refusal: impl FnOnce(&Material) -> Result<(), Error>,
    ) -> Result<SpiffeId, Error> {
        let material = self.shared.material.load();
        let leaf_id = spiffe_id_of(end_entity);
        let anchors = &material.roots.roots;
        let refused: RefCell<Option<AnchorRefused>> = RefCell::new(None);
        let accept = |path: &webpki::VerifiedPath<'_>| -> Result<(), webpki::Error> {
            // A leaf without a usable ID is refused by `check_id` once the chain is known good.
            let Ok(id) = &leaf_id else { return Ok(()) };
            let index = anchors
                .iter()
                .position(|anchor| std::ptr::eq(anchor, path.anchor()))
                .unwrap_or(usize::MAX);
            material.bundle.vouches(index, id).map_err(|e| {
                refused.borrow_mut().get_or_insert(e);
                // Not fatal to webpki: it goes on with the next candidate root.
                webpki::Error::UnknownIssuer
            })
        };
        let chain = EndEntityCert::try_from(end_entity).and_then(|cert| {
            cert.verify_for_usage(
                self.algorithms.all,
                anchors,
                intermediates,
                now,
                usage,
                None,
                Some(&accept),
            )
            .map(drop)
        });
        if let Err(webpki_error) = chain {
            if let Some(refusal) = refused.into_inner() {
                return Err(self.anchor_refused(refusal));
            }
            let error = match name_refusal(&material) {
                Err(error) => error,
                // rustls and webpki disagreeing would be a bug; refuse with webpki's reason.
                Ok(()) => other(webpki_error),
            };
            return Err(self.chain_refused(end_entity, error));
        }
        self.check_id(leaf_id)
    }

    fn anchor_refused(&self, refusal: AnchorRefused) -> Error {
        match &refusal.scope {
            RootScope::TrustDomain(root_domain) => warn!(
                peer = %refusal.presented,
                role = %self.role,
                root = %refusal.root,
                root_trust_domain = %root_domain,
                "refused TLS peer: {refusal}"
            ),
            RootScope::Nothing(_) => warn!(
                peer = %refusal.presented,
                role = %self.role,
                root = %refusal.root,
                "refused TLS peer: {refusal}"
            ),
        }
        other(refusal)
    }

    /// Logs and passes through a chain refusal.
    fn chain_refused(&self, end_entity: &CertificateDer<'_>, error: Error) -> Error {
        let presented = spiffe_id_of(end_entity)
            .map(|id| id.to_string())
            .unwrap_or_else(|_| "<no SPIFFE ID>".to_owned());
        warn!(
            peer = %presented,
            role = %self.role,
            error = %error,
            "refused TLS peer: certificate chain not accepted"
        );
        error
    }

    /// Applies the policy to the leaf's SPIFFE ID. Runs after the chain is verified.
    fn check_id(&self, leaf_id: Result<SpiffeId, CertsError>) -> Result<SpiffeId, Error> {
        let id = leaf_id.map_err(|e| {
            warn!(
                role = %self.role,
                error = %crate::error::Chain(&e),
                "refused TLS peer: certificate has no usable SPIFFE ID"
            );
            other(e)
        })?;
        self.policy.check(&id).map_err(|denied| {
            warn!(
                peer = %denied.presented,
                role = %self.role,
                policy = %denied.policy,
                "refused TLS peer: SPIFFE ID not allowed by the policy"
            );
            other(denied)
        })?;
        Ok(id)
    }

    fn verify_tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Server side: requires a client certificate, verifies it with webpki against the current
/// bundle, then checks its SPIFFE ID.
pub(crate) struct SpiffeClientVerifier(PeerCheck);

impl SpiffeClientVerifier {
    pub(crate) fn new(shared: Arc<Shared>, policy: PeerPolicy) -> Self {
        SpiffeClientVerifier(PeerCheck::new(shared, policy, PeerRole::Client))
    }
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("policy", &self.0.policy.to_string())
            .finish()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No CA hints: the bundle can change under a live config, and every mesh client has
    /// exactly one certificate to offer anyway.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.0.verify(
            end_entity,
            intermediates,
            now,
            KeyUsage::client_auth(),
            |material| {
                material
                    .client_chain
                    .verify_client_cert(end_entity, intermediates, now)
                    .map(drop)
            },
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.schemes()
    }
}

/// Client side: verifies the server's chain against the current bundle, with no host-name
/// check, then checks its SPIFFE ID.
pub(crate) struct SpiffeServerVerifier(PeerCheck);

impl SpiffeServerVerifier {
    pub(crate) fn new(shared: Arc<Shared>, policy: PeerPolicy) -> Self {
        SpiffeServerVerifier(PeerCheck::new(shared, policy, PeerRole::Server))
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("policy", &self.0.policy.to_string())
            .finish()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    /// `server_name` is deliberately ignored: mesh peers are authorized by SPIFFE ID only, and
    /// an ingress reached through a VIP or load balancer has no stable host name.
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let algorithms = self.0.algorithms.all;
        self.0.verify(
            end_entity,
            intermediates,
            now,
            KeyUsage::server_auth(),
            |material| {
                ParsedCertificate::try_from(end_entity).and_then(|cert| {
                    verify_server_cert_signed_by_trust_anchor(
                        &cert,
                        &material.roots,
                        intermediates,
                        now,
                        algorithms,
                    )
                })
            },
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.schemes()
    }
}

/// Hands out the current identity to both server and client handshakes.
pub(crate) struct CurrentCert(Arc<Shared>);

impl CurrentCert {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        CurrentCert(shared)
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.0.material.load().identity.certified_key()
    }
}

impl fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurrentCert")
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
