//! Whatever an app sends first, the egress peek never panics and never reads past its bound.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let isthmus_gateway::peek::Peeked::Host(h) = isthmus_gateway::peek::classify(data, 16 * 1024)
    {
        assert!(!h.is_empty() && h.len() <= 253);
    }
});
