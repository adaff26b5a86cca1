//! The admin server over real TCP on an ephemeral port, with hand-written HTTP/1.1 requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_runtime::admin::{AdminServer, Health};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Generous: only a hang should ever reach it.
const LIMIT: Duration = Duration::from_secs(10);

struct Running {
    addr: SocketAddr,
    health: Health,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

async fn start(registry: Registry) -> Running {
    start_with(registry, |server| server).await
}

async fn start_with(
    registry: Registry,
    configure: impl FnOnce(AdminServer) -> AdminServer,
) -> Running {
    let health = Health::new();
    let server = timeout(
        LIMIT,
        AdminServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(registry),
            health.clone(),
        ),
    )
    .await
    .expect("bind timed out")
    .expect("bind");
    let server = configure(server);
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0, "local_addr must report the bound port");
    let cancel = CancellationToken::new();
    let task = tokio::spawn(server.serve(cancel.clone()));
    Running {
        addr,
        health,
        cancel,
        task,
    }
}

impl Running {
    async fn stop(self) {
        self.cancel.cancel();
        timeout(LIMIT, self.task)
            .await
            .expect("serve did not return after cancel")
            .expect("serve panicked");
    }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// Sends one request with `Connection: close` and reads the whole reply.
async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    request_with(addr, method, path, "").await
}

/// As [`request`], with `headers` (each line ending in `\r\n`) added.
async fn request_with(addr: SocketAddr, method: &str, path: &str, headers: &str) -> Reply {
    timeout(LIMIT, async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n{headers}\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        parse(&String::from_utf8(raw).expect("utf-8 reply"))
    })
    .await
    .expect("request timed out")
}

fn parse(raw: &str) -> Reply {
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .expect("a complete HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    Reply {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

#[tokio::test]
async fn healthz_is_ok_and_shows_staleness() {
    let admin = start(Registry::default()).await;
    let reply = request(admin.addr, "GET", "/healthz").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok\n"));
    assert!(
        reply
            .head
            .contains("content-type: text/plain; charset=utf-8"),
        "{}",
        reply.head
    );

    admin.health.set_stale(true);
    let reply = request(admin.addr, "GET", "/healthz").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok (stale)\n"));
    // Staleness is not unreadiness.
    admin.health.set_ready();
    assert_eq!(request(admin.addr, "GET", "/readyz").await.status, 200);
    admin.stop().await;
}

#[tokio::test]
async fn readyz_is_503_with_reason_until_ready() {
    let admin = start(Registry::default()).await;
    let reply = request(admin.addr, "GET", "/readyz").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (503, "not ready: starting\n")
    );

    admin.health.set_ready();
    let reply = request(admin.addr, "GET", "/readyz").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ready\n"));

    admin.health.set_not_ready("route-sync disconnected");
    let reply = request(admin.addr, "GET", "/readyz").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (503, "not ready: route-sync disconnected\n")
    );
    admin.stop().await;
}

#[tokio::test]
async fn metrics_shows_a_registered_counter_in_the_format_asked_for() {
    let mut registry = Registry::default();
    let accepted = Counter::<u64>::default();
    registry.register(
        "isthmus_test_accepted",
        "Connections accepted",
        accepted.clone(),
    );
    let admin = start(registry).await;

    accepted.inc_by(41);
    accepted.inc();
    // Prometheus asks for OpenMetrics and gets it.
    let accept =
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n";
    let reply = request_with(admin.addr, "GET", "/metrics", accept).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .head
            .contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{}",
        reply.head
    );
    assert!(
        reply
            .body
            .contains("# TYPE isthmus_test_accepted counter\n"),
        "{}",
        reply.body
    );
    assert!(
        reply.body.contains("isthmus_test_accepted_total 42\n"),
        "{}",
        reply.body
    );
    assert!(reply.body.ends_with("# EOF\n"), "{}", reply.body);

    // Anyone else (curl, promtool, older agents) gets Prometheus text 0.0.4, where a counter
    // family carries the name of its samples.
    let reply = request(admin.addr, "GET", "/metrics").await;
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .head
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{}",
        reply.head
    );
    assert_eq!(
        reply.body,
        "# HELP isthmus_test_accepted_total Connections accepted.\n\
         # TYPE isthmus_test_accepted_total counter\n\
         isthmus_test_accepted_total 42\n"
    );
    admin.stop().await;
}

#[tokio::test]
async fn unknown_path_is_404_and_other_methods_405() {
    let admin = start(Registry::default()).await;
    assert_eq!(request(admin.addr, "GET", "/").await.status, 404);
    assert_eq!(
        request(admin.addr, "GET", "/healthz/extra").await.status,
        404
    );
    assert_eq!(request(admin.addr, "DELETE", "/nowhere").await.status, 404);
    for path in ["/healthz", "/readyz", "/metrics"] {
        let reply = request(admin.addr, "POST", path).await;
        assert_eq!(reply.status, 405, "POST {path}");
        assert!(reply.head.contains("allow: get"), "{}", reply.head);
    }
    admin.stop().await;
}

#[tokio::test]
async fn serve_returns_after_cancel_with_an_idle_keep_alive_connection() {
    let admin = start(Registry::default()).await;
    let addr = admin.addr;
    let mut stream = timeout(LIMIT, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    timeout(
        LIMIT,
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n"),
    )
    .await
    .expect("write timed out")
    .expect("write");
    // Read exactly the one response, leaving the connection open and idle.
    let mut raw = Vec::new();
    let mut chunk = [0_u8; 512];
    while !raw.ends_with(b"\r\n\r\nok\n") {
        let n = timeout(LIMIT, stream.read(&mut chunk))
            .await
            .expect("read timed out")
            .expect("read");
        assert_ne!(n, 0, "server closed a keep-alive connection early");
        raw.extend_from_slice(&chunk[..n]);
    }

    // Well under the server's 5 s forced drain: returning this fast shows the idle connection was
    // closed gracefully, not dropped at the deadline.
    admin.cancel.cancel();
    timeout(Duration::from_secs(2), admin.task)
        .await
        .expect("serve waited on an idle keep-alive connection")
        .expect("serve panicked");
    // The server closed the idle connection instead of leaving the client hanging.
    let n = timeout(LIMIT, stream.read(&mut chunk))
        .await
        .expect("idle connection was not closed at shutdown")
        .expect("read");
    assert_eq!(n, 0);
    // And no longer accepts.
    let refused = timeout(LIMIT, TcpStream::connect(addr))
        .await
        .expect("connect timed out");
    assert!(refused.is_err(), "listener still open after serve returned");
}

#[tokio::test]
async fn slow_client_is_cut_off_by_the_header_read_timeout() {
    let admin = start_with(Registry::default(), |server| {
        server.with_header_read_timeout(Duration::from_millis(200))
    })
    .await;
    let mut stream = timeout(LIMIT, TcpStream::connect(admin.addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    // Half a request line, then nothing.
    timeout(LIMIT, stream.write_all(b"GET /heal"))
        .await
        .expect("write timed out")
        .expect("write");
    let mut raw = Vec::new();
    // Shorter than the 5 s default, so this fails if the configured timeout is not applied.
    timeout(Duration::from_secs(3), stream.read_to_end(&mut raw))
        .await
        .expect("server kept a silent client's connection open")
        .expect("read");
    let reply = String::from_utf8_lossy(&raw);
    assert!(!reply.contains("200"), "{reply}");
    admin.stop().await;
}
