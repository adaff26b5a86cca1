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
//!     vip: 100.64.0.7              # optional; see below
//! ```
//!
//! `vip` is for consumers that read a route file themselves, without route-sync (a DNS shim
//! and an egress given the same static file then answer and recognise the same address).
//! route-sync ignores it: the VIPs it serves are its own allocation's.
//!
//! Each entry is checked on its own: a bad entry is rejected with its reason and the others
//! apply, while the routes of the name it gives keep their last good version (an entry cut
//! mid-way, or a typo in one field, never removes a route). A file that is not YAML of this
//! shape (half-written, truncated, empty, or `routes:` with nothing after it) changes
//! nothing: the last good table stays. Only an explicit `routes: []` clears the table.
//!
//! The watcher loads a file only once it has settled (its metadata unchanged for one poll
//! interval), so a writer that truncates the file and writes it in several steps is read
//! once, whole: a file cut at an entry boundary is valid YAML with fewer routes, and only
//! waiting tells it apart from a real removal.

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
    /// The names that refused entries gave (when the name itself was valid) and no valid
    /// entry has: [`FileSource::apply`] keeps their current routes rather than removing them.
    pub unsettled_names: Vec<RouteName>,
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
    /// The route's VIP, for consumers reading the file without route-sync.
    #[serde(default)]
    vip: Option<String>,
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
        let vip = match &self.vip {
            Some(text) => {
                Some(
                    text.parse::<std::net::IpAddr>()
                        .map_err(|_| InvalidRoute::Vip {
                            value: text.clone(),
                        })?,
                )
            }
            None => None,
        };
        Ok(Route {
            key,
            protocol,
            home_cluster: ClusterName::parse(&self.home_cluster)?,
            exported: self.exported,
            allowed_peers,
            backends,
            weights,
            vip,
            egress_port: None,
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
        // `routes:` and nothing after it is what a file cut right after the key looks like;
        // clearing the table takes the explicit `routes: []`.
        Some(serde_norway::Value::Null) => {
            return Err(malformed(
                "`routes` is empty (null); write `routes: []` to remove every route".into(),
            ));
        }
        Some(_) => return Err(malformed("`routes` must be a list".into())),
        None => return Err(malformed("missing `routes`".into())),
    };

    let mut loaded = Loaded::default();
    let mut seen = HashSet::new();
    let mut bad_names = Vec::new();
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
                bad_names.extend(hint.as_deref().and_then(|n| RouteName::parse(n).ok()));
                loaded.rejected.push(reject(hint, e.to_string()));
                continue;
            }
        };
        let name = RouteName::parse(&raw.name).ok();
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
            Err(e) => {
                bad_names.extend(name);
                loaded.rejected.push(reject(hint, e.to_string()));
            }
        }
    }
    let good: HashSet<&RouteName> = loaded.routes.iter().map(|r| &r.key.name).collect();
    bad_names.retain(|n| !good.contains(n));
    bad_names.sort();
    bad_names.dedup();
    loaded.unsettled_names = bad_names;
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

/// Name of the route-file load counter as scraped (the registry adds `_total`).
pub const ROUTE_FILE_LOADS: &str = "isthmus_route_file_loads_total";
/// Name of the rejected-entry counter as scraped.
pub const ROUTE_FILE_ENTRIES_REJECTED: &str = "isthmus_route_file_entries_rejected_total";

/// Labels of a route file's load counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct LoadLabels {
    file: String,
    /// `ok` (a table came of it, rejected entries or not) or `failed` (the file was
    /// unreadable or malformed as a whole, and the previous table was kept).
    result: &'static str,
}

/// Labels of a route file's rejected-entry count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct FileLabel {
    file: String,
}

/// A route file's [`SourceStats`] as metrics, read at scrape time:
/// `isthmus_route_file_loads_total{file,result="ok|failed"}` and
/// `isthmus_route_file_entries_rejected_total{file}`. A failed load keeps the previous
/// table, so without these an operator would see only a log line.
#[derive(Debug)]
pub struct RouteFileMetrics {
    file: String,
    stats: Arc<SourceStats>,
}

impl RouteFileMetrics {
    /// The metrics of `source`.
    pub fn new(source: &FileSource) -> Self {
        Self {
            file: source.path.display().to_string(),
            stats: source.stats(),
        }
    }

    /// Registers them in `registry`.
    pub fn register(self, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(self));
    }
}

impl prometheus_client::collector::Collector for RouteFileMetrics {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric as _;
        use prometheus_client::metrics::counter::ConstCounter;
        {
            let mut loads = encoder.encode_descriptor(
                ROUTE_FILE_LOADS.trim_end_matches("_total"),
                "Loads of the route file: ok (a table came of it) or failed (the previous table was kept)",
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (result, count) in [
                ("ok", &self.stats.loads_ok),
                ("failed", &self.stats.loads_failed),
            ] {
                let labels = LoadLabels {
                    file: self.file.clone(),
                    result,
                };
                ConstCounter::new(count.load(Ordering::Relaxed))
                    .encode(loads.encode_family(&labels)?)?;
            }
        }
        let mut rejected = encoder.encode_descriptor(
            ROUTE_FILE_ENTRIES_REJECTED.trim_end_matches("_total"),
            "Route file entries refused (each with its reason in the log), summed over loads",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        let labels = FileLabel {
            file: self.file.clone(),
        };
        ConstCounter::new(self.stats.entries_rejected.load(Ordering::Relaxed))
            .encode(rejected.encode_family(&labels)?)?;
        Ok(())
    }
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
        parse(&self.read()?, &self.path)
    }

    fn read(&self) -> Result<String, SourceError> {
        std::fs::read_to_string(&self.path).map_err(|source| SourceError::Read {
            path: self.path.clone(),
            source,
        })
    }

    /// Loads the file into `store`, logging each rejected entry. On error the store is left
    /// as it was. The routes of a name that only refused entries give keep their current
    /// version (see [`Loaded::unsettled_names`]).
    ///
    /// # Errors
    /// As [`FileSource::load`].
    pub fn apply(&self, store: &RouteStore) -> Result<(Applied, Vec<Rejected>), SourceError> {
        let text = self.read();
        self.apply_text(store, text)
    }

    fn apply_text(
        &self,
        store: &RouteStore,
        text: Result<String, SourceError>,
    ) -> Result<(Applied, Vec<Rejected>), SourceError> {
        let loaded = match text.and_then(|t| parse(&t, &self.path)) {
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
        let mut routes = loaded.routes;
        if !loaded.unsettled_names.is_empty() {
            let current = store.snapshot();
            for name in &loaded.unsettled_names {
                for kept in current.by_route_name(name) {
                    tracing::warn!(
                        file = %self.path.display(),
                        route = %kept.key,
                        "keeping the last good version of a route whose entry was refused"
                    );
                    routes.push(Route::clone(kept));
                }
            }
        }
        let applied = store.replace_all(routes);
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
    ///
    /// A change is loaded only once the file settled: its metadata stayed the same for one
    /// interval, and again after it was read. A writer that truncates the file and writes it
    /// in steps less than an interval apart is therefore read once, complete; the first load
    /// comes one interval after the start.
    pub fn watch(
        self,
        store: RouteStore,
        interval: Duration,
        cancel: CancellationToken,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut settle = Settle::default();
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let now = Fingerprint::of(&self.path);
                if !settle.ready(now) {
                    continue;
                }
                let text = self.read();
                // Written to while we read: wait for it to settle again.
                let after = Fingerprint::of(&self.path);
                if after != now {
                    settle.ready(after);
                    continue;
                }
                settle.loaded(now);
                if let Err(e) = self.apply_text(&store, text) {
                    tracing::warn!("{e}");
                }
            }
        })
    }
}

/// When a changed file may be loaded: once its fingerprint was the same on two polls in a
/// row and differs from the one last loaded. No clock: the poll interval is the unit.
#[derive(Debug, Default)]
struct Settle {
    /// What the last load read; `None` before the first.
    loaded: Option<Option<Fingerprint>>,
    /// What the previous poll saw, while it differs from `loaded`.
    pending: Option<Option<Fingerprint>>,
}

impl Settle {
    /// Whether the file, fingerprinted `now`, should be loaded now.
    fn ready(&mut self, now: Option<Fingerprint>) -> bool {
        if self.loaded == Some(now) {
            self.pending = None;
            return false;
        }
        if self.pending == Some(now) {
            return true;
        }
        self.pending = Some(now);
        false
    }

    fn loaded(&mut self, now: Option<Fingerprint>) {
        self.loaded = Some(now);
        self.pending = None;
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
