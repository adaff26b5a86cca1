//! PEM in and out. Reading goes through `rustls-pki-types`; writing is a tiny base64 encoder so
//! that bundles can be re-encoded canonically without another dependency.

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::CertsError;

/// Every `CERTIFICATE` section of `pem`, in order; other sections are ignored.
///
/// # Errors
/// [`CertsError::Pem`] for malformed PEM (such as a half-written file missing its END line),
/// [`CertsError::NoCertificates`] when there is none.
pub(crate) fn parse_certs(
    pem: &[u8],
    origin: &str,
) -> Result<Vec<CertificateDer<'static>>, CertsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertsError::Pem {
            origin: origin.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(CertsError::NoCertificates {
            origin: origin.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in `pem`.
///
/// # Errors
/// [`CertsError::Pem`] for malformed PEM, [`CertsError::NoPrivateKey`] when there is none.
pub(crate) fn parse_key(pem: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>, CertsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| match source {
        pem::Error::NoItemsFound => CertsError::NoPrivateKey {
            origin: origin.to_owned(),
        },
        source => CertsError::Pem {
            origin: origin.to_owned(),
            source,
        },
    })
}

/// Encodes `der` as one PEM section with the given label, 64 columns, trailing newline.
pub(crate) fn encode(label: &str, der: &[u8]) -> String {
    let b64 = base64(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextet = |shift: u32| char::from(ALPHABET[((n >> shift) & 0x3f) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn encode_round_trips_through_the_reader() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let text = encode("CERTIFICATE", &der);
        assert!(text.lines().all(|l| l.len() <= 64));
        let certs = parse_certs(text.as_bytes(), "test").unwrap();
        assert_eq!(certs.len(), 1);
        assert_eq!(certs[0].as_ref(), &der[..]);
    }

    #[test]
    fn truncated_pem_is_an_error_not_an_empty_list() {
        let text = encode("CERTIFICATE", &[1, 2, 3, 4, 5, 6]);
        let half = &text.as_bytes()[..text.len() - 10];
        assert!(matches!(
            parse_certs(half, "half"),
            Err(CertsError::Pem { .. })
        ));
        assert!(matches!(
            parse_certs(b"", "empty"),
            Err(CertsError::NoCertificates { .. })
        ));
        assert!(matches!(
            parse_key(text.as_bytes(), "no key"),
            Err(CertsError::NoPrivateKey { .. })
        ));
    }
}
