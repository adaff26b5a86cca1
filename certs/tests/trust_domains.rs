//! A root vouches only for its own trust domain: with the roots of `a` and `b` in one bundle,
//! a leaf of `a` must chain to `a`'s root. Both verifiers (the server judging a client, the
//! client judging a server), over real handshakes.

mod common;

use common::*;
use isthmus_certs::ca::MeshCa;
use isthmus_certs::{Identity, MeshTls, PeerPolicy, PeerRule, RootScope, TrustBundle};
use rustls::Error;

const A_GATEWAY: &str = "spiffe://a/cluster/k8s/gateway";
const A_CLIENT: &str = "spiffe://a/cluster/diego/gateway";

/// Any ID of `a` or `b`: the policy is not what these tests are about.
fn both() -> PeerPolicy {
    PeerPolicy::new(vec![
        PeerRule::TrustDomain {
            trust_domain: "a".into(),
            path_prefix: String::new(),
        },
        PeerRule::TrustDomain {
            trust_domain: "b".into(),
            path_prefix: String::new(),
        },
    ])
}

struct Domains {
    a: RawCa,
    b: RawCa,
    bundle: TrustBundle,
}

fn domains() -> Domains {
    let a = RawCa::new("root of a", &["spiffe://a"]);
    let b = RawCa::new("root of b", &["spiffe://b"]);
    let bundle = bundle_of(&[&a.pem, &b.pem]);
    Domains { a, b, bundle }
}

/// The server's refusal of `client`, after the client tried and failed.
async fn server_refuses(
    server_identity: Identity,
    client: Identity,
    bundle: &TrustBundle,
) -> Error {
    let server = MeshTls::new(server_identity, bundle.clone());
    let mut echo = EchoServer::start(server.server_config(both(), &[ALPN])).await;
    let client = MeshTls::new(client, bundle.clone());
    let result = connect_and_echo(client.client_config(both(), &[ALPN]), echo.addr).await;
    assert!(result.is_err(), "the client must not get through");
    let err = echo.next().await.expect_err("the server must refuse");
    rustls_error(&err).clone()
}

/// The client's refusal of `server`.
async fn client_refuses(
    server: Identity,
    client_identity: Identity,
    bundle: &TrustBundle,
) -> Error {
    let server = MeshTls::new(server, bundle.clone());
    let echo = EchoServer::start(server.server_config(both(), &[ALPN])).await;
    let client = MeshTls::new(client_identity, bundle.clone());
    let err = connect(client.client_config(both(), &[ALPN]), echo.addr)
        .await
        .expect_err("the client must refuse the server");
    rustls_error(&err).clone()
}

fn assert_names_both_domains(err: &Error, presented: &str, root: &str) {
    let refusal = anchor_refused(err).unwrap_or_else(|| panic!("not an anchor refusal: {err:?}"));
    assert_eq!(refusal.presented.as_str(), presented);
    assert_eq!(refusal.scope, RootScope::TrustDomain("b".into()));
    let text = err.to_string();
    for needle in [presented, "trust domain a", "trust domain b", root] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }
}

#[tokio::test]
async fn leaves_signed_by_their_own_domains_root_pass_both_ways() {
    let d = domains();
    let server = MeshTls::new(d.a.leaf(A_GATEWAY), d.bundle.clone());
    let mut echo = EchoServer::start(server.server_config(both(), &[ALPN])).await;
    for client in [
        d.a.leaf(A_CLIENT),
        d.b.leaf("spiffe://b/cluster/diego/gateway"),
    ] {
        let client = MeshTls::new(client, d.bundle.clone());
        connect_and_echo(client.client_config(both(), &[ALPN]), echo.addr)
            .await
            .expect("a leaf chaining to its own domain's root gets through");
        assert_eq!(
            echo.next().await.expect("accepted").peer_id,
            client.local_id()
        );
    }
}

#[tokio::test]
async fn server_refuses_a_client_of_a_signed_by_bs_root() {
    let d = domains();
    let err = server_refuses(d.a.leaf(A_GATEWAY), d.b.leaf(A_CLIENT), &d.bundle).await;
    assert_names_both_domains(&err, A_CLIENT, "root of b");
}

#[tokio::test]
async fn client_refuses_a_server_of_a_signed_by_bs_root() {
    let d = domains();
    let err = client_refuses(d.b.leaf(A_GATEWAY), d.a.leaf(A_CLIENT), &d.bundle).await;
    assert_names_both_domains(&err, A_GATEWAY, "root of b");
}

#[tokio::test]
async fn a_root_without_a_spiffe_san_anchors_nothing() {
    let a = RawCa::new("root of a", &["spiffe://a"]);
    let plain = RawCa::new("plain root", &[]);
    let bundle = bundle_of(&[&a.pem, &plain.pem]);
    assert!(matches!(
        bundle.scopes().nth(1),
        Some(RootScope::Nothing(why)) if why.contains("no spiffe://<trust-domain> URI SAN")
    ));

    let server_err = server_refuses(a.leaf(A_GATEWAY), plain.leaf(A_CLIENT), &bundle).await;
    let client_err = client_refuses(plain.leaf(A_GATEWAY), a.leaf(A_CLIENT), &bundle).await;
    for (err, presented) in [(server_err, A_CLIENT), (client_err, A_GATEWAY)] {
        let refusal =
            anchor_refused(&err).unwrap_or_else(|| panic!("not an anchor refusal: {err:?}"));
        assert_eq!(refusal.presented.as_str(), presented);
        assert!(matches!(refusal.scope, RootScope::Nothing(_)), "{refusal}");
        let text = err.to_string();
        assert!(text.contains("plain root"), "{text}");
        assert!(text.contains("anchors no trust domain"), "{text}");
    }
}

#[test]
fn scopes_are_read_from_each_roots_uri_san() {
    let ca = MeshCa::generate("mesh.test").unwrap();
    let a = RawCa::new("root of a", &["spiffe://a", "https://a.example"]);
    let svid = RawCa::new("an SVID CA", &["spiffe://c/ca/issuer"]);
    let bad = RawCa::new("bad", &["spiffe://Not Valid"]);
    let two = RawCa::new("two domains", &["spiffe://a", "spiffe://b"]);
    let bundle = bundle_of(&[&ca.cert_pem(), &a.pem, &svid.pem, &bad.pem, &two.pem]);
    let scopes: Vec<&RootScope> = bundle.scopes().collect();
    assert_eq!(scopes[0], &RootScope::TrustDomain("mesh.test".into()));
    assert_eq!(scopes[1], &RootScope::TrustDomain("a".into()));
    assert_eq!(scopes[2], &RootScope::TrustDomain("c".into()));
    assert!(matches!(scopes[3], RootScope::Nothing(why) if why.contains("Not Valid")));
    assert!(
        matches!(scopes[4], RootScope::Nothing(why) if why.contains("more than one trust domain"))
    );

    let id = isthmus_certs::SpiffeId::parse("spiffe://mesh.test/cluster/k8s/gateway").unwrap();
    assert!(bundle.vouches(0, &id).is_ok());
    let refusal = bundle.vouches(1, &id).unwrap_err();
    assert!(refusal.to_string().contains("trust domain a"), "{refusal}");
    assert!(refusal.to_string().contains("root of a"), "{refusal}");
}
