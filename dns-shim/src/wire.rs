//! DNS wire format: reading a client's query and writing replies. No sockets, no clock.
//!
//! Parsing never panics and never trusts a count: records are read one at a time, so a
//! header that claims 65,535 records fails at the end of the packet, not in an allocation.
//! Name decompression (pointer loops, forward pointers, over-long names) is hickory-proto's,
//! which refuses them. Every reply is encoded first in full; a UDP reply that does not fit
//! the client's size is replaced by its header and question with TC set, so the client
//! retries over TCP and never sees half an RRset.

use hickory_proto::op::{
    Edns, Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_proto::rr::{DNSClass, Name};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

/// The smallest UDP payload every client accepts (RFC 1035).
pub const MIN_UDP_PAYLOAD: usize = 512;

/// The most a DNS message over TCP can hold (a 16-bit length prefix).
pub const MAX_TCP_MESSAGE: usize = 65_535;

/// A client's query, decoded and checked.
#[derive(Debug, Clone)]
pub struct Request {
    /// The query's header fields (id, opcode, RD, CD).
    pub metadata: Metadata,
    /// The one question, its name as the client wrote it (case kept).
    pub query: Query,
    /// The client's OPT record, if it sent one.
    pub edns: Option<Edns>,
}

/// Why a packet was not a usable query: the label it is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Malformed {
    /// Shorter than a DNS header (0 to 11 bytes): dropped.
    TooShort,
    /// A response (QR set), not a query: dropped, so the shim cannot be used to reflect.
    NotAQuery,
    /// A readable header but a question or record that does not decode: FORMERR.
    Undecodable,
    /// Not exactly one question: FORMERR.
    QuestionCount,
}

impl Malformed {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Malformed::TooShort => "too_short",
            Malformed::NotAQuery => "not_a_query",
            Malformed::Undecodable => "undecodable",
            Malformed::QuestionCount => "question_count",
        }
    }
}

/// A packet that is not a query the shim answers normally.
#[derive(Debug, Clone)]
pub enum Rejected {
    /// No reply at all.
    Drop(Malformed),
    /// A reply of just a header (and the question and OPT when known) with `rcode`.
    Reply {
        /// The query's header fields.
        metadata: Metadata,
        /// FORMERR, NOTIMP or BADVERS.
        rcode: ResponseCode,
        /// The question, when it decoded.
        query: Option<Query>,
        /// The client's OPT, when it decoded.
        edns: Option<Edns>,
        /// Set when the packet was malformed (FORMERR), for counting.
        malformed: Option<Malformed>,
    },
}

/// Decodes a client's packet. The error is boxed: it is the rare path.
///
/// # Errors
/// [`Rejected::Drop`] for packets shorter than a header and for responses;
/// [`Rejected::Reply`] with NOTIMP for opcodes other than QUERY, FORMERR for a body that does
/// not decode or does not hold exactly one question, BADVERS for EDNS versions above 0.
pub fn parse(packet: &[u8]) -> Result<Request, Box<Rejected>> {
    let mut decoder = BinDecoder::new(packet);
    let Ok(header) = Header::read(&mut decoder) else {
        return Err(Box::new(Rejected::Drop(Malformed::TooShort)));
    };
    let metadata = header.metadata;
    if metadata.message_type == MessageType::Response {
        return Err(Box::new(Rejected::Drop(Malformed::NotAQuery)));
    }
    let reject = |rcode, query, edns, malformed| {
        Box::new(Rejected::Reply {
            metadata,
            rcode,
            query,
            edns,
            malformed,
        })
    };
    if metadata.op_code != OpCode::Query {
        return Err(reject(ResponseCode::NotImp, None, None, None));
    }
    let formerr = |m| reject(ResponseCode::FormErr, None, None, Some(m));
    if header.counts.queries != 1 {
        return Err(formerr(Malformed::QuestionCount));
    }
    let query = Query::read(&mut decoder).map_err(|_| formerr(Malformed::Undecodable))?;
    let counts = header.counts;
    for (count, additional) in [
        (counts.answers, false),
        (counts.authorities, false),
        (counts.additionals, true),
    ] {
        let (_, edns, _) =
            Message::read_records(&mut decoder, usize::from(count), additional, OpCode::Query)
                .map_err(|_| formerr(Malformed::Undecodable))?;
        if additional && let Some(edns) = edns {
            if edns.version() != 0 {
                return Err(reject(ResponseCode::BADVERS, Some(query), Some(edns), None));
            }
            return Ok(Request {
                metadata,
                query,
                edns: Some(edns),
            });
        }
    }
    Ok(Request {
        metadata,
        query,
        edns: None,
    })
}

/// The header of a reply to `request`: id, opcode, RD and CD copied, QR set.
pub fn reply_metadata(request: &Metadata) -> Metadata {
    Metadata::response_from_request(request)
}

/// The OPT record of a reply: present when the query had one, advertising `payload`, DO
/// copied from the query (RFC 3225), version 0, no options.
pub fn reply_edns(query: Option<&Edns>, payload: u16) -> Option<Edns> {
    query.map(|q| {
        let mut edns = Edns::new();
        edns.set_max_payload(payload);
        edns.set_version(0);
        edns.set_dnssec_ok(q.flags().dnssec_ok);
        edns
    })
}

/// The largest UDP reply the client accepts: 512 without EDNS, else its advertised size,
/// never above `ours` and never below 512.
pub fn udp_limit(query: Option<&Edns>, ours: u16) -> usize {
    match query {
        None => MIN_UDP_PAYLOAD,
        Some(edns) => usize::from(edns.max_payload().min(ours)).max(MIN_UDP_PAYLOAD),
    }
}

/// Encodes `message`; when it is longer than `limit`, encodes instead its header, question
/// and OPT with TC set.
pub fn encode(message: &Message, limit: usize) -> Vec<u8> {
    match message.to_vec() {
        Ok(bytes) if bytes.len() <= limit => bytes,
        Ok(_) => truncated(message),
        Err(error) => {
            // Only a name or record we built could fail to encode; say SERVFAIL, not nothing.
            tracing::error!(%error, "cannot encode a reply; answering SERVFAIL");
            let mut fail = message.truncate();
            fail.metadata.truncation = false;
            fail.metadata.response_code = ResponseCode::ServFail;
            fail.to_vec().unwrap_or_default()
        }
    }
}

/// `message` reduced to header, question and OPT, with TC set.
pub fn truncated(message: &Message) -> Vec<u8> {
    let mut t = message.truncate();
    t.metadata.authoritative = message.metadata.authoritative;
    t.to_vec().unwrap_or_default()
}

/// A reply carrying only `rcode` (and the question and OPT when given).
pub fn error_reply(
    request: &Metadata,
    rcode: ResponseCode,
    query: Option<&Query>,
    edns: Option<Edns>,
) -> Vec<u8> {
    let mut message = Message::new(request.id, MessageType::Response, request.op_code);
    message.metadata = reply_metadata(request);
    message.metadata.response_code = rcode;
    if let Some(query) = query {
        message.add_query(query.clone());
    }
    if let Some(edns) = edns {
        message.set_edns(edns);
    }
    // Header, question and OPT always fit in 512 bytes.
    encode(&message, MAX_TCP_MESSAGE)
}

/// The lowercase, dot-joined form of `name` without the root dot (`orders.apps.internal`),
/// or `None` when a label holds anything but letters, digits, `-` or `_`: such a name can
/// never be a route name, and joining its labels could make it look like one.
pub fn lookup_key(name: &Name) -> Option<String> {
    let mut key = String::with_capacity(name.len());
    for label in name.iter() {
        if label.is_empty()
            || !label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return None;
        }
        if !key.is_empty() {
            key.push('.');
        }
        key.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
    }
    (!key.is_empty()).then_some(key)
}

/// Whether two questions ask the same thing (names compared ignoring ASCII case).
pub fn same_question(a: &Query, b: &Query) -> bool {
    a.query_type() == b.query_type()
        && a.query_class() == b.query_class()
        && a.name().num_labels() == b.name().num_labels()
        && a.name()
            .iter()
            .zip(b.name().iter())
            .all(|(x, y)| x.eq_ignore_ascii_case(y))
}

/// Whether the class is one the shim answers (IN, or ANY as some tools send).
pub fn answerable_class(class: DNSClass) -> bool {
    matches!(class, DNSClass::IN | DNSClass::ANY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::RecordType;

    fn query_bytes(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn parses_a_query_and_keeps_the_case() {
        let req = parse(&query_bytes(
            "Orders.Apps.Internal.",
            RecordType::A,
            Some(1232),
        ))
        .unwrap();
        assert_eq!(req.metadata.id, 0x1234);
        assert_eq!(req.query.name().to_ascii(), "Orders.Apps.Internal.");
        assert_eq!(req.edns.as_ref().map(Edns::max_payload), Some(1232));
        assert_eq!(
            lookup_key(req.query.name()).as_deref(),
            Some("orders.apps.internal")
        );
    }

    #[test]
    fn short_packets_and_responses_are_dropped() {
        for len in 0..12 {
            assert!(matches!(
                parse(&vec![0u8; len]).map_err(|e| *e),
                Err(Rejected::Drop(Malformed::TooShort))
            ));
        }
        let mut bytes = query_bytes("a.apps.internal.", RecordType::A, None);
        bytes[2] |= 0x80;
        assert!(matches!(
            parse(&bytes).map_err(|e| *e),
            Err(Rejected::Drop(Malformed::NotAQuery))
        ));
    }

    #[test]
    fn bad_bodies_get_formerr_and_other_opcodes_notimp() {
        let mut bytes = query_bytes("a.apps.internal.", RecordType::A, None);
        bytes.truncate(20);
        let Err(Rejected::Reply {
            rcode, malformed, ..
        }) = parse(&bytes).map_err(|e| *e)
        else {
            panic!("expected a reply")
        };
        assert_eq!(rcode, ResponseCode::FormErr);
        assert_eq!(malformed, Some(Malformed::Undecodable));

        let mut two = query_bytes("a.apps.internal.", RecordType::A, None);
        two[5] = 2;
        let Err(Rejected::Reply { malformed, .. }) = parse(&two).map_err(|e| *e) else {
            panic!("expected a reply")
        };
        assert_eq!(malformed, Some(Malformed::QuestionCount));

        let mut notify = query_bytes("a.apps.internal.", RecordType::SOA, None);
        notify[2] = (notify[2] & 0x87) | (4 << 3);
        let Err(Rejected::Reply {
            rcode, malformed, ..
        }) = parse(&notify).map_err(|e| *e)
        else {
            panic!("expected a reply")
        };
        assert_eq!((rcode, malformed), (ResponseCode::NotImp, None));
    }

    #[test]
    fn edns_version_above_zero_is_badvers() {
        let mut bytes = query_bytes("a.apps.internal.", RecordType::A, Some(1232));
        // The OPT TTL's second byte is the version; it sits 5 bytes before the end
        // (version, flags(2), rdlength(2)).
        let at = bytes.len() - 5;
        bytes[at] = 1;
        let Err(Rejected::Reply { rcode, edns, .. }) = parse(&bytes).map_err(|e| *e) else {
            panic!("expected a reply")
        };
        assert_eq!(rcode, ResponseCode::BADVERS);
        let reply = error_reply(
            &Metadata::new(1, MessageType::Query, OpCode::Query),
            rcode,
            None,
            reply_edns(edns.as_ref(), 1232),
        );
        let decoded = Message::from_vec(&reply).unwrap();
        // 16 is both BADVERS and BADSIG; hickory decodes it as the latter.
        assert_eq!(u16::from(decoded.metadata.response_code), 16);
    }

    #[test]
    fn limits_follow_the_client_within_our_bounds() {
        let mut e = Edns::new();
        assert_eq!(udp_limit(None, 1232), 512);
        e.set_max_payload(4096);
        assert_eq!(udp_limit(Some(&e), 1232), 1232);
        e.set_max_payload(800);
        assert_eq!(udp_limit(Some(&e), 1232), 800);
        e.set_max_payload(100);
        assert_eq!(udp_limit(Some(&e), 1232), 512);
    }

    #[test]
    fn lookup_key_refuses_labels_that_could_fake_a_route() {
        let name = Name::from_labels(vec![&b"orders.apps"[..], &b"internal"[..]]).unwrap();
        assert_eq!(lookup_key(&name), None);
        assert_eq!(lookup_key(&Name::root()), None);
    }
}
