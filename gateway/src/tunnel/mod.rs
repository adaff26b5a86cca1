//! One tunneled connection as a pair of byte-chunk halves, whatever carries it.
//!
//! An HTTP/2 CONNECT stream and a QUIC bidirectional stream both move `Bytes` chunks with
//! flow control and a half-close. [`StreamSend`] and [`StreamRecv`] are that common shape, so
//! the byte pump ([`pump`]) is written once. Chunks move by reference count: a chunk read from
//! the tunnel is written to the socket as it is, with no intermediate buffer per connection.

pub mod h2;
pub mod liveness;
pub mod pump;
pub mod quic;

use std::future::Future;
use std::io;

use bytes::Bytes;

/// The sending half of a tunneled stream.
pub trait StreamSend: Send {
    /// Sends one chunk, waiting for flow-control credit (this is where backpressure from the
    /// far side reaches the near socket).
    fn send(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Half-closes: the far side reads end-of-stream, and may still send. Resolves once the
    /// far side has everything sent (QUIC: acknowledged), so that closing the tunnel
    /// connection after the stream ended cannot cut its last bytes.
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Aborts the stream in both directions (the far side sees a reset, not a clean end).
    fn reset(&mut self);
}

/// The receiving half of a tunneled stream.
pub trait StreamRecv: Send {
    /// The next chunk, or `None` once the far side half-closed.
    fn recv(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
}

/// HBONE-style status codes, used on both transports.
pub mod status {
    /// Authorized and the backend connection is up: bytes follow.
    pub const OK: u16 = 200;
    /// The request is malformed or names no valid route (`:authority`).
    pub const BAD_REQUEST: u16 = 400;
    /// The caller's identity is not allowed for the route.
    pub const DENIED: u16 = 401;
    /// This cluster does not export that route.
    pub const NOT_FOUND: u16 = 404;
    /// The gateway is at its connection limit.
    pub const OVERLOADED: u16 = 429;
    /// No backend of the route could be reached, or the ingress is not ready (its route
    /// table is not loaded yet) or draining; `isthmus-reason` says which. The egress tries
    /// another endpoint of the cluster.
    pub const UNAVAILABLE: u16 = 503;
}
