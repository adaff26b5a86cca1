//! Test world for the DNS shim: the shim in-process on loopback, real DNS clients over UDP
//! and TCP, and the upstreams it forwards to (a hickory-server authority, an mTLS SDC, a
//! bosh-dns HTTP handler), all on ephemeral ports.

#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::Server;
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use isthmus_dns_shim::config::{
    AnswerConfig, DnsServer, DnsShimConfig, RoutesConfig, UpstreamConfig,
};
use isthmus_dns_shim::metrics::Metrics;
use isthmus_dns_shim::server::Server as ShimServer;
use isthmus_runtime::config::HumanDuration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Every await in a test is bounded by this.
pub const T: Duration = Duration::from_secs(10);

/// Runs `f` under the test timeout.
pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("timed out")
}

/// Polls `check` every 10 ms until it holds, failing after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Writes a route file the way a careful writer does: a temporary file, then a rename.
pub fn write_routes(path: &Path, yaml: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A configuration for the shim of cluster `diego` on loopback ports, routes polled fast.
pub fn config(routes: &Path, answer: AnswerConfig, upstream: UpstreamConfig) -> DnsShimConfig {
    let mut cfg = DnsShimConfig::new(
        "diego",
        answer,
        upstream,
        RoutesConfig {
            file: Some(routes.to_path_buf()),
            poll_interval: HumanDuration::from_millis(50),
            route_sync: None,
        },
    );
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    cfg.udp_sockets = 2;
    cfg.negative_ttl = 5;
    cfg
}

/// VIP answers: each route's own `vip`.
pub fn vips() -> AnswerConfig {
    AnswerConfig {
        vip: true,
        egress: Vec::new(),
    }
}

/// Shared answers from these addresses.
pub fn shared(addrs: &[&str]) -> AnswerConfig {
    AnswerConfig {
        vip: false,
        egress: addrs.iter().map(|a| a.parse().unwrap()).collect(),
    }
}

/// A `dns` upstream.
pub fn dns_upstream(servers: &[SocketAddr]) -> UpstreamConfig {
    UpstreamConfig::Dns {
        servers: servers.iter().map(|s| DnsServer(*s)).collect(),
    }
}

/// A running shim.
pub struct Running {
    /// UDP and TCP address.
    pub dns: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// Its metrics.
    pub metrics: Metrics,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops it and waits for it to finish.
    pub async fn stop(self) {
        self.stop.cancel();
        within(self.task).await.unwrap();
    }

    /// Total of the malformed-packet counter over every label.
    pub fn malformed(&self) -> u64 {
        let text = self.metrics_text();
        sum_metric(&text, "isthmus_dns_malformed_packets_total")
    }

    /// The metrics page as the admin server renders it, without HTTP.
    pub fn metrics_text(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        self.metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }
}

/// Sums every sample of `name` in a metrics page.
pub fn sum_metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Starts the whole process (route file, shim, admin) in this test.
pub async fn start(cfg: DnsShimConfig) -> Running {
    let server = within(ShimServer::build(&cfg)).await.unwrap();
    let dns = server.shim.local_addr();
    let admin = server.admin.local_addr();
    let metrics = server.shim.engine().metrics().clone();
    let stop = CancellationToken::new();
    let task = tokio::spawn(server.run(stop.clone()));
    Running {
        dns,
        admin,
        metrics,
        stop,
        task,
    }
}

/// A query message.
pub fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

/// Sends `bytes` over UDP from a fresh socket and decodes the reply.
pub async fn udp(addr: SocketAddr, bytes: &[u8]) -> Message {
    let raw = within(udp_raw(addr, bytes)).await;
    Message::from_vec(&raw).expect("reply decodes")
}

/// Sends `bytes` over UDP and returns the reply's bytes.
pub async fn udp_raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(bytes, addr).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    let (n, _) = socket.recv_from(&mut buf).await.unwrap();
    buf.truncate(n);
    buf
}

/// Sends `bytes` as one message over a new TCP connection and decodes the reply.
pub async fn tcp(addr: SocketAddr, bytes: &[u8]) -> Message {
    let mut s = within(TcpStream::connect(addr)).await.unwrap();
    let raw = within(tcp_exchange(&mut s, bytes)).await.unwrap();
    Message::from_vec(&raw).expect("reply decodes")
}

/// Writes one length-prefixed message and reads one reply.
pub async fn tcp_exchange(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    s.write_all(&framed).await?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut reply).await?;
    Ok(reply)
}

/// The A/AAAA addresses of a reply, as text.
pub fn addrs(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

/// The SOA minimum of a reply's authority section, if it has an SOA.
pub fn soa_minimum(m: &Message) -> Option<u32> {
    m.authorities.iter().find_map(|r| match &r.data {
        RData::SOA(soa) => Some(soa.minimum),
        _ => None,
    })
}

/// A hickory-server authority for `apps.internal.` on UDP and TCP: `billing` (A
/// 10.255.0.1), `0.orders` (A 10.255.9.9), `big` (60 A records, too many for 512 bytes);
/// anything else NXDOMAIN.
pub struct Authority {
    pub addr: SocketAddr,
    _server: Server<Catalog>,
}

pub async fn authority() -> Authority {
    let origin = Name::from_ascii("apps.internal.").unwrap();
    let mut zone = InMemoryZoneHandler::<hickory_server::net::runtime::TokioRuntimeProvider>::empty(
        origin.clone(),
        ZoneType::Primary,
        AxfrPolicy::Deny,
    );
    let soa = SOA::new(
        Name::from_ascii("ns.apps.internal.").unwrap(),
        Name::from_ascii("hostmaster.apps.internal.").unwrap(),
        1,
        3600,
        600,
        86_400,
        30,
    );
    zone.upsert_mut(Record::from_rdata(origin.clone(), 30, RData::SOA(soa)), 1);
    let mut add = |name: &str, ip: [u8; 4]| {
        let rec = Record::from_rdata(
            Name::from_ascii(name).unwrap(),
            0,
            RData::A(A::from(std::net::Ipv4Addr::from(ip))),
        );
        zone.upsert_mut(rec, 1);
    };
    add("billing.apps.internal.", [10, 255, 0, 1]);
    add("0.orders.apps.internal.", [10, 255, 9, 9]);
    add("orders.apps.internal.", [10, 255, 9, 1]);
    for i in 0..60u8 {
        add("big.apps.internal.", [10, 254, 0, i]);
    }
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::from(&origin), vec![Arc::new(zone)]);
    let mut server = Server::new(catalog);
    let (tcp, udp) = loop {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        if let Ok(udp) = UdpSocket::bind(tcp.local_addr().unwrap()).await {
            break (tcp, udp);
        }
    };
    let addr = tcp.local_addr().unwrap();
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 64 * 1024);
    Authority {
        addr,
        _server: server,
    }
}

/// A UDP address that swallows queries and never answers.
pub async fn blackhole() -> (SocketAddr, UdpSocket) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    (socket.local_addr().unwrap(), socket)
}

/// A UDP and TCP address nothing listens on (replies with port unreachable / RST).
pub async fn dead() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.local_addr().unwrap()
}

/// What an HTTP test server answers: status and body for a path-and-query.
pub type Handler = Arc<dyn Fn(&str) -> (u16, String) + Send + Sync>;

/// An HTTP/1.1 server (over TLS when `tls` is given) answering with `handler`; returns its
/// address and the list of requested path-and-queries.
pub async fn http_server(
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: Handler,
) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (handler, log, tls) = (Arc::clone(&handler), Arc::clone(&log), tls.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let target = req
                        .uri()
                        .path_and_query()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_default();
                    log.lock().unwrap().push(target.clone());
                    let (status, body) = handler(&target);
                    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                    std::future::ready(Ok::<_, Infallible>(resp))
                });
                let builder = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(cfg) => {
                        let Ok(stream) = tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await
                        else {
                            return;
                        };
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Certificates as cf-deployment has them for the SDC: a CA, a server certificate for
/// `service-discovery-controller.service.cf.internal`, a client certificate with the
/// clientAuth EKU, written as PEM files.
pub struct SdcPki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A client certificate from another CA, which the SDC must refuse.
    pub stranger_cert: PathBuf,
    pub stranger_key: PathBuf,
    /// The SDC's TLS 1.2-only server configuration, requiring client certificates.
    pub server: Arc<rustls::ServerConfig>,
}

pub fn sdc_pki(dir: &Path) -> SdcPki {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca = |cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.self_signed(&key).unwrap();
        (cert, Issuer::new(params, key))
    };
    let leaf = |issuer: &Issuer<'_, KeyPair>, name: &str, eku: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.extended_key_usages = vec![eku];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        (params.signed_by(&key, issuer).unwrap(), key)
    };
    let (ca_cert, issuer) = ca("cf_app_sd_ca");
    let (server_cert, server_key) = leaf(
        &issuer,
        "service-discovery-controller.service.cf.internal",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(
        &issuer,
        "bosh-dns-adapter",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let (_, other) = ca("someone-else");
    let (stranger, stranger_key) = leaf(&other, "stranger", ExtendedKeyUsagePurpose::ClientAuth);
    let write = |name: &str, pem: String| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server_cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        )
        .unwrap();
    SdcPki {
        ca: write("ca.pem", ca_cert.pem()),
        cert: write("client.pem", client_cert.pem()),
        key: write("client-key.pem", client_key.serialize_pem()),
        stranger_cert: write("stranger.pem", stranger.pem()),
        stranger_key: write("stranger-key.pem", stranger_key.serialize_pem()),
        server: Arc::new(server),
    }
}
