//! Configuration files: any text goes through the real parse-and-validate path of each
//! binary (`isthmus_runtime::config::from_str`, the same function `load` and `load_or_exit`
//! call after reading the file) without a panic, and every error names the file.
//!
//! Input: one selector byte (`g` gateway, `r` route-sync, anything else dns-shim), then the YAML.
#![no_main]
use std::path::Path;

use isthmus_runtime::config::{ConfigError, from_str};
use libfuzzer_sys::fuzz_target;

fn check<T: serde::de::DeserializeOwned + isthmus_runtime::config::Validate>(text: &str) {
    let origin = Path::new("fuzz.yaml");
    if let Err(e) = from_str::<T>(text, origin) {
        let named = match &e {
            ConfigError::Read { path, .. }
            | ConfigError::Parse { path, .. }
            | ConfigError::Invalid { path, .. } => path == origin,
        };
        assert!(named, "error without the file name: {e}");
        let _ = e.to_string();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, yaml)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(yaml) else {
        return;
    };
    match which {
        b'g' => check::<isthmus_gateway::config::GatewayConfig>(text),
        b'r' => check::<isthmus_route_sync::config::RouteSyncConfig>(text),
        _ => check::<isthmus_dns_shim::config::DnsShimConfig>(text),
    }
});
