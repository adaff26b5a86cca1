//! Faults under load: an ingress replica killed, route-sync killed, certificates rotated.

mod common;

use std::time::{Duration, Instant};

use common::*;
use isthmus_tests::world::client::{Load, Recorder};
use isthmus_tests::world::net::Cluster;
use isthmus_tests::world::scenario::{self, Pace};
use isthmus_tests::world::{Answer, App, Transport, World};

/// Steady load from the scenario's four callers.
fn load(world: &World, recorder: &std::sync::Arc<Recorder>) -> Load {
    scenario::start_load(world, recorder, &Pace::quick())
}

/// Waits until every caller has finished `n` calls in `step`.
async fn calls(recorder: &Recorder, step: usize, n: usize) {
    let start = Instant::now();
    loop {
        let counts = recorder.counts(step);
        if counts.iter().all(|&c| c >= n) && !counts.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < LIMIT,
            "calls in step {step}: {counts:?}, wanted {n} each"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn failures_in(recorder: &Recorder, step: usize) -> (usize, String) {
    let rows: Vec<_> = recorder
        .summary()
        .into_iter()
        .filter(|r| r.step == step)
        .collect();
    (
        rows.iter().map(|r| r.failures).sum(),
        scenario::table(&rows),
    )
}

fn kill_an_ingress_replica(transport: Transport, base: u8) {
    let _one = serial();
    runtime().block_on(async {
        let (mut world, _dir) = start(base, transport, false).await;
        scenario::seed(&mut world, &Pace::quick()).await.unwrap();
        let recorder = Recorder::new();
        let running = load(&world, &recorder);
        calls(&recorder, 0, 20).await;

        // diego -> echo tunnels into k8s, whose first replica now dies mid-stream.
        recorder.set_step(1);
        world.proc("k8s/ingress-0").kill();
        let killed = Instant::now();
        // Calls begun more than a second after the kill must all succeed.
        tokio::time::sleep_until((killed + Duration::from_secs(1)).into()).await;
        recorder.set_step(2);
        calls(&recorder, 2, 20).await;
        // And past the pool's 2 s back-off, when the dead endpoint is probed again.
        recorder.set_step(3);
        calls(&recorder, 3, 150).await;
        running.stop().await;
        eprintln!("{}", scenario::table(&recorder.summary()));
        for step in [2, 3] {
            let (failed, table) = failures_in(&recorder, step);
            assert_eq!(failed, 0, "calls after the first second failed:\n{table}");
        }
        let (before, table) = failures_in(&recorder, 0);
        assert_eq!(before, 0, "calls before the kill failed:\n{table}");
        world.shutdown().await;
    });
}

#[test]
fn an_ingress_replica_killed_under_load_over_tcp() {
    kill_an_ingress_replica(Transport::Tcp, 190);
}

#[test]
fn an_ingress_replica_killed_under_load_over_quic() {
    kill_an_ingress_replica(Transport::Quic, 210);
}

#[test]
fn data_planes_keep_serving_while_route_sync_is_down() {
    let _one = serial();
    runtime().block_on(async {
        let (mut world, _dir) = start(230, Transport::Tcp, false).await;
        scenario::seed(&mut world, &Pace::quick()).await.unwrap();
        let recorder = Recorder::new();
        let running = load(&world, &recorder);
        calls(&recorder, 0, 20).await;

        recorder.set_step(1);
        world.proc("diego/route-sync").kill();
        world.proc("k8s/route-sync").kill();
        // Long enough for every consumer to notice its stream broke and retry a few times.
        calls(&recorder, 1, 60).await;
        let (failed, table) = failures_in(&recorder, 1);
        assert_eq!(
            failed, 0,
            "calls failed while route-sync was down:\n{table}"
        );

        // Back up: consumers resume, and a change flows again.
        recorder.set_step(2);
        world.proc("diego/route-sync").start().unwrap();
        world.proc("k8s/route-sync").start().unwrap();
        world.wait_ready("diego/route-sync", LIMIT).await.unwrap();
        world.wait_ready("k8s/route-sync", LIMIT).await.unwrap();
        world.start_app(Cluster::K8s, App::Orders).await.unwrap();
        world.export(Cluster::K8s, App::Orders).await.unwrap();
        world
            .wait_answer(Cluster::K8s, App::Orders, Answer::Local, LIMIT)
            .await
            .unwrap();
        world
            .wait_route_count(Cluster::Diego, "k8s", 2, LIMIT)
            .await
            .unwrap();
        calls(&recorder, 2, 20).await;
        running.stop().await;
        let (failed, table) = failures_in(&recorder, 2);
        assert_eq!(
            failed, 0,
            "calls failed after route-sync came back:\n{table}"
        );
        world.shutdown().await;
    });
}

#[test]
fn certificates_rotate_under_load_without_a_failed_call() {
    let _one = serial();
    runtime().block_on(async {
        let (mut world, _dir) = start(240, Transport::Tcp, false).await;
        scenario::seed(&mut world, &Pace::quick()).await.unwrap();
        let recorder = Recorder::new();
        let running = load(&world, &recorder);
        calls(&recorder, 0, 20).await;

        recorder.set_step(1);
        let rotated: Vec<(String, String)> = world
            .proc_names()
            .into_iter()
            .map(|n| {
                let serial = world.rotate(&n).unwrap();
                (n, serial)
            })
            .collect();
        // Each component says it now uses its new certificate.
        for (name, serial) in &rotated {
            let needle = format!("serial=\"{serial}\"");
            let start = Instant::now();
            while !std::fs::read_to_string(&world.proc(name).log)
                .unwrap_or_default()
                .contains(&needle)
            {
                assert!(
                    start.elapsed() < LIMIT,
                    "{name} never loaded certificate {serial}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // A new handshake gets the new certificate; connections made before keep working.
        for i in 0..2u8 {
            let presented = world.ingress_serial(Cluster::K8s, i).await.unwrap();
            let want = &rotated
                .iter()
                .find(|(n, _)| *n == format!("k8s/ingress-{i}"))
                .unwrap()
                .1;
            assert_eq!(
                &presented, want,
                "k8s/ingress-{i} presents an old certificate"
            );
        }
        recorder.set_step(2);
        calls(&recorder, 2, 20).await;
        running.stop().await;
        for step in [1, 2] {
            let (failed, table) = failures_in(&recorder, step);
            assert_eq!(failed, 0, "calls failed during the rotation:\n{table}");
        }
        world.shutdown().await;
    });
}

/// Each k8s ingress replica in turn is stopped (SIGTERM, drain), loses its route cache, and
/// comes back while k8s's route-sync is down, so it cannot load a table: it answers tunnels
/// with a "not ready" refusal, and diego's egress must take the other replica. Calls begun
/// at any moment, the drain and the empty replica's whole life included, all succeed.
fn restart_ingress_replicas_without_a_cache(transport: Transport, base: u8) {
    let _one = serial();
    runtime().block_on(async {
        let (mut world, _dir) = start(base, transport, false).await;
        scenario::seed(&mut world, &Pace::quick()).await.unwrap();
        let recorder = Recorder::new();
        let running = load(&world, &recorder);
        calls(&recorder, 0, 20).await;
        for (step, i) in [(1, 0u8), (2, 1u8)] {
            recorder.set_step(step);
            let name = format!("k8s/ingress-{i}");
            world.proc("k8s/route-sync").kill();
            let cache = world.cache_of(&name);
            let proc = world.proc(&name);
            tokio::task::block_in_place(|| proc.terminate());
            std::fs::remove_file(&cache)
                .unwrap_or_else(|e| panic!("{name} kept no cache at {}: {e}", cache.display()));
            world.proc(&name).start().unwrap();
            // Past the egress' 2 s back-off for the endpoint that went away, so it is tried
            // again while it has no table.
            let back = Instant::now();
            calls(&recorder, step, 40).await;
            tokio::time::sleep_until((back + Duration::from_millis(2500)).into()).await;
            let before = recorder.counts(step);
            calls(
                &recorder,
                step,
                before.iter().copied().max().unwrap_or(0) + 20,
            )
            .await;
            assert!(
                world
                    .wait_ready(&name, Duration::from_millis(300))
                    .await
                    .is_err(),
                "{name} says it is ready without a route table"
            );
            world.proc("k8s/route-sync").start().unwrap();
            world.wait_ready("k8s/route-sync", LIMIT).await.unwrap();
            world.wait_ready(&name, LIMIT).await.unwrap();
        }
        recorder.set_step(3);
        calls(&recorder, 3, 20).await;
        running.stop().await;
        eprintln!("{}", scenario::table(&recorder.summary()));
        for step in 0..=3 {
            let (failed, table) = failures_in(&recorder, step);
            assert_eq!(failed, 0, "calls failed while replicas restarted:\n{table}");
        }
        world.shutdown().await;
    });
}

#[test]
fn ingress_replicas_restarted_in_turn_without_a_cache_over_tcp() {
    restart_ingress_replicas_without_a_cache(Transport::Tcp, 150);
}

#[test]
fn ingress_replicas_restarted_in_turn_without_a_cache_over_quic() {
    restart_ingress_replicas_without_a_cache(Transport::Quic, 170);
}
