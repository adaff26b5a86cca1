//! gRPC over the mesh's mutual TLS: tonic served on our own TLS streams, so the SPIFFE
//! verifiers of `isthmus-certs` run on every connection and each request carries the
//! caller's verified identity.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use hyper_util::rt::TokioIo;
use isthmus_certs::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

/// The verified identity of the caller, in every request's extensions.
#[derive(Clone, Debug)]
pub struct Caller(pub SpiffeId);

/// A TLS connection whose peer presented a verified SPIFFE ID.
pub struct MeshConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    caller: Caller,
}

impl Connected for MeshConn {
    type ConnectInfo = Caller;
    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for MeshConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
}

/// Accepted, handshaken connections for `tonic`'s `serve_with_incoming`. Handshakes run
/// concurrently (one slow client never holds the accept loop) and are bounded in time; a
/// failed one is logged and dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
    cancel: CancellationToken,
) -> impl Stream<Item = io::Result<MeshConn>> {
    let (tx, rx) = mpsc::channel::<MeshConn>(256);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let (socket, peer) = tokio::select! {
                () = cancel.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("route-sync accept failed: {e}; continuing");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = socket.set_nodelay(true);
                let tls =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(socket)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "route-sync handshake refused: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "route-sync handshake timed out");
                            return;
                        }
                    };
                let id = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| isthmus_certs::spiffe_id_of(c).ok());
                if let Some(id) = id {
                    let _ = tx
                        .send(MeshConn {
                            inner: tls,
                            caller: Caller(id),
                        })
                        .await;
                }
            });
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|conn| (Ok(conn), rx))
    })
}

/// A lazily connecting channel to a route-sync server over mesh TLS. The server's SPIFFE ID
/// is checked by `tls` (built with the policy for the cluster we mean to reach).
///
/// # Errors
/// When the address does not make a valid URI.
pub fn channel(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let tls = Arc::clone(&tls);
        async move {
            let tcp = TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, io::Error>(TokioIo::new(stream))
        }
    });
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(connector))
}
