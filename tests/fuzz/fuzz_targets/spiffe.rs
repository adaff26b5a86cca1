//! SPIFFE IDs from certificates and configuration: parsing never panics, what parses prints
//! back to itself and parses the same again, and a peer's DER certificate (as rustls hands it
//! to our verifiers) yields an ID or an error, never a panic.
#![no_main]
use isthmus_certs::SpiffeId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let der = rustls_pki_types::CertificateDer::from(data);
    if let Ok(id) = isthmus_certs::spiffe_id_of(&der) {
        assert_eq!(SpiffeId::parse(id.as_str()).ok(), Some(id));
    }
    let _ = isthmus_certs::serial_of(&der);
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(s) {
        let again = SpiffeId::parse(id.as_str()).expect("a parsed ID parses again");
        assert_eq!(again, id);
        assert!(id.as_str().starts_with("spiffe://"));
        assert!(isthmus_certs::validate_trust_domain(id.trust_domain()).is_ok());
        let _ = id.cluster();
    }
    let _ = isthmus_certs::validate_trust_domain(s);
});
