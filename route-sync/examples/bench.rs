//! route-sync at scale: two clusters' route-sync nodes, each in its own OS process, and a
//! consumer (a gateway's table) in the benchmark process, over real mTLS gRPC on loopback.
//!
//! `cargo run --release -p isthmus-route-sync --example bench -- [--routes 250000] [--json PATH] [--persist]`
//!
//! The benchmark re-executes itself (with a hidden first argument) to run the "diego" node
//! (the source cluster: N exported routes) and the "k8s" node (its peer); certificates are
//! issued by a fresh mesh CA into a temporary directory and loaded from files, as the binary
//! does. The diego process holds its whole table as in production: it builds the N routes
//! itself, as a source would, and on `load` writes them into the node's local store, the
//! store every source writes into; afterwards it applies each change the benchmark process
//! sends it over stdin. The benchmark process keeps the consumer: a `RouteSyncSource` that
//! follows the k8s node with a k8s gateway's identity. `--persist` gives both nodes a
//! `state_dir` and the consumer a `cache` (last known good on disk), as a production
//! configuration may.
//!
//! Measures:
//! - initial sync of N routes from the source to the peer node, and on to the consumer;
//! - single-change propagation p50/p99 (source -> consumer in the other cluster), N loaded;
//! - 1,000 changes per second sustained for 10 s (lag p99 in the first vs the last 2 s);
//!   change timings start when the benchmark process writes the change to the diego
//!   process's stdin, so they include that hop;
//! - memory of each route-sync process, from `/proc/<pid>/status`: VmRSS when ready (diego
//!   then holds the N routes it is about to load), right after the initial sync and at the
//!   end, and VmHWM, the peak over the run, which the 300 MB target is checked against; and
//!   the benchmark process's own RSS (the consumer's table).
//!
//! `--json PATH` writes the same numbers: the fields of the one-process benchmark this
//! replaces (`rss_mib` is now the sum of the three processes at the end), plus
//! `peer_sync_s`, `source_load_s`, `persist` and `processes.{diego,k8s,bench}` with
//! `rss_ready_mib`, `rss_synced_mib`, `hwm_synced_mib`, `rss_end_mib` and `hwm_end_mib`.
//!
//! Every process uses mimalloc (this example's global allocator).

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use isthmus_certs::ca::{LeafSpec, MeshCa};
use isthmus_certs::{MeshTls, TlsFiles};
use isthmus_route_sync::client::RouteSyncSource;
use isthmus_route_sync::node::{Node, NodeSettings, PeerSpec};
use isthmus_route_sync::{Backend, ClusterName, Protocol, Route, RouteKey, RouteName, RouteStore};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The hidden first argument that makes this executable a route-sync node.
const NODE_ROLE: &str = "__route-sync-node";
const TRUST_DOMAIN: &str = "mesh.local";
/// Time allowed for any one step before the benchmark gives up.
const STEP: Duration = Duration::from_secs(120);

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
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
        vip: None,
        egress_port: None,
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

/// VmRSS and VmHWM of a process, in MiB.
#[derive(Debug, Clone, Copy, Default)]
struct Mem {
    rss: f64,
    hwm: f64,
}

impl Mem {
    fn of(pid: &str) -> Mem {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .map(|kib| kib / 1024.0)
                .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        };
        Mem {
            rss: field("VmRSS:"),
            hwm: field("VmHWM:"),
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if args.get(1).map(String::as_str) == Some(NODE_ROLE) {
        runtime.block_on(node_process(&args[2..]));
    } else {
        runtime.block_on(bench(&args));
    }
}

// ---- The node processes ---------------------------------------------------------------------

/// One route-sync node, driven over stdin and reporting on stdout, one line each:
/// it prints `addr ADDR`, reads `peer ADDR`, prints `ready`; then `load` writes the routes it
/// built into its local store (prints `loaded`), `set I:M ...` applies changed routes, and
/// end of input stops it. With `--expect N` it prints `synced` once its merged table holds N.
async fn node_process(args: &[String]) {
    let cluster = arg(args, "--cluster").expect("--cluster");
    let peer = arg(args, "--peer").expect("--peer");
    let certs = PathBuf::from(arg(args, "--certs").expect("--certs"));
    let routes: Option<usize> = arg(args, "--routes").map(|s| s.parse().unwrap());
    let expect: Option<usize> = arg(args, "--expect").map(|s| s.parse().unwrap());
    let state_dir = arg(args, "--state-dir").map(PathBuf::from);

    let tls = MeshTls::load(&TlsFiles {
        cert: certs.join("cert.pem"),
        key: certs.join("key.pem"),
        bundle: certs.join("ca.pem"),
    })
    .expect("loading the node's certificates");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("addr {}", listener.local_addr().unwrap());
    let mut input = BufReader::new(tokio::io::stdin()).lines();
    let line = input.next_line().await.unwrap().expect("peer address");
    let peer_addr = line
        .strip_prefix("peer ")
        .expect("peer ADDR")
        .parse()
        .unwrap();
    let settings = NodeSettings {
        cluster: ClusterName::parse(&cluster).unwrap(),
        trust_domain: TRUST_DOMAIN.into(),
        tls,
        peers: vec![PeerSpec {
            cluster: ClusterName::parse(&peer).unwrap(),
            endpoints: vec![peer_addr],
        }],
        state_dir,
        handshake_timeout: Duration::from_secs(5),
        vips: None,
        limits: Default::default(),
        keepalive: Default::default(),
    };
    let node = Node::with_listener(settings, listener);
    node.handle().local_loaded();
    let local = node.local_store();
    let merged = node.merged_store();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(node.run(cancel.clone()));
    if let Some(expect) = expect {
        tokio::spawn(async move {
            let mut watch = merged.subscribe();
            while watch.current().len() < expect {
                watch.changed().await;
            }
            println!("synced");
        });
    }
    // Built before `ready`, as a source would have read them: the benchmark times their load
    // into the store and everything after it.
    let mut initial: Option<Vec<Route>> = routes.map(|n| (0..n).map(|i| route(i, 1)).collect());
    println!("ready");
    while let Ok(Some(line)) = input.next_line().await {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("load") => {
                local.replace_all(initial.take().unwrap_or_default());
                println!("loaded");
            }
            Some("set") => {
                let changed = words.map(|w| {
                    let (i, m) = w.split_once(':').expect("I:M");
                    route(i.parse().unwrap(), m.parse().unwrap())
                });
                local.apply(changed, []);
            }
            other => panic!("unknown command {other:?}"),
        }
    }
    cancel.cancel();
    let _ = task.await;
}

/// A node process as the benchmark sees it.
struct NodeProcess {
    name: &'static str,
    child: tokio::process::Child,
    pid: String,
    addr: std::net::SocketAddr,
    commands: Option<mpsc::UnboundedSender<String>>,
    events: mpsc::UnboundedReceiver<(String, Instant)>,
}

impl NodeProcess {
    fn spawn(name: &'static str, peer: &str, certs: &Path, extra: &[String]) -> NodeProcess {
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .arg(NODE_ROLE)
            .args(["--cluster", name, "--peer", peer])
            .arg("--certs")
            .arg(certs)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting a node process");
        let pid = child.id().expect("a running child").to_string();
        let (events_tx, events) = mpsc::unbounded_channel();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            // Each line is stamped when it arrives.
            while let Ok(Some(line)) = out.next_line().await {
                let _ = events_tx.send((line, Instant::now()));
            }
        });
        let (commands, mut rx) = mpsc::unbounded_channel::<String>();
        let mut stdin = child.stdin.take().unwrap();
        tokio::spawn(async move {
            while let Some(mut line) = rx.recv().await {
                line.push('\n');
                if stdin.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
            // Dropping stdin ends the node.
        });
        NodeProcess {
            name,
            child,
            pid,
            addr: ([0, 0, 0, 0], 0).into(),
            commands: Some(commands),
            events,
        }
    }

    /// Waits for the next line, which must start with `word`; returns its rest and arrival.
    async fn expect(&mut self, word: &str) -> (String, Instant) {
        let (line, at) = tokio::time::timeout(STEP, self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("{}: no `{word}` within {STEP:?}", self.name))
            .unwrap_or_else(|| panic!("{}: exited before `{word}`", self.name));
        let rest = line
            .strip_prefix(word)
            .unwrap_or_else(|| panic!("{}: expected `{word}`, got {line:?}", self.name));
        (rest.trim().to_string(), at)
    }

    fn send(&self, line: String) {
        self.commands
            .as_ref()
            .unwrap()
            .send(line)
            .expect("node process gone");
    }

    fn mem(&self) -> Mem {
        Mem::of(&self.pid)
    }

    async fn stop(mut self) {
        self.commands = None;
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(status) => panic!("{}: exited with {status:?}", self.name),
            Err(_) => {
                eprintln!("{}: did not stop within 10 s; killing it", self.name);
                let _ = self.child.kill().await;
            }
        }
    }
}

fn mesh_tls(ca: &MeshCa, cluster: &str, component: &str) -> MeshTls {
    ca.mesh_tls(&LeafSpec::new(
        cluster,
        component,
        Duration::from_secs(3600),
    ))
    .unwrap()
}

// ---- The benchmark process ------------------------------------------------------------------

async fn bench(args: &[String]) {
    let n: usize = arg(args, "--routes")
        .and_then(|s| s.parse().ok())
        .unwrap_or(250_000);
    let json = arg(args, "--json");
    let persist = args.iter().any(|a| a == "--persist");
    let dir = tempfile::tempdir().unwrap();
    let ca = MeshCa::generate(TRUST_DOMAIN).unwrap();
    for cluster in ["diego", "k8s"] {
        ca.issue(&LeafSpec::new(
            cluster,
            "route-sync",
            Duration::from_secs(3600),
        ))
        .unwrap()
        .write(&dir.path().join(cluster), &ca.cert_pem())
        .unwrap();
    }
    let state = |cluster: &str| {
        if persist {
            let state = dir.path().join(format!("{cluster}-state"));
            vec!["--state-dir".to_string(), state.display().to_string()]
        } else {
            Vec::new()
        }
    };
    let mut diego = NodeProcess::spawn(
        "diego",
        "k8s",
        &dir.path().join("diego"),
        &[vec!["--routes".into(), n.to_string()], state("diego")].concat(),
    );
    let mut k8s = NodeProcess::spawn(
        "k8s",
        "diego",
        &dir.path().join("k8s"),
        &[vec!["--expect".into(), n.to_string()], state("k8s")].concat(),
    );
    for node in [&mut diego, &mut k8s] {
        node.addr = node.expect("addr").await.0.parse().unwrap();
    }
    diego.send(format!("peer {}", k8s.addr));
    k8s.send(format!("peer {}", diego.addr));
    diego.expect("ready").await;
    k8s.expect("ready").await;
    let ready = (diego.mem(), k8s.mem(), Mem::of("self"));

    let cancel = CancellationToken::new();
    let consumer = RouteStore::new();
    RouteSyncSource {
        cluster: ClusterName::parse("k8s").unwrap(),
        trust_domain: TRUST_DOMAIN.into(),
        endpoints: vec![k8s.addr],
        tls: mesh_tls(&ca, "k8s", "gateway"),
        cache: persist.then(|| dir.path().join("consumer-routes.pb")),
    }
    .spawn(consumer.clone(), cancel.clone());

    // 1. Initial sync.
    let mut watch = consumer.subscribe();
    let start = Instant::now();
    diego.send("load".into());
    while consumer.snapshot().len() < n {
        let _ = tokio::time::timeout(Duration::from_secs(1), watch.changed()).await;
        assert!(start.elapsed() < STEP, "initial sync did not finish");
    }
    let initial = start.elapsed().as_secs_f64();
    let (_, loaded_at) = diego.expect("loaded").await;
    let (_, synced_at) = k8s.expect("synced").await;
    let (load_s, peer_s) = (
        loaded_at.duration_since(start).as_secs_f64(),
        synced_at.duration_since(start).as_secs_f64(),
    );
    let synced = (diego.mem(), k8s.mem(), Mem::of("self"));
    eprintln!(
        "initial sync: source store {load_s:.2} s, peer node {peer_s:.2} s, consumer {initial:.2} s"
    );

    // 2. One change at a time, propagation to the consumer in the other cluster.
    let mut lat = Vec::new();
    for k in 0..300 {
        let i = (k * 7919) % n;
        let m = 10 + k as u32;
        let t = Instant::now();
        diego.send(format!("set {i}:{m}"));
        while marker(&consumer, i) != Some(m) {
            let _ = tokio::time::timeout(Duration::from_millis(50), watch.changed()).await;
            assert!(t.elapsed() < STEP, "a change did not arrive");
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&lat, 0.50), percentile(&lat, 0.99));
    eprintln!("one change: p50 {p50:.1} ms, p99 {p99:.1} ms");

    // 3. 1,000 changes per second for 10 s, 10 every 10 ms; lag of the first of each batch.
    let seconds = 10;
    let sent: std::sync::Arc<std::sync::Mutex<Vec<(usize, u32, Instant)>>> = Default::default();
    let producer = {
        let commands = diego.commands.clone().unwrap();
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut seq = 1000u32;
            for _ in 0..seconds * 100 {
                tick.tick().await;
                let batch: Vec<(usize, u32)> = (0..10)
                    .map(|j| {
                        seq += 1;
                        ((seq as usize * 104_729 + j) % n, seq)
                    })
                    .collect();
                let line = batch.iter().fold(String::from("set"), |mut s, (i, m)| {
                    s.push_str(&format!(" {i}:{m}"));
                    s
                });
                let at = Instant::now();
                commands.send(line).expect("diego gone");
                sent.lock().unwrap().push((batch[0].0, batch[0].1, at));
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
    let end = (diego.mem(), k8s.mem(), Mem::of("self"));
    cancel.cancel();
    diego.stop().await;
    k8s.stop().await;

    println!(
        "route-sync benchmark: {n} routes; diego and k8s route-sync nodes in their own processes, \
         the consumer in the benchmark's; {} cores{}",
        std::thread::available_parallelism().map_or(0, |c| c.get()),
        if persist {
            "; state_dir and consumer cache on"
        } else {
            ""
        }
    );
    println!("| metric | measured | target | verdict |");
    println!("|---|---|---|---|");
    let row = |m: &str, v: String, t: &str, ok: bool| {
        let verdict = match (t, ok) {
            ("-", _) => "-",
            (_, true) => "PASS",
            (_, false) => "MISS",
        };
        println!("| {m} | {v} | {t} | {verdict} |")
    };
    row(
        "initial sync, source -> peer route-sync",
        format!("{peer_s:.2} s (source store loaded at {load_s:.2} s)"),
        "<= 5 s",
        peer_s <= 5.0,
    );
    row(
        "initial sync, source -> the other cluster's consumer",
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
    // 300 MB = 286.1 MiB.
    let limit = 300e6 / f64::from(1 << 20);
    for (name, role, ready, synced, end) in [
        ("diego", "source", ready.0, synced.0, end.0),
        ("k8s", "peer", ready.1, synced.1, end.1),
    ] {
        row(
            &format!("{name} route-sync ({role}) VmRSS: ready / synced / end"),
            format!("{:.0} / {:.0} / {:.0} MiB", ready.rss, synced.rss, end.rss),
            "-",
            true,
        );
        // VmHWM is the kernel's high-water mark; read twice, the larger is the peak.
        let peak = synced.hwm.max(end.hwm);
        row(
            &format!("{name} route-sync ({role}) peak, VmHWM over the run"),
            format!("{peak:.0} MiB"),
            "<= 300 MB (286 MiB)",
            peak <= limit,
        );
    }
    row(
        "benchmark process (consumer table, driver) VmRSS: synced / end",
        format!("{:.0} / {:.0} MiB", synced.2.rss, end.2.rss),
        "-",
        true,
    );
    if let Some(path) = json {
        let mem = |name: &str, r: Mem, s: Mem, e: Mem| {
            format!(
                "\"{name}\":{{\"rss_ready_mib\":{:.1},\"rss_synced_mib\":{:.1},\"hwm_synced_mib\":{:.1},\"rss_end_mib\":{:.1},\"hwm_end_mib\":{:.1}}}",
                r.rss, s.rss, s.hwm, e.rss, e.hwm
            )
        };
        // `rss_mib` keeps its old meaning, all three tables: now the sum of the processes.
        let total = end.0.rss + end.1.rss + end.2.rss;
        let out = format!(
            "{{\"routes\":{n},\"initial_sync_s\":{initial:.3},\"peer_sync_s\":{peer_s:.3},\"source_load_s\":{load_s:.3},\"change_p50_ms\":{p50:.2},\"change_p99_ms\":{p99:.2},\"sustained_changes_per_s\":{rate:.1},\"lag_p99_first_ms\":{early:.2},\"lag_p99_last_ms\":{late:.2},\"rss_mib\":{total:.1},\"persist\":{persist},\"processes\":{{{},{},{}}}}}\n",
            mem("diego", ready.0, synced.0, end.0),
            mem("k8s", ready.1, synced.1, end.1),
            mem("bench", ready.2, synced.2, end.2),
        );
        std::fs::write(&path, out).unwrap();
        println!("wrote {path}");
    }
}
