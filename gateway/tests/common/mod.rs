//! Test world for the gateway: a mesh CA, a "k8s" ingress and a "diego" egress in-process on
//! loopback, backends, and raw tunnel clients for refusal tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use isthmus_certs::ca::{LeafSpec, MeshCa};
use isthmus_certs::{Component, MeshTls, PeerPolicy};
use isthmus_gateway::Context;
use isthmus_gateway::config::{EgressConfig, IngressConfig, PeerConfig, Transport};
use isthmus_gateway::egress::Egress;
use isthmus_gateway::ingress::Ingress;
use isthmus_gateway::metrics::Metrics;
use isthmus_route_sync::source::file::parse;
use isthmus_route_sync::{ClusterName, RouteStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const TD: &str = "mesh.local";
pub const T: Duration = Duration::from_secs(10);

/// Runs `f` under the test timeout.
pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("timed out")
}

pub struct Mesh {
    pub ca: MeshCa,
}

impl Mesh {
    pub fn new() -> Self {
        Self {
            ca: MeshCa::generate(TD).unwrap(),
        }
    }

    pub fn tls(&self, cluster: &str, component: &str) -> MeshTls {
        self.ca
            .mesh_tls(&LeafSpec::new(
                cluster,
                component,
                Duration::from_secs(3600),
            ))
            .unwrap()
    }

    pub fn context(&self, cluster: &str, routes: &RouteStore) -> Context {
        Context {
            cluster: ClusterName::parse(cluster).unwrap(),
            trust_domain: TD.into(),
            routes: routes.clone(),
            tls: self.tls(cluster, "gateway"),
            metrics: Metrics::default(),
            loaded: isthmus_gateway::TableLoaded::new(true),
        }
    }
}

/// Loads YAML routes into a new store.
pub fn routes(yaml: &str) -> RouteStore {
    let loaded = parse(yaml, Path::new("test-routes.yaml")).unwrap();
    assert!(loaded.rejected.is_empty(), "{:?}", loaded.rejected);
    let store = RouteStore::new();
    store.replace_all(loaded.routes);
    store
}

/// An echo backend: echoes every byte, and half-closes its side when the caller does.
/// Replies start with `prefix` when it is not empty.
pub async fn echo_backend(prefix: &'static str) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if !prefix.is_empty() && s.write_all(prefix.as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// A port nothing listens on.
pub async fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

pub struct Running {
    pub shutdown: CancellationToken,
    pub force: CancellationToken,
    pub task: JoinHandle<()>,
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.force.cancel();
        within(self.task).await.unwrap();
    }
}

pub async fn start_ingress(ctx: Context, cfg: IngressConfig) -> (SocketAddr, Running) {
    let ingress = Ingress::bind(ctx, cfg).await.unwrap();
    let addr = ingress.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let force = CancellationToken::new();
    let task = tokio::spawn(ingress.run(shutdown.clone(), force.clone()));
    (
        addr,
        Running {
            shutdown,
            force,
            task,
        },
    )
}

pub fn ingress_cfg() -> IngressConfig {
    IngressConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..IngressConfig::default()
    }
}

pub fn egress_cfg(route: &str, endpoints: Vec<SocketAddr>, transport: Transport) -> EgressConfig {
    let mut cfg = EgressConfig::with_peers(vec![PeerConfig {
        cluster: "k8s".into(),
        endpoints,
        transport,
        fallback_to_tcp: false,
    }]);
    cfg.dedicated
        .push(isthmus_gateway::config::DedicatedListener {
            listen: "127.0.0.1:0".parse().unwrap(),
            route: route.into(),
        });
    cfg
}

/// A bound egress: the dedicated listener address of its first route, and a handle to it.
pub struct EgressUnderTest {
    pub addr: SocketAddr,
    pub egress: Arc<tokio::sync::Mutex<Option<Egress>>>,
}

pub async fn start_egress(ctx: Context, cfg: EgressConfig) -> (SocketAddr, Running) {
    let egress = Egress::bind(ctx, cfg).await.unwrap();
    let addr = egress.dedicated_addrs()[0].1;
    let shutdown = CancellationToken::new();
    let force = CancellationToken::new();
    let task = tokio::spawn(egress.run(shutdown.clone(), force.clone()));
    (
        addr,
        Running {
            shutdown,
            force,
            task,
        },
    )
}

/// Sends `payload` through `addr`, half-closes, and returns everything read back.
pub async fn round_trip(addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(payload).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(out)
}

/// A raw HTTP/2 CONNECT client on one tunnel connection, for refusal tests.
pub struct RawH2 {
    pub send: h2::client::SendRequest<Bytes>,
}

impl RawH2 {
    pub async fn connect(
        addr: SocketAddr,
        tls: &MeshTls,
        server_cluster: &str,
    ) -> std::io::Result<Self> {
        let policy = PeerPolicy::component(TD, server_cluster, Component::GATEWAY);
        let cfg = tls.client_config(policy, &[b"h2"]);
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await?;
        let (send, conn) = h2::client::handshake(tls)
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { send })
    }

    /// Sends one request and returns its status and stream halves.
    pub async fn request(
        &mut self,
        method: http::Method,
        uri: &str,
    ) -> (u16, h2::SendStream<Bytes>, h2::RecvStream) {
        let send = self.send.clone().ready().await.unwrap();
        let mut send = send;
        let req = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap();
        let (resp, stream) = send.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        (resp.status().as_u16(), stream, resp.into_body())
    }
}

/// Sends `data` on an h2 stream and reads the same number of bytes back.
pub async fn h2_echo(
    send: &mut h2::SendStream<Bytes>,
    recv: &mut h2::RecvStream,
    data: &[u8],
) -> Vec<u8> {
    send.send_data(Bytes::copy_from_slice(data), false).unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        let chunk = recv.data().await.unwrap().unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    got
}

/// Waits until `f` holds, polling; panics after the test timeout.
pub async fn eventually(mut f: impl FnMut() -> bool) {
    within(async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

pub const ROUTES: &str = r#"
routes:
  - {name: orders.apps.internal, port: 8080, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["ECHO"]}
  - {name: secret.apps.internal, port: 8080, home_cluster: k8s, exported: false,
     allowed_peers: [cluster:diego], backends: ["ECHO"]}
  - {name: private.apps.internal, port: 8080, home_cluster: k8s, exported: true,
     allowed_peers: ["spiffe://mesh.local/cluster/billing/gateway"], backends: ["ECHO"]}
  - {name: down.apps.internal, port: 8080, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["DEAD"]}
"#;

pub fn world_routes(echo: SocketAddr, dead: SocketAddr) -> RouteStore {
    routes(
        &ROUTES
            .replace("ECHO", &echo.to_string())
            .replace("DEAD", &dead.to_string()),
    )
}

pub fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "tcp",
        Transport::Quic => "quic",
    }
}

/// A raw QUIC tunnel client on one connection, for refusal tests.
pub struct RawQuic {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
}

impl RawQuic {
    pub async fn connect(
        addr: SocketAddr,
        tls: &MeshTls,
        server_cluster: &str,
    ) -> Result<Self, String> {
        let policy = PeerPolicy::component(TD, server_cluster, Component::GATEWAY);
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(
            tls.client_config(policy, &[b"isthmus/1"]),
        )
        .map_err(|e| e.to_string())?;
        let endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
        let conn = endpoint
            .connect_with(quinn::ClientConfig::new(Arc::new(crypto)), addr, "ingress")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self { endpoint, conn })
    }

    /// Opens a stream, writes `head` raw, and returns the response status and the halves.
    pub async fn raw_request(&self, head: &[u8]) -> (u16, quinn::SendStream, quinn::RecvStream) {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        send.write_all(head).await.unwrap();
        let mut buf = Vec::new();
        loop {
            match isthmus_gateway::frame::parse_response(&buf).unwrap() {
                isthmus_gateway::frame::Parsed::Complete { head, .. } => {
                    return (head.status, send, recv);
                }
                isthmus_gateway::frame::Parsed::NeedMore => {}
            }
            let chunk = recv
                .read_chunk(1024, true)
                .await
                .unwrap()
                .expect("response head");
            buf.extend_from_slice(&chunk.bytes);
        }
    }

    pub async fn connect_route(
        &self,
        authority: &str,
    ) -> (u16, quinn::SendStream, quinn::RecvStream) {
        self.raw_request(format!("CONNECT {authority} ISTHMUS/1\r\n\r\n").as_bytes())
            .await
    }
}

/// Sends `data` on a QUIC stream and reads the same number of bytes back.
pub async fn quic_echo(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    data: &[u8],
) -> Vec<u8> {
    send.write_all(data).await.unwrap();
    let mut got = vec![0u8; data.len()];
    recv.read_exact(&mut got).await.unwrap();
    got
}

/// A free TCP port on every address (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
