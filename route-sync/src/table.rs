//! The watchable route table.
//!
//! Readers on the data path call [`RouteStore::snapshot`]: one atomic load, no lock, and an
//! immutable [`RouteTable`] that stays consistent for as long as they hold it. Writers are
//! rare (a file edit, a route-sync delta); they build the next table beside the current one,
//! swap it in whole, and wake every [`RouteWatch`]. Unchanged routes keep their `Arc`, so a
//! consumer can diff two snapshots cheaply.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::model::{Route, RouteKey, RouteName};

/// An immutable, consistent set of routes at one revision.
#[derive(Debug, Default)]
pub struct RouteTable {
    revision: u64,
    routes: HashMap<RouteKey, Arc<Route>>,
    by_name: HashMap<RouteName, Vec<Arc<Route>>>,
}

impl RouteTable {
    fn build(revision: u64, routes: HashMap<RouteKey, Arc<Route>>) -> Self {
        let mut by_name: HashMap<RouteName, Vec<Arc<Route>>> = HashMap::new();
        for route in routes.values() {
            by_name
                .entry(route.key.name.clone())
                .or_default()
                .push(Arc::clone(route));
        }
        for list in by_name.values_mut() {
            list.sort_by_key(|r| r.key.port);
        }
        Self {
            revision,
            routes,
            by_name,
        }
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

struct Inner {
    current: ArcSwap<RouteTable>,
    notify: watch::Sender<u64>,
    /// Serialises writers so two updates never race on the same base table.
    write: Mutex<()>,
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
                write: Mutex::new(()),
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
        let _guard = self.inner.write.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.snapshot();
        let next_rev = old.revision + 1;
        let mut summary = Applied {
            revision: old.revision,
            ..Applied::default()
        };
        let mut input: HashMap<RouteKey, Route> = HashMap::with_capacity(old.len());
        for route in routes {
            input.insert(route.key.clone(), route);
        }
        let mut map = HashMap::with_capacity(input.len());
        for (key, mut route) in input {
            let entry = match old.routes.get(&key) {
                Some(prev) if prev.same_content(&route) => Arc::clone(prev),
                prev => {
                    if prev.is_some() {
                        summary.changed += 1;
                    } else {
                        summary.added += 1;
                    }
                    route.revision = next_rev;
                    Arc::new(route)
                }
            };
            map.insert(key, entry);
        }
        summary.removed = old.routes.keys().filter(|k| !map.contains_key(*k)).count();
        if !summary.is_change() {
            return summary;
        }
        summary.revision = next_rev;
        self.inner
            .current
            .store(Arc::new(RouteTable::build(next_rev, map)));
        self.inner.notify.send_replace(next_rev);
        summary
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
