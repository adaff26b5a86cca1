//! Route updates from a peer or from route-sync: any sequence of messages decodes (prost),
//! converts (`to_model`) and applies without a panic, both as a route-sync node imports a
//! peer's stream (chunks of `more` gathered into one snapshot or delta for the merger) and as a
//! consumer applies its route-sync's stream to its table. A peer can never place a route with
//! backends, homed elsewhere or not exported into the merged view. The saved cache decodes
//! the same way (`persist::routes_of`).
//!
//! Input: messages, each a one-byte length (up to 255 bytes) and that many bytes of protobuf.
#![no_main]
use std::sync::Arc;

use isthmus_route_sync::merge::Merger;
use isthmus_route_sync::proto::Update;
use isthmus_route_sync::{ClusterName, Route, RouteKey, RouteStore};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

/// A chunked snapshot or delta being gathered, as both stream readers do.
#[derive(Default)]
struct Pending {
    snapshot: bool,
    routes: Vec<Route>,
    removals: Vec<RouteKey>,
}

fuzz_target!(|data: &[u8]| {
    let here = ClusterName::parse("diego").expect("cluster");
    let peer = ClusterName::parse("k8s").expect("cluster");
    let mut merger = Merger::new(here.clone());
    let store = RouteStore::new();
    let mut pending: Option<Pending> = None;
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (message, tail) = tail.split_at(usize::from(len).min(tail.len()));
        rest = tail;
        let Ok(update) = Update::decode(message) else {
            continue;
        };
        let _ = isthmus_route_sync::persist::routes_of(&update);
        let p = pending.get_or_insert_with(|| Pending {
            snapshot: update.snapshot,
            ..Pending::default()
        });
        p.routes
            .extend(update.upserts.iter().filter_map(|r| r.to_model().ok()));
        p.removals
            .extend(update.removals.iter().filter_map(|k| k.to_model().ok()));
        if update.more {
            continue;
        }
        let Pending {
            snapshot,
            routes,
            removals,
        } = pending.take().unwrap_or_default();
        let shared: Vec<Arc<Route>> = routes.iter().cloned().map(Arc::new).collect();
        let (keys, _rejected) = if snapshot {
            store.replace_all(routes);
            merger.import_snapshot(&peer, shared)
        } else {
            store.apply(routes, removals.clone());
            merger.import_delta(&peer, shared, removals)
        };
        let _ = merger.resolve(keys);
        for route in merger.imported(&peer) {
            assert_eq!(route.home_cluster, peer, "imported a route homed elsewhere");
            assert!(route.exported, "imported an unexported route");
            assert!(route.backends.is_empty(), "kept a peer's backends");
        }
        let table = store.snapshot();
        for route in table.iter() {
            assert_eq!(table.get(&route.key).map(|r| &r.key), Some(&route.key));
        }
    }
});
