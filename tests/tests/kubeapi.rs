//! Conformance of the Kubernetes API server fixture (`isthmus_tests::kubeapi`) against the
//! real clients: the `kubectl` binary and kube-rs (client, `watcher`).

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt as _;
use isthmus_tests::kubeapi::{ApiServer, McsVersion, Options, Resource};
use isthmus_tests::tools::ensure_kubectl;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Every await in these tests is bounded by this.
const BOUND: Duration = Duration::from_secs(20);

async fn bounded<F: std::future::IntoFuture>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {BOUND:?}: {what}"))
}

fn service(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 8080}]}
    })
}

/// What a kube-rs watcher over Services saw, one line per event.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Init,
    InitApply(String),
    InitDone,
    Apply(String, Box<Service>),
    Delete(String),
}

fn name_of(s: &Service) -> String {
    s.metadata.name.clone().unwrap_or_default()
}

/// Runs a kube-rs watcher (with the default backoff, as route-sync does) into a channel.
fn spawn_watcher(client: kube::Client, config: watcher::Config) -> mpsc::UnboundedReceiver<Seen> {
    let (tx, rx) = mpsc::unbounded_channel();
    let api: Api<Service> = Api::namespaced(client, "default");
    tokio::spawn(async move {
        use kube::runtime::WatchStreamExt as _;
        let mut stream = watcher(api, config).default_backoff().boxed();
        while let Some(event) = stream.next().await {
            let seen = match event {
                Ok(watcher::Event::Init) => Seen::Init,
                Ok(watcher::Event::InitApply(s)) => Seen::InitApply(name_of(&s)),
                Ok(watcher::Event::InitDone) => Seen::InitDone,
                Ok(watcher::Event::Apply(s)) => Seen::Apply(name_of(&s), Box::new(s)),
                Ok(watcher::Event::Delete(s)) => Seen::Delete(name_of(&s)),
                // Errors are retried by the backoff; the test looks at what comes after.
                Err(_) => continue,
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for the first event `pick` accepts, returning what it made of it.
async fn until<T>(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    what: &str,
    mut pick: impl FnMut(&Seen) -> Option<T>,
) -> T {
    bounded(what, async {
        loop {
            let seen = rx.recv().await.expect("the watcher ended");
            if let Some(t) = pick(&seen) {
                return t;
            }
        }
    })
    .await
}

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    fn new(api: &ApiServer, dir: &Path) -> Kubectl {
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, "admin").unwrap();
        Kubectl {
            bin: ensure_kubectl().expect("kubectl"),
            kubeconfig,
            cache: dir.join("kube-cache"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .arg("--request-timeout=15s")
            .args(args)
            .env_remove("KUBECONFIG");
        cmd
    }

    /// Runs kubectl to completion (bounded), with `stdin` as its input; returns stdout or
    /// panics with stderr.
    fn run(&self, args: &[&str], stdin: Option<&Value>) -> String {
        let (ok, out, err) = self.try_run(args, stdin);
        assert!(ok, "kubectl {args:?} failed: {err}");
        out
    }

    fn try_run(&self, args: &[&str], stdin: Option<&Value>) -> (bool, String, String) {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().unwrap();
            pipe.write_all(serde_json::to_string(input).unwrap().as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        let started = std::time::Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if started.elapsed() > BOUND {
                let _ = child.kill();
                panic!("kubectl {args:?} did not finish within {BOUND:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts a long-running kubectl whose stdout lines arrive on the channel.
    fn spawn(&self, args: &[&str]) -> (Child, mpsc::UnboundedReceiver<String>) {
        let mut child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn kubectl");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        (child, rx)
    }
}

/// Reads lines until one contains `needle`.
async fn until_line(rx: &mut mpsc::UnboundedReceiver<String>, needle: &str) {
    bounded(&format!("a kubectl line with {needle:?}"), async {
        loop {
            let line = rx.recv().await.expect("kubectl's output ended");
            if line.contains(needle) {
                return;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_and_kube_rs_watcher_see_the_same_changes() {
    let api = bounded("start", ApiServer::start(Options::default()))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubectl = Kubectl::new(&api, dir.path());
    let client = api.client("admin").await.unwrap();
    let mut seen = spawn_watcher(client, watcher::Config::default());
    until(&mut seen, "InitDone", |s| {
        (*s == Seen::InitDone).then_some(())
    })
    .await;

    let (mut kwatch, mut klines) = kubectl.spawn(&["get", "services", "--watch", "-o", "json"]);

    // create -f: a Service and its EndpointSlice.
    kubectl.run(
        &["create", "--validate=false", "-f", "-"],
        Some(&service("orders", json!({"tier": "web"}))),
    );
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "orders-abc", "labels": {"kubernetes.io/service-name": "orders"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    });
    kubectl.run(&["create", "--validate=false", "-f", "-"], Some(&slice));
    let created = until(&mut seen, "Apply(orders)", |s| match s {
        Seen::Apply(n, svc) if n == "orders" => Some((**svc).clone()),
        _ => None,
    })
    .await;
    let ip = created
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .unwrap();
    assert!(
        ip.starts_with("10.96."),
        "clusterIP {ip} from the service CIDR"
    );

    // get -o json shows both, the ClusterIP allocated.
    let got: Value =
        serde_json::from_str(&kubectl.run(&["get", "service", "orders", "-o", "json"], None))
            .unwrap();
    assert_eq!(got["spec"]["clusterIP"], ip.as_str());
    assert_eq!(got["spec"]["clusterIPs"], json!([ip]));
    let slices: Value =
        serde_json::from_str(&kubectl.run(&["get", "endpointslices", "-o", "json"], None)).unwrap();
    assert_eq!(slices["items"][0]["metadata"]["name"], "orders-abc");
    assert_eq!(
        slices["items"][0]["endpoints"][0]["addresses"],
        json!(["10.1.0.5"])
    );
    until_line(&mut klines, "\"name\": \"orders\"").await;

    // replace -f: kubectl's watch and kube-rs both see the new label.
    kubectl.run(
        &["replace", "--validate=false", "-f", "-"],
        Some(&service("orders", json!({"tier": "canary"}))),
    );
    until_line(&mut klines, "canary").await;
    let replaced = until(&mut seen, "Apply(orders) after replace", |s| match s {
        Seen::Apply(n, svc) if n == "orders" => Some((**svc).clone()),
        _ => None,
    })
    .await;
    assert_eq!(replaced.metadata.labels.unwrap()["tier"], "canary");
    assert_eq!(
        replaced.spec.unwrap().cluster_ip.unwrap(),
        ip,
        "kept on replace"
    );

    // apply -f: a ServiceExport through v1beta1, created, readable through v1alpha1.
    let export = json!({
        "apiVersion": "multicluster.x-k8s.io/v1beta1",
        "kind": "ServiceExport",
        "metadata": {"name": "orders", "namespace": "default"}
    });
    kubectl.run(&["apply", "--validate=false", "-f", "-"], Some(&export));
    let alpha = api
        .get(
            Resource::ServiceExports(McsVersion::V1alpha1),
            "default",
            "orders",
        )
        .expect("the ServiceExport, read in the other version");
    assert_eq!(alpha["apiVersion"], "multicluster.x-k8s.io/v1alpha1");
    let listed: Value = serde_json::from_str(&kubectl.run(
        &[
            "get",
            "serviceexports.v1alpha1.multicluster.x-k8s.io",
            "-o",
            "json",
        ],
        None,
    ))
    .unwrap();
    assert_eq!(listed["items"][0]["metadata"]["name"], "orders");

    // delete.
    kubectl.run(&["delete", "service", "orders"], None);
    until(&mut seen, "Delete(orders)", |s| {
        (*s == Seen::Delete("orders".into())).then_some(())
    })
    .await;
    assert!(api.get(Resource::Services, "default", "orders").is_none());

    let writes: Vec<(String, String)> = api
        .requests()
        .into_iter()
        .filter(|r| r.user == "admin")
        .map(|r| (r.verb, r.path))
        .collect();
    for want in [
        ("create", "/api/v1/namespaces/default/services"),
        ("update", "/api/v1/namespaces/default/services/orders"),
        ("delete", "/api/v1/namespaces/default/services/orders"),
        (
            "create",
            "/apis/multicluster.x-k8s.io/v1beta1/namespaces/default/serviceexports",
        ),
    ] {
        assert!(
            writes.iter().any(|(v, p)| v == want.0 && p == want.1),
            "{want:?} in {writes:?}"
        );
    }
    let _ = kwatch.kill();
    let _ = kwatch.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_resources_follow_the_served_mcs_versions() {
    let api = bounded(
        "start",
        ApiServer::start(Options {
            mcs_versions: vec![],
            ..Options::default()
        }),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubectl = Kubectl::new(&api, dir.path());
    for versions in [
        vec![],
        vec![McsVersion::V1alpha1],
        vec![McsVersion::V1beta1],
        vec![McsVersion::V1alpha1, McsVersion::V1beta1],
    ] {
        api.set_mcs_versions(&versions);
        let out = kubectl.run(
            &[
                "api-resources",
                "--cached=false",
                "--api-group=multicluster.x-k8s.io",
            ],
            None,
        );
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("serviceexports"))
            .collect();
        match versions.as_slice() {
            [] => assert!(lines.is_empty(), "{out}"),
            // kubectl lists the group's preferred version.
            [v] => assert!(
                lines.len() == 1
                    && lines[0].contains(&format!("multicluster.x-k8s.io/{}", v.as_str())),
                "{out}"
            ),
            _ => assert!(
                lines.len() == 1 && lines[0].contains("multicluster.x-k8s.io/v1beta1"),
                "{out}"
            ),
        }
        // Both versions, when served, answer through kubectl.
        for v in &versions {
            let resource = format!("serviceexports.{}.multicluster.x-k8s.io", v.as_str());
            kubectl.run(&["get", &resource], None);
        }
    }
    let out = kubectl.run(&["api-resources", "--cached=false"], None);
    for name in ["services", "endpointslices", "leases", "namespaces"] {
        assert!(out.lines().any(|l| l.starts_with(name)), "{name} in {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_returns_every_object_exactly_once() {
    let api = bounded("start", ApiServer::start(Options::default()))
        .await
        .unwrap();
    for i in 0..23 {
        api.create(service(&format!("svc-{i:02}"), json!({"page": "yes"})))
            .unwrap();
    }
    let client = api.client("admin").await.unwrap();
    let services: Api<Service> = Api::all(client);
    let mut names = Vec::new();
    let mut params = ListParams::default().limit(5).labels("page=yes");
    let mut pages = 0;
    loop {
        let page = bounded("a page", services.list(&params)).await.unwrap();
        pages += 1;
        names.extend(page.items.iter().map(name_of));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => params = params.continue_token(&c),
            None => break,
        }
    }
    let mut want: Vec<String> = (0..23).map(|i| format!("svc-{i:02}")).collect();
    want.sort();
    assert_eq!(names, want);
    assert_eq!(pages, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_restarts_a_running_watcher_without_losing_objects() {
    let api = bounded("start", ApiServer::start(Options::default()))
        .await
        .unwrap();
    api.create(service("a", json!({}))).unwrap();
    let client = api.client("admin").await.unwrap();
    let mut seen = spawn_watcher(client, watcher::Config::default());
    until(&mut seen, "InitDone", |s| {
        (*s == Seen::InitDone).then_some(())
    })
    .await;
    // The watcher reports InitDone before it sends its watch request; a watch begun after
    // the compaction resumes from the current resourceVersion, which is not too old. So
    // first see an event through the watch: then it is open when the history goes.
    api.create(service("w", json!({}))).unwrap();
    until(&mut seen, "Apply(w)", |s| {
        matches!(s, Seen::Apply(n, _) if n == "w").then_some(())
    })
    .await;
    api.compact();
    // The open watch ends with ERROR 410: the watcher relists, and the relist has both.
    until(&mut seen, "Init again", |s| {
        (*s == Seen::Init).then_some(())
    })
    .await;
    let mut init = Vec::new();
    until(&mut seen, "InitDone again", |s| match s {
        Seen::InitApply(n) => {
            init.push(n.clone());
            None
        }
        Seen::InitDone => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(init, ["a", "w"]);
    api.create(service("b", json!({}))).unwrap();
    until(&mut seen, "Apply(b)", |s| {
        matches!(s, Seen::Apply(n, _) if n == "b").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_gets_401_and_a_stale_replace_gets_409() {
    let api = bounded(
        "start",
        ApiServer::start(Options {
            users: vec!["replica-a".into(), "replica-b".into()],
            ..Options::default()
        }),
    )
    .await
    .unwrap();
    let kubeconfig = api.kubeconfig("replica-a").unwrap();
    let forged = kubeconfig.replace(api.token("replica-a").unwrap(), "not-a-token");
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::from_yaml(&forged).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let bad: Api<Service> = Api::default_namespaced(kube::Client::try_from(config).unwrap());
    match bounded("list with a wrong token", bad.list(&ListParams::default())).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 401);
            assert_eq!(s.reason, "Unauthorized");
        }
        other => panic!("expected 401, got {other:?}"),
    }

    let a: Api<Service> = Api::default_namespaced(api.client("replica-a").await.unwrap());
    let b: Api<Service> = Api::default_namespaced(api.client("replica-b").await.unwrap());
    let svc: Service = serde_json::from_value(service("s", json!({}))).unwrap();
    let created = bounded("create", a.create(&PostParams::default(), &svc))
        .await
        .unwrap();
    let mut newer = created.clone();
    newer.metadata.labels = Some([("v".to_owned(), "2".to_owned())].into());
    bounded(
        "replace by b",
        b.replace("s", &PostParams::default(), &newer),
    )
    .await
    .unwrap();
    let mut stale = created;
    stale.metadata.labels = Some([("v".to_owned(), "3".to_owned())].into());
    match bounded(
        "stale replace",
        a.replace("s", &PostParams::default(), &stale),
    )
    .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 409);
            assert_eq!(s.reason, "Conflict");
        }
        other => panic!("expected 409, got {other:?}"),
    }
    match bounded("create again", a.create(&PostParams::default(), &svc)).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists")),
        other => panic!("expected 409 AlreadyExists, got {other:?}"),
    }
    bounded("delete", b.delete("s", &DeleteParams::default()))
        .await
        .unwrap();
    match bounded("get deleted", a.get("s")).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (404, "NotFound")),
        other => panic!("expected 404, got {other:?}"),
    }
    // Who wrote what.
    let by: Vec<(String, String, u16)> = api
        .requests()
        .into_iter()
        .map(|r| (r.user, r.verb, r.code))
        .collect();
    assert_eq!(
        by,
        [
            ("replica-a".into(), "create".into(), 201),
            ("replica-b".into(), "update".into(), 200),
            ("replica-a".into(), "update".into(), 409),
            ("replica-a".into(), "create".into(), 409),
            ("replica-b".into(), "delete".into(), 200),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_recovers_after_stop_and_resume() {
    let api = bounded("start", ApiServer::start(Options::default()))
        .await
        .unwrap();
    let client = api.client("admin").await.unwrap();
    let mut seen = spawn_watcher(client, watcher::Config::default());
    until(&mut seen, "InitDone", |s| {
        (*s == Seen::InitDone).then_some(())
    })
    .await;
    bounded("stop", api.stop()).await;
    // Gone: a new connection is refused.
    assert!(std::net::TcpStream::connect(api.addr()).is_err());
    // Written while the server is away: only a relist or a resumed watch can show it.
    api.create(service("while-away", json!({}))).unwrap();
    api.resume().unwrap();
    until(&mut seen, "while-away", |s| match s {
        Seen::Apply(n, _) | Seen::InitApply(n) if n == "while-away" => Some(()),
        _ => None,
    })
    .await;
    api.create(service("after", json!({}))).unwrap();
    until(&mut seen, "Apply(after)", |s| {
        matches!(s, Seen::Apply(n, _) if n == "after").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_list_watcher_gets_initial_events_then_changes() {
    let api = bounded("start", ApiServer::start(Options::default()))
        .await
        .unwrap();
    api.create(service("one", json!({}))).unwrap();
    api.create(service("two", json!({}))).unwrap();
    let client = api.client("admin").await.unwrap();
    let mut seen = spawn_watcher(client, watcher::Config::default().streaming_lists());
    let mut init = Vec::new();
    until(&mut seen, "InitDone", |s| match s {
        Seen::InitApply(n) => {
            init.push(n.clone());
            None
        }
        Seen::InitDone => Some(()),
        _ => None,
    })
    .await;
    init.sort();
    assert_eq!(init, ["one", "two"]);
    api.delete(Resource::Services, "default", "one").unwrap();
    until(&mut seen, "Delete(one)", |s| {
        (*s == Seen::Delete("one".into())).then_some(())
    })
    .await;
}
