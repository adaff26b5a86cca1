//! route-sync at scale: two clusters' route-sync nodes and a consumer, in one process, over
//! real mTLS gRPC on loopback.
//!
//! `cargo run --release -p isthmus-route-sync --example bench -- [--routes 250000] [--json PATH]`
//!
//! Measures: initial sync of N routes from the source in one cluster to a consumer (a
//! gateway's table) in the other; single-change propagation p50/p99 with N routes loaded;
//! 1,000 changes per second sustained (lag at the start vs the end); RSS of the process
//! holding both nodes and the consumer (three full tables).

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use isthmus_certs::ca::{LeafSpec, MeshCa};
use isthmus_certs::{MeshTls, TrustBundle};
use isthmus_route_sync::client::RouteSyncSource;
use isthmus_route_sync::node::{Node, NodeSettings, PeerSpec};
use isthmus_route_sync::{Backend, ClusterName, Protocol, Route, RouteKey, RouteName, RouteStore};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn tls(ca: &MeshCa, cluster: &str, component: &str) -> MeshTls {
    let leaf = ca
        .issue(&LeafSpec::new(
            cluster,
            component,
            Duration::from_secs(3600),
        ))
        .unwrap();
    MeshTls::new(
        leaf.identity().unwrap(),
        TrustBundle::from_pem(ca.cert_pem().as_bytes()).unwrap(),
    )
}

fn route(i: usize, marker: u32) -> Route {
    // The change marker rides in a weight (weights cross clusters, backends do not). Loaded
    // routes carry none, as most real routes; only changed ones do.
    let mut weights = BTreeMap::new();
    if marker > 1 {
        weights.insert(ClusterName::parse("diego").unwrap(), marker);
    }
    Route {
        key: RouteKey::new(
            RouteName::parse(&format!("app-{i}.apps.internal")).unwrap(),
            8080,
        ),
        protocol: Protocol::Http,
        home_cluster: ClusterName::parse("diego").unwrap(),
        exported: true,
        allowed_peers: vec![isthmus_route_sync::PeerSelector::parse("cluster:k8s").unwrap()],
        backends: vec![
            Backend::parse(&format!(
                "10.{}.{}.{}:8080",
                i >> 16 & 255,
                i >> 8 & 255,
                i & 255
            ))
            .unwrap(),
        ],
        weights,
        revision: 0,
    }
}

fn marker(store: &RouteStore, i: usize) -> Option<u32> {
    let key = RouteKey::new(
        RouteName::parse(&format!("app-{i}.apps.internal")).unwrap(),
        8080,
    );
    store
        .snapshot()
        .get(&key)
        .map(|r| r.weights.values().next().copied().unwrap_or(1))
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_string)
        })
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let n: usize = arg("--routes")
        .and_then(|s| s.parse().ok())
        .unwrap_or(250_000);
    let json = arg("--json");
    let ca = MeshCa::generate("mesh.local").unwrap();
    let (ld, lk) = (
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    let (ad, ak) = (ld.local_addr().unwrap(), lk.local_addr().unwrap());
    let settings = |cluster: &str, peer: &str, addr| NodeSettings {
        cluster: ClusterName::parse(cluster).unwrap(),
        trust_domain: "mesh.local".into(),
        tls: tls(&ca, cluster, "route-sync"),
        peers: vec![PeerSpec {
            cluster: ClusterName::parse(peer).unwrap(),
            endpoints: vec![addr],
        }],
        state_dir: None,
        handshake_timeout: Duration::from_secs(5),
    };
    let diego = Node::with_listener(settings("diego", "k8s", ak), ld);
    let k8s = Node::with_listener(settings("k8s", "diego", ad), lk);
    diego.handle().local_loaded();
    k8s.handle().local_loaded();
    let source = diego.local_store();
    let cancel = CancellationToken::new();
    tokio::spawn(diego.run(cancel.clone()));
    tokio::spawn(k8s.run(cancel.clone()));
    let consumer = RouteStore::new();
    RouteSyncSource {
        cluster: ClusterName::parse("k8s").unwrap(),
        trust_domain: "mesh.local".into(),
        endpoints: vec![ak],
        tls: tls(&ca, "k8s", "gateway"),
        cache: None,
    }
    .spawn(consumer.clone(), cancel.clone());
    let rss_before = rss_mib();

    // 1. Initial sync.
    let routes: Vec<Route> = (0..n).map(|i| route(i, 1)).collect();
    let start = Instant::now();
    source.replace_all(routes);
    let mut watch = consumer.subscribe();
    while consumer.snapshot().len() < n {
        let _ = tokio::time::timeout(Duration::from_secs(60), watch.changed()).await;
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "initial sync did not finish"
        );
    }
    let initial = start.elapsed().as_secs_f64();
    let rss_loaded = rss_mib();

    eprintln!("initial sync {initial:.2}s");
    // 2. One change at a time, propagation to the consumer in the other cluster.
    let mut lat = Vec::new();
    for k in 0..300 {
        let i = (k * 7919) % n;
        let m = 10 + k as u32;
        let t = Instant::now();
        source.apply([route(i, m)], []);
        while marker(&consumer, i) != Some(m) {
            let _ = tokio::time::timeout(Duration::from_millis(50), watch.changed()).await;
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&lat, 0.50), percentile(&lat, 0.99));

    eprintln!("changes p99 {p99:.1}");
    // 3. 1,000 changes per second for 10 s, 10 every 10 ms; lag of every 10th change.
    let seconds = 10;
    let sent: std::sync::Arc<std::sync::Mutex<Vec<(usize, u32, Instant)>>> = Default::default();
    let producer = {
        let source = source.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut seq = 1000u32;
            for _ in 0..seconds * 100 {
                tick.tick().await;
                let batch: Vec<Route> = (0..10)
                    .map(|j| {
                        seq += 1;
                        route((seq as usize * 104_729 + j) % n, seq)
                    })
                    .collect();
                let probe = (
                    batch[0].key.name.as_str()[4..]
                        .split('.')
                        .next()
                        .unwrap()
                        .parse::<usize>()
                        .unwrap(),
                    seq - 9,
                );
                source.apply(batch, []);
                sent.lock()
                    .unwrap()
                    .push((probe.0, probe.1, Instant::now()));
            }
        })
    };
    let mut lags: Vec<(f64, f64)> = Vec::new();
    let t0 = Instant::now();
    let mut next = 0;
    loop {
        let pending: Vec<(usize, u32, Instant)> = sent.lock().unwrap()[next..].to_vec();
        for (i, m, at) in pending {
            while marker(&consumer, i).is_none_or(|v| v < m) {
                let _ = tokio::time::timeout(Duration::from_millis(20), watch.changed()).await;
                if at.elapsed() > Duration::from_secs(30) {
                    break;
                }
            }
            lags.push((
                at.duration_since(t0).as_secs_f64(),
                at.elapsed().as_secs_f64() * 1000.0,
            ));
            next += 1;
        }
        if producer.is_finished() && next == sent.lock().unwrap().len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let window = |from: f64, to: f64| {
        let mut v: Vec<f64> = lags
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, l)| *l)
            .collect();
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.99)
    };
    let (early, late) = (
        window(0.0, 2.0),
        window(seconds as f64 - 2.0, seconds as f64),
    );
    let elapsed = t0.elapsed().as_secs_f64();
    let rate = (seconds * 1000) as f64 / elapsed.max(seconds as f64);
    let rss_end = rss_mib();
    cancel.cancel();

    println!(
        "route-sync benchmark: {n} routes, two nodes + one consumer in one process, {} cores",
        std::thread::available_parallelism().map_or(0, |c| c.get())
    );
    println!("| metric | measured | target | verdict |");
    println!("|---|---|---|---|");
    let row = |m: &str, v: String, t: &str, ok: bool| {
        println!("| {m} | {v} | {t} | {} |", if ok { "PASS" } else { "MISS" })
    };
    row(
        "initial sync to the other cluster's consumer",
        format!("{initial:.2} s"),
        "<= 5 s",
        initial <= 5.0,
    );
    row(
        "one change, source -> remote consumer, p50",
        format!("{p50:.1} ms"),
        "-",
        true,
    );
    row(
        "one change, source -> remote consumer, p99",
        format!("{p99:.1} ms"),
        "<= 200 ms",
        p99 <= 200.0,
    );
    row(
        "sustained changes/s",
        format!("{rate:.0}"),
        ">= 1000",
        rate >= 990.0,
    );
    row(
        "lag p99, first 2 s vs last 2 s",
        format!("{early:.1} ms vs {late:.1} ms"),
        "not growing",
        late <= early.max(50.0) * 2.0,
    );
    row(
        "RSS, whole process (3 tables)",
        format!("{rss_end:.0} MiB (idle {rss_before:.0}, loaded {rss_loaded:.0})"),
        "<= 300 MiB per route-sync",
        rss_end <= 300.0,
    );
    if let Some(path) = json {
        let out = format!(
            "{{\"routes\":{n},\"initial_sync_s\":{initial:.3},\"change_p50_ms\":{p50:.2},\"change_p99_ms\":{p99:.2},\"sustained_changes_per_s\":{rate:.1},\"lag_p99_first_ms\":{early:.2},\"lag_p99_last_ms\":{late:.2},\"rss_mib\":{rss_end:.1}}}\n"
        );
        std::fs::write(&path, out).unwrap();
        println!("wrote {path}");
    }
}
