//! Cloud Foundry's service-discovery-controller (SDC) as the upstream.
//!
//! `GET {url}/v1/registration/<name.>` over mutual TLS, as bosh-dns-adapter calls it; the
//! reply is `{"hosts":[{"ip_address":"10.255.12.3",...}],"env":"","service":""}` (lowercase
//! `hosts`; other fields ignored). Before its table is warm the SDC answers 500 `address table
//! is not warm`, which becomes SERVFAIL (counted as `not_warm`), never an empty answer.
//!
//! The SDC knows only IPv4 container addresses. A name with no hosts is NXDOMAIN; a name with
//! hosts asked for another type is NODATA (Diego's adapter answers both with an empty
//! NOERROR; the shim keeps the DNS distinction). Answers carry the configured TTL (the SDC
//! has none) and are shuffled, as the adapter shuffles them.
//!
//! This hop is CF's own mTLS, not the mesh: rustls with the ring provider and TLS 1.2 and 1.3
//! (cf-deployment's SDC requires 1.2 at least), webpki hostname verification against the
//! configured CA, and a client certificate.

use std::path::Path;
use std::sync::Arc;

use hickory_proto::op::{Query, ResponseCode};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::decide::family_matches;
use crate::error::ShimError;
use crate::upstream::http::HttpClient;
use crate::upstream::{Synth, percent_encode, shuffle};
use crate::wire::lookup_key;

/// The SDC's registration reply: only what the shim reads.
#[derive(Debug, Deserialize)]
struct Registration {
    #[serde(default)]
    hosts: Option<Vec<Host>>,
}

#[derive(Debug, Deserialize)]
struct Host {
    #[serde(default)]
    ip_address: String,
}

/// The SDC client.
#[derive(Debug)]
pub struct SdcUpstream {
    client: HttpClient,
    ttl: u32,
}

impl SdcUpstream {
    /// A client for the SDC at `url` with this TLS configuration, checking its certificate
    /// against `server_name` (default: the URL's host); answers get `ttl`.
    ///
    /// # Errors
    /// [`ShimError::InvalidUrl`] when `url` is not an `https` URL with a host, or the server
    /// name is not a DNS name or IP address.
    pub fn new(
        url: &str,
        server_name: Option<&str>,
        tls: Arc<ClientConfig>,
        ttl: u32,
    ) -> Result<Self, ShimError> {
        Ok(Self {
            client: HttpClient::new(url, Some((tls, server_name)))?,
            ttl,
        })
    }

    /// Looks `query`'s name up.
    ///
    /// # Errors
    /// When the SDC cannot be reached, is not warm, answers a status other than 200, or a
    /// body that is not the registration JSON.
    pub async fn resolve(&self, query: &Query) -> Result<Synth, ShimError> {
        // The adapter passes bosh-dns' question name, with its trailing dot; route-emitter
        // registers lowercase names.
        let name = match lookup_key(query.name()) {
            Some(key) => format!("{key}."),
            None => query.name().to_lowercase().to_ascii(),
        };
        let path = format!("/v1/registration/{}", percent_encode(&name));
        let (status, body) = self.client.get(&path).await?;
        if status == 500 && body.windows(8).any(|w| w == b"not warm") {
            return Err(ShimError::NotWarm {
                server: self.client.url().to_string(),
            });
        }
        if status != 200 {
            return Err(ShimError::UpstreamStatus {
                server: self.client.url().to_string(),
                status,
            });
        }
        let registration: Registration =
            serde_json::from_slice(&body).map_err(|e| ShimError::BadReply {
                server: self.client.url().to_string(),
                reason: format!("not the registration JSON: {e}"),
            })?;
        let mut ips: Vec<std::net::IpAddr> = registration
            .hosts
            .unwrap_or_default()
            .iter()
            .filter_map(|h| h.ip_address.parse().ok())
            .collect();
        if ips.is_empty() {
            return Ok(Synth {
                rcode: ResponseCode::NXDomain,
                answers: Vec::new(),
                truncated: false,
            });
        }
        shuffle(&mut ips);
        Ok(Synth {
            rcode: ResponseCode::NoError,
            answers: ips
                .into_iter()
                .filter(|ip| family_matches(query.query_type(), *ip))
                .map(|ip| (ip, self.ttl))
                .collect(),
            truncated: false,
        })
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ShimError> {
    std::fs::read(path).map_err(|source| ShimError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The rustls client configuration for the SDC: ring provider, TLS 1.3 and 1.2, the CA in
/// `ca` as the only root, the certificate chain in `cert` and the key in `key` as the client
/// identity.
///
/// # Errors
/// When a file cannot be read, holds no PEM of the expected kind, or rustls refuses the
/// material (e.g. a key that does not match the certificate).
pub fn tls_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>, ShimError> {
    let pem_err = |what, path: &Path, expected, reason: String| ShimError::Pem {
        what,
        path: path.to_path_buf(),
        expected,
        reason,
    };
    let mut roots = RootCertStore::empty();
    let ca_pem = read("SDC CA", ca)?;
    for der in CertificateDer::pem_slice_iter(&ca_pem) {
        let der = der.map_err(|e| pem_err("SDC CA", ca, "CERTIFICATE", e.to_string()))?;
        roots
            .add(der)
            .map_err(|e| pem_err("SDC CA", ca, "CERTIFICATE", e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(pem_err(
            "SDC CA",
            ca,
            "CERTIFICATE",
            "no certificate found".into(),
        ));
    }
    let cert_pem = read("SDC client certificate", cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err("SDC client certificate", cert, "CERTIFICATE", e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err(
            "SDC client certificate",
            cert,
            "CERTIFICATE",
            "no certificate found".into(),
        ));
    }
    let key_pem = read("SDC client key", key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| pem_err("SDC client key", key, "PRIVATE KEY", e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| ShimError::Tls { source })?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key_der)
        .map_err(|source| ShimError::Tls { source })?;
    Ok(Arc::new(config))
}
