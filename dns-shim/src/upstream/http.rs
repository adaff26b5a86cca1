//! A small HTTP/1.1 GET client with kept-alive connections, over TCP or rustls.
//!
//! Hand-rolled on hyper's connection API rather than a pooled client stack: the shim talks to
//! exactly one host, wants every wait bounded by the query's own deadline (the caller's
//! timeout), and needs nothing but GET. Idle connections are kept for reuse; one that turns
//! out to be closed when reused is replaced by a fresh one, once.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::error::ShimError;

/// Largest response body read; an SDC registration for one name is a few KiB.
const MAX_BODY: usize = 1 << 20;

/// Idle connections kept for reuse.
const MAX_IDLE: usize = 32;

type Sender = SendRequest<Empty<Bytes>>;

/// A client for one `http://` or `https://` base URL.
pub struct HttpClient {
    url: String,
    host: String,
    port: u16,
    authority: HeaderValue,
    base_path: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    idle: Mutex<Vec<Sender>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("url", &self.url)
            .finish()
    }
}

impl HttpClient {
    /// A client for `url`; `tls` (the configuration, and the name to check the server's
    /// certificate against when not the URL's host) is required for `https` and refused for
    /// `http`.
    ///
    /// # Errors
    /// [`ShimError::InvalidUrl`] when the URL does not parse, has no host, or its scheme does
    /// not match `tls`.
    pub fn new(
        url: &str,
        tls: Option<(Arc<ClientConfig>, Option<&str>)>,
    ) -> Result<Self, ShimError> {
        let invalid = |reason| ShimError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let uri: http::Uri = url.parse().map_err(|_| invalid("not a URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(invalid("the scheme must be http or https")),
        };
        if https != tls.is_some() {
            return Err(invalid(
                "https needs TLS settings and http must not have them",
            ));
        }
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid("the host is missing"))?;
        // `Uri::host` keeps IPv6 brackets; connecting and SNI want the bare address.
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = HeaderValue::from_str(&format!("{host}:{port}"))
            .map_err(|_| invalid("the host is not a valid header value"))?;
        let tls = match tls {
            Some((config, server_name)) => {
                let name = ServerName::try_from(server_name.unwrap_or(&bare).to_string())
                    .map_err(|_| invalid("the host is not a valid TLS server name"))?;
                Some((TlsConnector::from(config), name))
            }
            None => None,
        };
        Ok(Self {
            url: url.to_string(),
            host: bare,
            port,
            authority,
            base_path: uri.path().trim_end_matches('/').to_string(),
            tls,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// The base URL, for logs and errors.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `GET {base}{path_and_query}`: the status code and the body.
    ///
    /// # Errors
    /// When connecting, the TLS handshake or the exchange fails, or the body is larger than
    /// 1 MiB. Not bounded in time: the caller's deadline is.
    pub async fn get(&self, path_and_query: &str) -> Result<(u16, Bytes), ShimError> {
        let target = format!("{}{}", self.base_path, path_and_query);
        let (mut sender, pooled) = match self.take_idle().await {
            Some(sender) => (sender, true),
            None => (self.connect().await?, false),
        };
        let response = match sender.send_request(self.request(&target)?).await {
            Ok(response) => response,
            // The server closed a kept-alive connection as we reused it: try a fresh one.
            Err(e) if pooled && (e.is_closed() || e.is_canceled() || e.is_incomplete_message()) => {
                sender = self.connect().await?;
                sender
                    .send_request(self.request(&target)?)
                    .await
                    .map_err(|source| self.http_err(source))?
            }
            Err(source) => return Err(self.http_err(source)),
        };
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| ShimError::BadReply {
                server: self.url.clone(),
                reason: format!("cannot read the body: {e}"),
            })?
            .to_bytes();
        self.put_idle(sender);
        Ok((status, body))
    }

    fn request(&self, target: &str) -> Result<http::Request<Empty<Bytes>>, ShimError> {
        http::Request::get(target)
            .header(HOST, self.authority.clone())
            .body(Empty::new())
            .map_err(|e| ShimError::BadReply {
                server: self.url.clone(),
                reason: format!("cannot build the request for {target:?}: {e}"),
            })
    }

    fn http_err(&self, source: hyper::Error) -> ShimError {
        ShimError::UpstreamHttp {
            server: self.url.clone(),
            source,
        }
    }

    async fn take_idle(&self) -> Option<Sender> {
        loop {
            let mut sender = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop()?;
            // An idle connection is ready at once unless the server closed it.
            if !sender.is_closed() && sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn put_idle(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> Result<Sender, ShimError> {
        let io_err = |source| ShimError::UpstreamIo {
            server: self.url.clone(),
            source,
        };
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(io_err)?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.handshake(tcp).await,
            Some((connector, name)) => {
                let tls = connector.connect(name.clone(), tcp).await.map_err(io_err)?;
                self.handshake(tls).await
            }
        }
    }

    async fn handshake<T>(&self, io: T) -> Result<Sender, ShimError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = http1::handshake(TokioIo::new(io))
            .await
            .map_err(|source| self.http_err(source))?;
        // Drives the connection; ends when the sender is dropped or the server closes.
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream HTTP connection ended");
            }
        });
        Ok(sender)
    }
}
