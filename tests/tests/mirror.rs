//! Mirror Services against the Kubernetes API server fixture: a "diego" route-sync (file
//! source) exports routes to "k8s" route-sync replicas (Kubernetes source + `mirror:`), each
//! run as the whole component (`service::run`) in this process on its own runtime, so a
//! replica can be stopped gracefully or killed (its runtime dropped: no Lease release).
//!
//! Checked: mirror Services are created with Isthmus's labels, the egress selector, one port
//! per route port and a target port from the range; a local consumer of the k8s route-sync
//! (its gRPC Watch, as the gateway and DNS shim see it) gets vip = the ClusterIP and
//! egress_port = the target port; a port change updates the Service in place (same
//! ClusterIP); a withdrawal deletes it; a same-named Service without Isthmus's labels is never
//! written (the fixture's request log) and its refusal shows in metrics and `status`; with two
//! replicas only the Lease holder's user writes, and killing it hands the writing over.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use isthmus_certs::ca::{LeafSpec, MeshCa};
use isthmus_route_sync::client::RouteSyncSource;
use isthmus_route_sync::config::RouteSyncConfig;
use isthmus_route_sync::k8s::mirror::service_name;
use isthmus_route_sync::{ClusterName, RouteKey, RouteName, RouteStore};
use isthmus_runtime::config::Validate as _;
use isthmus_tests::kubeapi::{ApiServer, Options, Resource};
use isthmus_tests::world::http_get;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const TD: &str = "mesh.local";
const NS: &str = "isthmus";
const LEASE: Duration = Duration::from_secs(2);
/// Every wait in these tests ends by this.
const LIMIT: Duration = Duration::from_secs(20);
const EGRESS_PORTS: std::ops::RangeInclusive<u16> = 20000..=20009;

/// Polls `f` every 20 ms until it gives a value; panics naming `what` after `limit`.
async fn wait_for<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn free_addr() -> SocketAddr {
    // Bound and released: service::run binds its own listeners from the configuration.
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// One test's certificates, files and fixture.
struct Setup {
    dir: tempfile::TempDir,
    ca: MeshCa,
    api: ApiServer,
}

impl Setup {
    async fn new(users: &[&str]) -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("isthmus-mirror-")
            .tempdir()
            .unwrap();
        let ca = MeshCa::generate(TD).unwrap();
        let api = ApiServer::start(Options {
            users: users.iter().map(|u| (*u).to_owned()).collect(),
            namespaces: vec![NS.to_owned(), "apps".to_owned()],
            ..Options::default()
        })
        .await
        .unwrap();
        Setup { dir, ca, api }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes an identity for `component` of `cluster` under `certs/<owner>` and returns
    /// the `tls:` section.
    fn tls(&self, cluster: &str, component: &str, owner: &str) -> Value {
        let d = self.path(&format!("certs/{owner}"));
        self.ca
            .issue(&LeafSpec::new(
                cluster,
                component,
                Duration::from_secs(3600),
            ))
            .unwrap()
            .write(&d, &self.ca.cert_pem())
            .unwrap();
        json!({"cert": d.join("cert.pem"), "key": d.join("key.pem"), "bundle": d.join("ca.pem")})
    }

    fn diego_routes(&self, routes: &[(&str, u16)]) {
        let mut text = String::from("routes:\n");
        for (name, port) in routes {
            text.push_str(&format!(
                "  - {{name: {name}, port: {port}, home_cluster: diego, exported: true, \
                 allowed_peers: [\"cluster:k8s\"], backends: [\"10.0.0.1:{port}\"]}}\n"
            ));
        }
        // Written whole then renamed, so the file source never reads half a file.
        let tmp = self.path("diego-routes.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.path("diego-routes.yaml")).unwrap();
    }

    fn diego_config(&self, listen: SocketAddr, k8s: &[SocketAddr]) -> RouteSyncConfig {
        config(json!({
            "cluster": "diego",
            "trust_domain": TD,
            "tls": self.tls("diego", "route-sync", "diego"),
            "listen": listen,
            "admin": {"listen": free_addr()},
            "source": {"file": self.path("diego-routes.yaml"), "poll_interval": "50ms"},
            "peers": [{"cluster": "k8s", "endpoints": k8s}],
        }))
    }

    /// A k8s replica acting as fixture user `user` (also its Lease identity).
    fn k8s_config(&self, user: &str, listen: SocketAddr, diego: SocketAddr) -> Replica {
        let kubeconfig = self.path(&format!("kubeconfig-{user}"));
        self.api.write_kubeconfig(&kubeconfig, user).unwrap();
        let cfg = config(json!({
            "cluster": "k8s",
            "trust_domain": TD,
            "tls": self.tls("k8s", "route-sync", user),
            "listen": listen,
            "admin": {"listen": free_addr()},
            "source": {"kubernetes": {"namespaces": ["apps"], "kubeconfig": kubeconfig}},
            "mirror": {
                "namespace": NS,
                "egress_selector": {"app.kubernetes.io/name": "isthmus-egress"},
                "egress_ports": format!("{}-{}", EGRESS_PORTS.start(), EGRESS_PORTS.end()),
                "lease": {"name": "isthmus-route-sync", "duration": "2s", "identity": user},
            },
            "peers": [{"cluster": "diego", "endpoints": [diego]}],
        }));
        Replica::start(user, cfg)
    }

    /// A local consumer of the k8s route-sync at `addr`, as the gateway and DNS shim are.
    fn consumer(&self, addr: SocketAddr, stop: &CancellationToken) -> RouteStore {
        let store = RouteStore::new();
        let source = RouteSyncSource {
            cluster: ClusterName::parse("k8s").unwrap(),
            trust_domain: TD.into(),
            endpoints: vec![addr],
            tls: self
                .ca
                .mesh_tls(&LeafSpec::new("k8s", "gateway", Duration::from_secs(3600)))
                .unwrap(),
            cache: None,
        };
        let _ = source.spawn(store.clone(), stop.clone());
        store
    }

    /// The mirror Services (with Isthmus's labels) in the namespace, by name.
    fn mirrors(&self) -> BTreeMap<String, Value> {
        self.api
            .list(Resource::Services, Some(NS))
            .into_iter()
            .filter(|s| {
                s["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "isthmus-route-sync"
            })
            .map(|s| (s["metadata"]["name"].as_str().unwrap().to_owned(), s))
            .collect()
    }

    /// The users that wrote Services (any verb) so far, in order, with the path.
    fn service_writes(&self) -> Vec<(String, String, String)> {
        self.api
            .requests()
            .into_iter()
            .filter(|r| r.path.contains("/services"))
            .map(|r| (r.user, r.verb, r.path))
            .collect()
    }
}

fn config(v: Value) -> RouteSyncConfig {
    let cfg: RouteSyncConfig = serde_json::from_value(v).unwrap();
    cfg.validate().unwrap();
    cfg
}

/// A route-sync running `service::run` on its own runtime and thread.
struct Replica {
    name: String,
    grpc: SocketAddr,
    admin: SocketAddr,
    cfg: RouteSyncConfig,
    stop: CancellationToken,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Replica {
    fn start(name: &str, cfg: RouteSyncConfig) -> Replica {
        let (grpc, admin) = (cfg.listen, cfg.admin.listen);
        let stop = CancellationToken::new();
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let thread = {
            let (cfg, stop, name) = (cfg.clone(), stop.clone(), name.to_owned());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    tokio::select! {
                        r = isthmus_route_sync::service::run(cfg, stop) => {
                            if let Err(e) = r {
                                panic!("{name}: route-sync failed: {e:#}");
                            }
                        }
                        _ = killed => {}
                    }
                });
                // Killed or stopped: every task still running is dropped where it stands,
                // as a crashed process's would be (a killed Lease holder releases nothing).
                rt.shutdown_background();
            })
        };
        Replica {
            name: name.to_owned(),
            grpc,
            admin,
            cfg,
            stop,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    async fn metrics(&self) -> String {
        match http_get(self.admin, "/metrics").await {
            Ok((200, body)) => body,
            _ => String::new(),
        }
    }

    /// The value of a metric line starting with `prefix` (0 when absent).
    async fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    async fn status(&self) -> String {
        isthmus_route_sync::service::status(&self.cfg, Some(self.grpc))
            .await
            .unwrap_or_else(|e| format!("no status: {e:#}"))
    }

    /// A graceful stop, as on SIGTERM.
    fn stop(&mut self) {
        self.stop.cancel();
        self.join();
    }

    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        self.join();
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let name = self.name.clone();
            // Bounded: a replica that does not stop fails the test rather than hanging it.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(t.join());
            });
            match rx.recv_timeout(LIMIT) {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("{name} panicked"),
                Err(_) => panic!("{name} did not stop within {LIMIT:?}"),
            }
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn key(name: &str, port: u16) -> RouteKey {
    RouteKey::new(RouteName::parse(name).unwrap(), port)
}

fn mirror_name(route: &str) -> String {
    service_name(&RouteName::parse(route).unwrap())
}

/// The (port, targetPort) pairs of a Service.
fn ports(svc: &Value) -> BTreeMap<u16, u16> {
    svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                u16::try_from(p["port"].as_u64().unwrap()).unwrap(),
                u16::try_from(p["targetPort"].as_u64().unwrap()).unwrap(),
            )
        })
        .collect()
}

fn cluster_ip(svc: &Value) -> std::net::IpAddr {
    svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap()
}

/// The (vip, egress_port) the consumer has for `key`, once it has the route.
fn seen_by(store: &RouteStore, key: &RouteKey) -> Option<(Option<std::net::IpAddr>, Option<u16>)> {
    store.snapshot().get(key).map(|r| (r.vip, r.egress_port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_services_follow_the_imports_and_never_touch_a_foreign_service() {
    let s = Setup::new(&["rs-a"]).await;
    // Someone else's Service with the name billing's mirror would have.
    let foreign_name = mirror_name("billing.apps.internal");
    s.api
        .create(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": foreign_name, "namespace": NS, "labels": {"team": "payments"}},
            "spec": {"selector": {"app": "billing"}, "ports": [{"port": 80, "targetPort": 8080}]}
        }))
        .unwrap();
    let foreign_before = s.api.get(Resource::Services, NS, &foreign_name).unwrap();

    s.diego_routes(&[
        ("orders.apps.internal", 8080),
        ("billing.apps.internal", 8080),
    ]);
    let (diego_addr, k8s_addr) = (free_addr(), free_addr());
    let _diego = Replica::start("diego", s.diego_config(diego_addr, &[k8s_addr]));
    let k8s = s.k8s_config("rs-a", k8s_addr, diego_addr);
    let stop = CancellationToken::new();
    let consumer = s.consumer(k8s_addr, &stop);

    // Created, labelled, selecting the egress pods, one port per route port.
    let orders_name = mirror_name("orders.apps.internal");
    let orders = wait_for("the orders mirror Service", LIMIT, async || {
        s.mirrors().get(&orders_name).cloned()
    })
    .await;
    assert_eq!(orders["metadata"]["labels"]["isthmus.io/mirror"], "true");
    assert_eq!(
        orders["metadata"]["annotations"]["isthmus.io/mirror-of"],
        "orders.apps.internal"
    );
    assert_eq!(
        orders["spec"]["selector"],
        json!({"app.kubernetes.io/name": "isthmus-egress"})
    );
    let first = ports(&orders);
    assert_eq!(first.keys().copied().collect::<Vec<_>>(), [8080]);
    assert!(EGRESS_PORTS.contains(&first[&8080]), "{first:?}");
    let ip = cluster_ip(&orders);

    // The local consumer sees the ClusterIP as the VIP and the target port as egress_port.
    wait_for(
        "the consumer sees orders' mirror address",
        LIMIT,
        async || {
            (seen_by(&consumer, &key("orders.apps.internal", 8080))
                == Some((Some(ip), Some(first[&8080]))))
            .then_some(())
        },
    )
    .await;

    // billing is refused (its name is taken by a Service that is not Isthmus's), visibly.
    wait_for("the refusal of billing in status", LIMIT, async || {
        let text = k8s.status().await;
        (text.contains("refused: billing.apps.internal") && text.contains(&foreign_name))
            .then_some(())
    })
    .await;
    assert!(
        k8s.metric("isthmus_route_sync_mirror_refused_total{reason=\"foreign_service\"}")
            .await
            >= 1.0
    );
    assert_eq!(
        seen_by(&consumer, &key("billing.apps.internal", 8080)),
        Some((None, None)),
        "a refused route carries no mirror address"
    );

    // A new port: the Service is updated in place (same ClusterIP), 8080 keeps its target.
    s.diego_routes(&[
        ("orders.apps.internal", 8080),
        ("orders.apps.internal", 9090),
        ("billing.apps.internal", 8080),
    ]);
    let grown = wait_for("orders' mirror Service gains 9090", LIMIT, async || {
        let svc = s.mirrors().get(&orders_name).cloned()?;
        (ports(&svc).len() == 2).then_some(svc)
    })
    .await;
    let grown_ports = ports(&grown);
    assert_eq!(cluster_ip(&grown), ip, "an update keeps the ClusterIP");
    assert_eq!(grown_ports[&8080], first[&8080]);
    assert_ne!(grown_ports[&9090], grown_ports[&8080]);
    assert!(EGRESS_PORTS.contains(&grown_ports[&9090]));
    wait_for("the consumer sees 9090's egress port", LIMIT, async || {
        (seen_by(&consumer, &key("orders.apps.internal", 9090))
            == Some((Some(ip), Some(grown_ports[&9090]))))
        .then_some(())
    })
    .await;

    // Withdrawn: the Service goes, and so does the route.
    s.diego_routes(&[("billing.apps.internal", 8080)]);
    wait_for("orders' mirror Service deleted", LIMIT, async || {
        (!s.mirrors().contains_key(&orders_name)).then_some(())
    })
    .await;
    wait_for("the consumer drops orders", LIMIT, async || {
        seen_by(&consumer, &key("orders.apps.internal", 8080))
            .is_none()
            .then_some(())
    })
    .await;

    // The foreign Service is exactly as it was, and no request ever wrote to it.
    let foreign_after = s.api.get(Resource::Services, NS, &foreign_name).unwrap();
    assert_eq!(foreign_after, foreign_before);
    let writes = s.service_writes();
    assert!(
        !writes
            .iter()
            .any(|(_, verb, path)| verb != "create" && path.ends_with(&format!("/{foreign_name}"))),
        "{writes:?}"
    );
    // Everything written was written as the replica's own user.
    assert!(
        writes.iter().all(|(user, _, _)| user == "rs-a"),
        "{writes:?}"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_writes_and_a_killed_holder_hands_over_within_the_lease() {
    let s = Setup::new(&["rs-a", "rs-b"]).await;
    s.diego_routes(&[("orders.apps.internal", 8080)]);
    let (diego_addr, a_addr, b_addr) = (free_addr(), free_addr(), free_addr());
    let _diego = Replica::start("diego", s.diego_config(diego_addr, &[a_addr, b_addr]));
    // a first, so that it takes the Lease; then b.
    let mut a = s.k8s_config("rs-a", a_addr, diego_addr);
    wait_for("rs-a holds the Lease", LIMIT, async || {
        (a.metric("isthmus_route_sync_lease_leader ").await == 1.0).then_some(())
    })
    .await;
    let b = s.k8s_config("rs-b", b_addr, diego_addr);
    let stop = CancellationToken::new();
    let b_consumer = s.consumer(b_addr, &stop);

    let orders_name = mirror_name("orders.apps.internal");
    let orders = wait_for("the orders mirror Service", LIMIT, async || {
        s.mirrors().get(&orders_name).cloned()
    })
    .await;
    let ip = cluster_ip(&orders);
    // The reader serves the same addresses: it reads the Services the holder wrote.
    wait_for(
        "rs-b's consumer sees orders' mirror address",
        LIMIT,
        async || {
            (seen_by(&b_consumer, &key("orders.apps.internal", 8080))
                == Some((Some(ip), Some(ports(&orders)[&8080]))))
            .then_some(())
        },
    )
    .await;
    let text = b.status().await;
    assert!(
        text.contains("reader (Lease isthmus-route-sync held elsewhere)"),
        "{text}"
    );
    assert_eq!(b.metric("isthmus_route_sync_lease_leader ").await, 0.0);
    let writes = s.service_writes();
    assert!(!writes.is_empty());
    assert!(
        writes.iter().all(|(user, _, _)| user == "rs-a"),
        "{writes:?}"
    );

    // Kill the holder (no release); a new import must then be mirrored by rs-b within the
    // lease (rs-b watches the Lease and takes it when the last renewal expires), plus a
    // margin for the slow machine.
    a.kill();
    let killed = Instant::now();
    let before = s.api.requests().len();
    s.diego_routes(&[
        ("orders.apps.internal", 8080),
        ("billing.apps.internal", 8080),
    ]);
    let billing_name = mirror_name("billing.apps.internal");
    wait_for(
        "rs-b mirrors billing after rs-a was killed",
        LIMIT,
        async || s.mirrors().contains_key(&billing_name).then_some(()),
    )
    .await;
    let handover = killed.elapsed();
    eprintln!("hand-over {handover:?} after the holder was killed (lease {LEASE:?})");
    assert!(
        handover <= LEASE + Duration::from_secs(1),
        "hand-over took {handover:?} (lease {LEASE:?})"
    );
    let later: Vec<_> = s.api.requests()[before..]
        .iter()
        .filter(|r| r.path.contains("/services"))
        .cloned()
        .collect();
    assert!(
        !later.is_empty() && later.iter().all(|r| r.user == "rs-b"),
        "{later:?}"
    );
    // No duplicates, and orders' Service was kept (same ClusterIP), not made again.
    let mirrors = s.mirrors();
    assert_eq!(mirrors.keys().cloned().collect::<Vec<_>>(), {
        let mut v = vec![orders_name.clone(), billing_name.clone()];
        v.sort();
        v
    });
    assert_eq!(cluster_ip(&mirrors[&orders_name]), ip);
    let text = b.status().await;
    assert!(
        text.contains("writer (holds Lease isthmus-route-sync)"),
        "{text}"
    );
    let lease = s
        .api
        .get(Resource::Leases, NS, "isthmus-route-sync")
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "rs-b");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_holder_releases_the_lease_and_the_other_writes_before_it_would_expire() {
    let s = Setup::new(&["rs-a", "rs-b"]).await;
    s.diego_routes(&[("orders.apps.internal", 8080)]);
    let (diego_addr, a_addr, b_addr) = (free_addr(), free_addr(), free_addr());
    let _diego = Replica::start("diego", s.diego_config(diego_addr, &[a_addr, b_addr]));
    let mut a = s.k8s_config("rs-a", a_addr, diego_addr);
    wait_for("rs-a holds the Lease", LIMIT, async || {
        (a.metric("isthmus_route_sync_lease_leader ").await == 1.0).then_some(())
    })
    .await;
    let b = s.k8s_config("rs-b", b_addr, diego_addr);
    let orders_name = mirror_name("orders.apps.internal");
    wait_for("the orders mirror Service", LIMIT, async || {
        s.mirrors().get(&orders_name).cloned()
    })
    .await;
    // b is up and reading before a goes.
    wait_for("rs-b lists the mirror Services", LIMIT, async || {
        b.status()
            .await
            .contains("1 Services in isthmus, reader")
            .then_some(())
    })
    .await;

    a.stop();
    let stopped = Instant::now();
    let lease = s
        .api
        .get(Resource::Leases, NS, "isthmus-route-sync")
        .unwrap();
    // Released on the way out, unless rs-b was already quicker.
    assert_ne!(lease["spec"]["holderIdentity"], "rs-a", "{lease}");
    wait_for("rs-b holds the Lease", LIMIT, async || {
        (b.metric("isthmus_route_sync_lease_leader ").await == 1.0).then_some(())
    })
    .await;
    // A released Lease is taken at the next attempt: sooner than the duration a claim of a
    // killed holder must be waited out.
    assert!(
        stopped.elapsed() < LEASE,
        "took {:?} after a graceful stop (lease {LEASE:?})",
        stopped.elapsed()
    );
    s.diego_routes(&[
        ("orders.apps.internal", 8080),
        ("billing.apps.internal", 8080),
    ]);
    let billing_name = mirror_name("billing.apps.internal");
    wait_for("rs-b mirrors billing", LIMIT, async || {
        s.mirrors().contains_key(&billing_name).then_some(())
    })
    .await;
    assert_eq!(s.mirrors().len(), 2);
}
