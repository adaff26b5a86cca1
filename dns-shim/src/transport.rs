//! The socket layer: UDP receive loops and TCP connections, around the [`Engine`].
//!
//! UDP: several sockets bound to the same port with `SO_REUSEPORT`, one task each, so the
//! kernel spreads clients over cores. A local answer is written back inline by the receiving
//! task (no spawn, no channel); only forwarded queries get a task of their own.
//!
//! TCP: RFC 1035 length-prefixed messages, answered in order on each connection. A
//! connection that sends nothing for `tcp_idle_timeout` is closed, as is one that takes longer
//! than that to send a whole message or to read a reply. A message that does not parse is
//! counted and answered FORMERR (or skipped when it is shorter than a header): the framing is
//! still intact, so the connection carries on.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::engine::{Engine, Step, Transport};

/// Pause after a failed `accept` or `recv` (e.g. out of file descriptors) so a loop does not spin.
const ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Receive buffer asked of the kernel per UDP socket, to ride out bursts; the kernel caps it
/// at `net.core.rmem_max`.
const UDP_RECV_BUFFER: usize = 4 << 20;

/// One UDP socket on `addr` with `SO_REUSEPORT`, so siblings can share the port.
pub fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    // Best effort: a smaller buffer only means drops sooner under a burst.
    let _ = socket.set_recv_buffer_size(UDP_RECV_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Serves one UDP socket until `stop`. Forwarded queries run on `tracker`.
pub async fn serve_udp(
    socket: Arc<UdpSocket>,
    engine: Arc<Engine>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    // Large enough for any datagram, so nothing is silently cut.
    let mut buf = vec![0u8; 65_536];
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    loop {
        let (len, peer) = tokio::select! {
            biased;
            () = &mut cancelled => break,
            received = socket.recv_from(&mut buf) => match received {
                Ok(r) => r,
                Err(error) => {
                    tracing::debug!(%error, "UDP receive failed; continuing");
                    tokio::time::sleep(ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        // Nothing can be sent to port 0; such a source is spoofed.
        if peer.port() == 0 {
            continue;
        }
        let Some(packet) = buf.get(..len) else {
            continue;
        };
        match engine.handle(packet, Transport::Udp) {
            Step::Reply(reply) => send(&socket, &reply, peer).await,
            Step::Drop => {}
            Step::Forward(job) => {
                let socket = Arc::clone(&socket);
                let engine = Arc::clone(&engine);
                tracker.spawn(async move {
                    let reply = engine.forward(job).await;
                    send(&socket, &reply, peer).await;
                });
            }
        }
    }
}

async fn send(socket: &UdpSocket, reply: &[u8], peer: SocketAddr) {
    if let Err(error) = socket.send_to(reply, peer).await {
        tracing::debug!(%peer, %error, "cannot send a UDP reply");
    }
}

/// What every TCP connection shares.
#[derive(Debug, Clone)]
pub struct TcpSettings {
    /// Idle and per-message read/write limit.
    pub idle: Duration,
    /// Open connections at most.
    pub limit: Arc<Semaphore>,
}

/// Accepts TCP connections until `stop`; each runs on `tracker`.
pub async fn serve_tcp(
    listener: TcpListener,
    engine: Arc<Engine>,
    settings: TcpSettings,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => match Arc::clone(&settings.limit).try_acquire_owned() {
                Ok(permit) => {
                    tracker.spawn(connection(
                        stream,
                        peer,
                        Arc::clone(&engine),
                        settings.idle,
                        stop.clone(),
                        permit,
                    ));
                }
                Err(_) => {
                    engine.metrics().tcp_rejected.inc();
                    tracing::debug!(%peer, "too many TCP connections; closing this one");
                }
            },
            Err(error) => {
                tracing::warn!(%error, "TCP accept failed; continuing");
                tokio::time::sleep(ERROR_BACKOFF).await;
            }
        }
    }
}

/// Answers queries on one connection, in order, until the client closes, goes idle, or
/// `stop` fires between queries.
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    engine: Arc<Engine>,
    idle: Duration,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let gauge = engine.metrics().tcp_connections.clone();
    gauge.inc();
    let _ = stream.set_nodelay(true);
    loop {
        let mut len = [0u8; 2];
        let waited = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            read = timeout(idle, stream.read_exact(&mut len)) => read,
        };
        match waited {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break, // closed or reset
            Err(_) => {
                tracing::debug!(%peer, "TCP connection idle; closing");
                break;
            }
        }
        let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if !matches!(
            timeout(idle, stream.read_exact(&mut message)).await,
            Ok(Ok(_))
        ) {
            break;
        }
        let reply = match engine.handle(&message, Transport::Tcp) {
            Step::Reply(reply) => reply,
            Step::Drop => continue,
            Step::Forward(job) => engine.forward(job).await,
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            break;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&reply_len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if !matches!(timeout(idle, stream.write_all(&framed)).await, Ok(Ok(()))) {
            break;
        }
    }
    gauge.dec();
}
