//! QUIC bidirectional streams as [`StreamSend`]/[`StreamRecv`].

use std::io;

use bytes::Bytes;

use super::{StreamRecv, StreamSend};

/// Application error code sent when a stream is aborted.
pub const CANCELLED: quinn::VarInt = quinn::VarInt::from_u32(0x1);

/// The sending half of a QUIC stream.
pub struct QuicSend(pub quinn::SendStream);

impl StreamSend for QuicSend {
    async fn send(&mut self, data: Bytes) -> io::Result<()> {
        self.0.write_chunk(data).await.map_err(io::Error::from)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.0
            .finish()
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))
    }

    fn reset(&mut self) {
        let _ = self.0.reset(CANCELLED);
    }
}

/// The receiving half of a QUIC stream.
pub struct QuicRecv(pub quinn::RecvStream);

impl StreamRecv for QuicRecv {
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        // Chunks arrive packet-sized (~1.2 KB); reading into one buffer gathers every chunk
        // already received, so the socket gets a few large writes instead of one per packet.
        let mut buf = bytes::BytesMut::zeroed(super::pump::CHUNK);
        match self.0.read(&mut buf).await {
            Ok(Some(n)) => {
                buf.truncate(n);
                Ok(Some(buf.freeze()))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(io::Error::from(e)),
        }
    }
}
