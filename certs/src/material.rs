//! The two kinds of TLS material a mesh component holds: its own [`Identity`] (certificate chain
//! plus private key, carrying a SPIFFE ID) and the [`TrustBundle`] of root CAs it accepts peers
//! from. Both are validated completely when loaded, so a value of either type is always usable.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::cert;
use crate::error::CertsError;
use crate::pem;
use crate::spiffe::SpiffeId;

/// A certificate chain with its private key and the SPIFFE ID of the leaf.
///
/// Cheap to clone (the key lives behind an `Arc`). `Debug` never shows key material.
#[derive(Clone)]
pub struct Identity {
    certified: Arc<CertifiedKey>,
    id: SpiffeId,
    serial: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl Identity {
    /// Builds an identity from a PEM chain (leaf first, then any intermediates) and a PEM
    /// private key (PKCS#8, SEC1 or PKCS#1).
    ///
    /// # Errors
    /// Malformed PEM, no certificate or key, a certificate that is not X.509, a leaf without
    /// exactly one SPIFFE ID, a key the provider cannot use, or a key that does not belong to
    /// the leaf ([`CertsError::KeyMismatch`]).
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, CertsError> {
        Self::parse(chain_pem, key_pem, "certificate PEM", "private key PEM")
    }

    /// Reads and validates `cert_path` (chain) and `key_path` (private key).
    ///
    /// # Errors
    /// [`CertsError::Read`] if a file cannot be read, otherwise as [`Identity::from_pem`] with
    /// the file names in the message.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CertsError> {
        let chain_pem = read(cert_path)?;
        let mut key_pem = read(key_path)?;
        let result = Self::parse(
            &chain_pem,
            &key_pem,
            &cert_path.display().to_string(),
            &key_path.display().to_string(),
        );
        // Do not leave a copy of the key in freed heap memory longer than needed.
        key_pem.fill(0);
        result
    }

    fn parse(
        chain_pem: &[u8],
        key_pem: &[u8],
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<Self, CertsError> {
        let chain = pem::parse_certs(chain_pem, cert_origin)?;
        for (index, der) in chain.iter().enumerate() {
            cert::parse(der, cert_origin, index)?;
        }
        let leaf = cert::parse(&chain[0], cert_origin, 0)?;
        let id = cert::spiffe_id_in(&leaf, cert_origin)?;
        let serial = cert::serial_hex(&leaf);
        let not_before = leaf.validity().not_before.to_datetime();
        let not_after = cert::not_after(&leaf);
        drop(leaf);

        let key = pem::parse_key(key_pem, key_origin)?;
        let provider = crate::crypto_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|source| CertsError::BadPrivateKey {
                origin: key_origin.to_owned(),
                source,
            })?;
        let certified = CertifiedKey::new(chain, signing_key);
        if let Err(e) = certified.keys_match() {
            return Err(match e {
                rustls::Error::InconsistentKeys(_) => CertsError::KeyMismatch {
                    cert: cert_origin.to_owned(),
                    key: key_origin.to_owned(),
                },
                source => CertsError::BadPrivateKey {
                    origin: key_origin.to_owned(),
                    source,
                },
            });
        }
        Ok(Identity {
            certified: Arc::new(certified),
            id,
            serial,
            not_before,
            not_after,
        })
    }

    /// The leaf's SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The leaf's serial number, lowercase hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// The chain and signing key in the form rustls resolvers hand out.
    pub(crate) fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.certified)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id.as_str())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.certified.cert.len())
            .finish_non_exhaustive()
    }
}

/// What one root of a bundle vouches for, read once at load from its SPIFFE URI SAN.
///
/// A root vouches only for the trust domain its own `spiffe://<trust-domain>` URI SAN names, so
/// a bundle that merges the roots of two trust domains does not let either CA issue IDs of the
/// other. A root that names no trust domain anchors nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootScope {
    /// Leaves whose SPIFFE ID is in this trust domain.
    TrustDomain(String),
    /// No leaf at all; the text says why the root names no trust domain.
    Nothing(String),
}

impl RootScope {
    /// Reads the scope from a root's URI SANs: every `spiffe://` URI must name the same, valid
    /// trust domain (`spiffe://<td>`, or an ID `spiffe://<td>/<path>` when the CA is itself an
    /// SVID), and there must be at least one.
    fn of(uris: &[&str]) -> RootScope {
        let spiffe: Vec<&str> = uris
            .iter()
            .copied()
            .filter(|uri| {
                uri.get(..9)
                    .is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe://"))
            })
            .collect();
        let mut domain: Option<String> = None;
        for uri in &spiffe {
            let td = match crate::spiffe::trust_domain_of_uri(uri) {
                Some(td) => td.to_owned(),
                None => match SpiffeId::parse(uri) {
                    Ok(id) => id.trust_domain().to_owned(),
                    Err(_) => {
                        return RootScope::Nothing(format!(
                            "its URI SAN {uri:?} is neither spiffe://<trust-domain> nor a valid SPIFFE ID"
                        ));
                    }
                },
            };
            match &domain {
                Some(seen) if *seen != td => {
                    return RootScope::Nothing(format!(
                        "its URI SANs name more than one trust domain ({}); a root vouches for one",
                        spiffe.join(", ")
                    ));
                }
                _ => domain = Some(td),
            }
        }
        match domain {
            Some(td) => RootScope::TrustDomain(td),
            None => RootScope::Nothing(
                "it has no spiffe://<trust-domain> URI SAN naming the trust domain it vouches for"
                    .to_owned(),
            ),
        }
    }
}

impl fmt::Display for RootScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RootScope::TrustDomain(td) => write!(f, "trust domain {td}"),
            RootScope::Nothing(why) => write!(f, "nothing ({why})"),
        }
    }
}

/// A chain verified up to a root of the bundle was refused because that root does not vouch
/// for the leaf's trust domain.
///
/// `Debug` prints the same sentence as `Display`, as [`PolicyDenied`](crate::PolicyDenied)
/// does, because rustls shows it through `Debug`.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub struct AnchorRefused {
    /// The ID the peer presented.
    pub presented: SpiffeId,
    /// The subject of the root its chain ended at.
    pub root: String,
    /// What that root vouches for.
    pub scope: RootScope,
}

impl fmt::Display for AnchorRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (presented, root) = (&self.presented, &self.root);
        match &self.scope {
            RootScope::TrustDomain(td) => write!(
                f,
                "peer {presented} of trust domain {} chains to root \"{root}\" of trust domain \
                 {td}, which vouches only for {td}: a root anchors only IDs of its own trust domain",
                presented.trust_domain()
            ),
            RootScope::Nothing(why) => write!(
                f,
                "peer {presented} chains to root \"{root}\", which anchors no trust domain: {why}"
            ),
        }
    }
}

impl fmt::Debug for AnchorRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AnchorRefused({self})")
    }
}

/// One root as the verifiers need it: its subject for messages and the trust domain it
/// vouches for, in the order of the store's trust anchors.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RootInfo {
    subject: String,
    scope: RootScope,
}

/// The root CAs peers are verified against. Never empty; every entry is a CA certificate.
///
/// Several roots at once are how a CA is rotated: distribute old and new, reissue leaves from
/// the new CA, then drop the old root. Each root vouches only for its own trust domain
/// ([`RootScope`]).
#[derive(Clone)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    /// `info[i]` describes `store.roots[i]` (and `roots[i]`).
    info: Arc<[RootInfo]>,
    store: Arc<RootCertStore>,
}

impl TrustBundle {
    /// Parses a bundle of one or more PEM CA certificates; identical certificates are kept once.
    ///
    /// # Errors
    /// Malformed PEM, no certificate, a certificate that is not X.509, not a CA
    /// ([`CertsError::NotCa`]), or not usable as a trust anchor.
    pub fn from_pem(pem: &[u8]) -> Result<Self, CertsError> {
        Self::parse(pem, "trust bundle PEM")
    }

    /// Reads and validates the bundle file at `path`.
    ///
    /// # Errors
    /// [`CertsError::Read`] if the file cannot be read, otherwise as [`TrustBundle::from_pem`]
    /// with the file name in the message.
    pub fn load(path: &Path) -> Result<Self, CertsError> {
        Self::parse(&read(path)?, &path.display().to_string())
    }

    /// Builds a bundle from DER certificates; `origin` names their source in errors.
    ///
    /// # Errors
    /// As [`TrustBundle::from_pem`], without the PEM errors.
    pub fn from_roots(
        roots: Vec<CertificateDer<'static>>,
        origin: &str,
    ) -> Result<Self, CertsError> {
        if roots.is_empty() {
            return Err(CertsError::NoCertificates {
                origin: origin.to_owned(),
            });
        }
        let mut unique: Vec<CertificateDer<'static>> = Vec::with_capacity(roots.len());
        let mut info = Vec::with_capacity(roots.len());
        let mut store = RootCertStore::empty();
        for (index, der) in roots.into_iter().enumerate() {
            let x509 = cert::parse(&der, origin, index)?;
            if !x509.is_ca() {
                return Err(CertsError::NotCa {
                    origin: origin.to_owned(),
                    index,
                    subject: x509.subject().to_string(),
                });
            }
            if unique.contains(&der) {
                continue;
            }
            let root = RootInfo {
                subject: x509.subject().to_string(),
                scope: RootScope::of(&cert::uri_sans(&x509, origin)?),
            };
            drop(x509);
            store
                .add(der.clone())
                .map_err(|source| CertsError::BadTrustAnchor {
                    origin: origin.to_owned(),
                    index,
                    source,
                })?;
            unique.push(der);
            info.push(root);
        }
        // `add` pushes exactly one anchor per root, so the two lists stay index for index.
        debug_assert_eq!(store.roots.len(), info.len());
        Ok(TrustBundle {
            roots: unique,
            info: info.into(),
            store: Arc::new(store),
        })
    }

    fn parse(pem: &[u8], origin: &str) -> Result<Self, CertsError> {
        Self::from_roots(pem::parse_certs(pem, origin)?, origin)
    }

    /// Each root as `"<subject> sha256:<hex of the DER>"`, in file order.
    pub fn anchors(&self) -> Vec<String> {
        self.roots
            .iter()
            .map(|der| {
                let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
                let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
                let subject = x509_parser::parse_x509_certificate(der.as_ref())
                    .map(|(_, c)| c.subject().to_string())
                    .unwrap_or_else(|_| "<unparsable>".into());
                format!("{subject} sha256:{hex}")
            })
            .collect()
    }

    /// The root certificates, in file order, without duplicates.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// What each root vouches for, index for index with [`TrustBundle::roots`].
    pub fn scopes(&self) -> impl ExactSizeIterator<Item = &RootScope> {
        self.info.iter().map(|root| &root.scope)
    }

    /// The subject of each root that anchors nothing, with the reason.
    pub(crate) fn unanchored(&self) -> impl Iterator<Item = (&str, &str)> {
        self.info.iter().filter_map(|root| match &root.scope {
            RootScope::Nothing(why) => Some((root.subject.as_str(), why.as_str())),
            RootScope::TrustDomain(_) => None,
        })
    }

    /// Whether the root at `index` (in [`TrustBundle::roots`] order, which is also the order
    /// of the rustls store's anchors) vouches for `id`.
    ///
    /// # Errors
    /// [`AnchorRefused`] naming the ID, the root and its scope when the root is of another
    /// trust domain or anchors none. An index past the end anchors nothing.
    pub fn vouches(&self, index: usize, id: &SpiffeId) -> Result<(), AnchorRefused> {
        let Some(root) = self.info.get(index) else {
            return Err(AnchorRefused {
                presented: id.clone(),
                root: format!("#{index}"),
                scope: RootScope::Nothing("no such root in the bundle".to_owned()),
            });
        };
        match &root.scope {
            RootScope::TrustDomain(td) if td.eq_ignore_ascii_case(id.trust_domain()) => Ok(()),
            scope => Err(AnchorRefused {
                presented: id.clone(),
                root: root.subject.clone(),
                scope: scope.clone(),
            }),
        }
    }

    /// The bundle as PEM text, one CERTIFICATE section per root.
    pub fn to_pem(&self) -> String {
        self.roots
            .iter()
            .map(|der| pem::encode("CERTIFICATE", der))
            .collect()
    }

    /// Writes the bundle as PEM to `path` atomically (temporary file, then rename), mode 0644.
    ///
    /// # Errors
    /// [`CertsError::Write`] naming the file.
    pub fn write(&self, path: &Path) -> Result<(), CertsError> {
        crate::fsutil::write_atomic(path, self.to_pem().as_bytes(), crate::fsutil::MODE_PUBLIC)
    }

    /// The roots as a rustls store (built once at load time).
    pub(crate) fn root_store(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.store)
    }
}

impl PartialEq for TrustBundle {
    fn eq(&self, other: &Self) -> bool {
        self.roots == other.roots
    }
}

impl Eq for TrustBundle {}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.roots.len())
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertsError> {
    std::fs::read(path).map_err(|source| CertsError::Read {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ca::{LeafSpec, MeshCa};

    fn leaf(ca: &MeshCa) -> crate::ca::IssuedLeaf {
        ca.issue(&LeafSpec::new("k8s", "gateway", Duration::from_secs(60)))
            .unwrap()
    }

    #[test]
    fn identity_refuses_a_key_of_another_leaf() {
        let ca = MeshCa::generate("mesh.test").unwrap();
        let (a, b) = (leaf(&ca), leaf(&ca));
        let err = Identity::from_pem(a.cert_pem.as_bytes(), b.key_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, CertsError::KeyMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn identity_needs_a_spiffe_id_and_a_key() {
        let ca = MeshCa::generate("mesh.test").unwrap();
        let a = leaf(&ca);
        // The CA carries only the trust-domain URI, which is not a workload ID.
        let err = Identity::from_pem(ca.cert_pem().as_bytes(), a.key_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, CertsError::InvalidSpiffeId { .. }), "{err:?}");
        let err = Identity::from_pem(a.cert_pem.as_bytes(), a.cert_pem.as_bytes()).unwrap_err();
        assert!(matches!(err, CertsError::NoPrivateKey { .. }), "{err:?}");
    }

    #[test]
    fn identity_debug_never_shows_the_key() {
        let ca = MeshCa::generate("mesh.test").unwrap();
        let a = leaf(&ca);
        let identity = a.identity().unwrap();
        let shown = format!("{identity:?} {a:?} {ca:?}");
        assert!(shown.contains(a.id.as_str()), "{shown}");
        for line in a.key_pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!shown.contains(line), "{shown}");
        }
    }

    #[test]
    fn bundle_dedupes_refuses_leaves_and_round_trips() {
        let (ca1, ca2) = (
            MeshCa::generate("mesh.test").unwrap(),
            MeshCa::generate("mesh.test").unwrap(),
        );
        let pem = format!("{}{}{}", ca1.cert_pem(), ca2.cert_pem(), ca1.cert_pem());
        let bundle = TrustBundle::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(
            bundle.roots(),
            &[ca1.cert_der().clone(), ca2.cert_der().clone()]
        );
        assert_eq!(
            TrustBundle::from_pem(bundle.to_pem().as_bytes()).unwrap(),
            bundle
        );

        let with_leaf = format!("{}{}", ca1.cert_pem(), leaf(&ca1).cert_pem);
        let err = TrustBundle::from_pem(with_leaf.as_bytes()).unwrap_err();
        assert!(matches!(err, CertsError::NotCa { index: 1, .. }), "{err:?}");
        assert!(matches!(
            TrustBundle::from_pem(b"no pem here"),
            Err(CertsError::NoCertificates { .. })
        ));
    }
}
