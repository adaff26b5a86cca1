//! A live migration end to end: orders moves from diego to k8s and back under continuous
//! load from both clusters, over each transport, with zero failed calls; the reverse
//! direction (k8s calling billing in diego) and TCP (diego calling echo in k8s) throughout.

mod common;

use common::*;
use isthmus_tests::world::Transport;
use isthmus_tests::world::scenario::{self, Pace};

fn migrate(transport: Transport, base: u8) {
    let _one = serial();
    runtime().block_on(async {
        let (mut world, dir) = start(base, transport, false).await;
        scenario::seed(&mut world, &Pace::quick()).await.unwrap();
        let walked = scenario::walk(&mut world, Pace::quick(), say())
            .await
            .unwrap_or_else(|e| panic!("{e:#} (files: {})", dir.path().display()));
        let table = scenario::table(&walked.rows);
        eprintln!("{table}");
        let failures: usize = walked.rows.iter().map(|r| r.failures).sum();
        assert_eq!(failures, 0, "failed calls during the migration:\n{table}");

        // Who served whom, at the steps where it is settled.
        served_only_by(&walked.rows, 0, "diego → orders", "diego");
        served_only_by(&walked.rows, 0, "k8s → orders", "diego");
        served_only_by(&walked.rows, 3, "diego → orders", "k8s");
        served_only_by(&walked.rows, 3, "k8s → orders", "k8s");
        served_only_by(&walked.rows, 5, "diego → orders", "diego");
        served_only_by(&walked.rows, 5, "k8s → orders", "diego");
        // The reverse direction, every step.
        for step in 0..scenario::STEPS.len() {
            served_only_by(&walked.rows, step, "k8s → billing", "diego");
            assert!(row(&walked.rows, step, "diego → echo").requests > 0);
        }
        world.shutdown().await;
    });
}

#[test]
fn migration_and_rollback_over_tls_tcp_fail_no_call() {
    migrate(Transport::Tcp, 150);
}

#[test]
fn migration_and_rollback_over_quic_fail_no_call() {
    migrate(Transport::Quic, 170);
}
