//! bosh-dns' HTTP handler protocol as the upstream (what bosh-dns-adapter serves).
//!
//! `GET {url}/?name=<qname with trailing dot>&type=<qtype number>`; a status other than 200
//! is SERVFAIL, as in bosh-dns. The JSON reply is read the way bosh-dns reads it (`TC` and
//! `Answer[].{type,TTL,data}`), plus `Status`, which bosh-dns ignores and the shim honours
//! (`3` is NXDOMAIN, `5` REFUSED, `0` NOERROR, anything else SERVFAIL). Answers are written
//! under the question's name, like bosh-dns does; only A and AAAA answers of the queried type
//! with a valid address are kept.

use std::net::IpAddr;

use hickory_proto::op::{Query, ResponseCode};
use hickory_proto::rr::RecordType;
use serde::Deserialize;

use crate::decide::family_matches;
use crate::error::ShimError;
use crate::upstream::http::HttpClient;
use crate::upstream::{Synth, percent_encode};

/// The reply, as far as the shim reads it. Go marshals a nil slice as `null`, hence the
/// options.
#[derive(Debug, Deserialize)]
struct HttpDnsMessage {
    #[serde(rename = "Status", default)]
    status: u16,
    #[serde(rename = "TC", default)]
    truncated: bool,
    #[serde(rename = "Answer", default)]
    answer: Option<Vec<HttpAnswer>>,
}

#[derive(Debug, Deserialize)]
struct HttpAnswer {
    #[serde(rename = "type")]
    rr_type: u16,
    #[serde(rename = "TTL", default)]
    ttl: u32,
    data: String,
}

/// A bosh-dns HTTP handler endpoint.
#[derive(Debug)]
pub struct BoshHttpUpstream {
    client: HttpClient,
}

impl BoshHttpUpstream {
    /// A client for the endpoint at `url` (plain HTTP, as the adapter listens on loopback).
    ///
    /// # Errors
    /// [`ShimError::InvalidUrl`] when `url` is not an `http` URL with a host.
    pub fn new(url: &str) -> Result<Self, ShimError> {
        Ok(Self {
            client: HttpClient::new(url, None)?,
        })
    }

    /// Asks the endpoint about `query`.
    ///
    /// # Errors
    /// When it cannot be reached, answers a status other than 200, or a body that is not
    /// the handler JSON.
    pub async fn resolve(&self, query: &Query) -> Result<Synth, ShimError> {
        let qtype = query.query_type();
        let path = format!(
            "/?name={}&type={}",
            percent_encode(&query.name().to_ascii()),
            u16::from(qtype)
        );
        let (status, body) = self.client.get(&path).await?;
        if status != 200 {
            return Err(ShimError::UpstreamStatus {
                server: self.client.url().to_string(),
                status,
            });
        }
        let message: HttpDnsMessage =
            serde_json::from_slice(&body).map_err(|e| ShimError::BadReply {
                server: self.client.url().to_string(),
                reason: format!("not the bosh-dns HTTP JSON: {e}"),
            })?;
        let rcode = match message.status {
            0 => ResponseCode::NoError,
            3 => ResponseCode::NXDomain,
            5 => ResponseCode::Refused,
            _ => ResponseCode::ServFail,
        };
        let answers = message
            .answer
            .unwrap_or_default()
            .into_iter()
            .filter_map(|a| {
                let ip: IpAddr = a.data.parse().ok()?;
                let kind = RecordType::from(a.rr_type);
                let fits = (kind == RecordType::A && ip.is_ipv4())
                    || (kind == RecordType::AAAA && ip.is_ipv6());
                (fits && family_matches(qtype, ip)).then_some((ip, a.ttl))
            })
            .collect();
        Ok(Synth {
            rcode,
            answers,
            truncated: message.truncated,
        })
    }
}
