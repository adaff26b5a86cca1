//! The watchable route table.
//!
//! Readers on the data path call [`RouteStore::snapshot`]: one atomic load, no lock, and an
//! immutable [`RouteTable`] that stays consistent for as long as they hold it. Writers are
//! rare (a file edit, a route-sync delta); they build the next table beside the current one,
//! swap it in whole, and wake every [`RouteWatch`]. Unchanged routes keep their `Arc`, so a
//! consumer can diff two snapshots cheaply.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::model::{Route, RouteKey, RouteName};

/// An immutable, consistent set of routes at one revision.
///
/// The maps are persistent (`imbl`): the next table shares every untouched node with this
/// one, so one route changing in a table of 250,000 costs O(log n), not a copy.
#[derive(Debug, Default, Clone)]
pub struct RouteTable {
    revision: u64,
    routes: imbl::HashMap<RouteKey, Arc<Route>>,
    by_name: imbl::HashMap<RouteName, Vec<Arc<Route>>>,
}

impl RouteTable {
    fn upsert(&mut self, route: Arc<Route>) {
        let key = route.key.clone();
        let list = self.by_name.entry(key.name.clone()).or_default();
        match list.iter().position(|r| r.key.port >= key.port) {
            Some(i) if list[i].key.port == key.port => list[i] = Arc::clone(&route),
            Some(i) => list.insert(i, Arc::clone(&route)),
            None => list.push(Arc::clone(&route)),
        }
        self.routes.insert(key, route);
    }

    fn remove(&mut self, key: &RouteKey) -> bool {
        if self.routes.remove(key).is_none() {
            return false;
        }
        if let Some(list) = self.by_name.get_mut(&key.name) {
            list.retain(|r| r.key.port != key.port);
            if list.is_empty() {
                self.by_name.remove(&key.name);
            }
        }
        true
    }

    /// The revision of this table; it grows by one with every applied change.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The route with this name and port.
    pub fn get(&self, key: &RouteKey) -> Option<&Arc<Route>> {
        self.routes.get(key)
    }

    /// Every route with this name (any port), sorted by port. `name` must be normalised
    /// (lower case, no trailing dot), as [`RouteName`] is.
    pub fn by_name(&self, name: &str) -> &[Arc<Route>] {
        // imbl looks keys up by the key type; a name that does not parse has no routes.
        match RouteName::parse(name) {
            Ok(name) => self.by_name.get(&name).map(Vec::as_slice).unwrap_or(&[]),
            Err(_) => &[],
        }
    }

    /// Every route with this name, by an already-parsed name.
    pub fn by_route_name(&self, name: &RouteName) -> &[Arc<Route>] {
        self.by_name.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every route, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.values()
    }

    /// The number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether the table holds no route.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// What changed between two tables.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    /// Routes added or changed, as they are in the newer table.
    pub upserted: Vec<Arc<Route>>,
    /// Keys of routes that are gone.
    pub removed: Vec<RouteKey>,
}

impl Delta {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.upserted.is_empty() && self.removed.is_empty()
    }
}

/// The changes from `old` to `new`. Routes shared by `Arc` are skipped without comparing.
pub fn diff(old: &RouteTable, new: &RouteTable) -> Delta {
    let mut delta = Delta::default();
    for (key, route) in &new.routes {
        match old.routes.get(key) {
            Some(prev) if Arc::ptr_eq(prev, route) || **prev == **route => {}
            _ => delta.upserted.push(Arc::clone(route)),
        }
    }
    for key in old.routes.keys() {
        if !new.routes.contains_key(key) {
            delta.removed.push(key.clone());
        }
    }
    delta
}

/// A summary of one applied change, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    /// The revision of the new table (the old one when nothing changed).
    pub revision: u64,
    /// Routes new in this revision.
    pub added: usize,
    /// Routes whose content changed.
    pub changed: usize,
    /// Routes removed.
    pub removed: usize,
}

impl Applied {
    /// Whether the table changed.
    pub fn is_change(&self) -> bool {
        self.added + self.changed + self.removed > 0
    }
}

/// How many changed keys the store remembers for resuming watchers. A watcher further
/// behind than this gets a full snapshot.
pub const DEFAULT_LOG_CAPACITY: usize = 1 << 20;

struct Inner {
    current: ArcSwap<RouteTable>,
    notify: watch::Sender<u64>,
    /// Serialises writers; holds the change log: `(revision, key)` for every key that changed
    /// at that revision, oldest first, so a watcher can resume with just what changed.
    write: Mutex<ChangeLog>,
}

struct ChangeLog {
    entries: VecDeque<(u64, RouteKey)>,
    capacity: usize,
    /// Revisions at or below this one may have been trimmed away.
    trimmed_through: u64,
}

impl ChangeLog {
    fn record(&mut self, revision: u64, keys: impl IntoIterator<Item = RouteKey>) {
        for key in keys {
            self.entries.push_back((revision, key));
        }
        while self.entries.len() > self.capacity {
            if let Some((rev, _)) = self.entries.pop_front() {
                self.trimmed_through = rev;
            }
        }
    }
}

/// The shared, watchable route table. Cheap to clone; all clones see the same table.
#[derive(Clone)]
pub struct RouteStore {
    inner: Arc<Inner>,
}

impl Default for RouteStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for RouteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.snapshot();
        f.debug_struct("RouteStore")
            .field("revision", &table.revision())
            .field("routes", &table.len())
            .finish()
    }
}

impl RouteStore {
    /// An empty table at revision 0.
    pub fn new() -> Self {
        let (notify, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(RouteTable::default()),
                notify,
                write: Mutex::new(ChangeLog {
                    entries: VecDeque::new(),
                    capacity: DEFAULT_LOG_CAPACITY,
                    trimmed_through: 0,
                }),
            }),
        }
    }

    /// The current table: one atomic load, never blocks, never waits on writers.
    pub fn snapshot(&self) -> Arc<RouteTable> {
        self.inner.current.load_full()
    }

    /// A watcher woken on every change after this call.
    pub fn subscribe(&self) -> RouteWatch {
        RouteWatch {
            rx: self.inner.notify.subscribe(),
            store: self.clone(),
        }
    }

    /// Replaces the whole table with `routes` (keyed by name and port; a later duplicate
    /// replaces an earlier one, so callers reject duplicates first). Unchanged routes keep
    /// their revision and their `Arc`; new and changed ones take the new revision. Nothing is
    /// published, and no watcher woken, when nothing changed.
    pub fn replace_all(&self, routes: impl IntoIterator<Item = Route>) -> Applied {
        let mut input: HashMap<RouteKey, Route> = HashMap::new();
        for route in routes {
            input.insert(route.key.clone(), route);
        }
        let old = self.snapshot();
        let removals: Vec<RouteKey> = old
            .routes
            .keys()
            .filter(|k| !input.contains_key(*k))
            .cloned()
            .collect();
        self.apply(input.into_values(), removals)
    }

    /// Applies a delta: `upserts` replace or add routes by key, `removals` drop keys. Routes
    /// whose content did not change keep their revision; a delta that changes nothing
    /// publishes nothing. O(changes x log n).
    pub fn apply(
        &self,
        upserts: impl IntoIterator<Item = Route>,
        removals: impl IntoIterator<Item = RouteKey>,
    ) -> Applied {
        let mut log = self.inner.write.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.snapshot();
        let next_rev = old.revision + 1;
        let mut summary = Applied {
            revision: old.revision,
            ..Applied::default()
        };
        let mut table = (*old).clone();
        let mut changed = Vec::new();
        for key in removals {
            if table.remove(&key) {
                summary.removed += 1;
                changed.push(key);
            }
        }
        for mut route in upserts {
            match table.routes.get(&route.key) {
                Some(prev) if prev.same_content(&route) => continue,
                Some(_) => summary.changed += 1,
                None => summary.added += 1,
            }
            route.revision = next_rev;
            changed.push(route.key.clone());
            table.upsert(Arc::new(route));
        }
        if !summary.is_change() {
            return summary;
        }
        summary.revision = next_rev;
        table.revision = next_rev;
        log.record(next_rev, changed);
        self.inner.current.store(Arc::new(table));
        self.inner.notify.send_replace(next_rev);
        summary
    }

    /// What changed after `revision`, against the current table: the routes changed or added
    /// since (as they are now) and the keys removed since. `None` when the log no longer
    /// reaches back that far (the caller then needs a full snapshot). Returns the revision the
    /// answer is current to.
    pub fn changes_since(&self, revision: u64) -> Option<(u64, Delta)> {
        let log = self.inner.write.lock().unwrap_or_else(|e| e.into_inner());
        let table = self.snapshot();
        if revision > table.revision || revision < log.trimmed_through {
            return None;
        }
        let start = log.entries.partition_point(|(rev, _)| *rev <= revision);
        let mut seen = std::collections::HashSet::new();
        let mut delta = Delta::default();
        for (_, key) in log.entries.range(start..) {
            if !seen.insert(key) {
                continue;
            }
            match table.get(key) {
                Some(route) => delta.upserted.push(Arc::clone(route)),
                None => delta.removed.push(key.clone()),
            }
        }
        Some((table.revision, delta))
    }

    /// Sets how many changed keys are remembered for [`RouteStore::changes_since`].
    pub fn set_log_capacity(&self, capacity: usize) {
        let mut log = self.inner.write.lock().unwrap_or_else(|e| e.into_inner());
        log.capacity = capacity;
        log.record(0, std::iter::empty());
    }
}

/// Wakes its owner when the table changes.
pub struct RouteWatch {
    rx: watch::Receiver<u64>,
    store: RouteStore,
}

impl RouteWatch {
    /// Waits for a table newer than the last one this watcher saw and returns it. Several
    /// quick changes may fold into one wake-up: the table returned is always the newest.
    pub async fn changed(&mut self) -> Arc<RouteTable> {
        // The sender lives in the store this watcher holds, so it cannot be dropped.
        let _ = self.rx.changed().await;
        self.rx.borrow_and_update();
        self.store.snapshot()
    }

    /// The current table, without waiting.
    pub fn current(&self) -> Arc<RouteTable> {
        self.store.snapshot()
    }
}
