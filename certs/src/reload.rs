//! Hot reload of the identity and bundle files, by polling their metadata.
//!
//! Why polling and not inotify: a Kubernetes Secret mount replaces files by swapping the
//! `..data` symlink to a new directory, which a watch on the file itself never sees, and BOSH
//! rewrites files in place. `stat` (following symlinks) of three files every 500 ms catches both
//! for next to no cost: the length, mtime, ctime (with nanoseconds) and inode all take part, and
//! the symlink swap always changes the inode.
//!
//! A change is loaded only once the files have looked the same for one whole interval, so a
//! writer caught between `key.pem` and `cert.pem` is usually not even seen. If the files do not
//! load (half-written, malformed PEM, key not matching the certificate, no SPIFFE ID), the
//! previous material stays in use, a `warn!` line says which file and why, and the next change
//! is tried again.

use std::path::Path;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{CertsError, Chain};
use crate::material::{Identity, TrustBundle};
use crate::mesh::{MeshTls, TlsFiles};

impl MeshTls {
    /// Loads the three files now and swaps them in if they differ from the current material.
    ///
    /// Returns `Ok(true)` when something changed, `Ok(false)` when the files hold what is
    /// already in use. On error the previous material stays in use and the failure is counted
    /// in [`MeshTls::reload_status`].
    ///
    /// # Errors
    /// As [`Identity::load`] and [`TrustBundle::load`], naming the file that failed.
    pub fn reload_from(&self, files: &TlsFiles) -> Result<bool, CertsError> {
        let mut status = self.lock_status();
        let loaded = Identity::load(&files.cert, &files.key)
            .and_then(|identity| Ok((identity, TrustBundle::load(&files.bundle)?)));
        let (identity, bundle) = match loaded {
            Ok(pair) => pair,
            Err(e) => {
                status.failures += 1;
                status.last_error = Some(Chain(&e).to_string());
                return Err(e);
            }
        };
        let current = self.shared.material.load();
        if identity.chain() == current.identity.chain() && bundle == current.bundle {
            status.last_error = None;
            return Ok(false);
        }
        if identity.id() != current.identity.id() {
            warn!(
                old = %current.identity.id(),
                new = %identity.id(),
                "the reloaded certificate has a different SPIFFE ID"
            );
        }
        let now = time::OffsetDateTime::now_utc();
        if identity.not_after() <= now || identity.not_before() > now {
            warn!(
                file = %files.cert.display(),
                not_before = %crate::rfc3339(identity.not_before()),
                not_after = %crate::rfc3339(identity.not_after()),
                "the reloaded certificate is not currently valid; peers will refuse it"
            );
        }
        drop(current);
        self.swap(&mut status, identity, bundle);
        Ok(true)
    }

    /// Polls `files` every `interval` and reloads them when they change, until `cancel`.
    ///
    /// Must be called inside a tokio runtime. File reads run on the blocking pool.
    pub fn watch(
        &self,
        files: TlsFiles,
        interval: Duration,
        cancel: CancellationToken,
    ) -> JoinHandle<()> {
        let mut watcher = Watcher {
            mesh: self.clone(),
            files,
            loaded: None,
            pending: None,
        };
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                match tokio::task::spawn_blocking(move || {
                    watcher.poll();
                    watcher
                })
                .await
                {
                    Ok(w) => watcher = w,
                    Err(e) => {
                        warn!(error = %e, "certificate watcher stopped: poll task failed");
                        return;
                    }
                }
            }
            debug!("certificate watcher stopped");
        })
    }
}

/// Metadata that changes whenever a file's content may have changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    #[cfg(unix)]
    unix: (u64, u64, i64, i64),
}

fn stamp(path: &Path) -> Option<Stamp> {
    // `metadata` follows symlinks: a `..data` swap shows up as a new inode.
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: meta.len(),
        modified: meta.modified().ok(),
        #[cfg(unix)]
        unix: {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
        },
    })
}

type Stamps = [Option<Stamp>; 3];

struct Watcher {
    mesh: MeshTls,
    files: TlsFiles,
    /// Stamps of the files as last loaded (successfully or not).
    loaded: Option<Stamps>,
    /// Stamps seen on the previous tick that differ from `loaded`; loaded once they hold still.
    pending: Option<Stamps>,
}

impl Watcher {
    fn poll(&mut self) {
        let now = [
            stamp(&self.files.cert),
            stamp(&self.files.key),
            stamp(&self.files.bundle),
        ];
        if self.loaded.as_ref() == Some(&now) {
            self.pending = None;
            return;
        }
        if self.pending.as_ref() != Some(&now) {
            self.pending = Some(now);
            return;
        }
        self.pending = None;
        // Stamps are taken before reading: a write racing the read shows up as a new change.
        self.loaded = Some(now);
        match self.mesh.reload_from(&self.files) {
            Ok(true) => {}
            Ok(false) => debug!(
                cert = %self.files.cert.display(),
                "TLS files touched but unchanged"
            ),
            Err(e) => warn!(
                cert = %self.files.cert.display(),
                key = %self.files.key.display(),
                bundle = %self.files.bundle.display(),
                error = %Chain(&e),
                "keeping the previous TLS material: the new files do not load; will retry when they change"
            ),
        }
    }
}
