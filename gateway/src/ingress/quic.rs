//! The QUIC side of the ingress: one bidirectional stream per tunneled connection, carrying
//! the request head of [`crate::frame`] and then raw bytes.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use isthmus_certs::SpiffeId;
use quinn::crypto::rustls::QuicServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Shared, admit, carry};
use crate::Refusal;
use crate::config::IngressConfig;
use crate::frame::{self, Parsed, ResponseHead};
use crate::metrics::PoolLabels;
use crate::tunnel::quic::{QuicRecv, QuicSend};
use crate::tunnel::status;

/// A QUIC server endpoint on `addr` with the ingress' limits.
pub(super) fn endpoint(
    tls: Arc<rustls::ServerConfig>,
    addr: SocketAddr,
    cfg: &IngressConfig,
) -> io::Result<quinn::Endpoint> {
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let transport = crate::quic_transport(
        cfg.max_streams_per_connection,
        cfg.stream_window,
        cfg.connection_window,
        // The egress side picks how fast a dead peer is noticed (the lower value wins).
        super::liveness(cfg),
    );
    server.transport_config(Arc::new(transport));
    quinn::Endpoint::server(server, addr)
}

/// Accepts QUIC connections until `shutdown`, then refuses them until `drained` (the
/// connections in flight are done): a refused handshake fails at once, so an egress that
/// dials this draining replica moves on, where a dropped one would wait out its handshake
/// timeout.
pub(super) async fn serve(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    shutdown: CancellationToken,
    drained: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        tokio::select! {
            () = drained.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) if shutdown.is_cancelled() => {
                    shared.ctx.metrics.handshake_failed("ingress", "draining");
                    incoming.refuse();
                }
                Some(incoming) => {
                    let Some(handshake) = shared.handshake_slot(&incoming.remote_address()) else {
                        incoming.refuse();
                        continue;
                    };
                    tracker.spawn(connection(
                        Arc::clone(&shared),
                        handshake,
                        incoming,
                        shutdown.clone(),
                        force.clone(),
                        tracker.clone(),
                    ));
                }
                None => break,
            }
        }
    }
    // No new connections; connections in flight drain in `connection`.
    endpoint.set_server_config(None);
}

async fn connection(
    shared: Arc<Shared>,
    handshake: tokio::sync::OwnedSemaphorePermit,
    incoming: quinn::Incoming,
    shutdown: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
) {
    let metrics = &shared.ctx.metrics;
    let peer = incoming.remote_address();
    let conn = match timeout(shared.cfg.handshake_timeout.get(), incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            let reason = crate::quic_handshake_reason(&e);
            metrics.handshake_failed("ingress", reason);
            tracing::warn!(%peer, reason, error = %e, "QUIC tunnel handshake refused");
            return;
        }
        Err(_) => {
            metrics.handshake_failed("ingress", "timeout");
            tracing::warn!(%peer, "QUIC tunnel handshake timed out");
            return;
        }
    };
    drop(handshake);
    let Some(caller) = crate::quic_peer_id(&conn) else {
        metrics.handshake_failed("ingress", "no_spiffe_id");
        conn.close(quinn::VarInt::from_u32(1), b"no SPIFFE ID");
        return;
    };
    let gauge = metrics
        .ingress_connections
        .get_or_create(&PoolLabels {
            peer_cluster: caller.cluster().unwrap_or("unknown").to_string(),
            transport: "quic",
        })
        .clone();
    gauge.inc();
    // This connection's streams, so a drain knows when the last one ended.
    let streams = TaskTracker::new();
    let mut draining = false;
    loop {
        tokio::select! {
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    // While draining, streams that raced the GOAWAY are answered `draining`
                    // (503) in `admit`, and the egress carries them elsewhere.
                    tracker.spawn(streams.track_future(stream_task(
                        Arc::clone(&shared),
                        caller.clone(),
                        send,
                        recv,
                        force.clone(),
                    )));
                }
                Err(_) => break,
            },
            () = shutdown.cancelled(), if !draining => {
                // Stream credit is left as it is: an egress that has credit would open a
                // stream anyway, and one without would wait for credit instead of moving on.
                draining = true;
                streams.close();
                tracker.spawn(send_goaway(conn.clone(), shared.cfg.handshake_timeout.get()));
            }
            () = streams.wait(), if draining => {
                // Every stream ended; a carried stream ends only once its last bytes were
                // acknowledged (`QuicSend::finish`), so closing now cuts none of them.
                conn.close(crate::tunnel::quic::DRAINED, b"drained");
                break;
            }
            () = force.cancelled() => {
                conn.close(quinn::VarInt::from_u32(0), b"draining");
                break;
            }
        }
    }
    gauge.dec();
}

/// Tells the egress to open no new stream here ([`crate::tunnel::quic::GOAWAY`]).
async fn send_goaway(conn: quinn::Connection, within: std::time::Duration) {
    let sent = timeout(within, async {
        let mut control = conn.open_uni().await?;
        control.write_all(crate::tunnel::quic::GOAWAY).await?;
        control.finish()?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await;
    match sent {
        Ok(Ok(())) => {}
        // An egress that takes no control stream still learns from the `draining` refusals.
        Ok(Err(e)) => tracing::debug!("could not send GOAWAY: {e}"),
        Err(_) => tracing::debug!("GOAWAY not sent in time"),
    }
}

async fn stream_task(
    shared: Arc<Shared>,
    caller: SpiffeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    force: CancellationToken,
) {
    let head = timeout(shared.cfg.request_timeout.get(), read_head(&mut recv)).await;
    let (request, leftover) = match head {
        Ok(Ok(parsed)) => parsed,
        Ok(Err(refusal)) => {
            super::refuse_malformed(&shared, &caller, &refusal);
            respond(&mut send, &refusal).await;
            return;
        }
        Err(_) => {
            let refusal = Refusal::BadRequest("request head timed out".into());
            super::refuse_malformed(&shared, &caller, &refusal);
            respond(&mut send, &refusal).await;
            return;
        }
    };
    let mut admitted = match admit(
        &shared,
        &caller,
        &request.authority,
        request.header("forwarded"),
    )
    .await
    {
        Ok(admitted) => admitted,
        Err(refusal) => {
            respond(&mut send, &refusal).await;
            return;
        }
    };
    let ok = ResponseHead {
        status: status::OK,
        reason: "OK".into(),
        headers: Vec::new(),
    };
    let Ok(bytes) = ok.encode() else { return };
    if send.write_all(&bytes).await.is_err() {
        admitted.abort();
        return;
    }
    if !leftover.is_empty() && admitted.backend.write_all(&leftover).await.is_err() {
        send.reset(crate::tunnel::quic::CANCELLED).ok();
        admitted.abort();
        return;
    }
    carry(
        &shared,
        admitted,
        Bytes::new(),
        QuicSend(send),
        QuicRecv(recv),
        force,
    )
    .await;
}

/// Reads one request head; bytes after it are the start of the payload.
async fn read_head(recv: &mut quinn::RecvStream) -> Result<(frame::RequestHead, Bytes), Refusal> {
    let mut buf = BytesMut::new();
    loop {
        match frame::parse_request(&buf) {
            Ok(Parsed::Complete { head, consumed }) => {
                let rest = buf.split_off(consumed).freeze();
                return Ok((head, rest));
            }
            Ok(Parsed::NeedMore) => {}
            Err(e) => return Err(Refusal::BadRequest(e.to_string())),
        }
        let limit = frame::MAX_HEAD + 1 - buf.len().min(frame::MAX_HEAD);
        match recv.read_chunk(limit, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(Refusal::BadRequest(
                    "stream ended inside the request head".into(),
                ));
            }
            Err(e) => return Err(Refusal::BadRequest(format!("stream failed: {e}"))),
        }
    }
}

async fn respond(send: &mut quinn::SendStream, refusal: &Refusal) {
    let head = ResponseHead {
        status: refusal.status(),
        reason: refusal.reason().into(),
        headers: Vec::new(),
    };
    if let Ok(bytes) = head.encode() {
        let _ = send.write_all(&bytes).await;
    }
    let _ = send.finish();
}
