//! Root mode: each cluster in its own network namespace, joined only by a veth pair that
//! carries the route-sync and ingress addresses. Proves a client in one cluster reaches the
//! other cluster's apps only through the gateways, and that the migration still fails no
//! call there.
//!
//! This test needs root (CI runs as root). Anywhere else it FAILS, saying why: it is never
//! skipped silently.

mod common;

use common::*;
use isthmus_tests::world::client;
use isthmus_tests::world::net::Cluster;
use isthmus_tests::world::scenario::{self, Pace};
use isthmus_tests::world::{App, Transport};

#[test]
fn namespaces_isolate_the_clusters_and_the_gateways_connect_them() {
    let _one = serial();
    runtime().block_on(async {
        let (mut world, _dir) = start(60, Transport::Tcp, true).await;
        scenario::seed(&mut world, &Pace::quick()).await.unwrap();
        let (diego, k8s) = (Cluster::Diego, Cluster::K8s);
        let echo = world.instance_addr(k8s, App::Echo);

        // Inside k8s, the echo instance answers at its own address...
        world
            .net(k8s)
            .run(client::call_echo(echo, "echo"))
            .await
            .expect("echo answers inside k8s");
        // ...which from diego is not reachable at all.
        let direct = world.net(diego).run(client::call_echo(echo, "echo")).await;
        assert!(
            direct.is_err(),
            "diego reached k8s's echo instance {echo} directly: namespaces do not isolate"
        );
        // Nor is k8s's platform resolver, nor its shim.
        let shim = world.shim_addr(k8s);
        let name = App::Echo.host();
        let lookup = world
            .net(diego)
            .run(async move { client::lookup(shim, &name).await })
            .await;
        assert!(lookup.is_err(), "diego reached k8s's DNS shim {shim}");

        // By name, through diego's shim and egress and k8s's ingress, it works.
        let caller = world.caller(diego, App::Echo);
        world
            .net(diego)
            .run(async move { caller.call().await })
            .await
            .expect("diego calls echo by name through the gateways");

        // And the whole migration, across namespaces, fails no call.
        let walked = scenario::walk(&mut world, Pace::quick(), say())
            .await
            .unwrap();
        let table = scenario::table(&walked.rows);
        eprintln!("{table}");
        let failures: usize = walked.rows.iter().map(|r| r.failures).sum();
        assert_eq!(failures, 0, "failed calls across namespaces:\n{table}");
        served_only_by(&walked.rows, 3, "diego → orders", "k8s");
        world.shutdown().await;
    });
}
