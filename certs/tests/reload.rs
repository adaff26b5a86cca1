//! Hot reload through `MeshTls::watch` with real files: leaf rotation under an open connection,
//! the Kubernetes `..data` symlink swap, CA rotation with a two-root bundle, and files that do
//! not load keeping the previous material.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use isthmus_certs::ca::{IssuedLeaf, MeshCa};
use isthmus_certs::{CertsError, MeshTls, PeerPolicy, TlsFiles};
use rustls::{CertificateError, Error};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const POLL: Duration = Duration::from_millis(50);

struct Watched {
    mesh: MeshTls,
    cancel: CancellationToken,
    handle: JoinHandle<()>,
}

impl Watched {
    fn start(files: &TlsFiles) -> Self {
        let mesh = MeshTls::load(files).expect("initial files load");
        let cancel = CancellationToken::new();
        let handle = mesh.watch(files.clone(), POLL, cancel.clone());
        Watched {
            mesh,
            cancel,
            handle,
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        t(self.handle)
            .await
            .expect("watcher ends cleanly on cancel");
    }
}

/// Writes `contents` to `path` by temp file + rename, so the watcher sees exactly `contents`.
fn replace_file(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp-test");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn leaf_rotation_keeps_open_connections_and_serves_the_new_serial() {
    let ca = MeshCa::generate(TD).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let first = leaf(&ca, "k8s", "gateway");
    first.write(dir.path(), &ca.cert_pem()).unwrap();
    let files = TlsFiles::in_dir(dir.path());
    let watched = Watched::start(&files);
    let mut server = EchoServer::start(
        watched
            .mesh
            .server_config(PeerPolicy::trust_domain(TD), &[ALPN]),
    )
    .await;
    let client_mesh = mesh(&ca, "diego", "gateway", &[&ca]);
    let client_config = client_mesh.client_config(PeerPolicy::trust_domain(TD), &[ALPN]);

    let mut old = connect_and_echo(client_config.clone(), server.addr)
        .await
        .unwrap();
    assert_eq!(server_serial(&old), first.serial);
    server.next().await.unwrap();

    let second = leaf(&ca, "k8s", "gateway");
    second.write(dir.path(), &ca.cert_pem()).unwrap();
    eventually("the server picks up the new leaf", || {
        watched.mesh.serial() == second.serial
    })
    .await;

    // The established connection is untouched and keeps working.
    echo(&mut old, b"still here after rotation").await.unwrap();
    assert_eq!(server_serial(&old), first.serial);
    // A new handshake sees the new certificate.
    let new = connect_and_echo(client_config.clone(), server.addr)
        .await
        .unwrap();
    assert_eq!(server_serial(&new), second.serial);
    server.next().await.unwrap();

    // The client side swaps too: its next handshake presents the replacement.
    let replacement = identity(&ca, "diego", "gateway");
    client_mesh.replace(replacement.clone(), bundle(&[&ca]));
    let _third = connect_and_echo(client_config, server.addr).await.unwrap();
    assert_eq!(
        server.next().await.unwrap().peer_serial,
        replacement.serial()
    );
    echo(&mut old, b"and after the client swap").await.unwrap();

    let status = watched.mesh.reload_status();
    assert_eq!(status.failures, 0, "{status:?}");
    assert!(status.generation >= 2, "{status:?}");
    watched.stop().await;
}

/// Lays out `leaf` the way the kubelet projects a Secret: a timestamped directory, a `..data`
/// symlink to it, and top-level symlinks through `..data`.
fn kubelet_project(root: &Path, version: &str, leaf: &IssuedLeaf, ca_pem: &str) {
    let versioned = root.join(version);
    leaf.write(&versioned, ca_pem).unwrap();
    let tmp_link = root.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp_link).unwrap();
    // rename(2) over the old symlink is the atomic swap the kubelet performs.
    std::fs::rename(&tmp_link, root.join("..data")).unwrap();
    for name in ["cert.pem", "key.pem", "ca.pem"] {
        let link = root.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

#[tokio::test]
async fn kubernetes_symlink_swap_is_picked_up() {
    let ca = MeshCa::generate(TD).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let first = leaf(&ca, "k8s", "gateway");
    kubelet_project(
        dir.path(),
        "..2026_01_01_00_00_00.1",
        &first,
        &ca.cert_pem(),
    );
    let files = TlsFiles::in_dir(dir.path());
    let watched = Watched::start(&files);
    assert_eq!(watched.mesh.serial(), first.serial);
    let mut server = EchoServer::start(
        watched
            .mesh
            .server_config(PeerPolicy::trust_domain(TD), &[ALPN]),
    )
    .await;
    let client_config =
        mesh(&ca, "diego", "gateway", &[&ca]).client_config(PeerPolicy::trust_domain(TD), &[ALPN]);
    let mut old = connect_and_echo(client_config.clone(), server.addr)
        .await
        .unwrap();
    server.next().await.unwrap();

    let second = leaf(&ca, "k8s", "gateway");
    kubelet_project(
        dir.path(),
        "..2026_01_02_00_00_00.2",
        &second,
        &ca.cert_pem(),
    );
    std::fs::remove_dir_all(dir.path().join("..2026_01_01_00_00_00.1")).unwrap();
    eventually("the server follows the ..data swap", || {
        watched.mesh.serial() == second.serial
    })
    .await;

    echo(&mut old, b"old connection survives the swap")
        .await
        .unwrap();
    let new = connect_and_echo(client_config, server.addr).await.unwrap();
    assert_eq!(server_serial(&new), second.serial);
    server.next().await.unwrap();
    assert_eq!(watched.mesh.reload_status().failures, 0);
    watched.stop().await;
}

#[tokio::test]
async fn ca_rotation_with_a_two_root_bundle() {
    let old_ca = MeshCa::generate(TD).unwrap();
    let new_ca = MeshCa::generate(TD).unwrap();
    let both = format!("{}{}", old_ca.cert_pem(), new_ca.cert_pem());
    let dir = tempfile::tempdir().unwrap();
    leaf(&old_ca, "k8s", "gateway")
        .write(dir.path(), &both)
        .unwrap();
    let files = TlsFiles::in_dir(dir.path());
    let watched = Watched::start(&files);
    assert_eq!(watched.mesh.bundle().roots().len(), 2);
    let mut server = EchoServer::start(
        watched
            .mesh
            .server_config(PeerPolicy::trust_domain(TD), &[ALPN]),
    )
    .await;
    let policy = PeerPolicy::trust_domain(TD);
    let old_client = mesh(&old_ca, "diego", "gateway", &[&old_ca, &new_ca])
        .client_config(policy.clone(), &[ALPN]);
    let new_client =
        mesh(&new_ca, "diego", "gateway", &[&old_ca, &new_ca]).client_config(policy, &[ALPN]);

    // Phase 1: both roots trusted, both generations of leaves accepted.
    let _a = connect_and_echo(old_client.clone(), server.addr)
        .await
        .unwrap();
    server.next().await.unwrap();
    let _b = connect_and_echo(new_client.clone(), server.addr)
        .await
        .unwrap();
    server.next().await.unwrap();

    // Phase 2: the server moves to a new-CA leaf and drops the old root.
    let server_leaf = leaf(&new_ca, "k8s", "gateway");
    server_leaf.write(dir.path(), &new_ca.cert_pem()).unwrap();
    eventually("the server drops the old root", || {
        watched.mesh.bundle().roots().len() == 1 && watched.mesh.serial() == server_leaf.serial
    })
    .await;

    assert!(connect_and_echo(old_client, server.addr).await.is_err());
    let err = server.next().await.expect_err("old leaf refused");
    assert_eq!(
        *rustls_error(&err),
        Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
    let new = connect_and_echo(new_client, server.addr).await.unwrap();
    assert_eq!(server_serial(&new), server_leaf.serial);
    server.next().await.unwrap();
    watched.stop().await;
}

#[tokio::test]
async fn files_that_do_not_load_keep_the_previous_material() {
    let ca = MeshCa::generate(TD).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = leaf(&ca, "k8s", "gateway");
    good.write(dir.path(), &ca.cert_pem()).unwrap();
    let files = TlsFiles::in_dir(dir.path());
    let watched = Watched::start(&files);
    let mut server = EchoServer::start(
        watched
            .mesh
            .server_config(PeerPolicy::trust_domain(TD), &[ALPN]),
    )
    .await;
    let client_config =
        mesh(&ca, "diego", "gateway", &[&ca]).client_config(PeerPolicy::trust_domain(TD), &[ALPN]);
    let next = leaf(&ca, "k8s", "gateway");

    // Each step leaves the files in a state that must be refused.
    let half_cert = &next.cert_pem.as_bytes()[..next.cert_pem.len() / 2];
    let check = Refusal {
        mesh: &watched.mesh,
        server: &mut server,
        client_config: &client_config,
        serial: &good.serial,
    };
    let check = check
        .expect("half-written cert.pem", "cert.pem", || {
            replace_file(&files.cert, half_cert);
        })
        .await;
    let check = check
        .expect("new cert.pem, old key.pem", "does not match", || {
            replace_file(&files.cert, next.cert_pem.as_bytes());
        })
        .await;
    check
        .expect(
            "new key.pem, malformed ca.pem",
            "ca.pem: malformed PEM",
            || {
                replace_file(
                    &files.bundle,
                    b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
                );
                replace_file(&files.key, next.key_pem.as_bytes());
            },
        )
        .await;

    // The next good write is picked up.
    replace_file(&files.bundle, ca.cert_pem().as_bytes());
    eventually("the good files are picked up", || {
        watched.mesh.serial() == next.serial
    })
    .await;
    assert_eq!(watched.mesh.reload_status().last_error, None);
    let stream = connect_and_echo(client_config, server.addr).await.unwrap();
    assert_eq!(server_serial(&stream), next.serial);
    server.next().await.unwrap();
    watched.stop().await;
}

/// One "these files must be refused" step of the malformed-files test.
struct Refusal<'a> {
    mesh: &'a MeshTls,
    server: &'a mut EchoServer,
    client_config: &'a std::sync::Arc<rustls::ClientConfig>,
    serial: &'a str,
}

impl<'a> Refusal<'a> {
    async fn expect(self, what: &str, expected_error: &str, write: impl FnOnce()) -> Refusal<'a> {
        let failures = self.mesh.reload_status().failures;
        write();
        eventually(&format!("the watcher tries and refuses: {what}"), || {
            self.mesh.reload_status().failures > failures
        })
        .await;
        let error = self.mesh.reload_status().last_error.unwrap_or_default();
        assert!(error.contains(expected_error), "{what}: {error}");
        assert_eq!(self.mesh.serial(), self.serial, "{what}");
        let stream = connect_and_echo(self.client_config.clone(), self.server.addr)
            .await
            .unwrap_or_else(|e| panic!("{what}: handshakes must keep working: {e}"));
        assert_eq!(server_serial(&stream), self.serial, "{what}");
        self.server.next().await.unwrap();
        self
    }
}

#[test]
fn reload_from_reports_changes_and_keeps_old_material_on_error() {
    let ca = MeshCa::generate(TD).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let first = leaf(&ca, "k8s", "gateway");
    first.write(dir.path(), &ca.cert_pem()).unwrap();
    let files = TlsFiles::in_dir(dir.path());
    let mesh = MeshTls::load(&files).unwrap();
    assert!(!mesh.reload_from(&files).unwrap(), "same files: no change");

    // A certificate without a SPIFFE ID is refused, naming the file.
    let other_td = MeshCa::generate("other.test").unwrap();
    replace_file(&files.cert, other_td.cert_pem().as_bytes());
    let err = mesh.reload_from(&files).unwrap_err();
    assert!(
        matches!(
            err,
            CertsError::InvalidSpiffeId { .. } | CertsError::SpiffeIdCount { .. }
        ),
        "{err:?}"
    );
    replace_file(&files.cert, b"");
    let err = mesh.reload_from(&files).unwrap_err();
    assert!(matches!(err, CertsError::NoCertificates { .. }), "{err:?}");
    assert!(err.to_string().contains("cert.pem"), "{err}");
    std::fs::remove_file(&files.key).unwrap();
    let err = mesh.reload_from(&files).unwrap_err();
    assert!(matches!(err, CertsError::Read { .. }), "{err:?}");
    assert_eq!(mesh.serial(), first.serial);
    assert_eq!(mesh.reload_status().failures, 3);

    let second = leaf(&ca, "k8s", "gateway");
    second.write(dir.path(), &ca.cert_pem()).unwrap();
    assert!(mesh.reload_from(&files).unwrap());
    assert_eq!(mesh.serial(), second.serial);
    assert!(!mesh.reload_from(&files).unwrap());
    assert_eq!(mesh.reload_status().last_error, None);
}
