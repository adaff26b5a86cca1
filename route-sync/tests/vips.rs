//! One VIP allocation per cluster, made by route-sync and carried with each route: names
//! churned between clusters keep their VIP while they exist, never share one, and keep it
//! across a route-sync restart.

mod common;

use common::{TD, c, eventually, tls};

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_certs::ca::MeshCa;
use isthmus_route_sync::client::RouteSyncSource;
use isthmus_route_sync::node::{Node, NodeHandle, NodeSettings, PeerSpec, VipSettings};
use isthmus_route_sync::vip::VipRange;
use isthmus_route_sync::{
    PeerSelector, Protocol, Route, RouteKey, RouteName, RouteStore, RouteTable,
};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const RANGE: &str = "10.200.0.0/16";

fn route(name: &str, port: u16, home: &str) -> Route {
    Route {
        key: RouteKey::new(RouteName::parse(name).unwrap(), port),
        protocol: Protocol::Http,
        home_cluster: c(home),
        exported: true,
        allowed_peers: vec![
            PeerSelector::parse("cluster:k8s").unwrap(),
            PeerSelector::parse("cluster:diego").unwrap(),
        ],
        backends: vec![],
        weights: Default::default(),
        // What a source claims is never what is served: only the node's allocation counts.
        vip: Some("192.0.2.1".parse().unwrap()),
        egress_port: None,
        revision: 0,
    }
}

struct Running {
    local: RouteStore,
    merged: RouteStore,
    handle: NodeHandle,
    addr: SocketAddr,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.cancel.cancel();
        timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

fn start(
    ca: &MeshCa,
    cluster: &str,
    listener: TcpListener,
    peer: (&str, SocketAddr),
    vips: Option<VipSettings>,
    state_dir: Option<PathBuf>,
) -> Running {
    let settings = NodeSettings {
        cluster: c(cluster),
        trust_domain: TD.into(),
        tls: tls(ca, cluster, "route-sync"),
        peers: vec![PeerSpec {
            cluster: c(peer.0),
            endpoints: vec![peer.1],
        }],
        state_dir,
        handshake_timeout: Duration::from_secs(5),
        vips,
        limits: Default::default(),
        keepalive: Default::default(),
    };
    let node = Node::with_listener(settings, listener);
    node.handle().local_loaded();
    let cancel = CancellationToken::new();
    Running {
        local: node.local_store(),
        merged: node.merged_store(),
        handle: node.handle(),
        addr: node.local_addr().unwrap(),
        cancel: cancel.clone(),
        task: tokio::spawn(node.run(cancel)),
    }
}

/// What the consumer checked: the first VIP seen for every name, and any violation.
#[derive(Default)]
struct Seen {
    vip_of: HashMap<RouteName, IpAddr>,
    tables: u64,
    violations: Vec<String>,
}

/// Checks one table: every route has a VIP in the range, a name's ports share it, no two
/// names share one, and a name's VIP is the one it had before (the hold outlasts the test,
/// so a name that left and came back gets its VIP back too).
fn check(table: &RouteTable, range: &VipRange, seen: &mut Seen) {
    seen.tables += 1;
    let mut owner: HashMap<IpAddr, &RouteName> = HashMap::new();
    for r in table.iter() {
        let Some(vip) = r.vip else {
            seen.violations.push(format!("{} has no VIP", r.key));
            continue;
        };
        if !range.contains(vip) {
            seen.violations
                .push(format!("{} has {vip}, outside {range}", r.key));
        }
        if let Some(other) = owner.insert(vip, &r.key.name)
            && *other != r.key.name
        {
            seen.violations
                .push(format!("{vip} names both {other} and {}", r.key.name));
        }
        match seen.vip_of.get(&r.key.name) {
            Some(before) if *before != vip => seen
                .violations
                .push(format!("{} moved from {before} to {vip}", r.key)),
            Some(_) => {}
            None => {
                seen.vip_of.insert(r.key.name.clone(), vip);
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Home {
    Absent,
    Diego,
    K8s,
    /// Offered by both clusters (a move half done: k8s's local route wins at k8s).
    Both,
}

/// xorshift64: a deterministic churn without a crate.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn routes_of(name: &str, home: &str, i: usize) -> Vec<Route> {
    // Every fifth name has a second port: both carry the name's one VIP.
    let mut routes = vec![route(name, 8080, home)];
    if i.is_multiple_of(5) {
        routes.push(route(name, 9090, home));
    }
    routes
}

fn keys_of(name: &str, i: usize) -> Vec<RouteKey> {
    routes_of(name, "k8s", i)
        .into_iter()
        .map(|r| r.key)
        .collect()
}

#[tokio::test]
async fn names_keep_one_unshared_vip_through_churn_moves_and_a_restart() {
    const NAMES: usize = 2000;
    let ca = MeshCa::generate(TD).unwrap();
    let state = tempfile::tempdir().unwrap();
    let range = VipRange::parse(RANGE).unwrap();
    let vips = Some(VipSettings {
        range,
        hold: Duration::from_secs(3600),
    });
    let (ld, lk) = (
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    let (ad, ak) = (ld.local_addr().unwrap(), lk.local_addr().unwrap());
    let diego = start(&ca, "diego", ld, ("k8s", ak), None, None);
    let k8s = start(
        &ca,
        "k8s",
        lk,
        ("diego", ad),
        vips,
        Some(state.path().into()),
    );

    // The consumer: a k8s gateway following k8s's route-sync, checking every table.
    let store = RouteStore::new();
    let cancel = CancellationToken::new();
    let source = RouteSyncSource {
        cluster: c("k8s"),
        trust_domain: TD.into(),
        endpoints: vec![k8s.addr],
        tls: tls(&ca, "k8s", "gateway"),
        cache: None,
    };
    let _ = source.spawn(store.clone(), cancel.clone());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let checker = {
        let seen = Arc::clone(&seen);
        let mut watch = store.subscribe();
        tokio::spawn(async move {
            loop {
                let table = watch.changed().await;
                check(&table, &range, &mut seen.lock().unwrap());
            }
        })
    };

    let names: Vec<String> = (0..NAMES)
        .map(|i| format!("svc-{i}.apps.internal"))
        .collect();
    let mut homes = vec![Home::Absent; NAMES];
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    for step in 0..40 {
        let (mut d_up, mut d_rm, mut k_up, mut k_rm) = (vec![], vec![], vec![], vec![]);
        let changes = if step == 0 { NAMES } else { 150 };
        let mut picked = std::collections::HashSet::new();
        for _ in 0..changes {
            let i = if step == 0 {
                homes.iter().position(|h| *h == Home::Absent).unwrap_or(0)
            } else {
                rng.below(NAMES)
            };
            // One change per name and step: a store applies removals before upserts.
            if !picked.insert(i) {
                continue;
            }
            let next = match (homes[i], rng.below(4)) {
                (Home::Absent, 0 | 1) => Home::Diego,
                (Home::Absent, _) => Home::K8s,
                // A move in the runbook's order: offered by both first.
                (Home::Diego | Home::K8s, 0) => Home::Both,
                (Home::Diego, 1) => Home::K8s,
                (Home::K8s, 1) => Home::Diego,
                (Home::Diego | Home::K8s, _) => Home::Absent,
                (Home::Both, 0 | 1) => Home::K8s,
                (Home::Both, _) => Home::Diego,
            };
            let in_diego = matches!(next, Home::Diego | Home::Both);
            let in_k8s = matches!(next, Home::K8s | Home::Both);
            if in_diego {
                d_up.extend(routes_of(&names[i], "diego", i));
            } else {
                d_rm.extend(keys_of(&names[i], i));
            }
            if in_k8s {
                k_up.extend(routes_of(&names[i], "k8s", i));
            } else {
                k_rm.extend(keys_of(&names[i], i));
            }
            homes[i] = next;
        }
        diego.local.apply(d_up, d_rm);
        k8s.local.apply(k_up, k_rm);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Converged: the consumer holds exactly the names that exist, each with its VIP.
    let expected: usize = homes
        .iter()
        .enumerate()
        .filter(|(_, h)| **h != Home::Absent)
        .map(|(i, _)| if i.is_multiple_of(5) { 2 } else { 1 })
        .sum();
    let ok = |t: &RouteTable| {
        t.len() == expected
            && t.iter().all(|r| {
                let i: usize = r.key.name.as_str()[4..]
                    .split('.')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                match homes[i] {
                    Home::Diego => r.home_cluster.as_str() == "diego",
                    Home::K8s | Home::Both => r.home_cluster.as_str() == "k8s",
                    Home::Absent => false,
                }
            })
    };
    let converged = timeout(Duration::from_secs(20), async {
        while !ok(&store.snapshot()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if converged.is_err() {
        let t = store.snapshot();
        let m = k8s.merged.snapshot();
        panic!(
            "not converged: consumer {} merged {} expected {}; local k8s {} diego {}; status {:?}",
            t.len(),
            m.len(),
            expected,
            k8s.local.snapshot().len(),
            diego.local.snapshot().len(),
            k8s.handle.status()
        );
    }
    {
        let s = seen.lock().unwrap();
        assert!(
            s.violations.is_empty(),
            "{:#?}",
            &s.violations[..s.violations.len().min(20)]
        );
        assert!(
            s.tables > 10,
            "the consumer saw the churn ({} tables)",
            s.tables
        );
        assert!(
            s.vip_of.len() >= NAMES * 9 / 10,
            "{} names seen",
            s.vip_of.len()
        );
    }
    let status = k8s.handle.status();
    let vs = status.vips.expect("status shows the VIPs");
    assert_eq!(vs.range, RANGE);
    let live = homes.iter().filter(|h| **h != Home::Absent).count() as u64;
    assert_eq!(vs.assigned, live);
    assert_eq!(vs.exhausted, 0);
    assert_eq!(vs.assigned + vs.held + vs.free, 65_534);
    assert!(vs.held > 0, "names that left hold their VIPs");

    // A restart with the same state_dir: every VIP stays, held ones stay held.
    let before: HashMap<RouteKey, Option<IpAddr>> = k8s
        .merged
        .snapshot()
        .iter()
        .map(|r| (r.key.clone(), r.vip))
        .collect();
    k8s.stop().await;
    let k8s = start(
        &ca,
        "k8s",
        TcpListener::bind(ak).await.unwrap(),
        ("diego", ad),
        vips,
        Some(state.path().into()),
    );
    // Before any peer or source answered: the restored table with its VIPs.
    let restored: HashMap<RouteKey, Option<IpAddr>> = k8s
        .merged
        .snapshot()
        .iter()
        .map(|r| (r.key.clone(), r.vip))
        .collect();
    assert_eq!(restored, before, "every VIP survives the restart");
    assert_eq!(k8s.handle.status().vips.unwrap().held, vs.held);
    // And a name that left before the restart gets its old VIP back when it returns.
    let returning = homes.iter().position(|h| *h == Home::Absent).unwrap();
    let name = RouteName::parse(&names[returning]).unwrap();
    let old = seen.lock().unwrap().vip_of.get(&name).copied();
    k8s.local
        .apply(routes_of(&names[returning], "k8s", returning), []);
    eventually(
        "the name is back at the consumer",
        Duration::from_secs(10),
        || {
            store
                .snapshot()
                .by_route_name(&name)
                .first()
                .is_some_and(|r| r.vip.is_some())
        },
    )
    .await;
    if let Some(old) = old {
        assert_eq!(store.snapshot().by_route_name(&name)[0].vip, Some(old));
    }
    assert!(seen.lock().unwrap().violations.is_empty());

    checker.abort();
    cancel.cancel();
    diego.stop().await;
    k8s.stop().await;
}

#[tokio::test]
async fn without_a_range_routes_carry_no_vip_whatever_the_source_says() {
    let ca = MeshCa::generate(TD).unwrap();
    let (ld, lk) = (
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    let (ad, ak) = (ld.local_addr().unwrap(), lk.local_addr().unwrap());
    let diego = start(&ca, "diego", ld, ("k8s", ak), None, None);
    let k8s = start(&ca, "k8s", lk, ("diego", ad), None, None);
    diego
        .local
        .apply(routes_of("a.apps.internal", "diego", 1), []);
    k8s.local.apply(routes_of("b.apps.internal", "k8s", 1), []);
    eventually("both routes at k8s", Duration::from_secs(5), || {
        k8s.merged.snapshot().len() == 2
    })
    .await;
    assert!(k8s.merged.snapshot().iter().all(|r| r.vip.is_none()));
    assert!(k8s.handle.status().vips.is_none());
    diego.stop().await;
    k8s.stop().await;
}
