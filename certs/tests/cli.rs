//! The built `isthmus-certs` binary end to end: init -> issue -> inspect -> bundle, the refusal
//! paths, exit statuses and key file modes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use isthmus_certs::ca::{LeafSpec, MeshCa};
use isthmus_certs::{Identity, TrustBundle};
use time::OffsetDateTime;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_isthmus-certs"))
        .args(args)
        .output()
        .expect("run isthmus-certs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn expect_status(o: &Output, code: i32, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}\nstdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn init_issue_inspect_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let leaf_dir = tmp.path().join("gateway");

    // init
    let o = run(&["init", "--trust-domain", "mesh.test", "--out", s(&ca_dir)]);
    expect_status(&o, 0, "init");
    assert_eq!(mode(&ca_dir.join("ca-key.pem")), 0o600);
    assert!(ca_dir.join("ca.pem").is_file());
    let first_key = std::fs::read(ca_dir.join("ca-key.pem")).unwrap();

    // init again refuses to overwrite the key, unless forced
    let o = run(&["init", "--trust-domain", "mesh.test", "--out", s(&ca_dir)]);
    expect_status(&o, 1, "second init without --force");
    assert!(stderr(&o).starts_with("error: "), "{}", stderr(&o));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert_eq!(std::fs::read(ca_dir.join("ca-key.pem")).unwrap(), first_key);

    // issue
    let o = run(&[
        "issue",
        "--ca",
        s(&ca_dir),
        "--cluster",
        "k8s",
        "--component",
        "gateway",
        "--dns",
        "gateway.isthmus.svc",
        "--dns",
        "gw.local",
        "--ip",
        "10.1.2.3",
        "--ttl",
        "2h",
        "--out",
        s(&leaf_dir),
    ]);
    expect_status(&o, 0, "issue");
    assert!(stdout(&o).contains("spiffe://mesh.test/cluster/k8s/gateway"));
    assert_eq!(mode(&leaf_dir.join("key.pem")), 0o600);
    let identity = Identity::load(&leaf_dir.join("cert.pem"), &leaf_dir.join("key.pem")).unwrap();
    assert_eq!(
        identity.id().as_str(),
        "spiffe://mesh.test/cluster/k8s/gateway"
    );
    let remaining = identity.not_after() - OffsetDateTime::now_utc();
    assert!(
        remaining > time::Duration::minutes(119) && remaining <= time::Duration::hours(2),
        "{remaining}"
    );
    assert_eq!(
        std::fs::read(leaf_dir.join("ca.pem")).unwrap(),
        std::fs::read(ca_dir.join("ca.pem")).unwrap()
    );

    // inspect a valid leaf: exit 0 and the details
    let o = run(&["inspect", s(&leaf_dir.join("cert.pem"))]);
    expect_status(&o, 0, "inspect valid leaf");
    let out = stdout(&o);
    for needle in [
        "SPIFFE ID:   spiffe://mesh.test/cluster/k8s/gateway",
        "gateway.isthmus.svc, gw.local",
        "10.1.2.3",
        "URI SANs:    spiffe://mesh.test/cluster/k8s/gateway",
        &format!("serial:      {}", identity.serial()),
        "time left:   1h 59m",
        "CA:          no",
        "issuer:      O=Isthmus, CN=Isthmus mesh CA (mesh.test)",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    let o = run(&["inspect", s(&ca_dir.join("ca.pem"))]);
    expect_status(&o, 0, "inspect CA");
    assert!(stdout(&o).contains("CA:          yes"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("CA of trust domain mesh.test"),
        "{}",
        stdout(&o)
    );
    // The root names its trust domain as a URI SAN: without it, it would anchor nothing.
    assert!(
        stdout(&o).contains("URI SANs:    spiffe://mesh.test\n"),
        "{}",
        stdout(&o)
    );
    let bundle = TrustBundle::load(&ca_dir.join("ca.pem")).unwrap();
    assert_eq!(
        bundle.scopes().collect::<Vec<_>>(),
        [&isthmus_certs::RootScope::TrustDomain("mesh.test".into())]
    );

    // inspect an expired and a not-yet-valid cert: exit 1 and why
    let ca = MeshCa::load(&ca_dir).unwrap();
    let now = OffsetDateTime::now_utc();
    let mut spec = LeafSpec::new("k8s", "old", Duration::from_secs(60));
    spec.not_before = now - time::Duration::days(2);
    spec.not_after = now - time::Duration::hours(3);
    let expired = tmp.path().join("expired.pem");
    std::fs::write(&expired, ca.issue(&spec).unwrap().cert_pem).unwrap();
    let o = run(&["inspect", s(&expired)]);
    expect_status(&o, 1, "inspect expired");
    assert!(stdout(&o).contains("expired 3h ago"), "{}", stdout(&o));
    assert!(stdout(&o).contains("NOT VALID"), "{}", stdout(&o));

    spec.not_before = now + time::Duration::hours(5);
    spec.not_after = now + time::Duration::days(1);
    let early = tmp.path().join("early.pem");
    std::fs::write(&early, ca.issue(&spec).unwrap().cert_pem).unwrap();
    let o = run(&["inspect", s(&early)]);
    expect_status(&o, 1, "inspect not yet valid");
    assert!(stdout(&o).contains("not valid yet"), "{}", stdout(&o));

    // bundle two CAs (one given twice): duplicates dropped, written as a loadable bundle
    let ca2_dir = tmp.path().join("ca2");
    expect_status(
        &run(&["init", "--trust-domain", "mesh.test", "--out", s(&ca2_dir)]),
        0,
        "init second CA",
    );
    let bundle_path = tmp.path().join("bundle.pem");
    let o = run(&[
        "bundle",
        s(&ca_dir.join("ca.pem")),
        s(&ca2_dir.join("ca.pem")),
        s(&ca_dir.join("ca.pem")),
        "--out",
        s(&bundle_path),
    ]);
    expect_status(&o, 0, "bundle");
    assert!(stdout(&o).contains("1 duplicate"), "{}", stdout(&o));
    let bundle = TrustBundle::load(&bundle_path).unwrap();
    assert_eq!(bundle.roots().len(), 2);
    let o = run(&["inspect", s(&bundle_path)]);
    expect_status(&o, 0, "inspect bundle");
    assert!(stdout(&o).contains("certificate #1"), "{}", stdout(&o));

    // a leaf is not a root: clear refusal naming the file
    let o = run(&[
        "bundle",
        s(&ca_dir.join("ca.pem")),
        s(&leaf_dir.join("cert.pem")),
        "--out",
        s(&tmp.path().join("bad-bundle.pem")),
    ]);
    expect_status(&o, 1, "bundle with a leaf");
    let err = stderr(&o);
    assert!(err.contains("is not a CA certificate"), "{err}");
    assert!(err.contains("gateway/cert.pem"), "{err}");
    assert!(!tmp.path().join("bad-bundle.pem").exists());

    // --force replaces the CA key
    let o = run(&[
        "init",
        "--trust-domain",
        "mesh.test",
        "--out",
        s(&ca_dir),
        "--force",
    ]);
    expect_status(&o, 0, "init --force");
    assert_ne!(std::fs::read(ca_dir.join("ca-key.pem")).unwrap(), first_key);
    assert_eq!(mode(&ca_dir.join("ca-key.pem")), 0o600);
}

#[test]
fn usage_and_input_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");

    let o = run(&["init", "--trust-domain", "Not Valid", "--out", s(&ca_dir)]);
    expect_status(&o, 1, "invalid trust domain");
    assert!(
        stderr(&o).contains("invalid trust domain"),
        "{}",
        stderr(&o)
    );
    assert!(!ca_dir.exists(), "nothing written on error");

    expect_status(
        &run(&["init", "--trust-domain", "mesh.test", "--out", s(&ca_dir)]),
        0,
        "init",
    );
    let o = run(&[
        "issue",
        "--ca",
        s(&ca_dir),
        "--cluster",
        "k8s",
        "--component",
        "gateway",
        "--ttl",
        "5x",
        "--out",
        s(&tmp.path().join("out")),
    ]);
    expect_status(&o, 2, "bad ttl is a usage error");
    assert!(stderr(&o).contains("unknown unit"), "{}", stderr(&o));

    let o = run(&[
        "issue",
        "--ca",
        s(&tmp.path().join("missing")),
        "--cluster",
        "k8s",
        "--component",
        "gateway",
        "--out",
        s(&tmp.path().join("out")),
    ]);
    expect_status(&o, 1, "missing CA dir");
    let err = stderr(&o);
    assert!(err.contains("cannot load the mesh CA"), "{err}");
    assert!(err.contains("missing/ca.pem"), "{err}");

    let garbage = tmp.path().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
    let o = run(&["inspect", s(&garbage)]);
    expect_status(&o, 1, "inspect malformed");
    assert!(stderr(&o).contains("malformed PEM"), "{}", stderr(&o));
}
