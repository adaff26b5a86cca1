//! Tunnel authorities: never a panic, and never an IP literal accepted as a route.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(key) = isthmus_route_sync::RouteKey::parse_authority(s) {
            assert!(key.name.as_str().parse::<std::net::IpAddr>().is_err());
        }
    }
});
