//! The YAML route file source.
//!
//! ```yaml
//! routes:
//!   - name: orders.apps.internal   # host name, case-insensitive
//!     port: 8080
//!     protocol: http               # tcp (default) | http | tls
//!     home_cluster: k8s
//!     exported: true               # default false: deny by default
//!     allowed_peers: [cluster:diego, spiffe://mesh.local/cluster/diego/gateway]
//!     backends: ["10.0.3.7:8080", "orders.default.svc:8080"]
//!     weights: {k8s: 100}          # optional
//! ```
//!
//! Each entry is checked on its own: a bad entry is rejected with its reason and the others
//! apply. A file that is not YAML of this shape (half-written, truncated, empty) changes
//! nothing: the last good table stays. An explicit `routes: []` does clear the table.

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{InvalidRoute, SourceError};
use crate::model::{
    Backend, ClusterName, PeerSelector, Protocol, Route, RouteKey, RouteName, parse_list,
};
use crate::source::Rejected;
use crate::table::{Applied, RouteStore};

/// The routes a file held, and the entries it refused.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The valid routes, at most one per name and port.
    pub routes: Vec<Route>,
    /// The refused entries.
    pub rejected: Vec<Rejected>,
}

/// One entry as written; checked into a [`Route`] by [`RawRoute::into_route`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    /// Host name.
    name: String,
    /// Port apps call it on.
    port: i64,
    /// tcp, http or tls.
    #[serde(default)]
    protocol: Option<String>,
    /// The cluster that serves it.
    home_cluster: String,
    /// Whether the home cluster exports it.
    #[serde(default)]
    exported: bool,
    /// `cluster:<name>` or SPIFFE IDs.
    #[serde(default)]
    allowed_peers: Vec<String>,
    /// `host:port` in the home cluster.
    #[serde(default)]
    backends: Vec<String>,
    /// Traffic share per cluster.
    #[serde(default)]
    weights: BTreeMap<String, u32>,
}

impl RawRoute {
    fn into_route(self) -> Result<Route, InvalidRoute> {
        let name = RouteName::parse(&self.name)?;
        let port = u16::try_from(self.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or(InvalidRoute::Port { value: self.port })?;
        let key = RouteKey::new(name, port);
        let protocol = match self.protocol {
            Some(p) => p.parse()?,
            None => Protocol::default(),
        };
        let allowed_peers = parse_list(&self.allowed_peers, PeerSelector::parse)?;
        let backends = parse_list(&self.backends, Backend::parse)?;
        let weights = self
            .weights
            .iter()
            .map(|(c, w)| Ok((ClusterName::parse(c)?, *w)))
            .collect::<Result<BTreeMap<_, _>, InvalidRoute>>()?;
        if !weights.is_empty() && weights.values().all(|w| *w == 0) {
            return Err(InvalidRoute::Weights {
                route: key.to_string(),
            });
        }
        Ok(Route {
            key,
            protocol,
            home_cluster: ClusterName::parse(&self.home_cluster)?,
            exported: self.exported,
            allowed_peers,
            backends,
            weights,
            vip: None,
            revision: 0,
        })
    }
}

/// Parses a route file's text. `origin` names the file in errors.
///
/// # Errors
/// [`SourceError::Malformed`] when the text is not YAML, not a mapping with exactly one key
/// `routes`, or `routes` is not a list. Bad entries are not errors: they come back in
/// [`Loaded::rejected`].
pub fn parse(text: &str, origin: &Path) -> Result<Loaded, SourceError> {
    let malformed = |reason: String| SourceError::Malformed {
        path: origin.to_path_buf(),
        reason,
    };
    let doc: serde_norway::Value =
        serde_norway::from_str(text).map_err(|e| malformed(e.to_string()))?;
    let serde_norway::Value::Mapping(top) = doc else {
        return Err(malformed(
            "expected a mapping with the key `routes` at the top".into(),
        ));
    };
    let mut entries = None;
    for (key, value) in top {
        match key.as_str() {
            Some("routes") => entries = Some(value),
            other => {
                return Err(malformed(format!(
                    "unknown top-level key {:?}, expected `routes`",
                    other.unwrap_or("<not a string>")
                )));
            }
        }
    }
    let entries = match entries {
        Some(serde_norway::Value::Sequence(list)) => list,
        Some(serde_norway::Value::Null) => Vec::new(),
        Some(_) => return Err(malformed("`routes` must be a list".into())),
        None => return Err(malformed("missing `routes`".into())),
    };

    let mut loaded = Loaded::default();
    let mut seen = HashSet::new();
    for (index, value) in entries.into_iter().enumerate() {
        let entry = format!("routes[{index}]");
        let hint = value
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_string);
        let reject = |route: Option<String>, reason: String| Rejected {
            entry: entry.clone(),
            route,
            reason,
        };
        let raw: RawRoute = match serde_norway::from_value(value) {
            Ok(raw) => raw,
            Err(e) => {
                loaded.rejected.push(reject(hint, e.to_string()));
                continue;
            }
        };
        match raw.into_route() {
            Ok(route) => {
                if seen.insert(route.key.clone()) {
                    loaded.routes.push(route);
                } else {
                    let key = route.key.to_string();
                    loaded.rejected.push(reject(
                        Some(key.clone()),
                        format!("duplicate of an earlier entry for {key}; the first one is kept"),
                    ));
                }
            }
            Err(e) => loaded.rejected.push(reject(hint, e.to_string())),
        }
    }
    Ok(loaded)
}

/// Counters of one source, for metrics and for tests that wait on a load.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Loads that produced a table (even with rejected entries).
    pub loads_ok: AtomicU64,
    /// Loads refused as a whole (unreadable or malformed file): the table was kept.
    pub loads_failed: AtomicU64,
    /// Entries rejected, summed over loads.
    pub entries_rejected: AtomicU64,
}

/// A route file, watched for changes.
#[derive(Debug, Clone)]
pub struct FileSource {
    path: PathBuf,
    stats: Arc<SourceStats>,
}

impl FileSource {
    /// A source reading `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            stats: Arc::default(),
        }
    }

    /// Counters shared by every clone of this source.
    pub fn stats(&self) -> Arc<SourceStats> {
        Arc::clone(&self.stats)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and parses the file once.
    ///
    /// # Errors
    /// When the file cannot be read or is malformed as a whole; see [`parse`].
    pub fn load(&self) -> Result<Loaded, SourceError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| SourceError::Read {
            path: self.path.clone(),
            source,
        })?;
        parse(&text, &self.path)
    }

    /// Loads the file into `store`, logging each rejected entry. On error the store is left
    /// as it was.
    ///
    /// # Errors
    /// As [`FileSource::load`].
    pub fn apply(&self, store: &RouteStore) -> Result<(Applied, Vec<Rejected>), SourceError> {
        let loaded = match self.load() {
            Ok(loaded) => loaded,
            Err(e) => {
                self.stats.loads_failed.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        self.stats.loads_ok.fetch_add(1, Ordering::Relaxed);
        self.stats
            .entries_rejected
            .fetch_add(loaded.rejected.len() as u64, Ordering::Relaxed);
        for rejected in &loaded.rejected {
            tracing::warn!(file = %self.path.display(), "{rejected}");
        }
        let applied = store.replace_all(loaded.routes);
        if applied.is_change() {
            tracing::info!(
                file = %self.path.display(),
                revision = applied.revision,
                added = applied.added,
                changed = applied.changed,
                removed = applied.removed,
                rejected = loaded.rejected.len(),
                "route table updated"
            );
        }
        Ok((applied, loaded.rejected))
    }

    /// Applies the file now, then again whenever it changes (polled every `interval`), until
    /// `cancel` fires. Polling the file's metadata catches both in-place rewrites and a
    /// Kubernetes ConfigMap's symlink swap, which inotify on the file alone would miss.
    pub fn watch(
        self,
        store: RouteStore,
        interval: Duration,
        cancel: CancellationToken,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut last = None;
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let now = Fingerprint::of(&self.path);
                if now == last {
                    continue;
                }
                last = now;
                if let Err(e) = self.apply(&store) {
                    tracing::warn!("{e}");
                }
            }
        })
    }
}

/// What tells us a file may have changed, following symlinks.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Fingerprint {
    len: u64,
    modified: Option<std::time::SystemTime>,
    inode: u64,
    ctime_ns: i128,
}

impl Fingerprint {
    fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let (inode, ctime_ns) = {
            use std::os::unix::fs::MetadataExt;
            (
                meta.ino(),
                i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            )
        };
        #[cfg(not(unix))]
        let (inode, ctime_ns) = (0, 0);
        Some(Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode,
            ctime_ns,
        })
    }
}
