//! The watchable table: consistent snapshots, revisions, structural sharing, wake-ups.

use std::sync::Arc;
use std::time::Duration;

use isthmus_route_sync::{ClusterName, Protocol, Route, RouteKey, RouteStore, diff};

fn route(authority: &str, home: &str) -> Route {
    Route {
        key: RouteKey::parse_authority(authority).unwrap(),
        protocol: Protocol::Tcp,
        home_cluster: ClusterName::parse(home).unwrap(),
        exported: false,
        allowed_peers: vec![],
        backends: vec![],
        weights: Default::default(),
        revision: 0,
    }
}

#[test]
fn revisions_track_changes_and_unchanged_routes_are_shared() {
    let store = RouteStore::new();
    let a = store.replace_all([
        route("a.apps.internal:80", "k8s"),
        route("b.apps.internal:80", "k8s"),
    ]);
    assert_eq!((a.revision, a.added, a.changed, a.removed), (1, 2, 0, 0));
    let t1 = store.snapshot();

    // Same content: no new revision, nothing published.
    let same = store.replace_all([
        route("b.apps.internal:80", "k8s"),
        route("a.apps.internal:80", "k8s"),
    ]);
    assert!(!same.is_change());
    assert!(Arc::ptr_eq(&t1, &store.snapshot()));

    let b = store.replace_all([
        route("a.apps.internal:80", "diego"),
        route("c.apps.internal:80", "k8s"),
    ]);
    assert_eq!((b.revision, b.added, b.changed, b.removed), (2, 1, 1, 1));
    let t2 = store.snapshot();
    let a_key = RouteKey::parse_authority("a.apps.internal:80").unwrap();
    assert_eq!(t2.get(&a_key).unwrap().revision, 2);
    assert_eq!(t1.get(&a_key).unwrap().home_cluster.as_str(), "k8s");

    let delta = diff(&t1, &t2);
    let mut up: Vec<String> = delta.upserted.iter().map(|r| r.key.to_string()).collect();
    up.sort();
    assert_eq!(up, ["a.apps.internal:80", "c.apps.internal:80"]);
    assert_eq!(
        delta.removed,
        [RouteKey::parse_authority("b.apps.internal:80").unwrap()]
    );
    assert!(diff(&t2, &t2).is_empty());
}

#[test]
fn lookup_by_name_covers_every_port() {
    let store = RouteStore::new();
    store.replace_all([
        route("a.apps.internal:9090", "k8s"),
        route("a.apps.internal:80", "k8s"),
        route("b.apps.internal:80", "k8s"),
    ]);
    let t = store.snapshot();
    let ports: Vec<u16> = t
        .by_name("a.apps.internal")
        .iter()
        .map(|r| r.key.port)
        .collect();
    assert_eq!(ports, [80, 9090]);
    assert!(t.by_name("zzz.apps.internal").is_empty());
}

#[tokio::test]
async fn watchers_wake_on_change_and_see_the_newest_table() {
    let store = RouteStore::new();
    let mut watch = store.subscribe();
    let writer = store.clone();
    tokio::spawn(async move {
        writer.replace_all([route("a.apps.internal:80", "k8s")]);
        writer.replace_all([
            route("a.apps.internal:80", "k8s"),
            route("b.apps.internal:80", "k8s"),
        ]);
    });
    let table = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let t = watch.changed().await;
            if t.len() == 2 {
                return t;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(table.revision(), 2);
}
