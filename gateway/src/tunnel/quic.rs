//! QUIC bidirectional streams as [`StreamSend`]/[`StreamRecv`].

use std::io;

use bytes::Bytes;
use futures_util::FutureExt as _;

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
        // Wait for the first chunk without holding a buffer (an idle stream costs nothing),
        // then gather the chunks already received: they arrive packet-sized (~1.2 KB), and
        // one larger write to the socket beats one write per packet.
        let first = match self.0.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) => return Ok(None),
            Err(e) => return Err(io::Error::from(e)),
        };
        let mut gathered: Option<bytes::BytesMut> = None;
        while gathered.as_ref().map_or(first.len(), |g| g.len()) < super::pump::CHUNK {
            match self.0.read_chunk(usize::MAX, true).now_or_never() {
                Some(Ok(Some(chunk))) => gathered
                    .get_or_insert_with(|| {
                        let mut g = bytes::BytesMut::with_capacity(super::pump::CHUNK);
                        g.extend_from_slice(&first);
                        g
                    })
                    .extend_from_slice(&chunk.bytes),
                // Nothing more ready, the end, or an error: hand over what we have; the
                // next call sees the end or the error.
                _ => break,
            }
        }
        Ok(Some(gathered.map_or(first, bytes::BytesMut::freeze)))
    }
}
