//! The one error type of this crate.
//!
//! Every message names the input it failed on (a file path, or which PEM argument) and what was
//! expected, so an operator reading a log line knows which file to fix. The underlying cause is
//! kept as `#[source]` and is *not* repeated in the message: print the chain (`{:#}` with anyhow,
//! or walk `source()`) to see it.

use std::path::PathBuf;

use crate::policy::PolicyDenied;
use crate::spiffe::SpiffeIdError;

/// Everything that can go wrong while loading, issuing or checking mesh certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertsError {
    /// A string is not a valid SPIFFE ID.
    #[error("invalid SPIFFE ID {input:?}: {reason}")]
    InvalidSpiffeId {
        /// The rejected input.
        input: String,
        /// Which rule it broke.
        reason: SpiffeIdError,
    },

    /// A trust domain name is not valid.
    #[error(
        "invalid trust domain {input:?}: {reason}; expected lowercase letters, digits, '.', '-' and '_', e.g. \"mesh.example.org\""
    )]
    InvalidTrustDomain {
        /// The rejected input.
        input: String,
        /// Which rule it broke.
        reason: SpiffeIdError,
    },

    /// A certificate does not carry exactly one `spiffe://` URI SAN.
    #[error(
        "{origin}: expected exactly one spiffe:// URI SAN, found {}",
        describe_uris(found)
    )]
    SpiffeIdCount {
        /// Which certificate was examined.
        origin: String,
        /// The `spiffe://` URIs that were found (zero, or more than one).
        found: Vec<String>,
    },

    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A file or directory could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The PEM text itself is malformed (for example a section without its END line, as in a
    /// half-written file).
    #[error("{origin}: malformed PEM")]
    Pem {
        /// Which input.
        origin: String,
        /// What the PEM reader found.
        #[source]
        source: rustls_pki_types::pem::Error,
    },

    /// No `CERTIFICATE` section was found where at least one was expected.
    #[error("{origin}: no PEM CERTIFICATE section found; expected at least one certificate")]
    NoCertificates {
        /// Which input.
        origin: String,
    },

    /// No private key section was found.
    #[error(
        "{origin}: no PEM private key found; expected a PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY section"
    )]
    NoPrivateKey {
        /// Which input.
        origin: String,
    },

    /// A certificate is not well-formed X.509 DER.
    #[error("{origin}: certificate #{index} is not valid X.509")]
    BadCertificate {
        /// Which input.
        origin: String,
        /// Zero-based position of the certificate in the input.
        index: usize,
        /// What the parser said.
        #[source]
        source: x509_parser::error::X509Error,
    },

    /// The private key does not belong to the leaf certificate.
    #[error(
        "private key {key} does not match the certificate {cert}; write both files from the same issuance"
    )]
    KeyMismatch {
        /// Where the certificate came from.
        cert: String,
        /// Where the key came from.
        key: String,
    },

    /// The private key could not be loaded by the crypto provider (wrong type or corrupt).
    #[error("{origin}: unusable private key (expected an ECDSA P-256 key)")]
    BadPrivateKey {
        /// Which input.
        origin: String,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },

    /// A trust bundle entry is not a CA certificate.
    #[error(
        "{origin}: certificate #{index} ({subject}) is not a CA certificate; a trust bundle holds only root CAs"
    )]
    NotCa {
        /// Which input.
        origin: String,
        /// Zero-based position of the certificate in the input.
        index: usize,
        /// Its subject, to recognise it.
        subject: String,
    },

    /// A certificate could not be used as a trust anchor.
    #[error("{origin}: certificate #{index} cannot be used as a trust anchor")]
    BadTrustAnchor {
        /// Which input.
        origin: String,
        /// Zero-based position of the certificate in the input.
        index: usize,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },

    /// The CA private key does not belong to the CA certificate.
    #[error("CA key {key} does not match the CA certificate {cert}")]
    CaKeyMismatch {
        /// The CA certificate file.
        cert: String,
        /// The CA key file.
        key: String,
    },

    /// A certificate that must be a CA (the mesh CA) is not one, or has no trust domain.
    #[error("{origin} is not a usable mesh CA: {reason}")]
    InvalidCa {
        /// Which input.
        origin: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// Certificate or key generation failed in rcgen.
    #[error("cannot {action}")]
    Generate {
        /// What was being generated, e.g. "sign the leaf for spiffe://…".
        action: String,
        /// What rcgen said.
        #[source]
        source: rcgen::Error,
    },

    /// A requested validity window is empty or reversed.
    #[error(
        "invalid validity for {what}: not_after ({not_after}) must be later than not_before ({not_before})"
    )]
    InvalidValidity {
        /// What was being issued.
        what: String,
        /// Requested start.
        not_before: time::OffsetDateTime,
        /// Requested end.
        not_after: time::OffsetDateTime,
    },

    /// A SAN value given to the issuer is not usable (non-ASCII DNS name, …).
    #[error("invalid {kind} SAN {value:?} for {id}: expected an ASCII host name")]
    InvalidSan {
        /// "DNS", "URI".
        kind: &'static str,
        /// The rejected value.
        value: String,
        /// The SPIFFE ID being issued.
        id: String,
    },

    /// The operating system could not provide random bytes (for a certificate serial).
    #[error("cannot obtain random bytes for a certificate serial number")]
    Random,

    /// A peer was refused by a [`PeerPolicy`](crate::PeerPolicy).
    #[error(transparent)]
    PolicyDenied(#[from] PolicyDenied),
}

fn describe_uris(found: &[String]) -> String {
    if found.is_empty() {
        "none".to_owned()
    } else {
        format!("{} ({})", found.len(), found.join(", "))
    }
}

/// Formats an error with its whole `source()` chain as `outer: inner: innermost`, for log lines.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}
