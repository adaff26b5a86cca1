//! Names homed in another cluster, answered by the shim itself over real UDP and TCP.

mod common;

use std::time::Duration;

use common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use isthmus_dns_shim::config::AnswerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// As route-sync serves them: each route with its name's VIP.
const ROUTES: &str = "routes:
  - {name: orders.apps.internal, port: 8080, home_cluster: k8s, vip: 100.64.105.32}
  - {name: orders.apps.internal, port: 9090, home_cluster: k8s, vip: 100.64.105.32}
  - {name: payments.apps.internal, port: 9090, home_cluster: k8s, vip: 100.64.220.120}
  - {name: billing.apps.internal, port: 8080, home_cluster: diego}
";

struct World {
    _dir: tempfile::TempDir,
    routes: std::path::PathBuf,
    _upstream: Authority,
    shim: Running,
}

async fn world(answer: AnswerConfig) -> World {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    write_routes(&routes, ROUTES);
    let upstream = authority().await;
    let shim = start(config(&routes, answer, dns_upstream(&[upstream.addr]))).await;
    World {
        _dir: dir,
        routes,
        _upstream: upstream,
        shim,
    }
}

/// The VIP `name`'s routes carry in [`ROUTES`] (or its IPv6 variant): what the egress reads
/// from the same table, so exactly what the shim must answer.
fn route_vip(v6: bool, name: &str) -> String {
    match (v6, name) {
        (false, "orders.apps.internal") => "100.64.105.32",
        (false, "payments.apps.internal") => "100.64.220.120",
        (true, "orders.apps.internal") => "fd00:64::7",
        _ => panic!("no VIP for {name}"),
    }
    .to_string()
}

fn assert_answer(m: &Message, want: &[String], qname: &str) {
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative, "AA set");
    assert_eq!(&addrs(m), want);
    assert_eq!(
        m.queries[0].name().to_ascii(),
        qname,
        "question echoed in its case"
    );
    for r in &m.answers {
        assert_eq!(r.name.to_ascii(), qname, "answer keeps the query's case");
        assert_eq!(r.ttl, 0, "TTL 0 by default");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vip_mode_answers_remote_names_over_udp_and_tcp() {
    let w = world(vips()).await;
    let qname = "OrDeRs.Apps.INTERNAL.";
    let vip = route_vip(false, "orders.apps.internal");
    let q = query(qname, RecordType::A, None);
    assert_answer(
        &udp(w.shim.dns, &q).await,
        std::slice::from_ref(&vip),
        qname,
    );
    assert_answer(
        &tcp(w.shim.dns, &q).await,
        std::slice::from_ref(&vip),
        qname,
    );
    let other = route_vip(false, "payments.apps.internal");
    let m = udp(
        w.shim.dns,
        &query("payments.apps.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(addrs(&m), vec![other]);

    // A v4 range has nothing for AAAA: NODATA, with the SOA carrying the negative TTL.
    let m = udp(w.shim.dns, &query(qname, RecordType::AAAA, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(soa_minimum(&m), Some(5));
    assert_eq!(m.authorities[0].ttl, 5);
    w.shim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vip_mode_with_an_ipv6_range_answers_aaaa() {
    let w = world(vips()).await;
    write_routes(&w.routes, &ROUTES.replace("100.64.105.32", "fd00:64::7"));
    let v6 = w.shim.metrics.clone();
    eventually(Duration::from_secs(2), "the v6 table in force", || {
        v6.table_revision.get() >= 2
    })
    .await;
    let vip = route_vip(true, "orders.apps.internal");
    let m = udp(
        w.shim.dns,
        &query("orders.apps.internal.", RecordType::AAAA, None),
    )
    .await;
    assert_answer(&m, &[vip], "orders.apps.internal.");
    let a = tcp(
        w.shim.dns,
        &query("orders.apps.internal.", RecordType::A, None),
    )
    .await;
    assert!(
        a.answers.is_empty() && soa_minimum(&a).is_some(),
        "A is NODATA"
    );
    w.shim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_mode_answers_the_egress_addresses() {
    let w = world(shared(&["10.0.4.7", "fd00::7"])).await;
    let name = "orders.apps.internal.";
    assert_answer(
        &udp(w.shim.dns, &query(name, RecordType::A, None)).await,
        &["10.0.4.7".into()],
        name,
    );
    assert_answer(
        &tcp(w.shim.dns, &query(name, RecordType::AAAA, None)).await,
        &["fd00::7".into()],
        name,
    );
    // A type the egress has nothing for: NODATA, not NXDOMAIN.
    let mx = udp(w.shim.dns, &query(name, RecordType::MX, None)).await;
    assert_eq!(mx.metadata.response_code, ResponseCode::NoError);
    assert!(mx.answers.is_empty() && soa_minimum(&mx) == Some(5));
    w.shim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_and_edns_follow_the_client() {
    let many: Vec<String> = (1..=40).map(|i| format!("10.0.5.{i}")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let w = world(shared(&refs)).await;
    let name = "orders.apps.internal.";

    // 40 A records do not fit 512 bytes: TC, no partial answer, no OPT without EDNS.
    let m = udp(w.shim.dns, &query(name, RecordType::A, None)).await;
    assert!(m.metadata.truncation, "TC set");
    assert!(m.answers.is_empty());
    assert!(m.edns.is_none(), "no OPT for a client without EDNS");
    // The client's EDNS size lets them through, and the OPT comes back with ours.
    let m = udp(w.shim.dns, &query(name, RecordType::A, Some(4096))).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 40);
    assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(1232));
    // A client size below 512 counts as 512.
    let m = udp(w.shim.dns, &query(name, RecordType::A, Some(256))).await;
    assert!(m.metadata.truncation);
    // TCP takes everything.
    let m = tcp(w.shim.dns, &query(name, RecordType::A, None)).await;
    assert_eq!(m.answers.len(), 40);
    assert!(
        sum_metric(
            &w.shim.metrics_text(),
            "isthmus_dns_truncated_replies_total"
        ) >= 2
    );

    // EDNS version 1: BADVERS (16), with an OPT to carry the upper rcode bits.
    let mut bad = query(name, RecordType::A, Some(1232));
    let at = bad.len() - 5;
    bad[at] = 1;
    let m = udp(w.shim.dns, &bad).await;
    assert_eq!(u16::from(m.metadata.response_code), 16);
    assert!(m.edns.is_some());
    w.shim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_outside_the_domains_and_soa_at_the_apex() {
    let w = world(vips()).await;
    for name in ["example.com.", "orders.apps.internal.example.", "internal."] {
        let m = udp(w.shim.dns, &query(name, RecordType::A, None)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
    }
    let m = udp(w.shim.dns, &query("APPS.internal.", RecordType::SOA, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(matches!(m.answers[0].data, RData::SOA(_)));
    assert_eq!(m.answers[0].name.to_ascii(), "apps.internal.");
    w.shim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_update_flips_the_answer_within_a_second() {
    let w = world(vips()).await;
    let vip = route_vip(false, "orders.apps.internal");
    let q = query("orders.apps.internal.", RecordType::A, None);
    let ask = || udp(w.shim.dns, &q);
    assert_eq!(addrs(&ask().await), vec![vip.clone()]);

    // orders moves back home: the name is now forwarded to the platform resolver.
    write_routes(
        &w.routes,
        &ROUTES
            .replace(
                "orders.apps.internal, port: 8080, home_cluster: k8s",
                "orders.apps.internal, port: 8080, home_cluster: diego",
            )
            .replace(
                "orders.apps.internal, port: 9090, home_cluster: k8s",
                "orders.apps.internal, port: 9090, home_cluster: diego",
            ),
    );
    let started = tokio::time::Instant::now();
    loop {
        if addrs(&ask().await) == ["10.255.9.1"] {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "not flipped within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // And away again.
    write_routes(&w.routes, ROUTES);
    let started = tokio::time::Instant::now();
    while addrs(&ask().await) != [vip.clone()] {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "not flipped back within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    w.shim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_serves_health_and_query_metrics() {
    let w = world(vips()).await;
    udp(
        w.shim.dns,
        &query("orders.apps.internal.", RecordType::A, None),
    )
    .await;
    udp(
        w.shim.dns,
        &query("billing.apps.internal.", RecordType::A, None),
    )
    .await;
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(w.shim.admin).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(within(get("/healthz")).await.contains("200 OK"));
    let ready = within(get("/readyz")).await;
    assert!(ready.contains("200 OK"), "{ready}");
    let metrics = within(get("/metrics")).await;
    for want in [
        "isthmus_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\",source=\"Local\",transport=\"udp\"} 1",
        "isthmus_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\",source=\"Upstream\",transport=\"udp\"} 1",
        "isthmus_dns_upstream_duration_seconds_count{kind=\"dns\"} 1",
        "isthmus_dns_remote_names 2",
    ] {
        assert!(metrics.contains(want), "missing {want} in\n{metrics}");
    }
    w.shim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_stalled_tcp_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    write_routes(&routes, ROUTES);
    let upstream = authority().await;
    let mut cfg = config(&routes, vips(), dns_upstream(&[upstream.addr]));
    cfg.tcp_idle_timeout = isthmus_runtime::config::HumanDuration::from_millis(200);
    let shim = start(cfg).await;
    let q = query("orders.apps.internal.", RecordType::A, None);
    // A connection that answered a query, then says nothing; and one that stalls halfway
    // through a message. Both are closed after the idle timeout (read returns 0).
    let mut quiet = within(tokio::net::TcpStream::connect(shim.dns))
        .await
        .unwrap();
    within(tcp_exchange(&mut quiet, &q)).await.unwrap();
    let mut stalled = within(tokio::net::TcpStream::connect(shim.dns))
        .await
        .unwrap();
    within(stalled.write_all(&[0, 40, 0x42])).await.unwrap();
    let started = tokio::time::Instant::now();
    for s in [&mut quiet, &mut stalled] {
        let mut buf = [0u8; 16];
        assert_eq!(
            within(s.read(&mut buf)).await.unwrap(),
            0,
            "closed by the server"
        );
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_secs(3),
        "{took:?}"
    );
    shim.stop().await;
}
