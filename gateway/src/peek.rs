//! Peek at the first bytes of a plain-TCP connection to learn which route it wants.
//!
//! The egress gateway shares one listener between many routes, so before it can pick a
//! tunnel it reads the first bytes an app sends and looks for a name:
//!
//! - a TLS ClientHello (first byte `0x16`): the `server_name` extension's `host_name`;
//! - an HTTP/1.0 or HTTP/1.1 request: the `Host` header.
//!
//! The caller keeps every byte it fed in and replays them to the far side once a route is
//! chosen; nothing here consumes or rewrites the stream.
//!
//! This module is pure: no sockets, no clock. A [`Peeker`] is handed the whole buffer each
//! time more bytes arrive and answers [`Peeked::NeedMore`] until it can decide; it resumes
//! where the previous call stopped (the scan for the end of an HTTP head, the TLS records
//! already reassembled), so a client that sends one byte at a time costs O(n) in total, not
//! O(n²). [`classify`] is the same decision in one call, for a buffer seen once.
//! It faces untrusted bytes, so it never panics, never indexes out of bounds and checks
//! every length field against the bytes actually present. It decides conservatively: a
//! ClientHello counts only once it is complete, and an HTTP request only once its header
//! block has ended, so that a name is never taken from a message that later turns out to
//! be malformed.

/// What the first bytes of a connection say about its destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    /// The host name the client asked for: lowercased, without port or trailing dot, made
    /// only of `a-z`, `0-9`, `.` and `-`, 1 to 253 characters long.
    Host(String),
    /// The bytes so far are a valid beginning and fewer than `max`: read more, call again.
    NeedMore,
    /// The connection cannot be routed by name. The reason is a fixed string for logs and
    /// metric labels.
    NotRecognised(&'static str),
}

/// Longest method token accepted before deciding the bytes are not HTTP. Registered
/// methods are at most 17 characters; the margin costs nothing.
const MAX_METHOD: usize = 32;

/// Largest TLS plaintext record fragment (RFC 8446 section 5.1).
const MAX_TLS_RECORD: usize = 1 << 14;

/// Classifies the first bytes of a connection in one call: as a new [`Peeker`] would.
///
/// `buf` is every byte received so far; `max` is how many bytes the caller is willing to
/// buffer before giving up. Only the first `max` bytes are looked at. While the bytes are a
/// valid but incomplete beginning and `buf.len() < max`, the answer is
/// [`Peeked::NeedMore`]; once `max` bytes have not been enough, it is
/// [`Peeked::NotRecognised`].
pub fn classify(buf: &[u8], max: usize) -> Peeked {
    Peeker::new(max).classify(buf)
}

/// Classifies a connection's first bytes as they arrive, resuming where the last call
/// stopped.
///
/// Each call is given every byte received so far: the buffer of the previous call with
/// more bytes appended (a caller that hands it anything else gets answers about bytes it
/// did not see). Every call answers what [`classify`] would for that buffer; once the answer
/// is not [`Peeked::NeedMore`], it stays the same.
#[derive(Debug, Clone)]
pub struct Peeker {
    max: usize,
    state: State,
    examined: usize,
    decided: Option<Peeked>,
}

#[derive(Debug, Clone)]
enum State {
    /// No byte seen yet.
    Start,
    Tls(tls::Reassembly),
    Http(http::Scan),
}

impl Peeker {
    /// A peeker that looks at no more than the first `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            state: State::Start,
            examined: 0,
            decided: None,
        }
    }

    /// Classifies `buf`, every byte received so far (see [`classify`] for the answers).
    pub fn classify(&mut self, buf: &[u8]) -> Peeked {
        if let Some(decided) = &self.decided {
            return decided.clone();
        }
        let window = buf.get(..self.max).unwrap_or(buf);
        let can_grow = buf.len() < self.max;
        if matches!(self.state, State::Start) {
            self.state = match window.first() {
                None => State::Start,
                Some(&0x16) => State::Tls(tls::Reassembly::default()),
                Some(b) if b.is_ascii_uppercase() => State::Http(http::Scan::default()),
                Some(_) => {
                    return self.decide(Peeked::NotRecognised("neither http/1.x nor tls"));
                }
            };
        }
        let (outcome, too_large) = match &mut self.state {
            State::Start => (Err(Stop::Short), "peek limit reached before any byte"),
            State::Tls(tls) => (
                tls.advance(window, self.max, &mut self.examined),
                "tls client hello too large",
            ),
            State::Http(http) => (
                http.advance(window, &mut self.examined),
                "http headers too large",
            ),
        };
        match outcome {
            Ok(host) => self.decide(Peeked::Host(host)),
            Err(Stop::Short) if can_grow => Peeked::NeedMore,
            Err(Stop::Short) => self.decide(Peeked::NotRecognised(too_large)),
            Err(Stop::Bad(why)) => self.decide(Peeked::NotRecognised(why)),
        }
    }

    /// How many bytes the calls so far have examined, all scans and parses counted: grows
    /// linearly with the bytes fed, however they were split into calls.
    pub fn examined(&self) -> usize {
        self.examined
    }

    fn decide(&mut self, answer: Peeked) -> Peeked {
        self.decided = Some(answer.clone());
        answer
    }
}

/// Why a parser stopped without a host name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The bytes end before the message does.
    Short,
    /// The bytes cannot become a routable message, whatever follows.
    Bad(&'static str),
}

impl From<&'static str> for Stop {
    fn from(why: &'static str) -> Self {
        Stop::Bad(why)
    }
}

const INVALID_HOST: &str = "invalid host";

/// Lowercases a host name, drops one trailing dot and checks it is a plausible DNS name.
///
/// Route names are DNS names, never IP literals with colons, so anything outside
/// `[a-z0-9.-]` is refused rather than guessed at.
fn normalise_host(raw: &[u8]) -> Result<String, &'static str> {
    let host = raw.strip_suffix(b".").unwrap_or(raw);
    if host.is_empty() || host.len() > 253 {
        return Err(INVALID_HOST);
    }
    let valid_byte = |b: &u8| b.is_ascii_alphanumeric() || *b == b'.' || *b == b'-';
    let valid_label = |l: &[u8]| !l.is_empty() && l.len() <= 63;
    if !host.iter().all(valid_byte) || !host.split(|b| *b == b'.').all(valid_label) {
        return Err(INVALID_HOST);
    }
    Ok(host
        .iter()
        .map(|b| char::from(b.to_ascii_lowercase()))
        .collect())
}

/// Splits `host[:port]` or `[literal][:port]` and normalises the host part.
///
/// The port is only checked for shape (RFC 3986 allows it to be empty): routing is by name,
/// the port the app dialled comes from the listener.
fn host_of_authority(authority: &[u8]) -> Result<String, &'static str> {
    let (host, port) = match authority.strip_prefix(b"[") {
        Some(rest) => {
            let close = rest.iter().position(|b| *b == b']').ok_or(INVALID_HOST)?;
            let (literal, after) = rest.split_at(close);
            let after = after.get(1..).unwrap_or_default();
            match after.strip_prefix(b":") {
                Some(port) => (literal, Some(port)),
                None if after.is_empty() => (literal, None),
                None => return Err(INVALID_HOST),
            }
        }
        None => match authority.iter().rposition(|b| *b == b':') {
            Some(colon) => {
                let (host, port) = authority.split_at(colon);
                (host, port.get(1..))
            }
            None => (authority, None),
        },
    };
    if let Some(port) = port {
        let digits_only = port.iter().all(u8::is_ascii_digit);
        let in_range = port.is_empty()
            || std::str::from_utf8(port)
                .ok()
                .and_then(|p| p.parse::<u16>().ok())
                .is_some();
        if !digits_only || !in_range {
            return Err(INVALID_HOST);
        }
    }
    normalise_host(host)
}

/// Finds the first occurrence of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

mod tls {
    //! TLS record and ClientHello parsing, just far enough to read the SNI host name.

    use super::{MAX_TLS_RECORD, Stop, normalise_host};

    const MALFORMED: &str = "malformed tls client hello";
    const NO_SNI: &str = "tls without sni";

    /// A cursor over bytes whose reads fail instead of running past the end.
    struct Reader<'a> {
        rest: &'a [u8],
    }

    impl<'a> Reader<'a> {
        fn new(rest: &'a [u8]) -> Self {
            Self { rest }
        }

        fn is_empty(&self) -> bool {
            self.rest.is_empty()
        }

        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            let (head, tail) = self.rest.split_at_checked(n)?;
            self.rest = tail;
            Some(head)
        }

        fn u8(&mut self) -> Option<u8> {
            self.take(1)?.first().copied()
        }

        fn u16(&mut self) -> Option<usize> {
            match *self.take(2)? {
                [a, b] => Some(usize::from(u16::from_be_bytes([a, b]))),
                _ => None,
            }
        }

        fn u24(&mut self) -> Option<usize> {
            match *self.take(3)? {
                [a, b, c] => Some(usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c)),
                _ => None,
            }
        }

        /// Reads a `u8`-length-prefixed vector.
        fn vec8(&mut self) -> Option<&'a [u8]> {
            let len = usize::from(self.u8()?);
            self.take(len)
        }

        /// Reads a `u16`-length-prefixed vector.
        fn vec16(&mut self) -> Option<&'a [u8]> {
            let len = self.u16()?;
            self.take(len)
        }
    }

    /// The ClientHello reassembled from the handshake records seen so far.
    ///
    /// A ClientHello may be fragmented over several records (RFC 8446 section 5.1), so
    /// fragments are concatenated until the handshake message's own length is satisfied.
    /// Each record's fragment is copied once, when the whole record has arrived; until then
    /// only its header and the handshake header are looked at, so feeding a record one
    /// byte at a time costs constant work per byte.
    #[derive(Debug, Clone, Default)]
    pub(super) struct Reassembly {
        /// Fragments of the whole records taken so far.
        handshake: Vec<u8>,
        /// Where the next record header starts.
        next_record: usize,
    }

    impl Reassembly {
        /// Takes the records `window` completes, and returns the SNI host name once the
        /// ClientHello is whole.
        pub(super) fn advance(
            &mut self,
            window: &[u8],
            max: usize,
            examined: &mut usize,
        ) -> Result<String, Stop> {
            let mut partial: &[u8] = &[];
            while !message_complete(&self.handshake) {
                let rest = window.get(self.next_record..).unwrap_or_default();
                let mut records = Reader::new(rest);
                let Some(header) = records.take(5) else {
                    break;
                };
                *examined += 5;
                let mut header = Reader::new(header);
                let content_type = header.u8();
                let major = header.u8();
                let _minor = header.u8();
                let len = header.u16().unwrap_or(0);
                if content_type != Some(0x16) {
                    return Err(Stop::Bad("tls record is not a handshake"));
                }
                if major != Some(3) {
                    return Err(Stop::Bad("unsupported tls record version"));
                }
                // Empty handshake fragments are forbidden (RFC 8446 section 5.1) and would
                // let a peer feed us records that make no progress.
                if len == 0 || len > MAX_TLS_RECORD {
                    return Err(Stop::Bad("invalid tls record length"));
                }
                match records.take(len) {
                    Some(fragment) => {
                        *examined += fragment.len();
                        self.handshake.extend_from_slice(fragment);
                        self.next_record += 5 + len;
                    }
                    None => {
                        // Look into the partial fragment too: its first bytes may already
                        // show the message is not a ClientHello or can never fit under `max`.
                        partial = records.rest;
                        break;
                    }
                }
            }

            // The handshake header: four bytes, from whole records first, then the partial
            // one. Only whole records ever make the body.
            let mut head = [0u8; 4];
            let known = self.handshake.len().min(4);
            head[..known].copy_from_slice(&self.handshake[..known]);
            let more = partial.len().min(4 - known);
            head[known..known + more].copy_from_slice(&partial[..more]);
            *examined += known + more;
            let mut message = Reader::new(&head[..known + more]);
            if let Some(kind) = message.u8()
                && kind != 1
            {
                return Err(Stop::Bad("tls handshake is not a client hello"));
            }
            if let Some(len) = message.u24() {
                // One record header and the handshake header come on top of the body; if
                // that cannot fit under `max`, waiting for it is pointless.
                if len.saturating_add(9) > max {
                    return Err(Stop::Bad("tls client hello too large"));
                }
                if let Some(body) = self.handshake.get(4..4 + len) {
                    *examined += body.len();
                    return client_hello_sni(body).map_err(Stop::Bad);
                }
            }
            Err(Stop::Short)
        }
    }

    /// Whether `handshake` holds at least one whole handshake message.
    fn message_complete(handshake: &[u8]) -> bool {
        let mut message = Reader::new(handshake);
        let _kind = message.u8();
        message.u24().is_some_and(|len| message.take(len).is_some())
    }

    /// Walks a complete ClientHello body (after the 4-byte handshake header).
    fn client_hello_sni(body: &[u8]) -> Result<String, &'static str> {
        let mut r = Reader::new(body);
        let _legacy_version = r.u16().ok_or(MALFORMED)?;
        let _random = r.take(32).ok_or(MALFORMED)?;
        let session_id = r.vec8().ok_or(MALFORMED)?;
        if session_id.len() > 32 {
            return Err(MALFORMED);
        }
        let suites = r.vec16().ok_or(MALFORMED)?;
        if suites.is_empty() || suites.len() % 2 != 0 {
            return Err(MALFORMED);
        }
        let compression = r.vec8().ok_or(MALFORMED)?;
        if compression.is_empty() {
            return Err(MALFORMED);
        }
        // Extensions are optional in the wire format; without them there is no SNI.
        if r.is_empty() {
            return Err(NO_SNI);
        }
        let extensions = r.vec16().ok_or(MALFORMED)?;
        if !r.is_empty() {
            return Err(MALFORMED);
        }
        let mut extensions = Reader::new(extensions);
        let mut host = None;
        while !extensions.is_empty() {
            let kind = extensions.u16().ok_or(MALFORMED)?;
            let data = extensions.vec16().ok_or(MALFORMED)?;
            if kind == 0 {
                // Two server_name extensions are illegal (RFC 8446 section 4.2) and could
                // make us and the server disagree on the name.
                if host.is_some() {
                    return Err("duplicate tls server_name extension");
                }
                host = Some(host_name(data)?);
            }
        }
        normalise_host(host.ok_or(NO_SNI)?)
    }

    /// Picks the `host_name` entry out of a `server_name` extension (RFC 6066 section 3).
    fn host_name(data: &[u8]) -> Result<&[u8], &'static str> {
        let mut r = Reader::new(data);
        let list = r.vec16().ok_or(MALFORMED)?;
        if !r.is_empty() || list.is_empty() {
            return Err(MALFORMED);
        }
        let mut list = Reader::new(list);
        let mut host = None;
        while !list.is_empty() {
            let kind = list.u8().ok_or(MALFORMED)?;
            let name = list.vec16().ok_or(MALFORMED)?;
            if kind == 0 {
                if host.is_some() {
                    return Err("duplicate tls sni host name");
                }
                host = Some(name);
            }
        }
        host.ok_or(NO_SNI)
    }
}

mod http {
    //! HTTP/1.x request head parsing, just far enough to read the Host header.

    use super::{MAX_METHOD, Stop, find, host_of_authority};

    const NOT_HTTP: &str = "neither http/1.x nor tls";
    const MALFORMED_LINE: &str = "malformed http request line";

    /// How far the scans of a request head have come. Each byte is scanned a bounded
    /// number of times whatever the calls' sizes: every search resumes where the last
    /// stopped (a few bytes back, for a terminator split between reads), and the request
    /// line and the header block are parsed once each, when complete.
    #[derive(Debug, Clone, Default)]
    pub(super) struct Scan {
        /// The method token and the space after it have been seen.
        method_ok: bool,
        /// Where the search for the blank line ending the head resumes.
        end_from: usize,
        /// Where the head's blank line starts, once seen.
        end: Option<usize>,
        /// Bytes before this are free of bare CR and LF.
        checked: usize,
        /// Where the search for the end of the request line resumes.
        line_from: usize,
        /// Where the request line ends, once seen and judged sound.
        line_end: Option<usize>,
    }

    impl Scan {
        /// Scans what `window` adds, and returns the normalised Host once the head is whole.
        pub(super) fn advance(
            &mut self,
            window: &[u8],
            examined: &mut usize,
        ) -> Result<String, Stop> {
            if !self.method_ok {
                let method_len = window
                    .iter()
                    .take(MAX_METHOD + 1)
                    .take_while(|b| b.is_ascii_uppercase())
                    .count();
                *examined += method_len + 1;
                if method_len > MAX_METHOD {
                    return Err(Stop::Bad(NOT_HTTP));
                }
                match window.get(method_len) {
                    None => return Err(Stop::Short),
                    Some(b' ') => self.method_ok = true,
                    Some(_) => return Err(Stop::Bad(NOT_HTTP)),
                }
            }

            if self.end.is_none() {
                let from = self.end_from.min(window.len());
                let found = find(window.get(from..).unwrap_or_default(), b"\r\n\r\n");
                *examined += window.len() - from;
                match found {
                    Some(at) => self.end = Some(from + at),
                    // The terminator may be split between reads: keep its first three bytes.
                    None => self.end_from = window.len().saturating_sub(3),
                }
            }
            // Bytes after the head are the body or the next request: not ours to judge.
            let scope = match self.end {
                Some(end) => window.get(..end.saturating_add(4)).unwrap_or(window),
                None => window,
            };
            // A bare CR or LF is a line break to some parsers and not to others; letting one
            // through could make us read a different Host than the server behind us does.
            let (clean, checked) = bare_cr_or_lf_from(scope, self.checked);
            *examined += checked.saturating_sub(self.checked) + 1;
            self.checked = checked;
            if !clean {
                return Err(Stop::Bad("bare cr or lf in http head"));
            }
            // Judge the request line as soon as it is complete so non-HTTP clients that
            // happen to start with capitals are turned away without waiting for `max` bytes.
            let line_end = match self.line_end {
                Some(line_end) => line_end,
                None => {
                    let from = self.line_from.min(scope.len());
                    let found = find(scope.get(from..).unwrap_or_default(), b"\r\n");
                    *examined += scope.len() - from;
                    let Some(at) = found else {
                        self.line_from = scope.len().saturating_sub(1);
                        return Err(Stop::Short);
                    };
                    let line_end = from + at;
                    *examined += line_end;
                    request_line(scope.get(..line_end).unwrap_or_default())?;
                    self.line_end = Some(line_end);
                    line_end
                }
            };
            let end = self.end.ok_or(Stop::Short)?;
            *examined += end;
            head_host(window, line_end, end)
        }
    }

    /// Finds the Host in a complete head: `window[..end]`, whose request line (judged
    /// sound already) ends at `line_end`.
    fn head_host(window: &[u8], line_end: usize, end: usize) -> Result<String, Stop> {
        let target_authority = request_line(window.get(..line_end).unwrap_or_default())?;
        let head = window.get(..end).unwrap_or_default();
        // No bare LF is left, so every '\n' ends a line and is preceded by '\r'.
        let mut lines = head
            .split(|b| *b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
        let _request_line = lines.next();
        let mut host = None;
        for line in lines {
            if matches!(line.first(), Some(b' ' | b'\t')) {
                return Err(Stop::Bad("obsolete line folding in http head"));
            }
            let colon = line
                .iter()
                .position(|b| *b == b':')
                .ok_or("malformed http header")?;
            let (name, value) = line.split_at(colon);
            // RFC 9112 section 5.1: no whitespace between name and colon; a name must be
            // a token.
            if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
                return Err(Stop::Bad("malformed http header"));
            }
            if name.eq_ignore_ascii_case(b"host") {
                if host.is_some() {
                    return Err(Stop::Bad("duplicate host header"));
                }
                host = Some(trim_ows(value.get(1..).unwrap_or_default()));
            }
        }
        let host = host.ok_or("http request without host header")?;
        let host = host_of_authority(host)?;
        if let Some(authority) = target_authority {
            // RFC 9112 section 3.2.2 lets the target win over Host. We route by Host, so
            // the two must agree or the backend could serve a different name than the one
            // we authorised.
            if host_of_authority(authority).as_deref() != Ok(host.as_str()) {
                return Err(Stop::Bad("host header does not match request target"));
            }
        }
        Ok(host)
    }

    /// Checks `METHOD SP target SP HTTP/1.x` and returns the target's authority, if the
    /// target has one (absolute form, or the authority form of CONNECT).
    fn request_line(line: &[u8]) -> Result<Option<&[u8]>, &'static str> {
        let rest = line
            .strip_suffix(b" HTTP/1.1")
            .or_else(|| line.strip_suffix(b" HTTP/1.0"))
            .ok_or("not an http/1.0 or http/1.1 request line")?;
        let space = rest.iter().position(|b| *b == b' ').ok_or(MALFORMED_LINE)?;
        let (method, target) = rest.split_at(space);
        let target = target.get(1..).unwrap_or_default();
        if target.is_empty() || !target.iter().all(|b| b.is_ascii_graphic()) {
            return Err(MALFORMED_LINE);
        }
        if target.first() == Some(&b'/') || target == b"*" {
            return Ok(None);
        }
        if method == b"CONNECT" {
            return Ok(Some(target));
        }
        absolute_authority(target).map(Some)
    }

    /// The authority of an absolute-form target `scheme://authority[/path][?query]`.
    fn absolute_authority(target: &[u8]) -> Result<&[u8], &'static str> {
        const BAD_TARGET: &str = "malformed http request target";
        let sep = find(target, b"://").ok_or(BAD_TARGET)?;
        let (scheme, rest) = target.split_at(sep);
        let scheme_ok = scheme.first().is_some_and(u8::is_ascii_alphabetic)
            && scheme
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
        if !scheme_ok {
            return Err(BAD_TARGET);
        }
        let rest = rest.get(3..).unwrap_or_default();
        let end = rest
            .iter()
            .position(|b| matches!(b, b'/' | b'?' | b'#'))
            .unwrap_or(rest.len());
        let authority = rest.get(..end).unwrap_or_default();
        // Userinfo makes `http://orders@evil/` look like it names `orders` to a careless
        // reader; refuse instead of deciding which part counts.
        if authority.contains(&b'@') {
            return Err("userinfo in request target");
        }
        Ok(authority)
    }

    /// Checks `bytes[from..]` for a bare CR or LF (`bytes[..from]` was checked before).
    /// Returns whether none was found, and how far the check got: a CR at the very end may
    /// still be followed by LF in the next read, so it is left for the next call.
    fn bare_cr_or_lf_from(bytes: &[u8], from: usize) -> (bool, usize) {
        let mut i = from;
        while let Some(&b) = bytes.get(i) {
            let prev = i.checked_sub(1).and_then(|p| bytes.get(p)).copied();
            let bare_lf = b == b'\n' && prev != Some(b'\r');
            let bare_cr = b == b'\r' && bytes.get(i + 1).is_some_and(|next| *next != b'\n');
            if bare_lf || bare_cr {
                return (false, i);
            }
            if b == b'\r' && bytes.get(i + 1).is_none() {
                return (true, i);
            }
            i += 1;
        }
        (true, i)
    }

    /// RFC 9110 section 5.6.2 token characters.
    fn is_tchar(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
    }

    /// Strips optional whitespace (SP / HTAB) from both ends.
    fn trim_ows(bytes: &[u8]) -> &[u8] {
        let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
        let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
        let end = bytes
            .iter()
            .rposition(|b| !is_ows(b))
            .map_or(start, |i| i + 1);
        bytes.get(start..end).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const MAX: usize = 16 * 1024;

    fn host(name: &str) -> Peeked {
        Peeked::Host(name.to_owned())
    }

    /// A ClientHello exactly as rustls (ring provider) writes it for `server_name`.
    fn rustls_client_hello(server_name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
            .expect("test server name is valid");
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), name).expect("client connection");
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out)
                .expect("writing to a Vec cannot fail");
        }
        assert!(out.len() > 100, "rustls wrote a ClientHello");
        out
    }

    /// Re-frames a single-record ClientHello as two records split at `at` bytes into the
    /// handshake payload.
    fn split_records(hello: &[u8], at: usize) -> Vec<u8> {
        let payload = &hello[5..];
        assert_eq!(
            payload.len(),
            usize::from(u16::from_be_bytes([hello[3], hello[4]]))
        );
        let (a, b) = payload.split_at(at);
        let mut out = Vec::new();
        for part in [a, b] {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&u16::try_from(part.len()).unwrap().to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    /// A hand-built ClientHello with the given extensions, for cases rustls never sends.
    fn handmade_hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7; 32]); // random
        body.push(0); // empty session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut exts = Vec::new();
        for (kind, data) in extensions {
            exts.extend_from_slice(&kind.to_be_bytes());
            exts.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
            exts.extend_from_slice(data);
        }
        body.extend_from_slice(&u16::try_from(exts.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&exts);
        let mut handshake = vec![1];
        handshake.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&u16::try_from(handshake.len()).unwrap().to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    fn sni_ext(name: &[u8]) -> (u16, Vec<u8>) {
        let mut entry = vec![0];
        entry.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
        entry.extend_from_slice(name);
        let mut data = u16::try_from(entry.len()).unwrap().to_be_bytes().to_vec();
        data.extend_from_slice(&entry);
        (0, data)
    }

    #[test]
    fn rustls_client_hello_yields_sni_and_every_prefix_needs_more() {
        let hello = rustls_client_hello("orders.apps.internal");
        assert_eq!(classify(&hello, MAX), host("orders.apps.internal"));
        for end in 0..hello.len() {
            assert_eq!(
                classify(&hello[..end], MAX),
                Peeked::NeedMore,
                "prefix {end}"
            );
        }
        // Bytes after the ClientHello (say, early data) do not change the answer.
        let mut more = hello.clone();
        more.extend_from_slice(b"\x17\x03\x03\x00\x05hello");
        assert_eq!(classify(&more, MAX), host("orders.apps.internal"));
    }

    #[test]
    fn client_hello_split_across_two_records() {
        let hello = rustls_client_hello("orders.apps.internal");
        for at in 1..hello.len() - 5 {
            let two = split_records(&hello, at);
            assert_eq!(
                classify(&two, MAX),
                host("orders.apps.internal"),
                "split {at}"
            );
            assert_eq!(classify(&two[..two.len() - 1], MAX), Peeked::NeedMore);
        }
    }

    #[test]
    fn tls_to_an_ip_address_has_no_sni() {
        let hello = rustls_client_hello("10.1.2.3");
        assert_eq!(
            classify(&hello, MAX),
            Peeked::NotRecognised("tls without sni")
        );
    }

    #[test]
    fn tls_limits_are_enforced() {
        let hello = rustls_client_hello("orders.apps.internal");
        // The message cannot fit under a small limit: refused as soon as its length is
        // known, not after buffering.
        assert_eq!(
            classify(&hello[..9], 64),
            Peeked::NotRecognised("tls client hello too large")
        );
        assert_eq!(
            classify(&hello[..3], 3),
            Peeked::NotRecognised("tls client hello too large")
        );
    }

    #[test]
    fn handmade_client_hellos() {
        let upper = handmade_hello(&[sni_ext(b"Orders.Apps.Internal.")]);
        assert_eq!(classify(&upper, MAX), host("orders.apps.internal"));

        let twice = handmade_hello(&[sni_ext(b"a.b"), sni_ext(b"c.d")]);
        assert_eq!(
            classify(&twice, MAX),
            Peeked::NotRecognised("duplicate tls server_name extension")
        );

        let none = handmade_hello(&[(10, vec![0, 2, 0, 29])]);
        assert_eq!(
            classify(&none, MAX),
            Peeked::NotRecognised("tls without sni")
        );

        let bad_name = handmade_hello(&[sni_ext(b"orders apps")]);
        assert_eq!(
            classify(&bad_name, MAX),
            Peeked::NotRecognised("invalid host")
        );

        // The ServerNameList length claims more than the extension holds.
        let mut lying = handmade_hello(&[sni_ext(b"a.b")]);
        let pos = lying.len() - 3 - 3 - 2; // list length field of the last extension
        lying[pos + 1] += 1;
        assert_eq!(
            classify(&lying, MAX),
            Peeked::NotRecognised("malformed tls client hello")
        );

        let mut server_hello = upper.clone();
        server_hello[5] = 2;
        assert_eq!(
            classify(&server_hello, MAX),
            Peeked::NotRecognised("tls handshake is not a client hello")
        );

        let mut two = split_records(&upper, 10);
        two[15] = 0x15; // second record becomes an alert
        assert_eq!(
            classify(&two, MAX),
            Peeked::NotRecognised("tls record is not a handshake")
        );

        let mut empty_record = upper.clone();
        empty_record.splice(0..0, [0x16, 0x03, 0x01, 0x00, 0x00]);
        assert_eq!(
            classify(&empty_record, MAX),
            Peeked::NotRecognised("invalid tls record length")
        );
    }

    const REQUEST: &[u8] =
        b"GET /orders?id=1 HTTP/1.1\r\nUser-Agent: t\r\nhOsT: \t Orders.Apps.Internal:8080 \r\n\
          Accept: */*\r\n\r\n";

    #[test]
    fn http_host_is_lowercased_and_port_stripped() {
        assert_eq!(classify(REQUEST, MAX), host("orders.apps.internal"));
        let mut with_body = REQUEST.to_vec();
        with_body.extend_from_slice(b"payload\nwith bare lf\r");
        assert_eq!(classify(&with_body, MAX), host("orders.apps.internal"));
        let http10 = b"POST / HTTP/1.0\r\nHost: orders.apps.internal.\r\n\r\n";
        assert_eq!(classify(http10, MAX), host("orders.apps.internal"));
    }

    #[test]
    fn every_prefix_of_a_request_needs_more() {
        for end in 0..REQUEST.len() {
            assert_eq!(
                classify(&REQUEST[..end], MAX),
                Peeked::NeedMore,
                "prefix {end}"
            );
        }
    }

    #[test]
    fn http_refusals() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"GET / HTTP/1.1\r\nAccept: x\r\n\r\n",
                "http request without host header",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a.b\r\nHOST: a.b\r\n\r\n",
                "duplicate host header",
            ),
            (b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", "invalid host"),
            (b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n", "invalid host"),
            (b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", "invalid host"),
            (b"GET / HTTP/1.1\r\nHost: a.b:99999\r\n\r\n", "invalid host"),
            (b"GET / HTTP/1.1\r\nHost: a.b:8x\r\n\r\n", "invalid host"),
            (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", "invalid host"),
            (b"GET / HTTP/1.1\r\nHost: a..b\r\n\r\n", "invalid host"),
            (
                b"GET / HTTP/1.1\r\nHost : a.b\r\n\r\n",
                "malformed http header",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a.b\r\n folded\r\n\r\n",
                "obsolete line folding in http head",
            ),
            (
                b"GET / HTTP/1.1\r\nX: 1\nHost: a.b\r\n\r\n",
                "bare cr or lf in http head",
            ),
            (
                b"GET / HTTP/2.0\r\nHost: a.b\r\n\r\n",
                "not an http/1.0 or http/1.1 request line",
            ),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                "not an http/1.0 or http/1.1 request line",
            ),
            (
                b"GET  HTTP/1.1\r\nHost: a.b\r\n\r\n",
                "malformed http request line",
            ),
            (
                b"GET / x HTTP/1.1\r\nHost: a.b\r\n\r\n",
                "malformed http request line",
            ),
            (
                b"GET x HTTP/1.1\r\nHost: a.b\r\n\r\n",
                "malformed http request target",
            ),
            (
                b"get / HTTP/1.1\r\nHost: a.b\r\n\r\n",
                "neither http/1.x nor tls",
            ),
            (b"GET\t/ HTTP/1.1\r\n", "neither http/1.x nor tls"),
            (b"\x00\x01", "neither http/1.x nor tls"),
            (b"SSH-2.0-OpenSSH\r\n", "neither http/1.x nor tls"),
        ];
        for (input, why) in cases {
            assert_eq!(
                classify(input, MAX),
                Peeked::NotRecognised(why),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn a_bad_request_line_is_refused_before_the_head_ends() {
        assert_eq!(
            classify(b"HELLO world\r\n", MAX),
            Peeked::NotRecognised("not an http/1.0 or http/1.1 request line")
        );
    }

    #[test]
    fn absolute_and_authority_form_targets_must_match_host() {
        let ok = b"GET http://Orders.apps.internal:8080/x HTTP/1.1\r\nHost: orders.apps.internal\r\n\r\n";
        assert_eq!(classify(ok, MAX), host("orders.apps.internal"));
        let mismatch = b"GET http://evil.example/ HTTP/1.1\r\nHost: orders.apps.internal\r\n\r\n";
        assert_eq!(
            classify(mismatch, MAX),
            Peeked::NotRecognised("host header does not match request target")
        );
        let userinfo =
            b"GET http://orders.apps.internal@evil/ HTTP/1.1\r\nHost: orders.apps.internal\r\n\r\n";
        assert_eq!(
            classify(userinfo, MAX),
            Peeked::NotRecognised("userinfo in request target")
        );
        let connect = b"CONNECT evil.example:443 HTTP/1.1\r\nHost: orders.apps.internal\r\n\r\n";
        assert_eq!(
            classify(connect, MAX),
            Peeked::NotRecognised("host header does not match request target")
        );
        let connect_ok =
            b"CONNECT orders.apps.internal:443 HTTP/1.1\r\nHost: orders.apps.internal:443\r\n\r\n";
        assert_eq!(classify(connect_ok, MAX), host("orders.apps.internal"));
        let asterisk = b"OPTIONS * HTTP/1.1\r\nHost: orders.apps.internal\r\n\r\n";
        assert_eq!(classify(asterisk, MAX), host("orders.apps.internal"));
    }

    #[test]
    fn oversize_heads_are_refused_at_the_limit() {
        let mut big = b"GET / HTTP/1.1\r\nHost: a.b\r\n".to_vec();
        while big.len() < 200 {
            big.extend_from_slice(b"X-Pad: 0123456789\r\n");
        }
        assert_eq!(classify(&big[..199], 200), Peeked::NeedMore);
        assert_eq!(
            classify(&big, 200),
            Peeked::NotRecognised("http headers too large")
        );
        // A complete head beyond the limit is not looked at either.
        big.extend_from_slice(b"\r\n");
        assert_eq!(
            classify(&big, 200),
            Peeked::NotRecognised("http headers too large")
        );
        assert_eq!(
            classify(&[b'A'; 40], MAX),
            Peeked::NotRecognised("neither http/1.x nor tls")
        );
        assert_eq!(
            classify(b"", 0),
            Peeked::NotRecognised("peek limit reached before any byte")
        );
        assert_eq!(classify(b"", MAX), Peeked::NeedMore);
    }

    /// Feeds `input` to one peeker a byte at a time; returns the answer at the end and the
    /// bytes it examined.
    fn byte_at_a_time(input: &[u8], max: usize) -> (Peeked, usize) {
        let mut peeker = Peeker::new(max);
        let mut answer = Peeked::NeedMore;
        for end in 0..=input.len() {
            answer = peeker.classify(&input[..end]);
            if answer != Peeked::NeedMore {
                break;
            }
        }
        (answer, peeker.examined())
    }

    /// An HTTP request head of exactly `len` bytes, its Host last.
    fn long_request(len: usize) -> Vec<u8> {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        let tail = b"Host: orders.apps.internal\r\n\r\n";
        while head.len() + tail.len() + 20 < len {
            head.extend_from_slice(b"X-Pad: 0123456789\r\n");
        }
        let fill = len - head.len() - tail.len() - 5;
        head.extend_from_slice(b"X: ");
        head.extend(std::iter::repeat_n(b'a', fill));
        head.extend_from_slice(b"\r\n");
        head.extend_from_slice(tail);
        assert_eq!(head.len(), len);
        head
    }

    /// A ClientHello of about `len` bytes (a padding extension), in records of `record`
    /// bytes of handshake payload each.
    fn long_hello(len: usize, record: usize) -> Vec<u8> {
        let one = handmade_hello(&[sni_ext(b"orders.apps.internal"), (21, vec![0; len - 80])]);
        let payload = &one[5..];
        let mut out = Vec::new();
        for part in payload.chunks(record) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&u16::try_from(part.len()).unwrap().to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    #[test]
    fn peeking_one_byte_at_a_time_costs_linear_work() {
        const N: usize = 8 * 1024;
        for (what, small, large) in [
            ("http", long_request(N), long_request(2 * N)),
            ("tls", long_hello(N, 16_000), long_hello(2 * N, 16_000)),
            (
                "tls in small records",
                long_hello(N, 100),
                long_hello(2 * N, 100),
            ),
        ] {
            let (answer, cost) = byte_at_a_time(&small, MAX * 2);
            assert_eq!(answer, host("orders.apps.internal"), "{what}");
            let (answer, double_cost) = byte_at_a_time(&large, MAX * 2);
            assert_eq!(answer, host("orders.apps.internal"), "{what}");
            // A bounded number of looks per byte (a call re-reads at most a record header
            // and a handshake header), and twice the bytes cost twice the work: a
            // quadratic peek costs about four times as much, and ~n²/2 bytes in all.
            assert!(
                cost <= 16 * small.len(),
                "{what}: {cost} bytes examined for {}",
                small.len()
            );
            assert!(
                double_cost * 10 <= cost * 23,
                "{what}: {cost} for {} bytes but {double_cost} for {}",
                small.len(),
                large.len()
            );
        }
    }

    #[test]
    fn a_peeker_answers_as_classify_does_for_every_prefix() {
        let inputs = [
            REQUEST.to_vec(),
            rustls_client_hello("orders.apps.internal"),
            split_records(&rustls_client_hello("a.b"), 40),
            b"GET / HTTP/1.1\r\nX: 1\r\nHost: a.b\r\r\n\r\n".to_vec(),
            b"GET / HTTP/1.1\r\nHost: a.b\r\nX: 1\n\r\n\r\n".to_vec(),
            b"HELLO world\r\n".to_vec(),
            long_hello(2000, 50),
        ];
        for input in &inputs {
            for max in [input.len() / 2, input.len(), MAX] {
                let mut peeker = Peeker::new(max);
                let mut decided = None;
                for end in 0..=input.len() {
                    let answer = peeker.classify(&input[..end]);
                    match &decided {
                        // Once decided, the answer stays.
                        Some(first) => assert_eq!(&answer, first),
                        None => {
                            assert_eq!(answer, classify(&input[..end], max), "prefix {end}");
                            if answer != Peeked::NeedMore {
                                decided = Some(answer);
                            }
                        }
                    }
                }
            }
        }
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

    /// The invariants every answer must keep, whatever the input.
    fn check(buf: &[u8], max: usize) {
        match classify(buf, max) {
            Peeked::NeedMore => assert!(buf.len() < max),
            Peeked::Host(h) => assert_eq!(normalise_host(h.as_bytes()), Ok(h.clone())),
            Peeked::NotRecognised(_) => {}
        }
    }

    #[test]
    fn random_and_mutated_inputs_never_panic() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..4000 {
            let len = rng.below(400);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            // Steer some inputs past the first-byte dispatch.
            match rng.below(3) {
                0 if !buf.is_empty() => buf[0] = 0x16,
                1 => drop(buf.splice(0..0, *b"GET / HTTP/1.1\r\n")),
                _ => {}
            }
            check(&buf, rng.below(600));
        }
        let seeds = [
            rustls_client_hello("orders.apps.internal"),
            split_records(&rustls_client_hello("a.b"), 40),
            handmade_hello(&[sni_ext(b"x.y"), (10, vec![0, 2, 0, 29])]),
            REQUEST.to_vec(),
            b"GET http://a.b/ HTTP/1.1\r\nHost: a.b\r\n\r\n".to_vec(),
        ];
        for seed in &seeds {
            for _ in 0..2000 {
                let mut buf = seed.clone();
                for _ in 0..=rng.below(4) {
                    let at = rng.below(buf.len());
                    match rng.below(4) {
                        0 => buf[at] = rng.byte(),
                        1 => buf[at] ^= 1 << rng.below(8),
                        2 => buf.insert(at, rng.byte()),
                        _ => buf.truncate(at),
                    }
                    if buf.is_empty() {
                        buf.push(rng.byte());
                    }
                }
                check(&buf, MAX);
                check(&buf, rng.below(buf.len() + 2));
            }
        }
    }
}
