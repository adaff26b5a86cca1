//! The fixture's CA and serving certificate (rcgen), and the rustls server config.

use std::net::IpAddr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::Error;

/// The serving material.
pub struct Material {
    /// The CA certificate, PEM (what a kubeconfig's certificate-authority-data carries).
    pub ca_pem: String,
    /// The server config: TLS 1.2 and 1.3, ALPN `http/1.1` only so Go clients stay on HTTP/1.1.
    pub config: Arc<rustls::ServerConfig>,
}

fn tls(e: impl std::fmt::Display) -> Error {
    Error::Tls(e.to_string())
}

/// A fresh CA and a server certificate for 127.0.0.1, `ip`, `localhost` and
/// `kubernetes.default.svc`.
///
/// # Errors
/// [`Error::Tls`] when generation or the rustls config fails.
pub fn generate(ip: IpAddr) -> Result<Material, Error> {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(tls)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "isthmus-fixture-kube-apiserver-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(tls)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut names = vec![
        "localhost".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
    ];
    names.dedup();
    let mut leaf = CertificateParams::new(names).map_err(tls)?;
    leaf.distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    let loopback: IpAddr = [127, 0, 0, 1].into();
    leaf.subject_alt_names.push(SanType::IpAddress(loopback));
    if ip != loopback && !ip.is_unspecified() {
        leaf.subject_alt_names.push(SanType::IpAddress(ip));
    }
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(tls)?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).map_err(tls)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(tls)?
        .with_no_client_auth()
        .with_single_cert(
            vec![
                CertificateDer::from(leaf_cert.der().to_vec()),
                CertificateDer::from(ca_cert.der().to_vec()),
            ],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .map_err(tls)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Material {
        ca_pem: ca_cert.pem(),
        config: Arc::new(config),
    })
}
