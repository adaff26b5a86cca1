//! Noticing a silent HTTP/2 tunnel peer, as QUIC's idle timeout does for QUIC.
//!
//! A killed process gets its TCP connections reset by its kernel, but a host that vanished,
//! a partition or a black-holing middlebox sends nothing: the pooled connection would look
//! healthy until the kernel gives up on retransmits, many minutes later, and every app
//! connection multiplexed on it would hang. So each side sends an HTTP/2 PING whenever it has
//! not heard from its peer for a while, and closes the connection as dead once it has heard
//! nothing at all (no frame of any kind, PING answers included) for `dead_after`.
//!
//! "Heard" is counted below h2, on the bytes read from the TLS stream ([`Heard`]), so a
//! connection busy with a bulk transfer is alive even if its PONG waits behind data.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Interval, MissedTickBehavior};

use crate::Liveness;

/// A transport that notes whenever bytes are read from it.
pub struct Heard<S> {
    inner: S,
    heard: Arc<AtomicBool>,
}

impl<S> Heard<S> {
    /// Wraps `inner`; the flag is set on every read that returns bytes.
    pub fn new(inner: S) -> (Self, Arc<AtomicBool>) {
        let heard = Arc::new(AtomicBool::new(true));
        (
            Self {
                inner,
                heard: Arc::clone(&heard),
            },
            heard,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Heard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.heard.store(true, Ordering::Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Heard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Pings a silent peer and tells when it has been silent for too long.
pub struct Watchdog {
    heard: Arc<AtomicBool>,
    pings: h2::PingPong,
    tick: Interval,
    every: Duration,
    dead_after: Duration,
    silent_for: Duration,
    waiting_for_pong: bool,
}

impl Watchdog {
    /// Watches the connection whose reads set `heard` and whose PINGs go through `pings`.
    pub fn new(heard: Arc<AtomicBool>, pings: h2::PingPong, liveness: Liveness) -> Self {
        let every = liveness.keep_alive.max(Duration::from_millis(10));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            heard,
            pings,
            tick,
            every,
            dead_after: liveness.dead_after,
            silent_for: Duration::ZERO,
            waiting_for_pong: false,
        }
    }

    /// Resolves once the peer has been silent for `dead_after`; never resolves if the
    /// connection ends first (its driver notices that itself).
    pub async fn silent(&mut self) {
        loop {
            tokio::select! {
                _ = self.tick.tick() => {}
                pong = std::future::poll_fn(|cx| self.pings.poll_pong(cx)), if self.waiting_for_pong => {
                    self.waiting_for_pong = false;
                    if pong.is_err() {
                        return std::future::pending().await;
                    }
                    continue;
                }
            }
            if self.heard.swap(false, Ordering::Relaxed) {
                self.silent_for = Duration::ZERO;
                continue;
            }
            self.silent_for += self.every;
            if self.silent_for >= self.dead_after {
                return;
            }
            if !self.waiting_for_pong {
                match self.pings.send_ping(h2::Ping::opaque()) {
                    Ok(()) => self.waiting_for_pong = true,
                    Err(_) => return std::future::pending().await,
                }
            }
        }
    }
}

/// [`Watchdog::silent`] of a connection that may have no watchdog (h2 hands out its PING
/// handle once): never resolves without one.
pub async fn silent(watchdog: Option<&mut Watchdog>) {
    match watchdog {
        Some(w) => w.silent().await,
        None => std::future::pending().await,
    }
}
