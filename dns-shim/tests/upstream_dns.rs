//! Forwarding to a real DNS server (a hickory-server authority), and what happens when the
//! upstream is down or silent.

mod common;

use std::time::Duration;

use common::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use isthmus_runtime::config::HumanDuration;

const ROUTES: &str = "routes:
  - {name: orders.apps.internal, port: 8080, home_cluster: k8s, vip: 100.64.105.32}
  - {name: billing.apps.internal, port: 8080, home_cluster: diego}
";

fn routes() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    write_routes(&path, ROUTES);
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmigrated_names_get_the_upstreams_answer() {
    let (_dir, path) = routes();
    let upstream = authority().await;
    let shim = start(config(&path, vips(), dns_upstream(&[upstream.addr]))).await;

    let q = query("Billing.Apps.Internal.", RecordType::A, None);
    for m in [udp(shim.dns, &q).await, tcp(shim.dns, &q).await] {
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.metadata.id, 0x4242, "the client's id comes back");
        assert_eq!(addrs(&m), vec!["10.255.0.1"]);
    }
    // A per-instance name of a route homed elsewhere is the platform's to answer.
    let m = udp(
        shim.dns,
        &query("0.orders.apps.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(addrs(&m), vec!["10.255.9.9"]);
    // The upstream's NXDOMAIN comes back with its SOA.
    let m = udp(
        shim.dns,
        &query("nobody.apps.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(soa_minimum(&m), Some(30));
    shim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_upstream_replies_are_fetched_again_over_tcp() {
    let (_dir, path) = routes();
    let upstream = authority().await;
    let shim = start(config(&path, vips(), dns_upstream(&[upstream.addr]))).await;
    let q = query("big.apps.internal.", RecordType::A, None);
    // Over TCP the client gets all 60 records: the shim's UDP query to the upstream came
    // back truncated (no EDNS: 512 bytes), so it asked again over TCP.
    let m = tcp(shim.dns, &q).await;
    assert_eq!(m.answers.len(), 60);
    assert!(!m.metadata.truncation);
    // A UDP client without EDNS still cannot take them: TC, so it retries over TCP.
    let m = udp(shim.dns, &q).await;
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty());
    shim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_gives_servfail_at_once() {
    let (_dir, path) = routes();
    let shim = start(config(&path, vips(), dns_upstream(&[dead().await]))).await;
    let started = tokio::time::Instant::now();
    let m = udp(
        shim.dns,
        &query("billing.apps.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let m = tcp(
        shim.dns,
        &query("billing.apps.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    // Local answers do not depend on the upstream.
    let m = udp(
        shim.dns,
        &query("orders.apps.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    let text = shim.metrics_text();
    assert!(
        text.contains("isthmus_dns_upstream_failures_total{kind=\"dns\",reason=\"io\"} 2"),
        "{text}"
    );
    shim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_gives_servfail_within_the_timeout() {
    let (_dir, path) = routes();
    let (silent, _socket) = blackhole().await;
    let mut cfg = config(&path, vips(), dns_upstream(&[silent]));
    cfg.upstream_timeout = HumanDuration::from_millis(300);
    let shim = start(cfg).await;
    let started = tokio::time::Instant::now();
    let m = udp(
        shim.dns,
        &query("billing.apps.internal.", RecordType::A, None),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    let text = shim.metrics_text();
    assert!(
        text.contains("isthmus_dns_upstream_failures_total{kind=\"dns\",reason=\"timeout\"} 1"),
        "{text}"
    );
    shim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_hands_over_to_the_next() {
    let (_dir, path) = routes();
    let (silent, _socket) = blackhole().await;
    let upstream = authority().await;
    let mut cfg = config(&path, vips(), dns_upstream(&[silent, upstream.addr]));
    cfg.upstream_timeout = HumanDuration::from_millis(800);
    let shim = start(cfg).await;
    // Round robin starts at each server in turn; either way the answer arrives in budget.
    for _ in 0..2 {
        let started = tokio::time::Instant::now();
        let m = udp(
            shim.dns,
            &query("billing.apps.internal.", RecordType::A, None),
        )
        .await;
        assert_eq!(addrs(&m), vec!["10.255.0.1"]);
        assert!(started.elapsed() < Duration::from_millis(800));
    }
    shim.stop().await;
}
