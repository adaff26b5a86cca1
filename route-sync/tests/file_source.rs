//! The YAML route file source feeding the watchable table.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use isthmus_certs::SpiffeId;
use isthmus_route_sync::source::file::{FileSource, parse};
use isthmus_route_sync::{RouteKey, RouteStore, RouteTable, SourceError};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const GOOD: &str = r#"
routes:
  - name: orders.apps.internal
    port: 8080
    protocol: http
    home_cluster: k8s
    exported: true
    allowed_peers: [cluster:diego]
    backends: ["127.0.0.1:18080"]
  - name: billing.apps.internal
    port: 9090
    home_cluster: diego
"#;

fn key(s: &str) -> RouteKey {
    RouteKey::parse_authority(s).unwrap()
}

async fn wait_for(
    watch: &mut isthmus_route_sync::RouteWatch,
    what: impl Fn(&RouteTable) -> bool,
) -> std::sync::Arc<RouteTable> {
    timeout(Duration::from_secs(1), async {
        loop {
            let table = watch.current();
            if what(&table) {
                return table;
            }
            watch.changed().await;
        }
    })
    .await
    .expect("the watcher saw the change within 1 s")
}

#[test]
fn parses_routes_with_defaults() {
    let loaded = parse(GOOD, Path::new("routes.yaml")).unwrap();
    assert!(loaded.rejected.is_empty(), "{:?}", loaded.rejected);
    assert_eq!(loaded.routes.len(), 2);
    let billing = &loaded.routes[1];
    assert!(!billing.exported, "deny by default");
    assert!(billing.allowed_peers.is_empty());
    let orders = &loaded.routes[0];
    let diego = SpiffeId::parse("spiffe://mesh.local/cluster/diego/gateway").unwrap();
    assert!(orders.allows(&diego, "mesh.local"));
    assert!(!billing.allows(&diego, "mesh.local"));
}

#[test]
fn bad_entries_are_rejected_with_reasons_and_the_rest_apply() {
    let text = r#"
routes:
  - {name: good.apps.internal, port: 8080, home_cluster: k8s}
  - {name: "10.0.0.1", port: 8080, home_cluster: k8s}
  - {name: port.apps.internal, port: 70000, home_cluster: k8s}
  - {name: typo.apps.internal, port: 80, home_cluster: k8s, exportd: true}
  - {name: peer.apps.internal, port: 80, home_cluster: k8s, allowed_peers: [everyone]}
  - {name: good.apps.internal, port: 8080, home_cluster: diego}
  - {name: proto.apps.internal, port: 80, home_cluster: k8s, protocol: udp}
  - "just a string"
"#;
    let loaded = parse(text, Path::new("r.yaml")).unwrap();
    assert_eq!(loaded.routes.len(), 1);
    assert_eq!(loaded.routes[0].key, key("good.apps.internal:8080"));
    let reasons: Vec<String> = loaded.rejected.iter().map(|r| r.to_string()).collect();
    assert_eq!(reasons.len(), 7, "{reasons:#?}");
    assert!(reasons[0].contains("routes[1]") && reasons[0].contains("not an IP address"));
    assert!(reasons[1].contains("port 70000") && reasons[1].contains("1 to 65535"));
    assert!(reasons[2].contains("exportd"), "{}", reasons[2]);
    assert!(reasons[3].contains("everyone"));
    assert!(reasons[4].contains("duplicate"));
    assert!(reasons[5].contains("udp"));
    assert!(reasons[6].contains("routes[7]"));
}

#[test]
fn malformed_files_are_errors_not_empty_tables() {
    for text in [
        "",
        "routes: [",
        "- a\n- b",
        "routez: []",
        "routes: 5",
        "routes:",
        "routes:\n",
        "routes: ~",
        "routes: null",
    ] {
        let err = parse(text, Path::new("r.yaml")).unwrap_err();
        assert!(matches!(err, SourceError::Malformed { .. }), "{text:?}");
        assert!(err.to_string().contains("r.yaml"));
    }
    assert!(
        parse("routes: []", Path::new("r.yaml"))
            .unwrap()
            .routes
            .is_empty()
    );
}

#[tokio::test]
async fn file_edits_reach_a_watcher_and_broken_files_keep_the_last_good_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, GOOD).unwrap();
    let store = RouteStore::new();
    let mut watch = store.subscribe();
    let cancel = CancellationToken::new();
    let source = FileSource::new(&path);
    let stats = source.stats();
    let task = source.watch(store.clone(), Duration::from_millis(20), cancel.clone());

    let first = wait_for(&mut watch, |t| t.len() == 2).await;
    let orders = first
        .get(&key("orders.apps.internal:8080"))
        .unwrap()
        .clone();

    // An edit: orders stops being exported, a route appears. Billing is untouched and keeps
    // its revision and its Arc.
    let edited = GOOD.replace("exported: true", "exported: false")
        + "  - {name: new.apps.internal, port: 80, home_cluster: k8s}\n";
    std::fs::write(&path, edited).unwrap();
    let second = wait_for(&mut watch, |t| t.len() == 3).await;
    assert!(
        !second
            .get(&key("orders.apps.internal:8080"))
            .unwrap()
            .exported
    );
    assert!(second.revision() > first.revision());
    let billing = key("billing.apps.internal:9090");
    assert!(std::sync::Arc::ptr_eq(
        first.get(&billing).unwrap(),
        second.get(&billing).unwrap()
    ));
    assert!(
        orders.exported,
        "an old snapshot never changes under its reader"
    );

    // A half-written file keeps the last good table.
    let failed_before = stats.loads_failed.load(Ordering::Relaxed);
    std::fs::write(&path, "routes:\n  - {name: orders.apps.internal, port: 80").unwrap();
    timeout(Duration::from_secs(1), async {
        while stats.loads_failed.load(Ordering::Relaxed) == failed_before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the watcher tried the broken file");
    assert!(std::sync::Arc::ptr_eq(&second, &store.snapshot()));

    // The next good write is picked up.
    std::fs::write(
        &path,
        "routes:\n  - {name: after.apps.internal, port: 80, home_cluster: k8s}\n",
    )
    .unwrap();
    let third = wait_for(&mut watch, |t| {
        t.get(&key("after.apps.internal:80")).is_some()
    })
    .await;
    assert_eq!(third.len(), 1);

    cancel.cancel();
    timeout(Duration::from_secs(1), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_broken_file_never_replaces_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, GOOD).unwrap();
    let store = RouteStore::new();
    let source = FileSource::new(&path);
    source.apply(&store).unwrap();
    let before = store.snapshot();
    for broken in ["", "routes: [", "routes: {a: 1}", "\u{0}\u{1}"] {
        std::fs::write(&path, broken).unwrap();
        assert!(source.apply(&store).is_err(), "{broken:?} was accepted");
        let after = store.snapshot();
        assert!(
            std::sync::Arc::ptr_eq(&before, &after),
            "{broken:?} changed the table"
        );
    }
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        source.apply(&store),
        Err(SourceError::Read { .. })
    ));
    assert_eq!(store.snapshot().len(), 2);
}

#[tokio::test]
async fn the_file_source_runs_behind_the_source_trait() {
    use isthmus_route_sync::source::RouteSource;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, GOOD).unwrap();
    let source = FileSource::new(&path);
    assert!(source.describe().contains("routes.yaml"));
    let store = RouteStore::new();
    let mut watch = store.subscribe();
    let cancel = CancellationToken::new();
    let task = RouteSource::run(source, store.clone(), cancel.clone());
    wait_for(&mut watch, |t| t.len() == 2).await;
    cancel.cancel();
    timeout(Duration::from_secs(1), task)
        .await
        .unwrap()
        .unwrap();
}

/// A file of `n` routes in block style, as an operator or a template writes it.
fn block_file(n: usize) -> String {
    let mut text = String::from("routes:\n");
    for i in 0..n {
        text.push_str(&format!(
            "  - name: svc-{i}.apps.internal\n    port: 8080\n    home_cluster: k8s\n    exported: true\n    allowed_peers: [cluster:diego]\n"
        ));
    }
    text
}

#[test]
fn a_refused_entry_keeps_the_last_good_version_of_its_routes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    let store = RouteStore::new();
    let source = FileSource::new(&path);
    std::fs::write(&path, block_file(3)).unwrap();
    source.apply(&store).unwrap();
    // Cut mid-entry: the last entry has its name and a port cut short, nothing more.
    let full = block_file(3);
    let cut = &full[..full.rfind("    home_cluster").unwrap() - 3];
    assert!(cut.ends_with("port: 80"), "{cut:?}");
    std::fs::write(&path, cut).unwrap();
    let (_, rejected) = source.apply(&store).unwrap();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    let t = store.snapshot();
    assert_eq!(t.len(), 3, "svc-2 keeps its last good version");
    assert!(t.get(&key("svc-2.apps.internal:8080")).is_some());
    // A valid file without the name does remove it.
    std::fs::write(&path, block_file(2)).unwrap();
    source.apply(&store).unwrap();
    assert_eq!(store.snapshot().len(), 2);
}

/// A writer that truncates the file and writes it in two steps, the pause between them
/// shorter than the poll interval, never makes the table shrink: the watcher waits for the
/// file to settle. Cut points: an empty file, right after `routes:`, at an entry boundary,
/// and mid-entry.
#[tokio::test]
async fn a_file_rewritten_in_two_steps_never_removes_routes() {
    use std::io::Write;
    const N: usize = 40;
    let poll = Duration::from_millis(100);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    let full = block_file(N);
    std::fs::write(&path, &full).unwrap();
    let store = RouteStore::new();
    let source = FileSource::new(&path);
    let stats = source.stats();
    let cancel = CancellationToken::new();
    let task = source.watch(store.clone(), poll, cancel.clone());
    let mut watch = store.subscribe();
    wait_for(&mut watch, |t| t.len() == N).await;

    // The consumer: every table the store publishes, checked as it comes.
    let seen_min = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(N));
    let consumer = {
        let seen_min = std::sync::Arc::clone(&seen_min);
        let mut watch = store.subscribe();
        tokio::spawn(async move {
            loop {
                let t = watch.changed().await;
                seen_min.fetch_min(t.len(), Ordering::SeqCst);
            }
        })
    };

    let boundary = full.match_indices("  - name:").nth(N / 2).unwrap().0;
    let mid_entry = boundary + "  - name: svc-20.apps.internal\n    po".len();
    let cuts = [0, "routes:\n".len(), boundary, mid_entry];
    let loads =
        || stats.loads_ok.load(Ordering::Relaxed) + stats.loads_failed.load(Ordering::Relaxed);
    for round in 0..12 {
        let cut = cuts[round % cuts.len()];
        let before = loads();
        // Step one: truncate and write the first part.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.write_all(&full.as_bytes()[..cut]).unwrap();
        file.flush().unwrap();
        // The writer's pause, shorter than the poll interval, during which a poll may see
        // the cut file: this pause is the scenario under test, not a wait for a result.
        tokio::time::sleep(poll * 3 / 10).await;
        // Step two: the rest.
        file.write_all(&full.as_bytes()[cut..]).unwrap();
        drop(file);
        // The watcher loads the settled file once; wait for that load, not for a time.
        timeout(Duration::from_secs(2), async {
            while loads() == before {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("round {round}: the watcher never loaded the rewritten file"));
    }
    consumer.abort();
    assert_eq!(
        seen_min.load(Ordering::SeqCst),
        N,
        "the consumer saw a table with fewer routes"
    );
    assert_eq!(store.snapshot().len(), N);
    assert_eq!(
        stats.loads_failed.load(Ordering::Relaxed),
        0,
        "no cut file was ever read"
    );
    cancel.cancel();
    timeout(Duration::from_secs(1), task)
        .await
        .unwrap()
        .unwrap();
}

/// Loads of the route file, good and failed, and refused entries show on `/metrics`: a
/// failed load keeps the previous table, so the metric is how an operator sees it.
#[test]
fn loads_and_refused_entries_are_metrics() {
    use isthmus_route_sync::source::file::RouteFileMetrics;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    let source = FileSource::new(&path);
    let mut registry = prometheus_client::registry::Registry::default();
    RouteFileMetrics::new(&source).register(&mut registry);
    let store = RouteStore::new();
    std::fs::write(&path, "routes:\n").unwrap();
    assert!(source.apply(&store).is_err());
    std::fs::write(
        &path,
        format!("{GOOD}  - {{name: bad, port: 1, home_cluster: k8s}}\n"),
    )
    .unwrap();
    source.apply(&store).unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let file = path.display();
    for line in [
        format!("isthmus_route_file_loads_total{{file=\"{file}\",result=\"ok\"}} 1"),
        format!("isthmus_route_file_loads_total{{file=\"{file}\",result=\"failed\"}} 1"),
        format!("isthmus_route_file_entries_rejected_total{{file=\"{file}\"}} 1"),
    ] {
        assert!(text.contains(&line), "no `{line}` in\n{text}");
    }
}
