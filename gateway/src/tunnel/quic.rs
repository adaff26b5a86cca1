//! QUIC bidirectional streams as [`StreamSend`]/[`StreamRecv`].

use std::io;

use bytes::Bytes;
use futures_util::FutureExt as _;

use super::{StreamRecv, StreamSend};

/// Application error code sent when a stream is aborted.
pub const CANCELLED: quinn::VarInt = quinn::VarInt::from_u32(0x1);

/// The ingress's drain signal, alone on a unidirectional stream it opens to the egress:
/// "open no new stream on this connection; the ones in flight may finish". QUIC has no
/// GOAWAY of its own (HTTP/3 sends one on its control stream); this is the same idea.
pub const GOAWAY: &[u8] = b"ISTHMUS/1 GOAWAY\r\n";

/// Application close code of a connection closed after a drain, its streams done.
pub const DRAINED: quinn::VarInt = quinn::VarInt::from_u32(0x0);

/// The sending half of a QUIC stream.
pub struct QuicSend(pub quinn::SendStream);

impl StreamSend for QuicSend {
    async fn send(&mut self, data: Bytes) -> io::Result<()> {
        self.0.write_chunk(data).await.map_err(io::Error::from)
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.0
            .finish()
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))?;
        // Closing a QUIC connection discards data not yet acknowledged: wait for the ack, so
        // a drained connection is closed only after its streams' bytes arrived. A peer that
        // stopped reading (`Some(code)`) wants no more; that is its end, not our failure.
        match self.0.stopped().await {
            Ok(_) => Ok(()),
            Err(e) => Err(io::Error::new(io::ErrorKind::ConnectionReset, e)),
        }
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
        // The gathered buffer grows with what arrived (at most twice its bytes), not to a
        // fixed 64 KiB: it waits on a slow app's socket, and memory should follow bytes.
        let mut gathered: Option<bytes::BytesMut> = None;
        while gathered.as_ref().map_or(first.len(), |g| g.len()) < super::pump::CHUNK {
            match self.0.read_chunk(usize::MAX, true).now_or_never() {
                Some(Ok(Some(chunk))) => gathered
                    .get_or_insert_with(|| {
                        let mut g = bytes::BytesMut::with_capacity(first.len() + chunk.bytes.len());
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
