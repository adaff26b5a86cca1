//! QUIC request and response heads: no panic on any bytes, a head never claims more bytes
//! than it was given, and whatever parses encodes to a head that parses back the same.
#![no_main]
use isthmus_gateway::frame::{Parsed, parse_request, parse_response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Complete { head, consumed }) = parse_request(data) {
        assert!(consumed <= data.len());
        if let Ok(bytes) = head.encode() {
            let consumed = bytes.len();
            assert_eq!(
                parse_request(&bytes),
                Ok(Parsed::Complete { head, consumed })
            );
        }
    }
    if let Ok(Parsed::Complete { head, consumed }) = parse_response(data) {
        assert!(consumed <= data.len());
        if let Ok(bytes) = head.encode() {
            let consumed = bytes.len();
            assert_eq!(
                parse_response(&bytes),
                Ok(Parsed::Complete { head, consumed })
            );
        }
    }
});
