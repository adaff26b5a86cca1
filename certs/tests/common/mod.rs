//! Shared test scaffolding: in-test CAs and leaves, a TLS echo server on 127.0.0.1:0 that
//! reports each handshake's outcome, and helpers that bound every await with a timeout.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_certs::ca::{IssuedLeaf, LeafSpec, MeshCa};
use isthmus_certs::{Identity, MeshTls, PolicyDenied, SpiffeId, TrustBundle};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

pub const TD: &str = "mesh.test";
pub const ALPN: &[u8] = b"isthmus/test";

/// Bound for any single await in the tests.
pub const STEP: Duration = Duration::from_secs(5);

/// Awaits `f` or fails the test after [`STEP`].
pub async fn t<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .expect("test step timed out")
}

/// Polls `cond` every 10 ms until it holds, failing the test after [`STEP`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn leaf(ca: &MeshCa, cluster: &str, component: &str) -> IssuedLeaf {
    let mut spec = LeafSpec::new(cluster, component, Duration::from_secs(3600));
    spec.dns = vec![format!("{component}.{cluster}.{TD}")];
    ca.issue(&spec).expect("issue leaf")
}

pub fn identity(ca: &MeshCa, cluster: &str, component: &str) -> Identity {
    leaf(ca, cluster, component)
        .identity()
        .expect("leaf identity")
}

pub fn bundle(cas: &[&MeshCa]) -> TrustBundle {
    let pem: String = cas.iter().map(|ca| ca.cert_pem()).collect();
    TrustBundle::from_pem(pem.as_bytes()).expect("bundle")
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("spiffe id")
}

pub fn mesh(ca: &MeshCa, cluster: &str, component: &str, trusted: &[&MeshCa]) -> MeshTls {
    MeshTls::new(identity(ca, cluster, component), bundle(trusted))
}

/// Lowercase hex serial of a DER certificate, as `Identity::serial` reports it.
pub fn serial_of(der: &CertificateDer<'_>) -> String {
    let (_, x509) = x509_parser::parse_x509_certificate(der).expect("x509");
    x509.tbs_certificate.serial.to_str_radix(16)
}

/// What the server saw of an accepted handshake.
#[derive(Debug)]
pub struct Accepted {
    pub peer_id: SpiffeId,
    pub peer_serial: String,
    pub alpn: Option<Vec<u8>>,
}

/// A TLS echo server; every handshake outcome is reported through [`EchoServer::next`].
pub struct EchoServer {
    pub addr: SocketAddr,
    outcomes: mpsc::UnboundedReceiver<io::Result<Accepted>>,
    cancel: CancellationToken,
}

impl EchoServer {
    pub async fn start(config: Arc<ServerConfig>) -> Self {
        let listener = t(TcpListener::bind("127.0.0.1:0")).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, outcomes) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let acceptor = TlsAcceptor::from(config);
        let stop = cancel.clone();
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let stream = match acceptor.accept(tcp).await {
                        Ok(stream) => stream,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let conn = stream.get_ref().1;
                    let leaf = &conn.peer_certificates().expect("client cert")[0];
                    let _ = tx.send(Ok(Accepted {
                        peer_id: isthmus_certs::spiffe_id_of(leaf).expect("peer id"),
                        peer_serial: serial_of(leaf),
                        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                    }));
                    let (mut r, mut w) = tokio::io::split(stream);
                    tokio::select! {
                        () = stop.cancelled() => {}
                        _ = tokio::io::copy(&mut r, &mut w) => {}
                    }
                });
            }
        });
        EchoServer {
            addr,
            outcomes,
            cancel,
        }
    }

    /// The outcome of the next handshake the server finished (or failed).
    pub async fn next(&mut self) -> io::Result<Accepted> {
        t(self.outcomes.recv()).await.expect("server task alive")
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Connects and completes the client side of the handshake. The server name is arbitrary:
/// mesh clients authorize by SPIFFE ID only.
pub async fn connect(
    config: Arc<ClientConfig>,
    addr: SocketAddr,
) -> io::Result<TlsStream<TcpStream>> {
    connect_as(config, addr, "unrelated.example").await
}

pub async fn connect_as(
    config: Arc<ClientConfig>,
    addr: SocketAddr,
    server_name: &str,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = t(TcpStream::connect(addr)).await?;
    let name = ServerName::try_from(server_name.to_owned()).expect("server name");
    t(TlsConnector::from(config).connect(name, tcp)).await
}

/// One round trip through the echo server.
pub async fn echo(stream: &mut TlsStream<TcpStream>, msg: &[u8]) -> io::Result<()> {
    t(stream.write_all(msg)).await?;
    t(stream.flush()).await?;
    let mut buf = vec![0; msg.len()];
    t(stream.read_exact(&mut buf)).await?;
    assert_eq!(buf, msg, "echo mismatch");
    Ok(())
}

/// Connects and echoes once: the whole client-visible outcome. In TLS 1.3 the client finishes
/// its handshake before the server has judged the client certificate, so a refusal of the
/// client may only surface on the first read.
pub async fn connect_and_echo(
    config: Arc<ClientConfig>,
    addr: SocketAddr,
) -> io::Result<TlsStream<TcpStream>> {
    let mut stream = connect(config, addr).await?;
    echo(&mut stream, b"ping").await?;
    Ok(stream)
}

/// Serial of the certificate the server presented on this connection.
pub fn server_serial(stream: &TlsStream<TcpStream>) -> String {
    serial_of(&stream.get_ref().1.peer_certificates().expect("server cert")[0])
}

/// The rustls error inside an I/O error from tokio-rustls.
pub fn rustls_error(e: &io::Error) -> &rustls::Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {e:?}"))
}

/// The policy refusal inside a rustls error, if that is what it is.
pub fn policy_denied(e: &rustls::Error) -> Option<&PolicyDenied> {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            other.0.downcast_ref::<PolicyDenied>()
        }
        _ => None,
    }
}

/// A root CA made with rcgen directly, so that tests can give it any URI SAN (or none) and
/// have it sign leaves of any trust domain, which [`MeshCa`] never does.
pub struct RawCa {
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl RawCa {
    /// A root named `cn` whose URI SANs are `uris` (for example `["spiffe://b"]`; none at all
    /// for a root that names no trust domain).
    pub fn new(cn: &str, uris: &[&str]) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        params.subject_alt_names = uris
            .iter()
            .map(|uri| SanType::URI((*uri).try_into().expect("uri")))
            .collect();
        let cert = params.self_signed(&key).expect("self-sign");
        RawCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A leaf carrying `spiffe_id` as its one URI SAN, valid for server and client auth.
    pub fn leaf(&self, spiffe_id: &str) -> Identity {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "leaf");
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().expect("uri"))];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Identity::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
            .expect("leaf identity")
    }
}

/// A bundle of the given PEM roots.
pub fn bundle_of(pems: &[&str]) -> TrustBundle {
    TrustBundle::from_pem(pems.concat().as_bytes()).expect("bundle")
}

/// The trust-domain refusal inside a rustls error, if that is what it is.
pub fn anchor_refused(e: &rustls::Error) -> Option<&isthmus_certs::AnchorRefused> {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            other.0.downcast_ref::<isthmus_certs::AnchorRefused>()
        }
        _ => None,
    }
}
