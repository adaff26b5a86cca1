//! Copies bytes between a TCP socket and a tunneled stream, both ways at once.
//!
//! - Half-close is preserved: end-of-file on the socket becomes end-of-stream on the tunnel
//!   and the other direction keeps flowing, and the reverse becomes a write shutdown.
//! - Backpressure is preserved: a chunk is read from one side only after the previous one was
//!   accepted by the other, so a slow reader slows the writer instead of filling memory.
//! - An idle connection holds no buffer: the socket side waits for readiness before it
//!   allocates, and tunnel chunks are written as they arrive.
//! - An error in either direction aborts both: the tunnel stream is reset and the socket
//!   closed, so neither end waits on a half-dead peer.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{StreamRecv, StreamSend};

/// Largest chunk read from a socket at once.
pub const CHUNK: usize = 64 * 1024;

/// Bytes moved, live: readable while the pump runs (for metrics) and after.
#[derive(Debug, Default)]
pub struct Moved {
    /// Socket to tunnel.
    pub into_tunnel: AtomicU64,
    /// Tunnel to socket.
    pub out_of_tunnel: AtomicU64,
}

/// Pumps until both directions ended or one failed. `first` is sent into the tunnel before
/// anything read from the socket (the bytes an egress peeked to learn the route).
///
/// # Errors
/// The first I/O error of either direction; the stream has been reset by then.
pub async fn pump<S: StreamSend, R: StreamRecv>(
    socket: TcpStream,
    first: Bytes,
    mut send: S,
    mut recv: R,
    moved: Arc<Moved>,
) -> io::Result<()> {
    let (rd, mut wr) = socket.into_split();
    let up = {
        let send = &mut send;
        let moved = &moved;
        async move {
            if !first.is_empty() {
                moved
                    .into_tunnel
                    .fetch_add(first.len() as u64, Ordering::Relaxed);
                send.send(first).await?;
            }
            loop {
                rd.readable().await?;
                let mut buf = BytesMut::with_capacity(CHUNK);
                match rd.try_read_buf(&mut buf) {
                    Ok(0) => return send.finish(),
                    Ok(n) => {
                        moved.into_tunnel.fetch_add(n as u64, Ordering::Relaxed);
                        send.send(buf.freeze()).await?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    };
    let down = {
        let recv = &mut recv;
        let moved = &moved;
        async move {
            while let Some(chunk) = recv.recv().await? {
                moved
                    .out_of_tunnel
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                wr.write_all(&chunk).await?;
            }
            wr.shutdown().await
        }
    };
    let result = tokio::try_join!(up, down).map(|_| ());
    if result.is_err() {
        send.reset();
    }
    result
}
