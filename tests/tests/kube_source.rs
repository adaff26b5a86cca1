//! route-sync's Kubernetes route source against the API server fixture
//! (`isthmus_tests::kubeapi`, a fixture speaking the API's protocol; no real API server can
//! run here): a real route-sync node, its source watching the fixture through kube-rs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use isthmus_certs::ca::{LeafSpec, MeshCa};
use isthmus_route_sync::k8s::Leadership;
use isthmus_route_sync::node::{Node, NodeHandle, NodeSettings};
use isthmus_route_sync::source::kubernetes::{KubeStats, KubernetesSource};
use isthmus_route_sync::{ClusterName, Route, RouteStore};
use isthmus_tests::kubeapi::{ApiServer, McsVersion, Options, Resource};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const TD: &str = "mesh.local";
const LIMIT: Duration = Duration::from_secs(10);

struct Running {
    api: ApiServer,
    local: RouteStore,
    handle: NodeHandle,
    stats: Arc<KubeStats>,
    cancel: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn start(options: Options, namespaces: &[&str]) -> Running {
    let api = ApiServer::start(options).await.unwrap();
    let ca = MeshCa::generate(TD).unwrap();
    let tls = ca
        .mesh_tls(&LeafSpec::new(
            "k8s",
            "route-sync",
            Duration::from_secs(3600),
        ))
        .unwrap();
    let settings = NodeSettings {
        cluster: ClusterName::parse("k8s").unwrap(),
        trust_domain: TD.into(),
        tls,
        peers: Vec::new(),
        state_dir: None,
        handshake_timeout: Duration::from_secs(5),
        vips: None,
        limits: Default::default(),
        keepalive: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = Node::with_listener(settings, listener);
    let cancel = CancellationToken::new();
    let source = KubernetesSource::new(
        api.client("admin").await.unwrap(),
        ClusterName::parse("k8s").unwrap(),
        namespaces.iter().map(|s| s.to_string()).collect(),
        Leadership::always(),
    )
    .with_node(node.handle())
    .rediscover_every(Duration::from_millis(200));
    let stats = source.stats();
    let local = node.local_store();
    let handle = node.handle();
    let _watch = source.watch(node.local_store(), cancel.clone());
    tokio::spawn(node.run(cancel.clone()));
    Running {
        api,
        local,
        handle,
        stats,
        cancel,
    }
}

impl Running {
    /// Waits until `f` holds, woken by every change of the local route table; predicates
    /// on what has no change channel (staleness, counters) are also re-checked every 50 ms.
    /// Panics naming `what` after `limit`.
    async fn eventually(&self, what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
        let mut changes = self.local.subscribe();
        tokio::time::timeout(limit, async {
            while !f() {
                tokio::select! {
                    _ = changes.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?}: {what}"));
    }
}

fn service(ns: &str, name: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name, "annotations": annotations},
        "spec": {"ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}
    })
}

/// endpoints: (address, ready, serving, terminating)
fn slice(ns: &str, service: &str, endpoints: &[(&str, bool, bool, bool)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": format!("{service}-abc"),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 9000, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|(a, r, s, t)| json!({
            "addresses": [a],
            "conditions": {"ready": r, "serving": s, "terminating": t}
        })).collect::<Vec<_>>()
    })
}

fn export(version: McsVersion, ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": format!("multicluster.x-k8s.io/{}", version.as_str()),
        "kind": "ServiceExport",
        "metadata": {"namespace": ns, "name": name}
    })
}

fn route(store: &RouteStore, name: &str) -> Option<Route> {
    store
        .snapshot()
        .by_name(name)
        .first()
        .map(|r| Route::clone(r))
}

fn backends(store: &RouteStore, name: &str) -> Vec<String> {
    route(store, name)
        .map(|r| r.backends.iter().map(ToString::to_string).collect())
        .unwrap_or_default()
}

fn annotated(route: &str, extra: &[(&str, &str)]) -> Value {
    let mut a = serde_json::Map::new();
    a.insert("isthmus.io/route".into(), json!(route));
    a.insert("isthmus.io/allowed-peers".into(), json!("cluster:diego"));
    for (k, v) in extra {
        a.insert((*k).into(), json!(v));
    }
    Value::Object(a)
}

#[tokio::test]
async fn service_slice_and_export_become_a_route_that_follows_its_endpoints() {
    let k = start(Options::default(), &[]).await;
    let name = "orders.apps.internal";
    k.api
        .create(service("default", "orders", annotated(name, &[])))
        .unwrap();
    k.api
        .create(slice(
            "default",
            "orders",
            &[
                ("10.0.0.1", true, true, false),
                ("10.0.0.2", true, true, false),
            ],
        ))
        .unwrap();
    k.api
        .create(export(McsVersion::V1beta1, "default", "orders"))
        .unwrap();
    k.eventually(
        "an exported route within 1 s",
        Duration::from_secs(1),
        || route(&k.local, name).is_some_and(|r| r.exported && r.backends.len() == 2),
    )
    .await;
    let r = route(&k.local, name).unwrap();
    assert_eq!(r.key.port, 8080);
    assert_eq!(r.home_cluster.as_str(), "k8s");
    assert_eq!(backends(&k.local, name), ["10.0.0.1:9000", "10.0.0.2:9000"]);
    k.eventually("fresh", LIMIT, || !k.handle.is_stale()).await;

    // A pod goes unready: it leaves the backends.
    k.api
        .apply(slice(
            "default",
            "orders",
            &[
                ("10.0.0.1", false, false, false),
                ("10.0.0.2", true, true, false),
            ],
        ))
        .unwrap();
    k.eventually("the unready pod gone", LIMIT, || {
        backends(&k.local, name) == ["10.0.0.2:9000"]
    })
    .await;

    // A serving-but-terminating pod is used only when no ready one is left.
    k.api
        .apply(slice(
            "default",
            "orders",
            &[
                ("10.0.0.2", true, true, false),
                ("10.0.0.3", false, true, true),
            ],
        ))
        .unwrap();
    k.eventually("the ready pod only", LIMIT, || {
        backends(&k.local, name) == ["10.0.0.2:9000"]
    })
    .await;
    k.api
        .apply(slice(
            "default",
            "orders",
            &[
                ("10.0.0.2", false, false, true),
                ("10.0.0.3", false, true, true),
            ],
        ))
        .unwrap();
    k.eventually(
        "the serving-terminating pod as a last resort",
        LIMIT,
        || backends(&k.local, name) == ["10.0.0.3:9000"],
    )
    .await;
    // No endpoint at all: the route stays, without backends.
    k.api.apply(slice("default", "orders", &[])).unwrap();
    k.eventually("a route with no backends", LIMIT, || {
        route(&k.local, name).is_some_and(|r| r.backends.is_empty())
    })
    .await;

    // Deleting the export withdraws the route from other clusters.
    k.api
        .delete(
            Resource::ServiceExports(McsVersion::V1beta1),
            "default",
            "orders",
        )
        .unwrap();
    k.eventually("no longer exported", LIMIT, || {
        route(&k.local, name).is_some_and(|r| !r.exported)
    })
    .await;
}

#[tokio::test]
async fn the_export_annotation_exports_and_its_removal_withdraws() {
    let k = start(Options::default(), &["shop"]).await;
    let name = "cart.apps.internal";
    k.api
        .create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}))
        .ok();
    k.api
        .create(service(
            "shop",
            "cart",
            annotated(name, &[("isthmus.io/export", "true")]),
        ))
        .unwrap();
    // Outside the configured namespaces: never a route.
    k.api
        .create(service(
            "default",
            "other",
            annotated("other.apps.internal", &[]),
        ))
        .unwrap();
    k.eventually("exported by annotation", LIMIT, || {
        route(&k.local, name).is_some_and(|r| r.exported)
    })
    .await;
    assert!(route(&k.local, "other.apps.internal").is_none());
    k.api
        .apply(service("shop", "cart", annotated(name, &[])))
        .unwrap();
    k.eventually("withdrawn", LIMIT, || {
        route(&k.local, name).is_some_and(|r| !r.exported)
    })
    .await;
    // The route annotation removed: no route.
    k.api.apply(service("shop", "cart", json!({}))).unwrap();
    k.eventually("gone", LIMIT, || route(&k.local, name).is_none())
        .await;
}

#[tokio::test]
async fn a_forced_410_relists_without_losing_routes() {
    let k = start(Options::default(), &[]).await;
    let name = "orders.apps.internal";
    k.api
        .create(service(
            "default",
            "orders",
            annotated(name, &[("isthmus.io/export", "true")]),
        ))
        .unwrap();
    k.api
        .create(slice(
            "default",
            "orders",
            &[("10.0.0.1", true, true, false)],
        ))
        .unwrap();
    k.eventually("the route", LIMIT, || backends(&k.local, name).len() == 1)
        .await;
    let lists = k.stats.lists[0].load(Ordering::Relaxed);
    let revision = k.local.snapshot().revision();
    k.api.compact();
    k.eventually("the Services relisted after 410", LIMIT, || {
        k.stats.lists[0].load(Ordering::Relaxed) > lists
    })
    .await;
    // A change after the compaction arrives through the new watch.
    k.api
        .apply(slice(
            "default",
            "orders",
            &[
                ("10.0.0.1", true, true, false),
                ("10.0.0.4", true, true, false),
            ],
        ))
        .unwrap();
    k.eventually("the change after the relist", LIMIT, || {
        backends(&k.local, name).len() == 2
    })
    .await;
    // The relist itself changed nothing: exactly one new revision, the slice change.
    let log = k.local.changes_since(revision).unwrap();
    assert!(
        log.1.removed.is_empty(),
        "the relist removed {:?}",
        log.1.removed
    );
    assert_eq!(k.local.snapshot().revision(), revision + 1);
    assert_eq!(k.stats.watch_errors[0].load(Ordering::Relaxed), 0);
    assert!(!k.handle.is_stale());
}

#[tokio::test]
async fn api_server_down_keeps_routes_stale_then_catches_up() {
    let k = start(Options::default(), &[]).await;
    let name = "orders.apps.internal";
    k.api
        .create(service("default", "orders", annotated(name, &[])))
        .unwrap();
    k.api
        .create(slice(
            "default",
            "orders",
            &[("10.0.0.1", true, true, false)],
        ))
        .unwrap();
    k.eventually("the route, fresh", LIMIT, || {
        backends(&k.local, name).len() == 1 && !k.handle.is_stale()
    })
    .await;
    k.api.stop().await;
    k.eventually("stale while the API server is down", LIMIT, || {
        k.handle.is_stale() && k.stats.stale.load(Ordering::Relaxed)
    })
    .await;
    assert!(k.handle.status().stale);
    assert_eq!(backends(&k.local, name), ["10.0.0.1:9000"], "routes kept");
    // Changes made while route-sync cannot see them.
    k.api
        .apply(slice(
            "default",
            "orders",
            &[("10.0.0.9", true, true, false)],
        ))
        .unwrap();
    k.api
        .create(service(
            "default",
            "pay",
            annotated("pay.apps.internal", &[]),
        ))
        .unwrap();
    assert_eq!(backends(&k.local, name), ["10.0.0.1:9000"]);
    k.api.resume().unwrap();
    k.eventually("caught up and fresh", Duration::from_secs(40), || {
        !k.handle.is_stale()
            && backends(&k.local, name) == ["10.0.0.9:9000"]
            && route(&k.local, "pay.apps.internal").is_some()
    })
    .await;
    assert!(
        k.stats
            .watch_errors
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<u64>()
            > 0
    );
}

#[tokio::test]
async fn bad_annotations_are_refused_counted_and_good_services_apply() {
    let k = start(Options::default(), &[]).await;
    k.api
        .create(service(
            "default",
            "good",
            annotated("good.apps.internal", &[]),
        ))
        .unwrap();
    k.api
        .create(service("default", "badname", annotated("not a name", &[])))
        .unwrap();
    k.api
        .create(service(
            "default",
            "badports",
            annotated("p.apps.internal", &[("isthmus.io/ports", "grpc")]),
        ))
        .unwrap();
    k.eventually("the good Service applies, two refused", LIMIT, || {
        route(&k.local, "good.apps.internal").is_some()
            && k.stats.services_rejected_now.load(Ordering::Relaxed) == 2
    })
    .await;
    assert!(route(&k.local, "p.apps.internal").is_none());
    assert_eq!(k.stats.services_rejected.load(Ordering::Relaxed), 2);
    // A typo on a good Service: refused, counted, and its route kept as it was.
    k.api
        .apply(service(
            "default",
            "good",
            annotated("good.apps.internal", &[("isthmus.io/export", "yes")]),
        ))
        .unwrap();
    k.eventually("the typo refused", LIMIT, || {
        k.stats.services_rejected.load(Ordering::Relaxed) == 3
    })
    .await;
    assert!(
        route(&k.local, "good.apps.internal").is_some(),
        "last good kept"
    );
    // Refusals count once, not once per table.
    k.api
        .create(service(
            "default",
            "more",
            annotated("more.apps.internal", &[]),
        ))
        .unwrap();
    k.eventually("another table", LIMIT, || {
        route(&k.local, "more.apps.internal").is_some()
    })
    .await;
    assert_eq!(k.stats.services_rejected.load(Ordering::Relaxed), 3);
}

fn condition(
    api: &ApiServer,
    version: McsVersion,
    name: &str,
    kind: &str,
) -> Option<(String, String)> {
    let export = api.get(Resource::ServiceExports(version), "default", name)?;
    export
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
            )
        })
}

fn status_writes(api: &ApiServer) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.path.ends_with("/status"))
        .count()
}

#[tokio::test]
async fn service_export_conditions_valid_and_conflict() {
    let k = start(Options::default(), &[]).await;
    let v = McsVersion::V1beta1;
    let shared = "shared.apps.internal";
    k.api
        .create(service("default", "a-first", annotated(shared, &[])))
        .unwrap();
    k.api
        .create(service("default", "b-second", annotated(shared, &[])))
        .unwrap();
    k.api
        .create(service("default", "bad", annotated("bad", &[])))
        .unwrap();
    k.api
        .create(service("default", "plain", json!({})))
        .unwrap();
    for name in ["a-first", "b-second", "bad", "plain", "ghost"] {
        k.api.create(export(v, "default", name)).unwrap();
    }
    let valid = |n: &str| condition(&k.api, v, n, "Valid");
    let conflict = |n: &str| condition(&k.api, v, n, "Conflict");
    let t = |s: &str, r: &str| Some((s.to_string(), r.to_string()));
    k.eventually("every export's conditions", LIMIT, || {
        valid("a-first") == t("True", "Exported")
            && conflict("a-first") == t("False", "NoConflict")
            && conflict("b-second") == t("True", "RouteConflict")
            && valid("bad") == t("False", "InvalidAnnotation")
            && valid("plain") == t("False", "NotAnnotated")
            && valid("ghost") == t("False", "ServiceNotFound")
    })
    .await;
    let export = k
        .api
        .get(Resource::ServiceExports(v), "default", "a-first")
        .unwrap();
    let c = &export["status"]["conditions"][0];
    assert!(
        c["lastTransitionTime"].is_string() && c["message"].is_string(),
        "{c}"
    );
    assert_eq!(c["observedGeneration"], export["metadata"]["generation"]);
    // Routes and conditions settled: an unrelated change makes a new table and no write.
    let writes = status_writes(&k.api);
    let syncs = k.stats.syncs.load(Ordering::Relaxed);
    k.api
        .create(service("default", "x", annotated("x.apps.internal", &[])))
        .unwrap();
    k.eventually("another table", LIMIT, || {
        route(&k.local, "x.apps.internal").is_some()
            && k.stats.syncs.load(Ordering::Relaxed) > syncs
    })
    .await;
    assert_eq!(
        status_writes(&k.api),
        writes,
        "no status write when nothing changed"
    );
    // The winner goes: the other Service takes the name.
    k.api
        .delete(Resource::Services, "default", "a-first")
        .unwrap();
    k.eventually("the conflict resolved", LIMIT, || {
        conflict("b-second") == t("False", "NoConflict")
            && valid("a-first") == t("False", "ServiceNotFound")
    })
    .await;
}

#[tokio::test]
async fn a_v1alpha1_only_server_exports_through_v1alpha1() {
    let options = Options {
        mcs_versions: vec![McsVersion::V1alpha1],
        ..Options::default()
    };
    let k = start(options, &[]).await;
    let name = "orders.apps.internal";
    k.api
        .create(service("default", "orders", annotated(name, &[])))
        .unwrap();
    k.api
        .create(export(McsVersion::V1alpha1, "default", "orders"))
        .unwrap();
    k.eventually("exported through v1alpha1", LIMIT, || {
        route(&k.local, name).is_some_and(|r| r.exported)
    })
    .await;
    assert_eq!(k.stats.export_version.load(Ordering::Relaxed), 2);
    k.eventually("its conditions", LIMIT, || {
        condition(&k.api, McsVersion::V1alpha1, "orders", "Valid")
            == Some(("True".into(), "Exported".into()))
    })
    .await;
}

#[tokio::test]
async fn without_the_crd_only_the_annotation_exports_until_it_is_installed() {
    let options = Options {
        mcs_versions: Vec::new(),
        ..Options::default()
    };
    let k = start(options, &[]).await;
    k.api
        .create(service(
            "default",
            "annotated",
            annotated("a.apps.internal", &[("isthmus.io/export", "true")]),
        ))
        .unwrap();
    k.api
        .create(service(
            "default",
            "orders",
            annotated("orders.apps.internal", &[]),
        ))
        .unwrap();
    k.eventually("routes with no CRD served", LIMIT, || {
        route(&k.local, "a.apps.internal").is_some_and(|r| r.exported)
            && route(&k.local, "orders.apps.internal").is_some_and(|r| !r.exported)
    })
    .await;
    assert!(!k.handle.is_stale());
    assert_eq!(k.stats.export_version.load(Ordering::Relaxed), 0);
    // The CRD installed later is discovered, and its ServiceExports count.
    k.api.set_mcs_versions(&[McsVersion::V1beta1]);
    k.api
        .create(export(McsVersion::V1beta1, "default", "orders"))
        .unwrap();
    k.eventually("exported once the CRD is there", LIMIT, || {
        route(&k.local, "orders.apps.internal").is_some_and(|r| r.exported)
    })
    .await;
    assert_eq!(k.stats.export_version.load(Ordering::Relaxed), 1);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The `isthmus-route-sync` service with `source.kubernetes` (a kubeconfig), as the binary
/// runs it: routes, staleness in `status`, and the source's metrics.
#[tokio::test]
async fn route_sync_service_reads_routes_from_the_api() {
    let api = ApiServer::start(Options::default()).await.unwrap();
    api.create(service(
        "default",
        "orders",
        annotated("orders.apps.internal", &[("isthmus.io/export", "true")]),
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = MeshCa::generate(TD).unwrap();
    let leaf = ca
        .issue(&LeafSpec::new(
            "k8s",
            "route-sync",
            Duration::from_secs(3600),
        ))
        .unwrap();
    leaf.write(&dir.path().join("certs"), &ca.cert_pem())
        .unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, "admin").unwrap();
    let (grpc, admin) = (free_port(), free_port());
    let text = format!(
        "cluster: k8s\ntrust_domain: {TD}\n\
         tls: {{cert: {d}/certs/cert.pem, key: {d}/certs/key.pem, bundle: {d}/certs/ca.pem}}\n\
         listen: 127.0.0.1:{grpc}\nadmin: {{listen: 127.0.0.1:{admin}}}\n\
         source: {{kubernetes: {{kubeconfig: {k}}}}}\n",
        d = dir.path().display(),
        k = kubeconfig.display(),
    );
    let cfg: isthmus_route_sync::config::RouteSyncConfig =
        isthmus_runtime::config::from_str(&text, std::path::Path::new("route-sync.yaml")).unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(isthmus_route_sync::service::run(cfg.clone(), stop.clone()));
    let mut status = String::new();
    for _ in 0..200 {
        if let Ok(s) = isthmus_route_sync::service::status(&cfg, None).await {
            status = s;
            if status.contains("1 local") && !k8s_stale(&status) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(!k8s_stale(&status), "{status}");
    assert!(status.contains("1 served, 1 local"), "{status}");
    let metrics = scrape(format!("127.0.0.1:{admin}").parse().unwrap()).await;
    assert!(
        metrics.contains("isthmus_route_source_stale{source=\"kubernetes\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("isthmus_kube_source_lists_total{kind=\"Service\"}"),
        "{metrics}"
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

fn k8s_stale(status: &str) -> bool {
    status
        .lines()
        .find(|l| l.starts_with("stale"))
        .is_none_or(|l| !l.contains("no"))
}

/// Runs the real kubectl against the fixture with `input` (JSON) on stdin; panics with its
/// stderr when it fails.
fn kubectl(kubeconfig: &std::path::Path, args: &[&str], input: Option<&Value>) -> String {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let bin = isthmus_tests::tools::ensure_kubectl().expect("kubectl");
    let mut child = Command::new(bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--request-timeout=10s")
        .args(args)
        .env_remove("KUBECONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl");
    if let Some(input) = input {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.to_string().as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_create_replace_and_delete_each_reach_the_routes() {
    let k = start(Options::default(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    k.api.write_kubeconfig(&kubeconfig, "admin").unwrap();
    let kc = kubeconfig.clone();
    let run = move |args: &'static [&'static str], input: Option<Value>| {
        let kc = kc.clone();
        tokio::task::spawn_blocking(move || kubectl(&kc, args, input.as_ref()))
    };
    let create = &["create", "--validate=false", "-f", "-"];

    // create: the Service, its slice and its ServiceExport become an exported route.
    run(
        create,
        Some(service(
            "default",
            "orders",
            annotated("orders.apps.internal", &[]),
        )),
    )
    .await
    .unwrap();
    run(
        create,
        Some(slice(
            "default",
            "orders",
            &[("10.0.0.1", true, true, false)],
        )),
    )
    .await
    .unwrap();
    run(
        create,
        Some(export(McsVersion::V1beta1, "default", "orders")),
    )
    .await
    .unwrap();
    k.eventually("kubectl create: an exported route", LIMIT, || {
        route(&k.local, "orders.apps.internal").is_some_and(|r| r.exported && r.backends.len() == 1)
    })
    .await;
    let got = run(&["get", "service", "orders", "-o", "json"], None)
        .await
        .unwrap();
    let got: Value = serde_json::from_str(&got).unwrap();
    assert_eq!(
        got["metadata"]["annotations"]["isthmus.io/route"],
        "orders.apps.internal"
    );

    // replace: the route annotation names another route; the old one goes.
    run(
        &["replace", "--validate=false", "-f", "-"],
        Some(service(
            "default",
            "orders",
            annotated("orders-v2.apps.internal", &[]),
        )),
    )
    .await
    .unwrap();
    k.eventually("kubectl replace: the route renamed", LIMIT, || {
        route(&k.local, "orders-v2.apps.internal").is_some_and(|r| r.exported)
            && route(&k.local, "orders.apps.internal").is_none()
    })
    .await;

    // delete: the export first (the route stays, local), then the Service (it goes).
    run(&["delete", "serviceexport", "orders"], None)
        .await
        .unwrap();
    k.eventually("kubectl delete serviceexport: not exported", LIMIT, || {
        route(&k.local, "orders-v2.apps.internal").is_some_and(|r| !r.exported)
    })
    .await;
    run(&["delete", "service", "orders"], None).await.unwrap();
    k.eventually("kubectl delete service: no route", LIMIT, || {
        route(&k.local, "orders-v2.apps.internal").is_none()
    })
    .await;
}
