//! The route file (route-sync's static source, also read by gateways and shims configured
//! with a file): any text parses to routes and per-entry rejections, or to an error naming
//! the file, without a panic; what it loads has one route per `name:port`, each passing the
//! model's validation again through its wire form.
#![no_main]
use std::collections::HashSet;
use std::path::Path;

use isthmus_route_sync::proto;
use isthmus_route_sync::source::file::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let origin = Path::new("routes.yaml");
    match parse(text, origin) {
        Ok(loaded) => {
            let mut keys = HashSet::new();
            for route in &loaded.routes {
                assert!(
                    keys.insert(route.key.clone()),
                    "duplicate {} loaded",
                    route.key
                );
                let back = proto::Route::from_model(route, true)
                    .to_model()
                    .expect("a loaded route survives its own wire form");
                assert_eq!(back.key, route.key);
            }
        }
        Err(e) => assert!(
            e.to_string().contains("routes.yaml"),
            "error without the file: {e}"
        ),
    }
});
