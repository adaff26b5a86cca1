//! Helpers shared by the route-sync integration tests.

#![allow(dead_code)]

use std::time::Duration;

use isthmus_certs::MeshTls;
use isthmus_certs::ca::{LeafSpec, MeshCa};
use isthmus_route_sync::ClusterName;

pub const TD: &str = "mesh.local";

/// A live identity for `component` of `cluster`, issued by `ca`.
pub fn tls(ca: &MeshCa, cluster: &str, component: &str) -> MeshTls {
    ca.mesh_tls(&LeafSpec::new(
        cluster,
        component,
        Duration::from_secs(3600),
    ))
    .unwrap()
}

pub fn c(s: &str) -> ClusterName {
    ClusterName::parse(s).unwrap()
}

/// Waits until `f` holds, polling every 5 ms; panics naming `what` after `limit`.
pub async fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    tokio::time::timeout(limit, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out: {what}"));
}
