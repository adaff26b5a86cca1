//! The platform resolvers the shim forwards to.
//!
//! - [`dns`]: any DNS server (bosh-dns, CoreDNS): the client's query is relayed as it came,
//!   under a fresh id, over UDP, and again over TCP when the reply is truncated.
//! - [`sdc`]: Cloud Foundry's service-discovery-controller over mutual TLS, as
//!   bosh-dns-adapter calls it.
//! - [`bosh_http`]: bosh-dns' HTTP handler protocol, as bosh-dns-adapter serves it.
//!
//! The HTTP kinds answer with addresses, which the engine turns into a DNS reply
//! ([`Reply::Synth`]). Every call here is bounded by the caller's `upstream_timeout`; a kind
//! never waits on its own.

pub mod bosh_http;
pub mod dns;
pub mod http;
pub mod sdc;

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;

use hickory_proto::op::ResponseCode;

use crate::config::UpstreamConfig;
use crate::error::ShimError;
use crate::wire::Request;

/// What an upstream answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A whole DNS reply from a DNS upstream, checked to answer the question asked; its id is
    /// the one the shim sent.
    Raw(Vec<u8>),
    /// Addresses from an HTTP upstream, to be written as a DNS reply.
    Synth(Synth),
}

/// An HTTP upstream's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synth {
    /// NOERROR, NXDOMAIN, ...
    pub rcode: ResponseCode,
    /// Addresses of the queried type, with their TTLs.
    pub answers: Vec<(IpAddr, u32)>,
    /// The upstream said its answer was truncated.
    pub truncated: bool,
}

/// A configured upstream.
#[derive(Debug)]
pub enum Upstream {
    /// A DNS server.
    Dns(dns::DnsUpstream),
    /// The service-discovery-controller.
    Sdc(sdc::SdcUpstream),
    /// A bosh-dns HTTP handler endpoint.
    BoshDnsHttp(bosh_http::BoshHttpUpstream),
}

impl Upstream {
    /// Builds the upstream: loads the SDC's certificate files, parses URLs. `timeout` is the
    /// whole budget of one forwarded query; `ttl` is the TTL of SDC answers (it sends none).
    ///
    /// # Errors
    /// When a certificate file cannot be read or used, or a URL cannot be used.
    pub fn from_config(
        cfg: &UpstreamConfig,
        timeout: std::time::Duration,
        ttl: u32,
    ) -> Result<Self, ShimError> {
        Ok(match cfg {
            UpstreamConfig::Dns { servers } => Upstream::Dns(dns::DnsUpstream::new(
                servers.iter().map(|s| s.0).collect(),
                timeout,
            )),
            UpstreamConfig::Sdc {
                url,
                ca,
                cert,
                key,
                server_name,
            } => {
                let tls = sdc::tls_config(ca, cert, key)?;
                Upstream::Sdc(sdc::SdcUpstream::new(
                    url,
                    server_name.as_deref(),
                    tls,
                    ttl,
                )?)
            }
            UpstreamConfig::BoshDnsHttp { url } => {
                Upstream::BoshDnsHttp(bosh_http::BoshHttpUpstream::new(url)?)
            }
        })
    }

    /// The kind, as in configs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Upstream::Dns(_) => "dns",
            Upstream::Sdc(_) => "sdc",
            Upstream::BoshDnsHttp(_) => "bosh-dns-http",
        }
    }

    /// Asks the upstream. `packet` is the client's query as received.
    ///
    /// # Errors
    /// When the upstream cannot be reached, fails, or answers something unusable.
    pub async fn resolve(&self, request: &Request, packet: &[u8]) -> Result<Reply, ShimError> {
        match self {
            Upstream::Dns(u) => u.resolve(packet, &request.query).await.map(Reply::Raw),
            Upstream::Sdc(u) => u.resolve(&request.query).await.map(Reply::Synth),
            Upstream::BoshDnsHttp(u) => u.resolve(&request.query).await.map(Reply::Synth),
        }
    }
}

/// A fast, non-cryptographic random number (xorshift64, seeded per thread from the
/// process's random hasher keys). Used for upstream query ids, beside the kernel's random
/// source port, and to shuffle SDC answers.
pub(crate) fn random_u64() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(0x9e37_79b9_7f4a_7c15);
            h.finish() | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

/// Shuffles `items` in place (Fisher-Yates), as bosh-dns-adapter shuffles SDC answers so
/// that clients taking the first address spread over instances.
pub(crate) fn shuffle<T>(items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let j = (random_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for a path segment or a
/// query value.
pub(crate) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_names_readable() {
        assert_eq!(percent_encode("app.apps.internal."), "app.apps.internal.");
        assert_eq!(percent_encode("a b/c\\003"), "a%20b%2Fc%5C003");
    }

    #[test]
    fn shuffle_keeps_every_item() {
        let mut v: Vec<u32> = (0..50).collect();
        shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    }
}
