//! The request and response heads that open each tunneled connection on a QUIC stream.
//!
//! Over QUIC every tunneled TCP connection is one bidirectional stream. The client writes a
//! request head, the server answers with a response head, and from then on the stream
//! carries the connection's raw bytes both ways. The heads carry the same fields as the
//! HTTP/2 CONNECT transport, in a bounded, HTTP/1-like text form:
//!
//! ```text
//! CONNECT orders.apps.internal:8080 ISTHMUS/1\r\n
//! traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n
//! \r\n
//! ```
//!
//! ```text
//! ISTHMUS/1 200 OK\r\n
//! \r\n
//! ```
//!
//! Header names are lowercase tokens; values are visible ASCII, spaces and tabs, trimmed of
//! surrounding whitespace. Headers keep their order; [`FORWARDED`], [`BAGGAGE`] and
//! [`TRACEPARENT`] are the ones Isthmus itself reads. A head, blank line included, is at most
//! [`MAX_HEAD`] bytes with at most [`MAX_HEADERS`] headers, so a peer cannot make us buffer
//! without bound.
//!
//! Lines end in CRLF only: a bare LF or CR is refused rather than guessed at, so both ends
//! always agree on where a header ends. The parsers never consume bytes after the blank
//! line; those belong to the tunneled connection.
//!
//! This module is pure (no I/O, no clock) and faces untrusted bytes: it never panics and
//! never indexes out of bounds.

/// Largest head, blank line included, that is parsed or encoded.
pub const MAX_HEAD: usize = 8 * 1024;
/// Most header lines a head may carry.
pub const MAX_HEADERS: usize = 64;
/// The only method a request head may carry.
pub const METHOD: &str = "CONNECT";
/// The protocol version both heads carry.
pub const VERSION: &str = "ISTHMUS/1";
/// RFC 7239 `Forwarded`: who the connection came from, as the egress gateway saw it.
pub const FORWARDED: &str = "forwarded";
/// W3C baggage, passed through for tracing.
pub const BAGGAGE: &str = "baggage";
/// W3C trace context, passed through for tracing.
pub const TRACEPARENT: &str = "traceparent";

/// Longest excerpt of offending input quoted in an error.
const EXCERPT_CHARS: usize = 100;

/// What a client sends first on a tunnel stream: which route it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The route authority, `name:port`, e.g. `orders.apps.internal:8080`.
    pub authority: String,
    /// Header fields in the order they were written.
    pub headers: Vec<(String, String)>,
}

/// What a server answers on a tunnel stream before the payload starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// HTTP-like status code, 100 to 599.
    pub status: u16,
    /// Human-readable reason; may be empty.
    pub reason: String,
    /// Header fields in the order they were written.
    pub headers: Vec<(String, String)>,
}

/// The outcome of parsing a buffer that may not hold a whole head yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    /// A whole head was read.
    Complete {
        /// The head.
        head: T,
        /// Bytes up to and including the blank line; the rest of the buffer is payload.
        consumed: usize,
    },
    /// The buffer is a valid beginning of a head: read more and parse again.
    NeedMore,
}

/// A head that cannot be parsed or encoded. Each names the input and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// No blank line within the first `limit` bytes, or an encoded head longer than that.
    #[error(
        "stream head exceeds {limit} bytes: expected the whole head, blank line included, within {limit} bytes"
    )]
    TooLarge {
        /// [`MAX_HEAD`].
        limit: usize,
    },
    /// A request line that is not three space-separated parts of visible ASCII.
    #[error(
        "request line \"{line}\" is malformed: expected `CONNECT <authority> ISTHMUS/1` ending in CRLF"
    )]
    BadRequestLine {
        /// The line, escaped and truncated to 100 characters.
        line: String,
    },
    /// A status line that is not `version status [reason]`.
    #[error(
        "status line \"{line}\" is malformed: expected `ISTHMUS/1 <3-digit status> <reason>` ending in CRLF"
    )]
    BadStatusLine {
        /// The line, escaped and truncated to 100 characters.
        line: String,
    },
    /// A request method other than `CONNECT`.
    #[error("method \"{method}\" is not supported: expected CONNECT")]
    BadMethod {
        /// The method as received, escaped and truncated.
        method: String,
    },
    /// A protocol version other than `ISTHMUS/1`.
    #[error("version \"{version}\" is not supported: expected ISTHMUS/1")]
    BadVersion {
        /// The version as received, escaped and truncated.
        version: String,
    },
    /// A status that is not three digits from 100 to 599.
    #[error("status \"{status}\" is invalid: expected three digits from 100 to 599")]
    BadStatus {
        /// The status as received or given, escaped and truncated.
        status: String,
    },
    /// A header line that is not `name: value`.
    #[error(
        "header line \"{line}\" is malformed: expected `name: value` with a lowercase token name and a value of visible ASCII, spaces and tabs, ending in CRLF"
    )]
    BadHeader {
        /// The line, escaped and truncated to 100 characters.
        line: String,
    },
    /// More header lines than [`MAX_HEADERS`].
    #[error("head carries more than {limit} headers: expected at most {limit}")]
    TooManyHeaders {
        /// [`MAX_HEADERS`].
        limit: usize,
    },
    /// A field that cannot be encoded, most importantly one that would inject a line.
    #[error("{field} \"{value}\" cannot be encoded: expected {expected}")]
    InvalidValue {
        /// Which field: `authority`, `header name`, `header value` or `reason`.
        field: &'static str,
        /// The value, escaped and truncated to 100 characters.
        value: String,
        /// What a valid value looks like.
        expected: &'static str,
    },
}

impl RequestHead {
    /// A request for `authority` with no headers.
    pub fn new(authority: impl Into<String>) -> Self {
        Self {
            authority: authority.into(),
            headers: Vec::new(),
        }
    }

    /// Writes the head, blank line included.
    ///
    /// # Errors
    ///
    /// [`FrameError::InvalidValue`] for an authority that is empty or not visible ASCII, or
    /// a header that is not a lowercase token name with a visible-ASCII value (a CR or LF
    /// would inject lines); [`FrameError::TooManyHeaders`] and [`FrameError::TooLarge`]
    /// past the limits the parser enforces.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let authority = self.authority.as_bytes();
        if authority.is_empty() || !authority.iter().all(u8::is_ascii_graphic) {
            return Err(invalid(
                "authority",
                authority,
                "a non-empty route authority such as orders.apps.internal:8080, visible ASCII without spaces",
            ));
        }
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(METHOD.as_bytes());
        out.push(b' ');
        out.extend_from_slice(authority);
        out.push(b' ');
        out.extend_from_slice(VERSION.as_bytes());
        out.extend_from_slice(b"\r\n");
        encode_headers(out, &self.headers)
    }

    /// The value of the first header called `name` (compared ignoring ASCII case).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

impl ResponseHead {
    /// A response with `status` and `reason` and no headers.
    pub fn new(status: u16, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            headers: Vec::new(),
        }
    }

    /// Writes the head, blank line included.
    ///
    /// # Errors
    ///
    /// [`FrameError::BadStatus`] outside 100..=599; [`FrameError::InvalidValue`] for a
    /// reason or header that would not parse back (a CR or LF would inject lines);
    /// [`FrameError::TooManyHeaders`] and [`FrameError::TooLarge`] past the limits.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        if !(100..=599).contains(&self.status) {
            return Err(FrameError::BadStatus {
                status: self.status.to_string(),
            });
        }
        let reason = self.reason.as_bytes();
        if !reason.iter().all(|b| is_field_byte(*b)) {
            return Err(invalid(
                "reason",
                reason,
                "visible ASCII, spaces and tabs, no CR or LF",
            ));
        }
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(VERSION.as_bytes());
        out.push(b' ');
        // Three digits: the range check above makes `status` exactly that.
        out.extend_from_slice(self.status.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason);
        out.extend_from_slice(b"\r\n");
        encode_headers(out, &self.headers)
    }

    /// The value of the first header called `name` (compared ignoring ASCII case).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// Parses a request head from the start of `buf`.
///
/// Returns [`Parsed::NeedMore`] while `buf` is a valid beginning shorter than
/// [`MAX_HEAD`]. A complete first line is checked at once, so a peer speaking something
/// else is refused without waiting for a whole head.
///
/// # Errors
///
/// [`FrameError::BadRequestLine`], [`FrameError::BadMethod`] or [`FrameError::BadVersion`]
/// for the first line, [`FrameError::BadHeader`] or [`FrameError::TooManyHeaders`] for
/// the headers, [`FrameError::TooLarge`] when [`MAX_HEAD`] bytes hold no blank line.
pub fn parse_request(buf: &[u8]) -> Result<Parsed<RequestHead>, FrameError> {
    parse_head(buf, request_line, |line| FrameError::BadRequestLine {
        line,
    })
    .map(|parsed| parsed.map(|(authority, headers)| RequestHead { authority, headers }))
}

/// Parses a response head from the start of `buf`.
///
/// Returns [`Parsed::NeedMore`] while `buf` is a valid beginning shorter than
/// [`MAX_HEAD`].
///
/// # Errors
///
/// [`FrameError::BadStatusLine`], [`FrameError::BadVersion`] or [`FrameError::BadStatus`]
/// for the first line, [`FrameError::BadHeader`] or [`FrameError::TooManyHeaders`] for
/// the headers, [`FrameError::TooLarge`] when [`MAX_HEAD`] bytes hold no blank line.
pub fn parse_response(buf: &[u8]) -> Result<Parsed<ResponseHead>, FrameError> {
    parse_head(buf, status_line, |line| FrameError::BadStatusLine { line }).map(|parsed| {
        parsed.map(|((status, reason), headers)| ResponseHead {
            status,
            reason,
            headers,
        })
    })
}

impl<T> Parsed<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Parsed<U> {
        match self {
            Parsed::Complete { head, consumed } => Parsed::Complete {
                head: f(head),
                consumed,
            },
            Parsed::NeedMore => Parsed::NeedMore,
        }
    }
}

type Headers = Vec<(String, String)>;

/// The line-by-line walk shared by both heads: first line, headers, blank line.
fn parse_head<F>(
    buf: &[u8],
    first_line: impl FnOnce(&[u8]) -> Result<F, FrameError>,
    bad_first_line: impl FnOnce(String) -> FrameError,
) -> Result<Parsed<(F, Headers)>, FrameError> {
    let window = buf.get(..MAX_HEAD).unwrap_or(buf);
    let short = || {
        if buf.len() >= MAX_HEAD {
            Err(FrameError::TooLarge { limit: MAX_HEAD })
        } else {
            Ok(Parsed::NeedMore)
        }
    };
    let mut pos = 0;
    let first = match next_line(window, &mut pos) {
        None => return short(),
        Some(Err(raw)) => return Err(bad_first_line(excerpt(raw))),
        Some(Ok(line)) => first_line(line)?,
    };
    let mut headers = Vec::new();
    loop {
        match next_line(window, &mut pos) {
            None => return short(),
            Some(Err(raw)) => return Err(FrameError::BadHeader { line: excerpt(raw) }),
            Some(Ok(b"")) => {
                return Ok(Parsed::Complete {
                    head: (first, headers),
                    consumed: pos,
                });
            }
            Some(Ok(line)) => {
                if headers.len() >= MAX_HEADERS {
                    return Err(FrameError::TooManyHeaders { limit: MAX_HEADERS });
                }
                headers.push(header_line(line)?);
            }
        }
    }
}

/// The next LF-terminated line from `pos`, advancing `pos` past it.
///
/// `None` when no LF follows yet; `Err(raw)` when the LF has no CR before it.
fn next_line<'a>(window: &'a [u8], pos: &mut usize) -> Option<Result<&'a [u8], &'a [u8]>> {
    let rest = window.get(*pos..)?;
    let lf = rest.iter().position(|b| *b == b'\n')?;
    let raw = rest.get(..lf)?;
    *pos = pos.saturating_add(lf).saturating_add(1);
    Some(raw.strip_suffix(b"\r").ok_or(raw))
}

/// `CONNECT <authority> ISTHMUS/1` -> the authority.
fn request_line(line: &[u8]) -> Result<String, FrameError> {
    let bad = || FrameError::BadRequestLine {
        line: excerpt(line),
    };
    if !line.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        return Err(bad());
    }
    let mut parts = line.split(|b| *b == b' ');
    let (Some(method), Some(authority), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if method.is_empty() || authority.is_empty() || version.is_empty() {
        return Err(bad());
    }
    if method != METHOD.as_bytes() {
        return Err(FrameError::BadMethod {
            method: excerpt(method),
        });
    }
    if version != VERSION.as_bytes() {
        return Err(FrameError::BadVersion {
            version: excerpt(version),
        });
    }
    Ok(ascii_string(authority))
}

/// `ISTHMUS/1 <status> [reason]` -> (status, reason).
fn status_line(line: &[u8]) -> Result<(u16, String), FrameError> {
    if !line.iter().all(|b| is_field_byte(*b)) {
        return Err(FrameError::BadStatusLine {
            line: excerpt(line),
        });
    }
    let space = line
        .iter()
        .position(|b| *b == b' ')
        .ok_or_else(|| FrameError::BadStatusLine {
            line: excerpt(line),
        })?;
    let (version, rest) = line.split_at(space);
    if version != VERSION.as_bytes() {
        return Err(FrameError::BadVersion {
            version: excerpt(version),
        });
    }
    let rest = rest.get(1..).unwrap_or_default();
    // The reason is optional, and so is the space before an empty one.
    let (status, reason) = match rest.iter().position(|b| *b == b' ') {
        Some(space) => (
            rest.get(..space).unwrap_or_default(),
            rest.get(space + 1..).unwrap_or_default(),
        ),
        None => (rest, &b""[..]),
    };
    let code = match *status {
        [a @ b'1'..=b'5', b @ b'0'..=b'9', c @ b'0'..=b'9'] => {
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
        }
        _ => {
            return Err(FrameError::BadStatus {
                status: excerpt(status),
            });
        }
    };
    Ok((code, ascii_string(reason)))
}

/// `name: value` with optional whitespace around the value.
fn header_line(line: &[u8]) -> Result<(String, String), FrameError> {
    let bad = || FrameError::BadHeader {
        line: excerpt(line),
    };
    let colon = line.iter().position(|b| *b == b':').ok_or_else(bad)?;
    let (name, value) = line.split_at(colon);
    let value = trim_ows(value.get(1..).unwrap_or_default());
    if !is_header_name(name) || !value.iter().all(|b| is_field_byte(*b)) {
        return Err(bad());
    }
    Ok((ascii_string(name), ascii_string(value)))
}

/// Appends the header lines and the blank line, then checks the size limit.
fn encode_headers(mut out: Vec<u8>, headers: &[(String, String)]) -> Result<Vec<u8>, FrameError> {
    if headers.len() > MAX_HEADERS {
        return Err(FrameError::TooManyHeaders { limit: MAX_HEADERS });
    }
    for (name, value) in headers {
        if !is_header_name(name.as_bytes()) {
            return Err(invalid(
                "header name",
                name.as_bytes(),
                "a non-empty lowercase token (a-z, 0-9 and !#$%&'*+-.^_`|~)",
            ));
        }
        let bytes = value.as_bytes();
        // Surrounding whitespace would be trimmed by the parser, so refuse it instead of
        // sending a value that does not come back as written.
        let trimmed = trim_ows(bytes).len() == bytes.len();
        if !bytes.iter().all(|b| is_field_byte(*b)) || !trimmed {
            return Err(invalid(
                "header value",
                bytes,
                "visible ASCII, inner spaces and tabs, no CR or LF and no surrounding whitespace",
            ));
        }
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        if !bytes.is_empty() {
            out.push(b' ');
            out.extend_from_slice(bytes);
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if out.len() > MAX_HEAD {
        return Err(FrameError::TooLarge { limit: MAX_HEAD });
    }
    Ok(out)
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn invalid(field: &'static str, value: &[u8], expected: &'static str) -> FrameError {
    FrameError::InvalidValue {
        field,
        value: excerpt(value),
        expected,
    }
}

/// A non-empty run of lowercase RFC 9110 token characters.
fn is_header_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(b))
}

/// Bytes allowed in a header value or reason: visible ASCII, space and tab.
fn is_field_byte(b: u8) -> bool {
    b.is_ascii_graphic() || b == b' ' || b == b'\t'
}

fn trim_ows(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    bytes.get(start..end).unwrap_or_default()
}

/// Bytes already checked to be ASCII, as a `String`.
fn ascii_string(bytes: &[u8]) -> String {
    bytes.iter().copied().map(char::from).collect()
}

/// Input quoted in an error: printable ASCII kept, everything else escaped, at most
/// [`EXCERPT_CHARS`] characters so a hostile peer cannot flood the logs.
fn excerpt(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        let piece = match b {
            b'\\' => "\\\\".to_owned(),
            b'"' => "\\\"".to_owned(),
            b'\r' => "\\r".to_owned(),
            b'\n' => "\\n".to_owned(),
            b'\t' => "\\t".to_owned(),
            b' '..=b'~' => char::from(b).to_string(),
            _ => format!("\\x{b:02x}"),
        };
        if out.len() + piece.len() > EXCERPT_CHARS {
            out.push_str("...");
            break;
        }
        out.push_str(&piece);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RequestHead {
        RequestHead {
            authority: "orders.apps.internal:8080".to_owned(),
            headers: vec![
                (
                    TRACEPARENT.to_owned(),
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
                ),
                ("x-custom".to_owned(), "a\tb c".to_owned()),
                (
                    FORWARDED.to_owned(),
                    "for=\"10.0.0.7:41234\";by=egress".to_owned(),
                ),
                (BAGGAGE.to_owned(), "tenant=blue".to_owned()),
                ("x-empty".to_owned(), String::new()),
                ("x-custom".to_owned(), "second".to_owned()),
            ],
        }
    }

    fn response() -> ResponseHead {
        ResponseHead {
            status: 200,
            reason: "Connection established".to_owned(),
            headers: vec![("x-served-by".to_owned(), "ingress-1".to_owned())],
        }
    }

    fn complete<T>(parsed: Result<Parsed<T>, FrameError>) -> (T, usize) {
        match parsed {
            Ok(Parsed::Complete { head, consumed }) => (head, consumed),
            other => panic!("expected a complete head, got {:?}", other.err()),
        }
    }

    #[test]
    fn request_round_trips_and_leaves_the_payload() {
        let head = request();
        let encoded = head.encode().unwrap();
        assert!(
            encoded.starts_with(b"CONNECT orders.apps.internal:8080 ISTHMUS/1\r\ntraceparent: 00-")
        );
        assert!(encoded.ends_with(b"x-empty:\r\nx-custom: second\r\n\r\n"));
        let mut buf = encoded.clone();
        buf.extend_from_slice(b"\r\n\r\nCONNECT payload");
        let (parsed, consumed) = complete(parse_request(&buf));
        assert_eq!(parsed, head);
        assert_eq!(consumed, encoded.len());
        assert_eq!(&buf[consumed..], b"\r\n\r\nCONNECT payload");
        assert_eq!(parsed.header("x-custom"), Some("a\tb c"));
        assert_eq!(
            parsed.header("TraceParent"),
            Some(head.headers[0].1.as_str())
        );
        assert_eq!(parsed.header("x-missing"), None);
    }

    #[test]
    fn response_round_trips() {
        for head in [
            response(),
            ResponseHead::new(599, ""),
            ResponseHead::new(100, "  odd\treason "),
        ] {
            let encoded = head.encode().unwrap();
            let mut buf = encoded.clone();
            buf.push(0);
            let (parsed, consumed) = complete(parse_response(&buf));
            assert_eq!((parsed, consumed), (head, encoded.len()));
        }
        assert_eq!(
            response().encode().unwrap()[..30],
            *b"ISTHMUS/1 200 Connection estab"
        );
        // A peer may leave out the space before an empty reason.
        let (bare, _) = complete(parse_response(b"ISTHMUS/1 403\r\n\r\n"));
        assert_eq!(bare, ResponseHead::new(403, ""));
    }

    #[test]
    fn parser_is_lenient_about_optional_whitespace_only() {
        let (head, _) = complete(parse_request(
            b"CONNECT a:1 ISTHMUS/1\r\nx:v\r\ny: \t v w \t\r\n\r\n",
        ));
        assert_eq!(
            head.headers,
            vec![("x".into(), "v".into()), ("y".into(), "v w".into())]
        );
    }

    #[test]
    fn every_prefix_needs_more() {
        let req = request().encode().unwrap();
        for end in 0..req.len() {
            assert_eq!(
                parse_request(&req[..end]),
                Ok(Parsed::NeedMore),
                "prefix {end}"
            );
        }
        let resp = response().encode().unwrap();
        for end in 0..resp.len() {
            assert_eq!(
                parse_response(&resp[..end]),
                Ok(Parsed::NeedMore),
                "prefix {end}"
            );
        }
    }

    #[test]
    fn size_limits() {
        let too_large = Some(FrameError::TooLarge { limit: MAX_HEAD });
        let mut big = b"CONNECT a:1 ISTHMUS/1\r\n".to_vec();
        big.extend_from_slice(b"x-pad: ");
        big.resize(MAX_HEAD - 1, b'p');
        assert_eq!(parse_request(&big), Ok(Parsed::NeedMore));
        big.push(b'p');
        assert_eq!(parse_request(&big).err(), too_large);
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_request(&big).err(), too_large);

        // A head of exactly MAX_HEAD bytes is fine both ways.
        let mut head = RequestHead::new("a:1");
        let fixed = head.encode().unwrap().len() + "x-pad: \r\n".len();
        head.headers
            .push(("x-pad".into(), "p".repeat(MAX_HEAD - fixed)));
        let encoded = head.encode().unwrap();
        assert_eq!(encoded.len(), MAX_HEAD);
        assert_eq!(complete(parse_request(&encoded)), (head.clone(), MAX_HEAD));
        head.headers[0].1.push('p');
        assert_eq!(head.encode().err(), too_large);

        let many = |n: usize| {
            let mut head = RequestHead::new("a:1");
            head.headers = (0..n).map(|i| (format!("x-{i}"), "1".to_owned())).collect();
            head
        };
        let max = many(MAX_HEADERS).encode().unwrap();
        assert_eq!(complete(parse_request(&max)).0, many(MAX_HEADERS));
        let too_many = Some(FrameError::TooManyHeaders { limit: MAX_HEADERS });
        assert_eq!(many(MAX_HEADERS + 1).encode().err(), too_many);
        let mut over = max.clone();
        over.splice(max.len() - 2..max.len() - 2, *b"x-extra: 1\r\n");
        assert_eq!(parse_request(&over).err(), too_many);
    }

    #[test]
    fn bad_request_heads_each_have_their_own_error() {
        let line = |s: &str| FrameError::BadRequestLine { line: s.into() };
        let cases: &[(&[u8], FrameError)] = &[
            (
                b"GET a:1 ISTHMUS/1\r\n\r\n",
                FrameError::BadMethod {
                    method: "GET".into(),
                },
            ),
            (
                b"CONNECT a:1 HTTP/1.1\r\n\r\n",
                FrameError::BadVersion {
                    version: "HTTP/1.1".into(),
                },
            ),
            (b"CONNECT a:1\r\n\r\n", line("CONNECT a:1")),
            (
                b"CONNECT  a:1 ISTHMUS/1\r\n\r\n",
                line("CONNECT  a:1 ISTHMUS/1"),
            ),
            (
                b"CONNECT a:1 ISTHMUS/1 x\r\n\r\n",
                line("CONNECT a:1 ISTHMUS/1 x"),
            ),
            (
                b"CONNECT a\x00:1 ISTHMUS/1\r\n",
                line("CONNECT a\\x00:1 ISTHMUS/1"),
            ),
            (b"CONNECT a:1 ISTHMUS/1\n\n", line("CONNECT a:1 ISTHMUS/1")),
            (b"\r\n", line("")),
            (
                b"CONNECT a:1 ISTHMUS/1\r\nX-Up: 1\r\n\r\n",
                FrameError::BadHeader {
                    line: "X-Up: 1".into(),
                },
            ),
            (
                b"CONNECT a:1 ISTHMUS/1\r\nx : 1\r\n\r\n",
                FrameError::BadHeader {
                    line: "x : 1".into(),
                },
            ),
            (
                b"CONNECT a:1 ISTHMUS/1\r\nnocolon\r\n\r\n",
                FrameError::BadHeader {
                    line: "nocolon".into(),
                },
            ),
            (
                b"CONNECT a:1 ISTHMUS/1\r\nx: a\rb\r\n\r\n",
                FrameError::BadHeader {
                    line: "x: a\\rb".into(),
                },
            ),
            (
                b"CONNECT a:1 ISTHMUS/1\r\nx: a\n\r\n",
                FrameError::BadHeader {
                    line: "x: a".into(),
                },
            ),
            (
                b"CONNECT a:1 ISTHMUS/1\r\nx: \xff\r\n\r\n",
                FrameError::BadHeader {
                    line: "x: \\xff".into(),
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_request(input).as_ref(),
                Err(want),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        // A bad first line is refused before the head is complete.
        assert_eq!(
            parse_request(b"SSH-2.0-OpenSSH_9.6\r\n"),
            Err(line("SSH-2.0-OpenSSH_9.6"))
        );
    }

    #[test]
    fn bad_response_heads_each_have_their_own_error() {
        let status = |s: &str| FrameError::BadStatus { status: s.into() };
        let cases: &[(&[u8], FrameError)] = &[
            (
                b"HTTP/1.1 200 OK\r\n\r\n",
                FrameError::BadVersion {
                    version: "HTTP/1.1".into(),
                },
            ),
            (
                b"ISTHMUS/1\r\n\r\n",
                FrameError::BadStatusLine {
                    line: "ISTHMUS/1".into(),
                },
            ),
            (
                b"ISTHMUS/1 200 O\x7fK\r\n\r\n",
                FrameError::BadStatusLine {
                    line: "ISTHMUS/1 200 O\\x7fK".into(),
                },
            ),
            (b"ISTHMUS/1 099 x\r\n\r\n", status("099")),
            (b"ISTHMUS/1 600 x\r\n\r\n", status("600")),
            (b"ISTHMUS/1 2000 x\r\n\r\n", status("2000")),
            (b"ISTHMUS/1 20 x\r\n\r\n", status("20")),
            (b"ISTHMUS/1 +20 x\r\n\r\n", status("+20")),
            (b"ISTHMUS/1  200 x\r\n\r\n", status("")),
            (
                b"ISTHMUS/1 200 OK\r\n: v\r\n\r\n",
                FrameError::BadHeader { line: ": v".into() },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_response(input).as_ref(),
                Err(want),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn encoding_refuses_injection_and_unparseable_values() {
        let field = |e: Result<Vec<u8>, FrameError>| match e {
            Err(FrameError::InvalidValue { field, .. }) => field,
            other => panic!("expected InvalidValue, got {other:?}"),
        };
        let with_header = |name: &str, value: &str| {
            let mut head = RequestHead::new("a:1");
            head.headers.push((name.into(), value.into()));
            head.encode()
        };
        assert_eq!(field(with_header("x", "1\r\nx-evil: 1")), "header value");
        assert_eq!(field(with_header("x", "1\nx-evil: 1")), "header value");
        assert_eq!(field(with_header("x", " padded")), "header value");
        assert_eq!(field(with_header("x", "caf\u{e9}")), "header value");
        assert_eq!(field(with_header("X-Upper", "1")), "header name");
        assert_eq!(field(with_header("x\r\ny", "1")), "header name");
        assert_eq!(field(with_header("", "1")), "header name");
        assert_eq!(
            field(RequestHead::new("a:1 ISTHMUS/1\r\n\r\nx").encode()),
            "authority"
        );
        assert_eq!(field(RequestHead::new("").encode()), "authority");
        assert_eq!(
            field(ResponseHead::new(200, "OK\r\n\r\npayload").encode()),
            "reason"
        );
        for status in [0, 99, 600, u16::MAX] {
            assert_eq!(
                ResponseHead::new(status, "x").encode(),
                Err(FrameError::BadStatus {
                    status: status.to_string()
                })
            );
        }
    }

    #[test]
    fn errors_quote_input_escaped_and_truncated() {
        let mut line = b"CONNECT ".to_vec();
        line.extend(std::iter::repeat_n(b'\x01', 200));
        line.extend_from_slice(b"\r\n");
        let Err(err) = parse_request(&line) else {
            panic!("must fail")
        };
        let FrameError::BadRequestLine { line } = &err else {
            panic!("{err:?}")
        };
        assert!(
            line.len() <= EXCERPT_CHARS + 3 && line.ends_with("..."),
            "{line}"
        );
        assert!(line.starts_with("CONNECT \\x01\\x01"));
        let shown = err.to_string();
        assert!(
            shown.contains("expected `CONNECT <authority> ISTHMUS/1`"),
            "{shown}"
        );
    }

    /// xorshift64: a tiny deterministic generator, enough to shake out panics.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap()).unwrap()
        }

        fn byte(&mut self) -> u8 {
            self.next().to_le_bytes()[0]
        }
    }

    /// Whatever the input: no panic, `consumed` within bounds, and anything accepted
    /// encodes back to a head that parses to the same value.
    fn check(buf: &[u8]) {
        match parse_request(buf) {
            Ok(Parsed::Complete { head, consumed }) => {
                assert!(consumed <= buf.len() && consumed <= MAX_HEAD);
                let again = head.encode().expect("an accepted head encodes");
                assert_eq!(complete(parse_request(&again)).0, head);
            }
            Ok(Parsed::NeedMore) => assert!(buf.len() < MAX_HEAD),
            Err(err) => drop(err.to_string()),
        }
        match parse_response(buf) {
            Ok(Parsed::Complete { head, consumed }) => {
                assert!(consumed <= buf.len() && consumed <= MAX_HEAD);
                let again = head.encode().expect("an accepted head encodes");
                assert_eq!(complete(parse_response(&again)).0, head);
            }
            Ok(Parsed::NeedMore) => assert!(buf.len() < MAX_HEAD),
            Err(err) => drop(err.to_string()),
        }
    }

    #[test]
    fn random_and_mutated_inputs_never_panic() {
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        for _ in 0..4000 {
            let len = rng.below(300);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            let prefix: &[u8] = match rng.below(3) {
                0 => b"CONNECT a:1 ISTHMUS/1\r\n",
                1 => b"ISTHMUS/1 200 OK\r\n",
                _ => b"",
            };
            buf.splice(0..0, prefix.iter().copied());
            check(&buf);
        }
        let seeds = [request().encode().unwrap(), response().encode().unwrap()];
        for seed in &seeds {
            for _ in 0..3000 {
                let mut buf = seed.clone();
                for _ in 0..=rng.below(4) {
                    let at = rng.below(buf.len());
                    match rng.below(5) {
                        0 => buf[at] = rng.byte(),
                        1 => buf[at] ^= 1 << rng.below(8),
                        2 => buf.insert(at, rng.byte()),
                        3 => buf.insert(at, [b'\r', b'\n', b' ', b':'][rng.below(4)]),
                        _ => buf.truncate(at),
                    }
                    if buf.is_empty() {
                        buf.push(rng.byte());
                    }
                }
                check(&buf);
            }
        }
    }
}
