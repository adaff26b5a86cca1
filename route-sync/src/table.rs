//! The watchable route table.
//!
//! Readers on the data path call [`RouteStore::snapshot`]: one atomic load, no lock, and an
//! immutable [`RouteTable`] that stays consistent for as long as they hold it. Writers are
//! rare (a file edit, a route-sync delta); they build the next table beside the current one,
//! swap it in whole, and wake every [`RouteWatch`]. Unchanged routes keep their `Arc`, so a
//! consumer can diff two snapshots cheaply.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::model::{Route, RouteKey, RouteName};

/// An immutable, consistent set of routes at one revision.
///
/// The map is persistent (`imbl`): the next table shares every untouched node with this
/// one, so one route changing in a table of 250,000 costs O(log n), not a copy. It is keyed
/// by name alone: a name almost always has one port, so one map answers both lookups by
/// `name:port` and by name, at about half the memory of a map per lookup.
#[derive(Debug, Default, Clone)]
pub struct RouteTable {
    revision: u64,
    len: usize,
    by_name: imbl::GenericHashMap<RouteName, Ports, Hasher, imbl::shared_ptr::DefaultSharedPtr>,
}

/// The hasher of the route maps: fast on short names, and seeded per process (SipHash cost a
/// sixth of a 250,000-route sync).
pub(crate) type Hasher = foldhash::fast::RandomState;

/// The routes of one name, sorted by port. One port needs no allocation of its own.
#[derive(Debug, Clone)]
enum Ports {
    One(Arc<Route>),
    /// Two or more, sorted by port.
    Many(Vec<Arc<Route>>),
}

impl Ports {
    fn as_slice(&self) -> &[Arc<Route>] {
        match self {
            Ports::One(route) => std::slice::from_ref(route),
            Ports::Many(routes) => routes,
        }
    }

    fn get(&self, port: u16) -> Option<&Arc<Route>> {
        match self {
            Ports::One(route) => (route.key.port == port).then_some(route),
            Ports::Many(routes) => routes
                .binary_search_by_key(&port, |r| r.key.port)
                .ok()
                .map(|i| &routes[i]),
        }
    }

    /// Adds or replaces the route of its port; true when it was added.
    fn upsert(&mut self, route: Arc<Route>) -> bool {
        match self {
            Ports::One(only) if only.key.port == route.key.port => {
                *only = route;
                false
            }
            Ports::One(only) => {
                let mut routes = vec![Arc::clone(only), route];
                routes.sort_by_key(|r| r.key.port);
                *self = Ports::Many(routes);
                true
            }
            Ports::Many(routes) => {
                match routes.binary_search_by_key(&route.key.port, |r| r.key.port) {
                    Ok(i) => {
                        routes[i] = route;
                        false
                    }
                    Err(i) => {
                        routes.insert(i, route);
                        true
                    }
                }
            }
        }
    }

    /// Removes the route of `port`; true when there was one. Leaves `Many` with at least one.
    fn remove(&mut self, port: u16) -> bool {
        let Ports::Many(routes) = self else {
            return false;
        };
        let Ok(i) = routes.binary_search_by_key(&port, |r| r.key.port) else {
            return false;
        };
        routes.remove(i);
        if routes.len() == 1 {
            *self = Ports::One(routes.remove(0));
        }
        true
    }
}

impl RouteTable {
    /// Adds or replaces `route` under its key.
    fn upsert(&mut self, route: Arc<Route>) {
        let added = match self.by_name.get_mut(&route.key.name) {
            Some(ports) => ports.upsert(route),
            None => {
                self.by_name
                    .insert(route.key.name.clone(), Ports::One(route));
                true
            }
        };
        if added {
            self.len += 1;
        }
    }

    fn remove(&mut self, key: &RouteKey) -> bool {
        let removed = match self.by_name.get(&key.name) {
            None => false,
            Some(Ports::One(only)) if only.key.port == key.port => {
                self.by_name.remove(&key.name);
                true
            }
            Some(Ports::One(_)) => false,
            Some(Ports::Many(_)) => self
                .by_name
                .get_mut(&key.name)
                .is_some_and(|ports| ports.remove(key.port)),
        };
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// The revision of this table; it grows by one with every applied change.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The route with this name and port.
    pub fn get(&self, key: &RouteKey) -> Option<&Arc<Route>> {
        self.by_name.get(&key.name)?.get(key.port)
    }

    /// Every route with this name (any port), sorted by port. `name` must be normalised
    /// (lower case, no trailing dot), as [`RouteName`] is.
    pub fn by_name(&self, name: &str) -> &[Arc<Route>] {
        // imbl looks keys up by the key type; a name that does not parse has no routes.
        match RouteName::parse(name) {
            Ok(name) => self.by_route_name(&name),
            Err(_) => &[],
        }
    }

    /// Every route with this name, by an already-parsed name.
    pub fn by_route_name(&self, name: &RouteName) -> &[Arc<Route>] {
        self.by_name.get(name).map_or(&[], Ports::as_slice)
    }

    /// Every route, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        Iter {
            routes: self.by_name.values().flat_map(Ports::as_slice),
            left: self.len,
        }
    }

    /// The number of routes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table holds no route.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Every route of a table, with an exact length (callers size their collections by it).
struct Iter<I> {
    routes: I,
    left: usize,
}

impl<'a, I: Iterator<Item = &'a Arc<Route>>> Iterator for Iter<I> {
    type Item = &'a Arc<Route>;

    fn next(&mut self) -> Option<Self::Item> {
        let route = self.routes.next()?;
        self.left -= 1;
        Some(route)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
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
    for route in new.iter() {
        match old.get(&route.key) {
            Some(prev) if Arc::ptr_eq(prev, route) || **prev == **route => {}
            _ => delta.upserted.push(Arc::clone(route)),
        }
    }
    for route in old.iter() {
        if new.get(&route.key).is_none() {
            delta.removed.push(route.key.clone());
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

/// The log keeps at least this many entries (capacity permitting), however small the table.
pub const MIN_LOG: usize = 4096;

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
    /// Records the keys changed at `revision`, forgetting the oldest entries beyond the
    /// capacity. The log never holds more than its capacity, not even for a moment: a
    /// 250,000-route load into a store with a small log allocates nothing here.
    ///
    /// Nor more than twice the table (`table_len`, at least [`MIN_LOG`]): a watcher further
    /// behind than that is sent the table itself for about the same cost, so a small table
    /// under steady churn does not grow a log of a million entries.
    fn record(&mut self, revision: u64, keys: Vec<RouteKey>, table_len: usize) {
        let capacity = self.capacity.min(table_len.saturating_mul(2).max(MIN_LOG));
        if keys.len() > capacity {
            // Only watchers older than `revision` could use these entries, and they would
            // miss the ones that do not fit: they need a snapshot anyway.
            self.entries.clear();
            self.trimmed_through = revision;
            return;
        }
        self.trim(capacity - keys.len());
        self.entries
            .extend(keys.into_iter().map(|key| (revision, key)));
    }

    /// Drops the oldest entries until at most `keep` remain.
    fn trim(&mut self, keep: usize) {
        while self.entries.len() > keep {
            if let Some((rev, _)) = self.entries.pop_front() {
                self.trimmed_through = rev;
            }
        }
    }
}

/// A route on its way into a table: owned routes are stamped with the new revision, shared
/// ones are stored as they are.
trait Incoming {
    fn key(&self) -> &RouteKey;
    fn route(&self) -> &Route;
    fn into_stored(self, revision: u64) -> Arc<Route>;
}

impl Incoming for Route {
    fn key(&self) -> &RouteKey {
        &self.key
    }
    fn route(&self) -> &Route {
        self
    }
    fn into_stored(mut self, revision: u64) -> Arc<Route> {
        self.revision = revision;
        Arc::new(self)
    }
}

impl Incoming for Arc<Route> {
    fn key(&self) -> &RouteKey {
        &self.key
    }
    fn route(&self) -> &Route {
        self
    }
    fn into_stored(self, _: u64) -> Arc<Route> {
        self
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

    /// How many [`RouteWatch`]es are alive: lets a test see that a reader is waiting for
    /// the next change before making it.
    pub fn watchers(&self) -> usize {
        self.inner.notify.receiver_count()
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
        self.replace(routes.into_iter().collect())
    }

    /// As [`RouteStore::replace_all`], storing each route as given: the table shares the
    /// `Arc` with the caller, and a route keeps the revision it carries (the revision at which
    /// it changed where it came from) rather than taking this table's. A route-sync node
    /// uses it to serve the routes of its local store and of its peers without a second copy.
    pub fn replace_all_shared(&self, routes: impl IntoIterator<Item = Arc<Route>>) -> Applied {
        self.replace(routes.into_iter().collect())
    }

    fn replace<R: Incoming>(&self, routes: Vec<R>) -> Applied {
        self.write(routes, |old, routes| {
            // The last of each key wins: index the keys (by reference), which also tells
            // which of the current routes are gone; then drop earlier duplicates.
            let mut last: HashMap<&RouteKey, usize, Hasher> =
                HashMap::with_capacity_and_hasher(routes.len(), Hasher::default());
            for (i, route) in routes.iter().enumerate() {
                last.insert(route.key(), i);
            }
            let removals = old
                .iter()
                .filter(|r| !last.contains_key(&r.key))
                .map(|r| r.key.clone())
                .collect();
            if last.len() < routes.len() {
                let mut keep = vec![false; routes.len()];
                for &i in last.values() {
                    keep[i] = true;
                }
                drop(last);
                let mut keep = keep.into_iter();
                routes.retain(|_| keep.next().unwrap_or(false));
            }
            removals
        })
    }

    /// Applies a delta: `upserts` replace or add routes by key, `removals` drop keys. Routes
    /// whose content did not change keep their revision; a delta that changes nothing
    /// publishes nothing. O(changes x log n).
    pub fn apply(
        &self,
        upserts: impl IntoIterator<Item = Route>,
        removals: impl IntoIterator<Item = RouteKey>,
    ) -> Applied {
        let removals: Vec<RouteKey> = removals.into_iter().collect();
        self.write(upserts.into_iter().collect(), move |_, _| removals)
    }

    /// As [`RouteStore::apply`], storing each upsert as given: shared with the caller, with
    /// the revision it carries (see [`RouteStore::replace_all_shared`]).
    pub fn apply_shared(
        &self,
        upserts: impl IntoIterator<Item = Arc<Route>>,
        removals: impl IntoIterator<Item = RouteKey>,
    ) -> Applied {
        let removals: Vec<RouteKey> = removals.into_iter().collect();
        self.write(upserts.into_iter().collect(), move |_, _| removals)
    }

    /// Builds the next table from the current one under the writers' lock: removes what
    /// `removals` names (given the current table; it may also drop upserts), then upserts.
    fn write<R: Incoming>(
        &self,
        mut upserts: Vec<R>,
        removals: impl FnOnce(&RouteTable, &mut Vec<R>) -> Vec<RouteKey>,
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
        for key in removals(&old, &mut upserts) {
            if table.remove(&key) {
                summary.removed += 1;
                changed.push(key);
            }
        }
        for route in upserts {
            match table.get(route.key()) {
                Some(prev)
                    if std::ptr::eq(&**prev, route.route()) || prev.same_content(route.route()) =>
                {
                    continue;
                }
                Some(_) => summary.changed += 1,
                None => summary.added += 1,
            }
            changed.push(route.key().clone());
            table.upsert(route.into_stored(next_rev));
        }
        if !summary.is_change() {
            return summary;
        }
        summary.revision = next_rev;
        table.revision = next_rev;
        log.record(next_rev, changed, table.len());
        self.inner.current.store(Arc::new(table));
        self.inner.notify.send_replace(next_rev);
        summary
    }

    /// What changed after `revision`, against the current table: the routes changed or added
    /// since (as they are now) and the keys removed since. `None` when the log no longer
    /// reaches back that far (the caller then needs a full snapshot). Returns the revision the
    /// answer is current to.
    pub fn changes_since(&self, revision: u64) -> Option<(u64, Delta)> {
        self.changes_since_within(revision, usize::MAX)
    }

    /// As [`RouteStore::changes_since`], but also `None` when more than `limit` changes were
    /// logged after `revision`. Past some size a snapshot is the better answer: it is no
    /// larger than the delta, and sending it needs no gathering under the writers' lock.
    pub fn changes_since_within(&self, revision: u64, limit: usize) -> Option<(u64, Delta)> {
        let log = self.inner.write.lock().unwrap_or_else(|e| e.into_inner());
        let table = self.snapshot();
        if revision > table.revision || revision < log.trimmed_through {
            return None;
        }
        let start = log.entries.partition_point(|(rev, _)| *rev <= revision);
        if log.entries.len() - start > limit {
            return None;
        }
        let mut seen = HashSet::with_hasher(Hasher::default());
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
        log.trim(capacity);
        log.entries.shrink_to(capacity);
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
