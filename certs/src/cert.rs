//! Reading X.509 certificates: SPIFFE ID, serial, validity. Pure functions over DER.

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::error::CertsError;
use crate::spiffe::SpiffeId;

/// The SPIFFE ID of a certificate: its one `spiffe://` URI SAN.
///
/// # Errors
/// [`CertsError::BadCertificate`] if the DER does not parse, [`CertsError::SpiffeIdCount`] if
/// there is not exactly one `spiffe://` URI SAN (the error lists what was found), or
/// [`CertsError::InvalidSpiffeId`] if that URI is not a valid workload ID.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, CertsError> {
    let x509 = parse(cert, "certificate", 0)?;
    spiffe_id_in(&x509, "certificate")
}

/// The serial number of a certificate, as lowercase hex (what `inspect` and logs show).
///
/// # Errors
/// [`CertsError::BadCertificate`] if the DER does not parse.
pub fn serial_of(cert: &CertificateDer<'_>) -> Result<String, CertsError> {
    Ok(serial_hex(&parse(cert, "certificate", 0)?))
}

/// Parses one certificate, refusing trailing bytes.
pub(crate) fn parse<'a>(
    der: &'a CertificateDer<'_>,
    origin: &str,
    index: usize,
) -> Result<X509Certificate<'a>, CertsError> {
    let bad = |source| CertsError::BadCertificate {
        origin: origin.to_owned(),
        index,
        source,
    };
    match x509_parser::parse_x509_certificate(der.as_ref()) {
        Ok(([], x509)) => Ok(x509),
        Ok(_) => Err(bad(x509_parser::error::X509Error::InvalidCertificate)),
        Err(e) => Err(bad(e.into())),
    }
}

/// All URI SANs of a certificate (empty if it has no SAN extension).
pub(crate) fn uri_sans<'a>(
    x509: &X509Certificate<'a>,
    origin: &str,
) -> Result<Vec<&'a str>, CertsError> {
    let sans = x509
        .subject_alternative_name()
        .map_err(|source| CertsError::BadCertificate {
            origin: origin.to_owned(),
            index: 0,
            source,
        })?;
    Ok(sans
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The one `spiffe://` URI SAN of a parsed certificate.
pub(crate) fn spiffe_id_in(
    x509: &X509Certificate<'_>,
    origin: &str,
) -> Result<SpiffeId, CertsError> {
    let spiffe: Vec<&str> = uri_sans(x509, origin)?
        .into_iter()
        .filter(|uri| {
            uri.get(..9)
                .is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe://"))
        })
        .collect();
    match spiffe.as_slice() {
        [one] => SpiffeId::parse(one),
        _ => Err(CertsError::SpiffeIdCount {
            origin: origin.to_owned(),
            found: spiffe.iter().map(|s| (*s).to_owned()).collect(),
        }),
    }
}

/// The serial number as lowercase hex without leading zeros (what `inspect` and logs show).
pub(crate) fn serial_hex(x509: &X509Certificate<'_>) -> String {
    x509.tbs_certificate.serial.to_str_radix(16)
}

/// End of the validity window.
pub(crate) fn not_after(x509: &X509Certificate<'_>) -> OffsetDateTime {
    x509.validity().not_after.to_datetime()
}
