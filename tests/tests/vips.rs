//! One VIP allocation (issue 10 point 2), end to end: thousands of raw-TCP routes homed in
//! k8s churn while diego apps call them by name. diego's shim answers each name with the VIP
//! diego's route-sync assigned; diego's egress recognises the route only by that VIP and
//! tunnels to k8s, whose ingress dials the route's one backend. Every backend address is
//! distinct and the backend replies with the address it was reached on, so each call proves
//! which route the egress picked for the VIP the shim handed out. Then route-sync restarts and
//! every name keeps its VIP.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use isthmus_tests::world::client::lookup;
use isthmus_tests::world::net::Cluster;
use isthmus_tests::world::scenario::{self, Pace};
use isthmus_tests::world::{ExtraRoute, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Names in the table at once, and how many leave and arrive per round.
const NAMES: usize = 2_000;
const TURNOVER: usize = 250;
const ROUNDS: usize = 6;
/// Every churned route listens on this port (one VIP listener per name at diego's egress).
const PORT: u16 = 7000;

/// Route `i`'s name and its backend: `127.<id>.<64 + i / 250>.<1 + i % 250>:<backend port>`,
/// distinct per route, all accepted by one wildcard listener.
fn route(id: u8, i: usize, backend_port: u16) -> ExtraRoute {
    let backend = Ipv4Addr::new(127, id, 64 + (i / 250) as u8, 1 + (i % 250) as u8);
    ExtraRoute {
        name: format!("churn-{i}.apps.internal"),
        port: PORT,
        backend: SocketAddr::new(IpAddr::V4(backend), backend_port),
    }
}

/// Calls `vip:PORT` and returns the backend address that answered.
async fn call(vip: IpAddr) -> anyhow::Result<SocketAddr> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect((vip, PORT)),
    )
    .await??;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(3), async {
        s.write_all(b"who?\n").await?;
        s.shutdown().await?;
        s.read_to_string(&mut out).await
    })
    .await??;
    Ok(out.trim().parse()?)
}

#[test]
fn the_shims_vip_for_a_name_is_the_egress_route_for_that_vip_through_churn_and_restart() {
    let _one = serial();
    runtime().block_on(async {
        let (mut world, _dir) = start(120, Transport::Tcp, false).await;
        scenario::seed(&mut world, &Pace::quick()).await.unwrap();
        let (diego, k8s) = (Cluster::Diego, Cluster::K8s);
        let id = world.plan.id;

        // One backend for every churned route: it says which address it was dialled on.
        let listener = world
            .net(k8s)
            .run(async { tokio::net::TcpListener::bind("0.0.0.0:0").await })
            .await
            .unwrap();
        let backend_port = listener.local_addr().unwrap().port();
        world.net(k8s).spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(local) = s.local_addr() else { return };
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                    let _ = s.write_all(format!("{local}\n").as_bytes()).await;
                });
            }
        });

        let shim = world.shim_addr(diego);
        let range = world.vip_range(diego).expect("diego answers VIPs");
        // Every VIP diego's shim ever answered, and for which name: one name per VIP.
        let mut owner: HashMap<IpAddr, String> = HashMap::new();
        let mut vip_of: BTreeMap<String, IpAddr> = BTreeMap::new();
        let mut checked = 0usize;
        let mut next = 0usize;
        let mut live: Vec<usize> = Vec::new();
        for round in 0..=ROUNDS {
            // Round 0 loads NAMES routes; each later one replaces TURNOVER of them.
            let arriving = if round == 0 { NAMES } else { TURNOVER };
            if round > 0 {
                live.drain(..TURNOVER);
            }
            live.extend(next..next + arriving);
            next += arriving;
            let routes: Vec<ExtraRoute> =
                live.iter().map(|&i| route(id, i, backend_port)).collect();
            let by_backend: HashMap<SocketAddr, String> =
                routes.iter().map(|r| (r.backend, r.name.clone())).collect();
            world.set_extra_routes(k8s, routes).unwrap();

            // Call a sample of the live names (the newest, which are still arriving, and a
            // spread of the rest) until each answered: while the shim does not know a name
            // yet it forwards it (no answer from the platform resolver); once it answers a
            // VIP, that VIP must lead to that name's backend and to no other.
            let sample: Vec<usize> = live
                .iter()
                .rev()
                .take(40)
                .chain(live.iter().step_by(97))
                .copied()
                .collect();
            for i in sample {
                let name = format!("churn-{i}.apps.internal");
                let start = Instant::now();
                let vip = loop {
                    let n = name.clone();
                    let answered = world
                        .net(diego)
                        .run(async move { lookup(shim, &n).await })
                        .await;
                    match answered {
                        Ok(ip) => break ip,
                        Err(e) => assert!(
                            start.elapsed() < LIMIT,
                            "round {round}: diego's shim never answered {name}: {e:#}"
                        ),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                assert!(
                    range.contains(vip),
                    "{name} answered {vip}, outside {range}"
                );
                if let Some(other) = owner.insert(vip, name.clone())
                    && other != name
                {
                    panic!("round {round}: VIP {vip} answered for {other} and then for {name}");
                }
                if let Some(before) = vip_of.insert(name.clone(), vip) {
                    assert_eq!(
                        before, vip,
                        "round {round}: {name} changed VIP while it existed"
                    );
                }
                // A name the shim has just learnt may reach the egress a moment before the
                // egress has learnt it too and bound its VIP (the two follow route-sync on
                // streams of their own): refused, then served. Never another route.
                let start = Instant::now();
                let reached = loop {
                    match world.net(diego).run(call(vip)).await {
                        Ok(reached) => break reached,
                        Err(e) => assert!(
                            start.elapsed() < LIMIT,
                            "round {round}: {name} via VIP {vip} failed: {e:#}"
                        ),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                assert_eq!(
                    by_backend.get(&reached),
                    Some(&name),
                    "round {round}: VIP {vip} of {name} reached the backend {reached}"
                );
                checked += 1;
            }
        }
        eprintln!("{checked} calls by VIP, each reached the route its name names");

        // route-sync restarts (from its state directory): every name keeps its VIP.
        world.proc("diego/route-sync").kill();
        world.proc("diego/route-sync").start().unwrap();
        world.wait_ready("diego/route-sync", LIMIT).await.unwrap();
        let survivors: Vec<(String, IpAddr)> = vip_of
            .iter()
            .filter(|(name, _)| {
                live.iter()
                    .any(|&i| format!("churn-{i}.apps.internal") == **name)
            })
            .map(|(n, v)| (n.clone(), *v))
            .collect();
        assert!(!survivors.is_empty());
        // A new name after the restart takes a free VIP, not one a live name holds.
        let mut routes: Vec<ExtraRoute> =
            live.iter().map(|&i| route(id, i, backend_port)).collect();
        routes.push(route(id, next, backend_port));
        world.set_extra_routes(k8s, routes).unwrap();
        let newcomer = format!("churn-{next}.apps.internal");
        let start = Instant::now();
        let fresh = loop {
            let n = newcomer.clone();
            if let Ok(ip) = world
                .net(diego)
                .run(async move { lookup(shim, &n).await })
                .await
            {
                break ip;
            }
            assert!(
                start.elapsed() < LIMIT,
                "{newcomer} never answered after the restart"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        for (name, vip) in &survivors {
            let n = name.clone();
            let now = world
                .net(diego)
                .run(async move { lookup(shim, &n).await })
                .await
                .unwrap();
            assert_eq!(now, *vip, "{name} changed VIP across a route-sync restart");
            assert_ne!(fresh, *vip, "{newcomer} got {name}'s VIP after the restart");
        }
        let reached = world.net(diego).run(call(fresh)).await.unwrap();
        assert_eq!(reached, route(id, next, backend_port).backend);
        world.shutdown().await;
    });
}
