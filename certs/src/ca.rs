//! The mesh CA: a self-signed ECDSA P-256 root that issues SPIFFE leaf certificates.
//!
//! The CA carries its trust domain as the URI SAN `spiffe://<trust-domain>`, so loading it back
//! from disk needs nothing but the two files. Leaves get the URI SAN
//! `spiffe://<trust-domain>/cluster/<cluster>/<component>`, the DNS and IP SANs asked for, both
//! serverAuth and clientAuth (one identity serves a gateway's ingress and egress roles) and a
//! random serial.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use rcgen::string::{Ia5String, PrintableString};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::error::CertsError;
use crate::fsutil::{self, MODE_PUBLIC, MODE_SECRET};
use crate::material::Identity;
use crate::spiffe::{self, SpiffeId};
use crate::{cert, pem};

/// File name of the CA certificate (also the trust bundle written beside issued leaves).
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of an issued leaf certificate.
pub const LEAF_CERT_FILE: &str = "cert.pem";
/// File name of an issued leaf private key.
pub const LEAF_KEY_FILE: &str = "key.pem";

/// OID of the X.520 `serialNumber` name attribute.
const X520_SERIAL_NUMBER: [u64; 4] = [2, 5, 4, 5];

/// Default CA lifetime: ten years.
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far back a leaf's `not_before` is set, to tolerate clock skew between machines.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// The mesh certificate authority. `Debug` never shows the key.
pub struct MeshCa {
    trust_domain: String,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl MeshCa {
    /// Generates a new CA for `trust_domain`, valid from five minutes ago for ten years.
    ///
    /// # Errors
    /// [`CertsError::InvalidTrustDomain`], or [`CertsError::Generate`] if signing fails.
    pub fn generate(trust_domain: &str) -> Result<MeshCa, CertsError> {
        let now = OffsetDateTime::now_utc();
        Self::generate_with_validity(
            trust_domain,
            now - CLOCK_SKEW,
            saturating_add(now, DEFAULT_CA_VALIDITY),
        )
    }

    /// Generates a new CA for `trust_domain` with an explicit validity window (tests use this
    /// to make expired or not-yet-valid CAs).
    ///
    /// # Errors
    /// [`CertsError::InvalidTrustDomain`], [`CertsError::InvalidValidity`], or
    /// [`CertsError::Generate`].
    pub fn generate_with_validity(
        trust_domain: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<MeshCa, CertsError> {
        spiffe::validate_trust_domain(trust_domain)?;
        let what = || format!("the mesh CA for {trust_domain}");
        check_validity(&what(), not_before, not_after)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(generate(format!("generate the key pair of {}", what())))?;

        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Isthmus");
        dn.push(
            DnType::CommonName,
            format!("Isthmus mesh CA ({trust_domain})"),
        );
        // X.520 serialNumber, unique per CA. Without it the old and new CA of one trust domain
        // share a subject during rotation, and a leaf from a foreign CA of the same trust
        // domain is reported as a bad signature instead of an unknown issuer.
        let unique: String = serial
            .to_bytes()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        dn.push(
            DnType::CustomDnType(X520_SERIAL_NUMBER.to_vec()),
            DnValue::PrintableString(
                PrintableString::try_from(unique)
                    .map_err(generate(format!("encode the subject of {}", what())))?,
            ),
        );
        params.distinguished_name = dn;
        // Path length 0: this root signs leaves only, never intermediates.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(
            Ia5String::try_from(format!("spiffe://{trust_domain}"))
                .map_err(generate(format!("encode the URI SAN of {}", what())))?,
        )];
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(serial);
        let cert = params
            .self_signed(&key)
            .map_err(generate(format!("self-sign {}", what())))?;
        Ok(MeshCa {
            trust_domain: trust_domain.to_owned(),
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads `dir/ca.pem` and `dir/ca-key.pem`. The trust domain is read from the CA's
    /// `spiffe://<trust-domain>` URI SAN.
    ///
    /// # Errors
    /// [`CertsError::Read`], PEM and X.509 errors naming the file, [`CertsError::InvalidCa`]
    /// when the certificate is not a CA or has no trust-domain URI, or
    /// [`CertsError::CaKeyMismatch`] when the key is not the certificate's.
    pub fn load(dir: &Path) -> Result<MeshCa, CertsError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_origin = cert_path.display().to_string();
        let key_origin = key_path.display().to_string();
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| CertsError::Read {
                path: path.to_owned(),
                source,
            })
        };

        let cert_der = pem::parse_certs(&read(&cert_path)?, &cert_origin)?.remove(0);
        let x509 = cert::parse(&cert_der, &cert_origin, 0)?;
        if !x509.is_ca() {
            return Err(CertsError::InvalidCa {
                origin: cert_origin,
                reason: "the certificate is not a CA (basicConstraints CA:TRUE missing)",
            });
        }
        let trust_domain = cert::uri_sans(&x509, &cert_origin)?
            .into_iter()
            .find_map(spiffe::trust_domain_of_uri)
            .ok_or_else(|| CertsError::InvalidCa {
                origin: cert_origin.clone(),
                reason: "no spiffe://<trust-domain> URI SAN naming the trust domain",
            })?
            .to_owned();
        let cert_spki = x509.public_key().raw.to_vec();
        drop(x509);

        let mut key_pem = read(&key_path)?;
        let key_der = pem::parse_key(&key_pem, &key_origin);
        key_pem.fill(0);
        let key = KeyPair::try_from(&key_der?)
            .map_err(generate(format!("load the CA key {key_origin}")))?;
        if key.subject_public_key_info() != cert_spki {
            return Err(CertsError::CaKeyMismatch {
                cert: cert_origin,
                key: key_origin,
            });
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(generate(format!("use {cert_origin} as an issuer")))?;
        Ok(MeshCa {
            trust_domain,
            cert_pem: pem::encode("CERTIFICATE", &cert_der),
            cert_der,
            issuer,
        })
    }

    /// Writes `dir/ca.pem` (mode 0644) and `dir/ca-key.pem` (mode 0600), each atomically,
    /// creating `dir` if needed. Overwrites existing files: refusing is the caller's decision.
    ///
    /// # Errors
    /// [`CertsError::Write`] naming the file.
    pub fn write(&self, dir: &Path) -> Result<(), CertsError> {
        fsutil::create_dir(dir)?;
        fsutil::write_atomic(
            &dir.join(CA_KEY_FILE),
            self.issuer.key().serialize_pem().as_bytes(),
            MODE_SECRET,
        )?;
        fsutil::write_atomic(
            &dir.join(CA_CERT_FILE),
            self.cert_pem.as_bytes(),
            MODE_PUBLIC,
        )
    }

    /// The CA certificate as PEM (what goes into trust bundles).
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA certificate as DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Issues a leaf for `spec` and returns it as a live [`crate::MeshTls`] trusting this CA
    /// alone: an in-process component (or a test) without files.
    ///
    /// # Errors
    /// As [`MeshCa::issue`].
    pub fn mesh_tls(&self, spec: &LeafSpec) -> Result<crate::MeshTls, CertsError> {
        let leaf = self.issue(spec)?;
        let bundle = crate::TrustBundle::from_pem(self.cert_pem().as_bytes())?;
        Ok(crate::MeshTls::new(leaf.identity()?, bundle))
    }

    /// Issues a leaf for `spec` with a fresh ECDSA P-256 key.
    ///
    /// # Errors
    /// [`CertsError::InvalidSpiffeId`] for a bad cluster or component name,
    /// [`CertsError::InvalidSan`] for a bad DNS name, [`CertsError::InvalidValidity`], or
    /// [`CertsError::Generate`].
    pub fn issue(&self, spec: &LeafSpec) -> Result<IssuedLeaf, CertsError> {
        let id = SpiffeId::for_component(&self.trust_domain, &spec.cluster, &spec.component)?;
        check_validity(id.as_str(), spec.not_before, spec.not_after)?;

        let mut sans = vec![SanType::URI(
            Ia5String::try_from(id.as_str())
                .map_err(generate(format!("encode the URI SAN {id}")))?,
        )];
        for dns in &spec.dns {
            let invalid = || CertsError::InvalidSan {
                kind: "DNS",
                value: dns.clone(),
                id: id.to_string(),
            };
            rustls_pki_types::DnsName::try_from(dns.as_str()).map_err(|_| invalid())?;
            sans.push(SanType::DnsName(
                Ia5String::try_from(dns.as_str()).map_err(|_| invalid())?,
            ));
        }
        sans.extend(spec.ips.iter().copied().map(SanType::IpAddress));

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(generate(format!("generate the key pair for {id}")))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Isthmus");
        dn.push(DnType::OrganizationalUnitName, spec.cluster.as_str());
        dn.push(DnType::CommonName, spec.component.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.serial_number = Some(random_serial()?);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate(format!("sign the leaf for {id}")))?;

        let serial = cert::serial_hex(&cert::parse(cert.der(), id.as_str(), 0)?);
        Ok(IssuedLeaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            id,
            serial,
        })
    }
}

impl fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// What to issue: the identity's cluster and component, extra SANs, and the validity window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafSpec {
    /// Cluster name, the `<cluster>` path segment (e.g. `k8s`, `diego`).
    pub cluster: String,
    /// Component name, the last path segment (e.g. `gateway`, `route-sync`).
    pub component: String,
    /// Extra DNS SANs (not used for mesh authorization, handy for other clients).
    pub dns: Vec<String>,
    /// Extra IP SANs.
    pub ips: Vec<IpAddr>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    /// A spec valid from five minutes ago (clock skew) until `ttl` from now, with no extra SANs.
    pub fn new(cluster: impl Into<String>, component: impl Into<String>, ttl: Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            cluster: cluster.into(),
            component: component.into(),
            dns: Vec::new(),
            ips: Vec::new(),
            not_before: now - CLOCK_SKEW,
            not_after: saturating_add(now, ttl),
        }
    }
}

/// A freshly issued leaf: certificate and key as PEM. `Debug` never shows the key.
#[derive(Clone)]
pub struct IssuedLeaf {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The SPIFFE ID in the certificate.
    pub id: SpiffeId,
    /// The serial number, lowercase hex.
    pub serial: String,
}

impl IssuedLeaf {
    /// Writes `dir/key.pem` (0600), `dir/cert.pem` (0644) and `dir/ca.pem` (0644, the trust
    /// bundle `ca_pem`), each atomically (temporary file, then rename), creating `dir` if
    /// needed. A watcher may briefly see the new key with the old certificate; it refuses that
    /// pair and picks up the complete set on the next change.
    ///
    /// # Errors
    /// [`CertsError::Write`] naming the file.
    pub fn write(&self, dir: &Path, ca_pem: &str) -> Result<(), CertsError> {
        fsutil::create_dir(dir)?;
        fsutil::write_atomic(
            &dir.join(LEAF_KEY_FILE),
            self.key_pem.as_bytes(),
            MODE_SECRET,
        )?;
        fsutil::write_atomic(
            &dir.join(LEAF_CERT_FILE),
            self.cert_pem.as_bytes(),
            MODE_PUBLIC,
        )?;
        fsutil::write_atomic(&dir.join(CA_CERT_FILE), ca_pem.as_bytes(), MODE_PUBLIC)
    }

    /// The leaf as a loaded, validated [`Identity`].
    ///
    /// # Errors
    /// As [`Identity::from_pem`] (never expected for a leaf this crate issued).
    pub fn identity(&self) -> Result<Identity, CertsError> {
        Identity::from_pem(self.cert_pem.as_bytes(), self.key_pem.as_bytes())
    }
}

impl fmt::Debug for IssuedLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedLeaf")
            .field("id", &self.id.as_str())
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

fn check_validity(
    what: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<(), CertsError> {
    if not_after <= not_before {
        return Err(CertsError::InvalidValidity {
            what: what.to_owned(),
            not_before,
            not_after,
        });
    }
    Ok(())
}

/// `t + d`, clamped at the largest representable time instead of panicking on overflow.
fn saturating_add(t: OffsetDateTime, d: Duration) -> OffsetDateTime {
    t.saturating_add(time::Duration::try_from(d).unwrap_or(time::Duration::MAX))
}

fn generate(action: String) -> impl FnOnce(rcgen::Error) -> CertsError {
    move |source| CertsError::Generate { action, source }
}

/// 16 random bytes (126 random bits, well above the CA/B Forum's 64).
fn random_serial() -> Result<SerialNumber, CertsError> {
    let mut bytes = [0u8; 16];
    crate::crypto_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CertsError::Random)?;
    // Top byte in 0x40..=0x7f: positive, and always two hex digits, so every serial prints
    // as exactly 32 hex characters.
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_has_the_mesh_shape() {
        let ca = MeshCa::generate("mesh.test").unwrap();
        let mut spec = LeafSpec::new("k8s", "gateway", Duration::from_secs(3600));
        spec.dns = vec!["gateway.isthmus.svc".into()];
        spec.ips = vec!["10.0.0.1".parse().unwrap()];
        let leaf = ca.issue(&spec).unwrap();
        assert_eq!(leaf.id.as_str(), "spiffe://mesh.test/cluster/k8s/gateway");
        assert_eq!(leaf.serial.len(), 32, "{}", leaf.serial);
        assert!(
            leaf.serial
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );

        let identity = leaf.identity().unwrap();
        assert_eq!(identity.serial(), leaf.serial);
        let der = &identity.chain()[0];
        let (_, x509) = x509_parser::parse_x509_certificate(der).unwrap();
        assert!(!x509.is_ca());
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let ku = x509.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let uris = cert::uri_sans(&x509, "t").unwrap();
        assert_eq!(uris, vec!["spiffe://mesh.test/cluster/k8s/gateway"]);

        let (_, ca_x509) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        assert!(ca_x509.is_ca());
        let ku = ca_x509.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let subject = ca_x509.subject().to_string();
        assert!(
            subject.starts_with("O=Isthmus, CN=Isthmus mesh CA (mesh.test), "),
            "{subject}"
        );
        // Two CAs of one trust domain never share a subject.
        let other = MeshCa::generate("mesh.test").unwrap();
        let (_, other_x509) = x509_parser::parse_x509_certificate(other.cert_der()).unwrap();
        assert_ne!(other_x509.subject(), ca_x509.subject());
    }

    #[test]
    fn serials_are_random() {
        let ca = MeshCa::generate("mesh.test").unwrap();
        let spec = LeafSpec::new("k8s", "gateway", Duration::from_secs(60));
        let a = ca.issue(&spec).unwrap();
        let b = ca.issue(&spec).unwrap();
        assert_ne!(a.serial, b.serial);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let ca = MeshCa::generate("mesh.test").unwrap();
        let mut spec = LeafSpec::new("k8s", "gateway", Duration::from_secs(60));
        spec.dns = vec!["not a host".into()];
        assert!(matches!(
            ca.issue(&spec),
            Err(CertsError::InvalidSan { .. })
        ));
        let spec = LeafSpec::new("k8s/x", "gateway", Duration::from_secs(60));
        assert!(matches!(
            ca.issue(&spec),
            Err(CertsError::InvalidSpiffeId { .. })
        ));
        let spec = LeafSpec::new("k8s", "gateway", Duration::ZERO);
        let mut spec = spec;
        spec.not_after = spec.not_before;
        assert!(matches!(
            ca.issue(&spec),
            Err(CertsError::InvalidValidity { .. })
        ));
        assert!(matches!(
            MeshCa::generate("Bad.Domain"),
            Err(CertsError::InvalidTrustDomain { .. })
        ));
    }

    #[test]
    fn write_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let ca = MeshCa::generate("mesh.test").unwrap();
        ca.write(dir.path()).unwrap();
        let loaded = MeshCa::load(dir.path()).unwrap();
        assert_eq!(loaded.trust_domain(), "mesh.test");
        assert_eq!(loaded.cert_der(), ca.cert_der());
        // The loaded CA issues leaves that chain to the original certificate.
        let leaf = loaded
            .issue(&LeafSpec::new("diego", "gateway", Duration::from_secs(60)))
            .unwrap();
        let identity = leaf.identity().unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&identity.chain()[0]).unwrap();
        let (_, ca_x509) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        assert_eq!(x509.issuer(), ca_x509.subject());
    }

    #[test]
    fn load_refuses_a_key_from_another_ca() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        MeshCa::generate("mesh.test")
            .unwrap()
            .write(dir.path())
            .unwrap();
        MeshCa::generate("mesh.test")
            .unwrap()
            .write(other.path())
            .unwrap();
        std::fs::copy(other.path().join(CA_KEY_FILE), dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(matches!(
            MeshCa::load(dir.path()),
            Err(CertsError::CaKeyMismatch { .. })
        ));
    }
}
