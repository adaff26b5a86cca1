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
        vip: None,
        egress_port: None,
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

#[test]
fn shared_routes_keep_their_arc_and_revision() {
    let store = RouteStore::new();
    let mut a = route("a.apps.internal:80", "k8s");
    a.revision = 7;
    let a = Arc::new(a);
    let applied = store.apply_shared([Arc::clone(&a)], []);
    assert_eq!((applied.revision, applied.added), (1, 1));
    let t = store.snapshot();
    let stored = t.get(&a.key).unwrap();
    assert!(Arc::ptr_eq(stored, &a), "stored as given, not copied");
    assert_eq!(stored.revision, 7, "the revision it came with");

    // An equal route in another `Arc` changes nothing; the whole-table form drops the rest.
    let again = Arc::new((*a).clone());
    assert!(!store.apply_shared([again], []).is_change());
    let b = Arc::new(route("b.apps.internal:80", "k8s"));
    let replaced = store.replace_all_shared([Arc::clone(&b)]);
    assert_eq!((replaced.added, replaced.removed), (1, 1));
    assert!(Arc::ptr_eq(store.snapshot().get(&b.key).unwrap(), &b));
}

#[test]
fn the_change_log_stays_within_its_capacity() {
    let store = RouteStore::new();
    store.set_log_capacity(10);
    let name = |i: usize| format!("r{i}.apps.internal:80");
    store.replace_all((0..3).map(|i| route(&name(i), "k8s")));
    let (rev, delta) = store.changes_since(0).unwrap();
    assert_eq!((rev, delta.upserted.len()), (1, 3));

    // One change of more keys than the log holds: older watchers need a snapshot, newer
    // ones are current.
    store.replace_all((0..20).map(|i| route(&name(i), "diego")));
    assert!(store.changes_since(1).is_none());
    let (rev, delta) = store.changes_since(2).unwrap();
    assert_eq!((rev, delta.is_empty()), (2, true));

    // Small changes are remembered until the log is full, the oldest forgotten first.
    for i in 0..6 {
        store.apply([route(&name(i), "k8s")], []);
    }
    assert_eq!(store.changes_since(2).unwrap().1.upserted.len(), 6);
    for i in 6..12 {
        store.apply([route(&name(i), "k8s")], []);
    }
    assert!(
        store.changes_since(2).is_none(),
        "12 changes, 10 remembered"
    );
    assert_eq!(store.changes_since(4).unwrap().1.upserted.len(), 10);

    // A caller may ask for no more than it is willing to gather.
    assert!(store.changes_since_within(10, 3).is_none());
    assert_eq!(
        store.changes_since_within(10, 4).unwrap().1.upserted.len(),
        4
    );
}

#[test]
fn names_with_several_ports_keep_their_ports_sorted_as_they_change() {
    let store = RouteStore::new();
    store.replace_all([
        route("a.apps.internal:9090", "k8s"),
        route("a.apps.internal:80", "k8s"),
        route("a.apps.internal:443", "k8s"),
    ]);
    let port = |t: &isthmus_route_sync::RouteTable| -> Vec<u16> {
        t.by_name("a.apps.internal")
            .iter()
            .map(|r| r.key.port)
            .collect()
    };
    assert_eq!(port(&store.snapshot()), [80, 443, 9090]);
    let k = |a: &str| RouteKey::parse_authority(a).unwrap();
    store.apply([], [k("a.apps.internal:443")]);
    let t = store.snapshot();
    assert_eq!((port(&t), t.len()), (vec![80, 9090], 2));
    assert!(t.get(&k("a.apps.internal:443")).is_none());
    store.apply([], [k("a.apps.internal:80"), k("a.apps.internal:9090")]);
    let t = store.snapshot();
    assert!(t.is_empty() && t.by_name("a.apps.internal").is_empty());
    assert_eq!(t.iter().count(), 0);
}

/// A small table under steady churn keeps a log of about twice its size (at least
/// `MIN_LOG`), not the default million: a watcher further behind gets the table instead.
#[test]
fn the_change_log_of_a_small_table_stays_small() {
    use isthmus_route_sync::table::MIN_LOG;
    let store = RouteStore::new();
    let name = |i: usize| format!("r{i}.apps.internal:80");
    store.replace_all((0..10).map(|i| route(&name(i), "k8s")));
    let start = store.snapshot().revision();
    let churn = MIN_LOG + 100;
    for i in 0..churn {
        let home = if (i / 10) % 2 == 0 { "diego" } else { "k8s" };
        store.apply([route(&name(i % 10), home)], []);
    }
    let end = store.snapshot().revision();
    assert_eq!(end, start + churn as u64);
    // The oldest changes are gone: resuming from the start needs a snapshot...
    assert!(store.changes_since(start).is_none());
    // ...while the last MIN_LOG are remembered.
    let (rev, delta) = store.changes_since(end - MIN_LOG as u64).unwrap();
    assert_eq!((rev, delta.upserted.len()), (end, 10));
    assert!(store.changes_since(end - MIN_LOG as u64 - 1).is_none());
}
