//! The backends the benchmark drives, run in their own process (the bench binary re-executes
//! itself with `--serve-backend`) so that the client's and the backends' sockets count
//! against different file-descriptor limits.
//!
//! - **echo** writes back every byte it reads, and closes its side at end of file;
//! - **sink** reads and discards until end of file, then replies with the byte count as a
//!   big-endian `u64` and closes.

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Which backend to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// Echo every byte.
    Echo,
    /// Count bytes, reply with the count at end of file.
    Sink,
}

impl BackendKind {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Echo => "echo",
            BackendKind::Sink => "sink",
        }
    }
}

/// Serves `kind` on `addr` until the process is killed.
///
/// # Errors
/// When `addr` cannot be bound.
pub async fn serve(kind: BackendKind, addr: SocketAddr) -> anyhow::Result<()> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("binding the {} backend on {addr}", kind.name()))?;
    // A deep backlog: the new-connection test opens connections as fast as it can.
    let listener = socket.listen(4096)?;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let _ = match kind {
                        BackendKind::Echo => echo(stream).await,
                        BackendKind::Sink => sink(stream).await,
                    };
                });
            }
            Err(e) => {
                // Out of file descriptors, most likely: say so once per failure and go on.
                eprintln!("{} backend: accept failed: {e}", kind.name());
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    // Wait for data before allocating, so 10,000 idle connections hold no buffers.
    let mut buf = Vec::new();
    loop {
        stream.readable().await?;
        if buf.is_empty() {
            buf = vec![0u8; 16 * 1024];
        }
        let n = match stream.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
    }
}

async fn sink(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    stream.write_all(&total.to_be_bytes()).await?;
    stream.shutdown().await
}
