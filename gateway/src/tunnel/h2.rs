//! HTTP/2 CONNECT streams as [`StreamSend`]/[`StreamRecv`].

use std::future::poll_fn;
use std::io;

use bytes::Bytes;
use h2::{RecvStream, SendStream};

use super::{StreamRecv, StreamSend};

/// Maps an h2 error to an I/O error, keeping a clean close distinguishable.
pub fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 i/o error"));
    }
    match e.reason() {
        Some(h2::Reason::NO_ERROR | h2::Reason::CANCEL) => {
            io::Error::new(io::ErrorKind::ConnectionReset, e)
        }
        _ => io::Error::other(e),
    }
}

/// The sending half of an h2 stream.
pub struct H2Send(pub SendStream<Bytes>);

impl StreamSend for H2Send {
    async fn send(&mut self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            self.0.reserve_capacity(data.len());
            match poll_fn(|cx| self.0.poll_capacity(cx)).await {
                None => return Err(io::ErrorKind::BrokenPipe.into()),
                Some(Err(e)) => return Err(to_io(e)),
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let chunk = data.split_to(n.min(data.len()));
                    self.0.send_data(chunk, false).map_err(to_io)?;
                }
            }
        }
        Ok(())
    }

    async fn finish(&mut self) -> io::Result<()> {
        // h2 delivers what it queued before closing the connection gracefully (GOAWAY).
        self.0.send_data(Bytes::new(), true).map_err(to_io)
    }

    fn reset(&mut self) {
        self.0.send_reset(h2::Reason::CANCEL);
    }
}

/// The receiving half of an h2 stream.
pub struct H2Recv(pub RecvStream);

impl StreamRecv for H2Recv {
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        match self.0.data().await {
            None => Ok(None),
            Some(Ok(chunk)) => {
                // Credit goes back as soon as the chunk leaves h2's queue; the pump holds
                // at most this one chunk, so the window still bounds memory.
                let _ = self.0.flow_control().release_capacity(chunk.len());
                Ok(Some(chunk))
            }
            Some(Err(e)) => Err(to_io(e)),
        }
    }
}
