//! A DNS server as the upstream: the client's query relayed as it came.
//!
//! Each forwarded query gets a fresh id and its own connected UDP socket (so a fresh random
//! source port, as resolvers do against spoofing); a reply counts only if it comes from the
//! server, carries that id, is a response and repeats the question. A reply with TC set is
//! fetched again over TCP from the same server. Servers are taken round robin; a server that
//! fails or does not answer within its share of the budget (the budget divided by the number
//! of servers) hands the query to the next.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Header, MessageType, Query};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::error::ShimError;
use crate::upstream::random_u64;
use crate::wire::{MAX_TCP_MESSAGE, same_question};

/// One or more DNS servers.
#[derive(Debug)]
pub struct DnsUpstream {
    servers: Vec<SocketAddr>,
    next: AtomicUsize,
    attempt: Duration,
}

/// A reply that answers the question, and whether it was truncated.
struct Checked {
    truncated: bool,
}

impl DnsUpstream {
    /// Servers tried in turn; `budget` is the whole time one query may take.
    pub fn new(servers: Vec<SocketAddr>, budget: Duration) -> Self {
        let n = u32::try_from(servers.len().max(1)).unwrap_or(u32::MAX);
        Self {
            servers,
            next: AtomicUsize::new(0),
            attempt: (budget / n).max(Duration::from_millis(50)),
        }
    }

    /// Relays `packet` (the client's query) and returns the reply, its id the one the shim
    /// chose (the caller restores the client's).
    ///
    /// # Errors
    /// The last server's failure when none answered.
    pub async fn resolve(&self, packet: &[u8], query: &Query) -> Result<Vec<u8>, ShimError> {
        let mut out = packet.to_vec();
        let id = (random_u64() & 0xffff) as u16;
        if let Some(head) = out.get_mut(0..2) {
            head.copy_from_slice(&id.to_be_bytes());
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = ShimError::UpstreamTimeout;
        for i in 0..self.servers.len() {
            let Some(&server) = self.servers.get((start + i) % self.servers.len()) else {
                break;
            };
            match tokio::time::timeout(self.attempt, exchange(server, &out, id, query)).await {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(e)) => {
                    tracing::debug!(%server, error = %e, "upstream attempt failed");
                    last = e;
                }
                Err(_) => last = ShimError::UpstreamTimeout,
            }
        }
        Err(last)
    }
}

/// UDP, then TCP if the UDP reply was truncated.
async fn exchange(
    server: SocketAddr,
    packet: &[u8],
    id: u16,
    query: &Query,
) -> Result<Vec<u8>, ShimError> {
    let reply = exchange_udp(server, packet, id, query).await?;
    if reply.1.truncated {
        return exchange_tcp(server, packet, id, query).await;
    }
    Ok(reply.0)
}

fn io_err(server: SocketAddr) -> impl Fn(std::io::Error) -> ShimError {
    move |source| ShimError::UpstreamIo {
        server: server.to_string(),
        source,
    }
}

async fn exchange_udp(
    server: SocketAddr,
    packet: &[u8],
    id: u16,
    query: &Query,
) -> Result<(Vec<u8>, Checked), ShimError> {
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await.map_err(io_err(server))?;
    // Connected: the kernel drops datagrams from anyone but the server, and reports its
    // ICMP port-unreachable as an error instead of leaving us to time out.
    socket.connect(server).await.map_err(io_err(server))?;
    socket.send(packet).await.map_err(io_err(server))?;
    loop {
        // `recv_buf` fills only the spare capacity it is given, so the 64 KiB a datagram
        // may need is reserved, not touched; the reply is shrunk to its size as it arrives.
        // (It also reports the ICMP port-unreachable of a connected socket, which waiting
        // on `readable()` alone would not.)
        let mut reply = Vec::with_capacity(MAX_TCP_MESSAGE);
        socket.recv_buf(&mut reply).await.map_err(io_err(server))?;
        reply.shrink_to_fit();
        match check(&reply, id, query, server) {
            Ok(checked) => return Ok((reply, checked)),
            // A late reply to an earlier query, or garbage: keep waiting for ours.
            Err(e) => tracing::debug!(%server, error = %e, "ignoring a datagram"),
        }
    }
}

async fn exchange_tcp(
    server: SocketAddr,
    packet: &[u8],
    id: u16,
    query: &Query,
) -> Result<Vec<u8>, ShimError> {
    let mut stream = TcpStream::connect(server).await.map_err(io_err(server))?;
    let _ = stream.set_nodelay(true);
    let len = u16::try_from(packet.len()).map_err(|_| ShimError::BadReply {
        server: server.to_string(),
        reason: "query longer than 65535 bytes".into(),
    })?;
    let mut framed = Vec::with_capacity(packet.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(packet);
    stream.write_all(&framed).await.map_err(io_err(server))?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(io_err(server))?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream
        .read_exact(&mut reply)
        .await
        .map_err(io_err(server))?;
    check(&reply, id, query, server)?;
    Ok(reply)
}

/// Whether `reply` answers `query` under `id`.
fn check(reply: &[u8], id: u16, query: &Query, server: SocketAddr) -> Result<Checked, ShimError> {
    let bad = |reason: &str| ShimError::BadReply {
        server: server.to_string(),
        reason: reason.to_string(),
    };
    let mut decoder = BinDecoder::new(reply);
    let header = Header::read(&mut decoder).map_err(|_| bad("shorter than a header"))?;
    if header.metadata.id != id {
        return Err(bad("id does not match"));
    }
    if header.metadata.message_type != MessageType::Response {
        return Err(bad("not a response"));
    }
    match header.counts.queries {
        // Some servers send FORMERR/NOTIMP without the question.
        0 if header.metadata.response_code != hickory_proto::op::ResponseCode::NoError => {}
        1 => {
            let echoed = Query::read(&mut decoder).map_err(|_| bad("question does not decode"))?;
            if !same_question(&echoed, query) {
                return Err(bad("question does not match"));
            }
        }
        _ => return Err(bad("not exactly one question")),
    }
    Ok(Checked {
        truncated: header.metadata.truncation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, OpCode, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};

    fn reply(id: u16, name: &str, rcode: ResponseCode) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Response, OpCode::Query);
        m.metadata.response_code = rcode;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    #[test]
    fn replies_must_match_id_and_question() {
        let server: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let q = Query::query(Name::from_ascii("a.apps.internal.").unwrap(), RecordType::A);
        assert!(
            check(
                &reply(7, "A.Apps.Internal.", ResponseCode::NoError),
                7,
                &q,
                server
            )
            .is_ok()
        );
        assert!(
            check(
                &reply(8, "a.apps.internal.", ResponseCode::NoError),
                7,
                &q,
                server
            )
            .is_err()
        );
        assert!(
            check(
                &reply(7, "b.apps.internal.", ResponseCode::NoError),
                7,
                &q,
                server
            )
            .is_err()
        );
        assert!(check(&[0, 7, 0x80], 7, &q, server).is_err());
    }
}
