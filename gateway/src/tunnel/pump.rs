//! Copies bytes between a TCP socket and a tunneled stream, both ways at once.
//!
//! - Half-close is preserved: end-of-file on the socket becomes end-of-stream on the tunnel
//!   and the other direction keeps flowing, and the reverse becomes a write shutdown.
//! - Backpressure is preserved: a chunk is read from one side only after the previous one was
//!   accepted by the other, so a slow reader slows the writer instead of filling memory.
//! - Memory follows the bytes in flight, not buffer capacity: an idle connection holds no
//!   buffer (the socket side waits for readiness before it allocates), the read buffer grows
//!   with the traffic ([`ReadSize`]) and a chunk handed to the tunnel never owns much more
//!   than its bytes ([`owned`]): h2 and quinn queue chunks counting their length, so a 1-byte
//!   chunk that kept a 64 KiB allocation alive would let a slow trickle pin megabytes.
//! - A failure in either direction (tunnel stream reset, tunnel connection lost, socket
//!   reset) aborts both, and reaches each end as a failure, never as a clean end: the tunnel
//!   stream is reset and the socket closed with a TCP RST (SO_LINGER 0), so an app reading a
//!   raw-TCP upload or an HTTP/1.0 body to end-of-file cannot take a cut one as complete.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;

use super::{StreamRecv, StreamSend};

/// Largest chunk read from a socket at once.
pub const CHUNK: usize = 64 * 1024;

/// First read buffer of a connection: a request line, a small message, a keystroke.
pub const MIN_READ: usize = 1024;

/// Bytes moved, live: readable while the pump runs (for metrics) and after.
#[derive(Debug, Default)]
pub struct Moved {
    /// Socket to tunnel.
    pub into_tunnel: AtomicU64,
    /// Tunnel to socket.
    pub out_of_tunnel: AtomicU64,
}

/// How much to read next: grows fourfold after a read that filled the buffer (bytes are
/// flowing), halves after reads that used under an eighth of it (quiet again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadSize(usize);

impl Default for ReadSize {
    fn default() -> Self {
        Self(MIN_READ)
    }
}

impl ReadSize {
    /// The buffer size for the next read.
    pub fn get(self) -> usize {
        self.0
    }

    /// Adapts to a read of `n` bytes into a buffer of [`get`](Self::get) bytes.
    pub fn after_read(&mut self, n: usize) {
        if n >= self.0 {
            self.0 = (self.0 * 4).min(CHUNK);
        } else if n < self.0 / 8 {
            self.0 = (self.0 / 2).max(MIN_READ);
        }
    }
}

/// The bytes of `buf` as a chunk that owns at most twice its length: a buffer less than
/// half full is copied out (the copy is small by definition) and the buffer freed.
pub fn owned(buf: BytesMut) -> Bytes {
    if buf.len() * 2 < buf.capacity() {
        Bytes::copy_from_slice(&buf)
    } else {
        buf.freeze()
    }
}

/// Pumps until both directions ended, one failed, or `abort` fired (the drain deadline).
/// `first` is sent into the tunnel before anything read from the socket (the bytes an
/// egress peeked to learn the route).
///
/// # Errors
/// The first I/O error of either direction, or an error when aborted; by then the stream
/// has been reset and the socket closed with a TCP reset.
pub async fn pump<S: StreamSend, R: StreamRecv>(
    socket: TcpStream,
    first: Bytes,
    mut send: S,
    mut recv: R,
    moved: Arc<Moved>,
    abort: &CancellationToken,
) -> io::Result<()> {
    let (rd, mut wr) = socket.into_split();
    let result = {
        let both = async {
            tokio::try_join!(
                up(&rd, first, &mut send, &moved),
                down(&mut recv, &mut wr, &moved)
            )
        };
        tokio::select! {
            r = both => r.map(|_| ()),
            () = abort.cancelled() => Err(io::Error::other("closed by drain deadline")),
        }
    };
    if result.is_err() {
        send.reset();
        reset_socket(rd, wr);
    }
    result
}

/// Closes with a TCP RST. Dropping the halves as they are would send a FIN (the write half
/// shuts down on drop), which the far end reads as a clean end of stream.
fn reset_socket(rd: OwnedReadHalf, wr: OwnedWriteHalf) {
    if let Ok(socket) = rd.reunite(wr) {
        let _ = socket.set_zero_linger();
        drop(socket);
    }
}

async fn up<S: StreamSend>(
    rd: &OwnedReadHalf,
    first: Bytes,
    send: &mut S,
    moved: &Moved,
) -> io::Result<()> {
    if !first.is_empty() {
        moved
            .into_tunnel
            .fetch_add(first.len() as u64, Ordering::Relaxed);
        send.send(first).await?;
    }
    let mut size = ReadSize::default();
    loop {
        rd.readable().await?;
        let mut buf = BytesMut::with_capacity(size.get());
        match rd.try_read_buf(&mut buf) {
            Ok(0) => return send.finish().await,
            Ok(n) => {
                size.after_read(n);
                moved.into_tunnel.fetch_add(n as u64, Ordering::Relaxed);
                send.send(owned(buf)).await?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn down<R: StreamRecv>(
    recv: &mut R,
    wr: &mut OwnedWriteHalf,
    moved: &Moved,
) -> io::Result<()> {
    while let Some(chunk) = recv.recv().await? {
        moved
            .out_of_tunnel
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        wr.write_all(&chunk).await?;
    }
    wr.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_size_grows_with_full_reads_and_shrinks_when_quiet() {
        let mut s = ReadSize::default();
        assert_eq!(s.get(), MIN_READ);
        s.after_read(MIN_READ);
        assert_eq!(s.get(), 4 * MIN_READ);
        for _ in 0..10 {
            s.after_read(s.get());
        }
        assert_eq!(s.get(), CHUNK);
        s.after_read(CHUNK / 2);
        assert_eq!(s.get(), CHUNK, "a half-full read keeps the size");
        for _ in 0..20 {
            s.after_read(1);
        }
        assert_eq!(s.get(), MIN_READ);
    }

    #[test]
    fn a_small_read_does_not_keep_its_buffer() {
        let mut buf = BytesMut::with_capacity(CHUNK);
        buf.extend_from_slice(b"x");
        let chunk = owned(buf);
        assert_eq!(&chunk[..], b"x");
        // The copy's allocation is its own: mutable access without a copy proves it is
        // unique, and `try_into_mut` keeps the capacity visible.
        let back = chunk.try_into_mut().expect("unique");
        assert!(back.capacity() < 64, "{}", back.capacity());

        let mut full = BytesMut::with_capacity(4096);
        full.extend_from_slice(&[7u8; 4096]);
        let ptr = full.as_ptr();
        let chunk = owned(full);
        assert_eq!(
            chunk.as_ptr(),
            ptr,
            "a full buffer is handed on without a copy"
        );
    }
}
