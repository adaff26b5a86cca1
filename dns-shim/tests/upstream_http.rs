//! Forwarding to Cloud Foundry's service-discovery-controller (mTLS, TLS 1.2) and to a
//! bosh-dns HTTP handler, with the exact JSON they serve.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use isthmus_dns_shim::config::UpstreamConfig;

const ROUTES: &str = "routes:
  - {name: orders.apps.internal, port: 8080, home_cluster: k8s, vip: 100.64.105.32}
";

const SDC_NAME: &str = "service-discovery-controller.service.cf.internal";

fn registration(ips: &[&str]) -> String {
    let hosts: Vec<String> = ips
        .iter()
        .map(|ip| {
            format!(
                r#"{{"ip_address":"{ip}","last_check_in":"","port":0,"revision":"","service":"","service_repo_name":"","tags":{{}}}}"#
            )
        })
        .collect();
    format!(r#"{{"hosts":[{}],"env":"","service":""}}"#, hosts.join(","))
}

struct Sdc {
    addr: std::net::SocketAddr,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
    warm: Arc<AtomicBool>,
    pki: SdcPki,
}

async fn sdc(dir: &std::path::Path) -> Sdc {
    let pki = sdc_pki(dir);
    let warm = Arc::new(AtomicBool::new(true));
    let is_warm = Arc::clone(&warm);
    let handler: Handler = Arc::new(move |target: &str| {
        if !is_warm.load(Ordering::SeqCst) {
            return (500, "address table is not warm\n".into());
        }
        match target {
            "/v1/registration/billing.apps.internal." => {
                (200, registration(&["10.255.12.3", "10.255.12.4"]))
            }
            _ => (200, registration(&[])),
        }
    });
    let (addr, seen) = http_server(Some(Arc::clone(&pki.server)), handler).await;
    Sdc {
        addr,
        seen,
        warm,
        pki,
    }
}

fn sdc_upstream(sdc: &Sdc, server_name: Option<&str>, stranger: bool) -> UpstreamConfig {
    let (cert, key) = if stranger {
        (sdc.pki.stranger_cert.clone(), sdc.pki.stranger_key.clone())
    } else {
        (sdc.pki.cert.clone(), sdc.pki.key.clone())
    };
    UpstreamConfig::Sdc {
        url: format!("https://127.0.0.1:{}", sdc.addr.port()),
        ca: sdc.pki.ca.clone(),
        cert,
        key,
        server_name: server_name.map(str::to_string),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdc_answers_over_mutual_tls_1_2() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    write_routes(&routes, ROUTES);
    let sdc = sdc(dir.path()).await;
    let shim = start(config(
        &routes,
        vips(),
        sdc_upstream(&sdc, Some(SDC_NAME), false),
    ))
    .await;

    let m = udp(
        shim.dns,
        &query("Billing.apps.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    let mut got = addrs(&m);
    got.sort();
    assert_eq!(got, vec!["10.255.12.3", "10.255.12.4"]);
    assert!(
        m.answers
            .iter()
            .all(|r| r.ttl == 0 && r.name.to_ascii() == "Billing.apps.internal.")
    );
    assert!(
        sdc.seen
            .lock()
            .unwrap()
            .contains(&"/v1/registration/billing.apps.internal.".to_string())
    );
    // The name exists but the SDC has only IPv4: NODATA. An unknown name: NXDOMAIN.
    let m = tcp(
        shim.dns,
        &query("billing.apps.internal.", RecordType::AAAA, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty() && soa_minimum(&m) == Some(5));
    let m = udp(
        shim.dns,
        &query("nobody.apps.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(soa_minimum(&m), Some(5));

    // Before the SDC's table is warm: SERVFAIL, never an empty answer.
    sdc.warm.store(false, Ordering::SeqCst);
    let m = udp(
        shim.dns,
        &query("billing.apps.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    let text = shim.metrics_text();
    assert!(
        text.contains("isthmus_dns_upstream_failures_total{kind=\"sdc\",reason=\"not_warm\"} 1"),
        "{text}"
    );
    shim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdc_refuses_strangers_and_the_shim_checks_the_sdcs_name() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    write_routes(&routes, ROUTES);
    let sdc = sdc(dir.path()).await;
    // A client certificate from another CA: the SDC ends the handshake.
    let shim = start(config(
        &routes,
        vips(),
        sdc_upstream(&sdc, Some(SDC_NAME), true),
    ))
    .await;
    let m = udp(
        shim.dns,
        &query("billing.apps.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    shim.stop().await;
    // No server_name: the certificate (for the SDC's name) does not match 127.0.0.1.
    let shim = start(config(&routes, vips(), sdc_upstream(&sdc, None, false))).await;
    let m = udp(
        shim.dns,
        &query("billing.apps.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    shim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bosh_dns_http_handler_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    write_routes(&routes, ROUTES);
    let handler: Handler = Arc::new(|target: &str| {
        let body = |status: u8, name: &str, qtype: u16, answers: &str| {
            format!(
                r#"{{"Status":{status},"TC":false,"RD":false,"RA":false,"AD":false,"CD":false,"Question":[{{"name":"{name}","type":{qtype}}}],"Answer":{answers},"Additional":[],"edns_client_subnet":"0.0.0.0/0"}}"#
            )
        };
        match target {
            "/?name=Billing.apps.internal.&type=1" => (
                200,
                body(
                    0,
                    "Billing.apps.internal.",
                    1,
                    r#"[{"name":"Billing.apps.internal.","type":1,"TTL":0,"data":"10.255.12.3"}]"#,
                ),
            ),
            "/?name=billing.apps.internal.&type=28" => {
                (200, body(0, "billing.apps.internal.", 28, "[]"))
            }
            "/?name=gone.apps.internal.&type=1" => (200, body(3, "gone.apps.internal.", 1, "null")),
            _ => (500, "boom".into()),
        }
    });
    let (addr, seen) = http_server(None, handler).await;
    let upstream = UpstreamConfig::BoshDnsHttp {
        url: format!("http://{addr}"),
    };
    let shim = start(config(&routes, vips(), upstream)).await;

    let m = udp(
        shim.dns,
        &query("Billing.apps.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&m), vec!["10.255.12.3"]);
    let m = tcp(
        shim.dns,
        &query("billing.apps.internal.", RecordType::AAAA, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty() && soa_minimum(&m).is_some());
    let m = udp(shim.dns, &query("gone.apps.internal.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // Non-200 is SERVFAIL, as in bosh-dns.
    let m = udp(
        shim.dns,
        &query("broken.apps.internal.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(
        seen.lock()
            .unwrap()
            .contains(&"/?name=Billing.apps.internal.&type=1".to_string())
    );
    shim.stop().await;
}
