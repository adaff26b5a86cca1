//! Real mutual-TLS handshakes over loopback: who is accepted, who is refused, and that each
//! refusal carries its own distinct reason.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use isthmus_certs::ca::{LeafSpec, MeshCa};
use isthmus_certs::{MeshTls, PeerPolicy, PeerRule};
use rustls::{CertificateError, Error};
use time::OffsetDateTime;

const GATEWAY: &str = "spiffe://mesh.test/cluster/diego/gateway";

/// A k8s ingress that accepts exactly the Diego gateway.
async fn ingress(ca: &MeshCa, trusted: &[&MeshCa]) -> EchoServer {
    let server = mesh(ca, "k8s", "gateway", trusted);
    let policy = PeerPolicy::exact([id(GATEWAY)]);
    EchoServer::start(server.server_config(policy, &[ALPN])).await
}

fn client(mesh: &MeshTls) -> Arc<rustls::ClientConfig> {
    mesh.client_config(
        PeerPolicy::new(vec![PeerRule::TrustDomain {
            trust_domain: TD.into(),
            path_prefix: "/cluster/k8s".into(),
        }]),
        &[ALPN],
    )
}

/// Runs one client against the server and returns the server's rustls error.
async fn refused(server: &mut EchoServer, client_mesh: &MeshTls) -> Error {
    let client_result = connect_and_echo(client(client_mesh), server.addr).await;
    assert!(client_result.is_err(), "client should not get through");
    let err = server.next().await.expect_err("server must refuse");
    rustls_error(&err).clone()
}

#[tokio::test]
async fn allowed_id_is_accepted_and_identified() {
    let ca = MeshCa::generate(TD).unwrap();
    let mut server = ingress(&ca, &[&ca]).await;
    let client_mesh = mesh(&ca, "diego", "gateway", &[&ca]);

    let mut stream = connect_and_echo(client(&client_mesh), server.addr)
        .await
        .expect("allowed client gets through");
    echo(&mut stream, b"second round trip").await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(ALPN));
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );

    let accepted = server.next().await.expect("accepted");
    assert_eq!(accepted.peer_id, id(GATEWAY));
    assert_eq!(accepted.peer_serial, client_mesh.serial());
    assert_eq!(accepted.alpn.as_deref(), Some(ALPN));
}

#[tokio::test]
async fn wrong_id_is_refused_naming_the_id_and_rule() {
    let ca = MeshCa::generate(TD).unwrap();
    let mut server = ingress(&ca, &[&ca]).await;
    let intruder = mesh(&ca, "diego", "route-sync", &[&ca]);

    let err = refused(&mut server, &intruder).await;
    let denied = policy_denied(&err).unwrap_or_else(|| panic!("not a policy refusal: {err:?}"));
    assert_eq!(
        denied.presented,
        id("spiffe://mesh.test/cluster/diego/route-sync")
    );
    let text = err.to_string();
    assert!(
        text.contains("spiffe://mesh.test/cluster/diego/route-sync"),
        "{text}"
    );
    assert!(text.contains(&format!("exact {GATEWAY}")), "{text}");
}

#[tokio::test]
async fn other_trust_domain_is_refused_even_with_a_trusted_chain() {
    let ca = MeshCa::generate(TD).unwrap();
    let other_ca = MeshCa::generate("other.test").unwrap();
    // The server trusts both roots, so only the policy stands between it and the client.
    let server_mesh = mesh(&ca, "k8s", "gateway", &[&ca, &other_ca]);
    let policy = PeerPolicy::trust_domain(TD);
    let mut server = EchoServer::start(server_mesh.server_config(policy, &[ALPN])).await;
    let foreigner = mesh(&other_ca, "diego", "gateway", &[&ca]);

    let err = refused(&mut server, &foreigner).await;
    let denied = policy_denied(&err).unwrap_or_else(|| panic!("not a policy refusal: {err:?}"));
    assert_eq!(denied.presented.trust_domain(), "other.test");
    assert!(
        denied.to_string().contains("trust domain mesh.test"),
        "{denied}"
    );
}

#[tokio::test]
async fn unknown_ca_is_refused() {
    let ca = MeshCa::generate(TD).unwrap();
    let rogue_ca = MeshCa::generate(TD).unwrap();
    let mut server = ingress(&ca, &[&ca]).await;
    // Same SPIFFE ID as the allowed peer, but from a CA the server does not trust.
    let impostor = mesh(&rogue_ca, "diego", "gateway", &[&ca]);

    let err = refused(&mut server, &impostor).await;
    assert_eq!(
        err,
        Error::InvalidCertificate(CertificateError::UnknownIssuer),
        "{err}"
    );
}

#[tokio::test]
async fn expired_client_cert_is_refused() {
    let ca = MeshCa::generate(TD).unwrap();
    let mut server = ingress(&ca, &[&ca]).await;
    let now = OffsetDateTime::now_utc();
    let mut spec = LeafSpec::new("diego", "gateway", Duration::from_secs(60));
    spec.not_before = now - time::Duration::days(2);
    spec.not_after = now - time::Duration::days(1);
    let expired = MeshTls::new(ca.issue(&spec).unwrap().identity().unwrap(), bundle(&[&ca]));

    let err = refused(&mut server, &expired).await;
    assert!(
        matches!(
            err,
            Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn not_yet_valid_client_cert_is_refused() {
    let ca = MeshCa::generate(TD).unwrap();
    let mut server = ingress(&ca, &[&ca]).await;
    let now = OffsetDateTime::now_utc();
    let mut spec = LeafSpec::new("diego", "gateway", Duration::from_secs(60));
    spec.not_before = now + time::Duration::days(1);
    spec.not_after = now + time::Duration::days(2);
    let early = MeshTls::new(ca.issue(&spec).unwrap().identity().unwrap(), bundle(&[&ca]));

    let err = refused(&mut server, &early).await;
    assert!(
        matches!(
            err,
            Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
            )
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn missing_client_cert_is_refused() {
    let ca = MeshCa::generate(TD).unwrap();
    let mut server = ingress(&ca, &[&ca]).await;
    // A plain client that verifies the server by host name and offers no certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let anonymous = rustls::ClientConfig::builder_with_provider(isthmus_certs::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();

    let client_result = async {
        let mut stream =
            connect_as(Arc::new(anonymous), server.addr, "gateway.k8s.mesh.test").await?;
        echo(&mut stream, b"ping").await
    }
    .await;
    assert!(
        client_result.is_err(),
        "anonymous client must not get through"
    );
    let err = server.next().await.expect_err("server must refuse");
    assert_eq!(*rustls_error(&err), Error::NoCertificatesPresented);
}

#[tokio::test]
async fn client_refuses_a_server_with_the_wrong_id() {
    let ca = MeshCa::generate(TD).unwrap();
    // The server is a route-sync, but the client wants the k8s gateway only.
    let server_mesh = mesh(&ca, "k8s", "route-sync", &[&ca]);
    let mut server =
        EchoServer::start(server_mesh.server_config(PeerPolicy::trust_domain(TD), &[ALPN])).await;
    let client_mesh = mesh(&ca, "diego", "gateway", &[&ca]);
    let config = client_mesh.client_config(
        PeerPolicy::exact([id("spiffe://mesh.test/cluster/k8s/gateway")]),
        &[ALPN],
    );

    // The server name matches the server's DNS SAN: it must not matter.
    let err = connect_as(config, server.addr, "route-sync.k8s.mesh.test")
        .await
        .expect_err("client must refuse the server");
    let err = rustls_error(&err);
    let denied = policy_denied(err).unwrap_or_else(|| panic!("not a policy refusal: {err:?}"));
    assert_eq!(
        denied.presented,
        id("spiffe://mesh.test/cluster/k8s/route-sync")
    );
    // The server hears about it as an alert from the client.
    assert!(server.next().await.is_err());
}

#[tokio::test]
async fn client_refuses_a_server_from_an_unknown_ca() {
    let ca = MeshCa::generate(TD).unwrap();
    let rogue_ca = MeshCa::generate(TD).unwrap();
    let server_mesh = mesh(&rogue_ca, "k8s", "gateway", &[&ca]);
    let server =
        EchoServer::start(server_mesh.server_config(PeerPolicy::trust_domain(TD), &[ALPN])).await;
    let client_mesh = mesh(&ca, "diego", "gateway", &[&ca]);
    let err = connect(client(&client_mesh), server.addr)
        .await
        .expect_err("client must refuse the server");
    assert_eq!(
        *rustls_error(&err),
        Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}

#[tokio::test]
async fn empty_policy_refuses_everyone() {
    let ca = MeshCa::generate(TD).unwrap();
    let server_mesh = mesh(&ca, "k8s", "gateway", &[&ca]);
    let mut server =
        EchoServer::start(server_mesh.server_config(PeerPolicy::default(), &[ALPN])).await;
    let err = refused(&mut server, &mesh(&ca, "diego", "gateway", &[&ca])).await;
    assert!(policy_denied(&err).is_some(), "{err:?}");
}

#[tokio::test]
async fn tls12_clients_are_refused() {
    let ca = MeshCa::generate(TD).unwrap();
    let mut server = ingress(&ca, &[&ca]).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let old = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    assert!(
        connect_as(Arc::new(old), server.addr, "gateway.k8s.mesh.test")
            .await
            .is_err()
    );
    let err = server.next().await.expect_err("TLS 1.2 must be refused");
    assert!(
        matches!(rustls_error(&err), Error::PeerIncompatible(_)),
        "{err:?}"
    );
}

#[test]
fn configs_are_tls13_only_and_quic_ready() {
    let ca = MeshCa::generate(TD).unwrap();
    let m = mesh(&ca, "k8s", "gateway", &[&ca]);
    let server = m.server_config(PeerPolicy::trust_domain(TD), &[ALPN, b"h2"]);
    let client = m.client_config(PeerPolicy::trust_domain(TD), &[ALPN]);
    for suites in [
        &server.crypto_provider().cipher_suites,
        &client.crypto_provider().cipher_suites,
    ] {
        assert!(
            suites.iter().all(|s| s.tls13().is_some()),
            "TLS 1.2 suite enabled"
        );
    }
    // quinn's QuicServerConfig::try_from needs this suite for the Initial packets.
    assert!(
        server
            .crypto_provider()
            .cipher_suites
            .iter()
            .any(|s| s.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    assert_eq!(server.max_early_data_size, 0);
    assert_eq!(server.alpn_protocols, vec![ALPN.to_vec(), b"h2".to_vec()]);
    assert_eq!(client.alpn_protocols, vec![ALPN.to_vec()]);
}
