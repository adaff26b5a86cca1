//! A failure in the middle of a tunneled connection reaches both ends as a TCP reset, never
//! as a clean end of stream that a raw-TCP upload or an HTTP/1.0 body would take as
//! complete: a backend reset reaches the app, an app reset reaches the backend, and a
//! broken tunnel resets both.

mod common;

use std::io::ErrorKind;
use std::net::SocketAddr;

use common::*;
use isthmus_gateway::config::Transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

const ROUTE: &str = r#"
routes:
  - {name: orders.apps.internal, port: 8080, home_cluster: k8s, exported: true,
     allowed_peers: [cluster:diego], backends: ["BACKEND"]}
"#;

/// Reads until end-of-stream or an error: the error kind, or `None` for a clean end.
async fn read_until_end(s: &mut TcpStream) -> (Vec<u8>, Option<ErrorKind>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match within(s.read(&mut buf)).await {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Some(e.kind())),
        }
    }
}

fn reset(s: TcpStream) {
    s.set_zero_linger().unwrap();
    drop(s);
}

struct World {
    app_addr: SocketAddr,
    /// Backend connections, as the backend accepted them.
    accepted: mpsc::Receiver<TcpStream>,
    ingress: Running,
    egress: Running,
}

async fn world(transport: Transport) -> World {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let (tx, accepted) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((s, _)) = backend.accept().await {
            if tx.send(s).await.is_err() {
                return;
            }
        }
    });
    let mesh = Mesh::new();
    let yaml = ROUTE.replace("BACKEND", &backend_addr.to_string());
    let (ingress_addr, ingress) =
        start_ingress(mesh.context("k8s", &routes(&yaml)), ingress_cfg()).await;
    let (app_addr, egress) = start_egress(
        mesh.context("diego", &routes(&yaml)),
        egress_cfg("orders.apps.internal:8080", vec![ingress_addr], transport),
    )
    .await;
    World {
        app_addr,
        accepted,
        ingress,
        egress,
    }
}

/// An app connection through the tunnel and its backend connection, bytes flowing.
async fn connected(w: &mut World) -> (TcpStream, TcpStream) {
    let mut app = within(TcpStream::connect(w.app_addr)).await.unwrap();
    app.write_all(b"upload part 1").await.unwrap();
    let mut backend = within(w.accepted.recv()).await.unwrap();
    let mut got = [0u8; 13];
    within(backend.read_exact(&mut got)).await.unwrap();
    backend.write_all(b"body part 1").await.unwrap();
    let mut got = [0u8; 11];
    within(app.read_exact(&mut got)).await.unwrap();
    (app, backend)
}

async fn backend_reset_reaches_the_app(transport: Transport) {
    let mut w = world(transport).await;
    let (mut app, backend) = connected(&mut w).await;
    reset(backend);
    let (_, end) = read_until_end(&mut app).await;
    assert_eq!(
        end,
        Some(ErrorKind::ConnectionReset),
        "the app must not see a clean end"
    );
    w.egress.stop().await;
    w.ingress.stop().await;
}

#[tokio::test]
async fn a_backend_reset_reaches_the_app_as_a_reset_tcp() {
    backend_reset_reaches_the_app(Transport::Tcp).await;
}

#[tokio::test]
async fn a_backend_reset_reaches_the_app_as_a_reset_quic() {
    backend_reset_reaches_the_app(Transport::Quic).await;
}

async fn app_reset_reaches_the_backend(transport: Transport) {
    let mut w = world(transport).await;
    let (app, mut backend) = connected(&mut w).await;
    reset(app);
    let (_, end) = read_until_end(&mut backend).await;
    assert_eq!(
        end,
        Some(ErrorKind::ConnectionReset),
        "the backend must not see a clean end"
    );
    w.egress.stop().await;
    w.ingress.stop().await;
}

#[tokio::test]
async fn an_app_reset_reaches_the_backend_as_a_reset_tcp() {
    app_reset_reaches_the_backend(Transport::Tcp).await;
}

#[tokio::test]
async fn an_app_reset_reaches_the_backend_as_a_reset_quic() {
    app_reset_reaches_the_backend(Transport::Quic).await;
}

async fn broken_tunnel_resets_both_ends(transport: Transport) {
    let mut w = world(transport).await;
    let (mut app, mut backend) = connected(&mut w).await;
    // The ingress goes away at once (its drain deadline): the tunnel breaks mid-stream.
    let (done_tx, done_rx) = oneshot::channel();
    tokio::spawn(async move {
        let end = read_until_end(&mut backend).await.1;
        let _ = done_tx.send(end);
    });
    w.ingress.stop().await;
    let (_, app_end) = read_until_end(&mut app).await;
    assert_eq!(app_end, Some(ErrorKind::ConnectionReset), "app side");
    let backend_end = within(done_rx).await.unwrap();
    assert_eq!(
        backend_end,
        Some(ErrorKind::ConnectionReset),
        "backend side"
    );
    w.egress.stop().await;
}

#[tokio::test]
async fn a_broken_tunnel_resets_the_app_and_the_backend_tcp() {
    broken_tunnel_resets_both_ends(Transport::Tcp).await;
}

#[tokio::test]
async fn a_broken_tunnel_resets_the_app_and_the_backend_quic() {
    broken_tunnel_resets_both_ends(Transport::Quic).await;
}
