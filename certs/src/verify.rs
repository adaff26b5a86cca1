//! The rustls hooks behind [`MeshTls`](crate::MeshTls) configs: peer verifiers that check the
//! chain against the *current* trust bundle and then the peer's SPIFFE ID against a
//! [`PeerPolicy`], and certificate resolvers that hand out the *current* identity.
//!
//! Each hook loads the material from the shared `ArcSwap` once per handshake, so a reload takes
//! effect on the next handshake without rebuilding any config.
//!
//! Refusals keep rustls' own error kinds for chain problems (expired, not yet valid, unknown
//! issuer, …; a missing client certificate never reaches us: rustls reports
//! `NoCertificatesPresented`). A policy refusal is `InvalidCertificate(Other(..))` carrying a
//! [`PolicyDenied`](crate::PolicyDenied) that names the presented ID and the rules. Every refusal
//! is logged once here at `warn`, with the presented SPIFFE ID when the certificate has one.

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

use crate::cert::spiffe_id_of;
use crate::mesh::Shared;
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

    /// Logs and passes through a chain refusal from webpki.
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

    /// Extracts the SPIFFE ID and applies the policy. Runs after the chain is verified.
    fn check_id(&self, end_entity: &CertificateDer<'_>) -> Result<SpiffeId, Error> {
        let id = spiffe_id_of(end_entity).map_err(|e| {
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
        let material = self.0.shared.material.load();
        material
            .client_chain
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| self.0.chain_refused(end_entity, e))?;
        self.0.check_id(end_entity)?;
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
        let material = self.0.shared.material.load();
        ParsedCertificate::try_from(end_entity)
            .and_then(|cert| {
                verify_server_cert_signed_by_trust_anchor(
                    &cert,
                    &material.roots,
                    intermediates,
                    now,
                    self.0.algorithms.all,
                )
            })
            .map_err(|e| self.0.chain_refused(end_entity, e))?;
        self.0.check_id(end_entity)?;
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
