//! What runs inside a cluster besides Isthmus: app instances (an HTTP service that says who
//! served it, a TCP echo) and the platform's own resolver (what bosh-dns or CoreDNS would
//! answer for apps homed here). They run on the cluster's [`ClusterNet`](super::net::ClusterNet).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What an app instance speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppKind {
    /// HTTP/1.1: answers `GET` with `<app> served by <cluster>/<instance>`.
    Http,
    /// Says who it is on a first line (`<app> served by <cluster>/<instance>`), then echoes
    /// every byte until the caller half-closes: a server-speaks-first protocol, so a caller
    /// knows which app it reached even over raw TCP.
    Echo,
}

/// A running app instance; [`stop`](Instance::stop) drains it.
pub struct Instance {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `orders-diego-0`.
    pub name: String,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Instance {
    /// Binds `addr` and serves until stopped. Call on the cluster's network.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub async fn start(
        addr: SocketAddr,
        kind: AppKind,
        app: &str,
        cluster: &str,
        name: &str,
    ) -> std::io::Result<Instance> {
        let listener = TcpListener::bind(addr).await?;
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let body: Arc<str> = format!("{app} served by {cluster}/{name}\n").into();
        let (s, t) = (stop.clone(), tracker.clone());
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    () = s.cancelled() => return,
                    accepted = listener.accept() => {
                        let Ok((socket, _)) = accepted else { continue };
                        let body = Arc::clone(&body);
                        t.spawn(async move {
                            let _ = match kind {
                                AppKind::Http => serve_http(socket, &body).await,
                                AppKind::Echo => serve_echo(socket, &body).await,
                            };
                        });
                    }
                }
            }
        });
        Ok(Instance {
            addr,
            name: name.to_string(),
            stop,
            tracker,
        })
    }

    /// Stops accepting, then waits for the connections in flight to finish.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

async fn serve_http(mut socket: TcpStream, body: &str) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buf).await?;
        if n == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let reply = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(reply.as_bytes()).await?;
    socket.shutdown().await
}

async fn serve_echo(mut socket: TcpStream, banner: &str) -> std::io::Result<()> {
    socket.write_all(banner.as_bytes()).await?;
    let (mut r, mut w) = socket.split();
    tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await
}

/// The platform's resolver for names homed in this cluster: A records from a table the
/// world edits as instances start and stop (bosh-dns / CoreDNS stand-in). Answers TTL 0,
/// NXDOMAIN for names it does not hold.
#[derive(Clone, Default)]
pub struct PlatformDns {
    names: Arc<RwLock<HashMap<String, Vec<IpAddr>>>>,
}

impl PlatformDns {
    /// Sets the addresses of `name` (empty removes it).
    pub fn set(&self, name: &str, addrs: Vec<IpAddr>) {
        let mut names = self.names.write().unwrap_or_else(|e| e.into_inner());
        if addrs.is_empty() {
            names.remove(&name.to_ascii_lowercase());
        } else {
            names.insert(name.to_ascii_lowercase(), addrs);
        }
    }

    /// Serves DNS over UDP on `addr` until `stop`. Call on the cluster's network.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub async fn serve(&self, addr: SocketAddr, stop: CancellationToken) -> std::io::Result<()> {
        let socket = UdpSocket::bind(addr).await?;
        let names = Arc::clone(&self.names);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let (n, from) = tokio::select! {
                    () = stop.cancelled() => return,
                    r = socket.recv_from(&mut buf) => match r { Ok(r) => r, Err(_) => continue },
                };
                if let Some(reply) = answer(&names, &buf[..n]) {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        Ok(())
    }
}

fn answer(names: &RwLock<HashMap<String, Vec<IpAddr>>>, packet: &[u8]) -> Option<Vec<u8>> {
    let query = Message::from_vec(packet).ok()?;
    let mut reply = Message::new(
        query.metadata.id,
        MessageType::Response,
        query.metadata.op_code,
    );
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = true;
    let q = query.queries.first()?.clone();
    let name = q.name().to_ascii();
    let key = name.trim_end_matches('.').to_ascii_lowercase();
    let found = names
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .cloned();
    reply.add_query(q.clone());
    match found {
        None => reply.metadata.response_code = ResponseCode::NXDomain,
        Some(addrs) if q.query_type() == RecordType::A => {
            for ip in addrs {
                if let IpAddr::V4(v4) = ip {
                    reply.add_answer(Record::from_rdata(q.name().clone(), 0, RData::A(A(v4))));
                }
            }
        }
        Some(_) => {}
    }
    reply.to_vec().ok()
}
