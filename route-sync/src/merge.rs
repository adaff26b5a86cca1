//! Merging this cluster's routes with those imported from peers. Pure: no I/O, no clock.
//!
//! Rules:
//! - Local routes must be homed in this cluster; remote routes only arrive by peering.
//! - An imported route must be homed in the peer it came from and exported by it; its
//!   backends are dropped (they never leave their cluster). Imported routes are never
//!   exported again, so three clusters cannot loop.
//! - **Conflicts**: when several clusters offer the same `name:port`, the local route wins
//!   (local callers reach it without a tunnel); among peers only, the lowest cluster name wins
//!   (a stable, documented, coordination-free choice). Each such key is reported as a
//!   conflict with its candidates and winner until only one cluster offers it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::model::{ClusterName, Route, RouteKey};
use crate::source::Rejected;
use crate::table::Hasher;

/// A name offered by more than one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The contested key.
    pub key: RouteKey,
    /// Every cluster offering it, sorted.
    pub clusters: Vec<ClusterName>,
    /// The one whose route is served.
    pub winner: ClusterName,
}

/// The local and imported route sets and their merge.
///
/// Routes are held as `Arc<Route>` and handed on as they are: the local store, the merger and
/// the merged table of a node share one copy of each route.
#[derive(Debug)]
pub struct Merger {
    cluster: ClusterName,
    local: Routes,
    imported: BTreeMap<ClusterName, Routes>,
}

/// One cluster's routes, by key.
type Routes = HashMap<RouteKey, Arc<Route>, Hasher>;

/// Upserts and removals that bring the merged table in line.
#[derive(Debug, Default)]
pub struct MergeDelta {
    /// Routes to add or replace, shared with the merger.
    pub upserts: Vec<Arc<Route>>,
    /// Keys to remove.
    pub removals: Vec<RouteKey>,
}

/// Puts `route` in `set`, unless an equal route is there already: that one stays, so the
/// `Arc` the merged table holds stays shared. True when the set changed.
fn put(set: &mut Routes, route: Arc<Route>) -> bool {
    match set.get(&route.key) {
        Some(prev) if Arc::ptr_eq(prev, &route) || prev.same_content(&route) => false,
        _ => {
            set.insert(route.key.clone(), route);
            true
        }
    }
}

impl Merger {
    /// An empty merger for this cluster.
    pub fn new(cluster: ClusterName) -> Self {
        Self {
            cluster,
            local: Routes::default(),
            imported: BTreeMap::new(),
        }
    }

    /// This cluster.
    pub fn cluster(&self) -> &ClusterName {
        &self.cluster
    }

    fn homed_elsewhere(&self, route: &Route) -> Rejected {
        Rejected {
            entry: "local source".into(),
            route: Some(route.key.to_string()),
            reason: format!(
                "homed in {}, not in this cluster ({}); routes of other clusters come from peering",
                route.home_cluster, self.cluster
            ),
        }
    }

    /// Replaces the local routes; returns the keys whose winner may have changed, and the
    /// routes refused (homed elsewhere). The routes are shared with the caller (the local
    /// store's `Arc`s).
    pub fn set_local(
        &mut self,
        routes: impl IntoIterator<Item = Arc<Route>>,
    ) -> (HashSet<RouteKey>, Vec<Rejected>) {
        let routes = routes.into_iter();
        let mut rejected = Vec::new();
        let mut prev = std::mem::take(&mut self.local);
        self.local.reserve(routes.size_hint().0);
        let mut affected = HashSet::new();
        for route in routes {
            if route.home_cluster != self.cluster {
                rejected.push(self.homed_elsewhere(&route));
                continue;
            }
            let old = if prev.is_empty() {
                None
            } else {
                prev.remove(&route.key)
            };
            let route = match old {
                Some(old) if Arc::ptr_eq(&old, &route) || old.same_content(&route) => old,
                _ => {
                    affected.insert(route.key.clone());
                    route
                }
            };
            self.local.insert(route.key.clone(), route);
        }
        affected.extend(prev.into_keys());
        (affected, rejected)
    }

    /// Applies a change of the local routes.
    pub fn local_delta(
        &mut self,
        upserts: impl IntoIterator<Item = Arc<Route>>,
        removals: impl IntoIterator<Item = RouteKey>,
    ) -> (HashSet<RouteKey>, Vec<Rejected>) {
        let mut affected = HashSet::new();
        let mut rejected = Vec::new();
        for key in removals {
            if self.local.remove(&key).is_some() {
                affected.insert(key);
            }
        }
        for route in upserts {
            if route.home_cluster != self.cluster {
                rejected.push(self.homed_elsewhere(&route));
                if self.local.remove(&route.key).is_some() {
                    affected.insert(route.key.clone());
                }
                continue;
            }
            let key = route.key.clone();
            if put(&mut self.local, route) {
                affected.insert(key);
            }
        }
        (affected, rejected)
    }

    /// The routes imported from `peer` (shared with the merged table).
    pub fn imported(&self, peer: &ClusterName) -> impl Iterator<Item = &Arc<Route>> {
        self.imported
            .get(peer)
            .into_iter()
            .flat_map(HashMap::values)
    }

    /// Checks a route imported from `peer`: homed there, exported, stripped of backends.
    fn admit(&self, peer: &ClusterName, mut route: Arc<Route>) -> Result<Arc<Route>, Rejected> {
        let reject = |reason: String| Rejected {
            entry: format!("peer {peer}"),
            route: Some(route.key.to_string()),
            reason,
        };
        if route.home_cluster != *peer {
            return Err(reject(format!(
                "homed in {}, but peers may only export their own routes",
                route.home_cluster
            )));
        }
        if !route.exported {
            return Err(reject("not exported".into()));
        }
        if *peer == self.cluster {
            return Err(reject("a peer claims this cluster's name".into()));
        }
        if !route.backends.is_empty() {
            // Copies only when shared; peers never send backends, so this is rare.
            Arc::make_mut(&mut route).backends = Vec::new();
        }
        Ok(route)
    }

    /// Replaces everything imported from `peer`.
    pub fn import_snapshot(
        &mut self,
        peer: &ClusterName,
        routes: impl IntoIterator<Item = Arc<Route>>,
    ) -> (HashSet<RouteKey>, Vec<Rejected>) {
        let routes = routes.into_iter();
        let mut rejected = Vec::new();
        let mut prev = self.imported.remove(peer).unwrap_or_default();
        let mut next = Routes::with_capacity_and_hasher(routes.size_hint().0, Hasher::default());
        let mut affected = HashSet::new();
        for route in routes {
            match self.admit(peer, route) {
                Ok(route) => {
                    // A route the peer sent before, unchanged, keeps its `Arc`.
                    let old = if prev.is_empty() {
                        None
                    } else {
                        prev.remove(&route.key)
                    };
                    let route = match old {
                        Some(old) if old.same_content(&route) => old,
                        _ => {
                            affected.insert(route.key.clone());
                            route
                        }
                    };
                    next.insert(route.key.clone(), route);
                }
                Err(r) => rejected.push(r),
            }
        }
        affected.extend(prev.into_keys());
        self.imported.insert(peer.clone(), next);
        (affected, rejected)
    }

    /// Applies a delta from `peer`. An upsert that is refused removes any previous route of
    /// that key from the peer (the peer no longer offers it in a usable form).
    pub fn import_delta(
        &mut self,
        peer: &ClusterName,
        upserts: impl IntoIterator<Item = Arc<Route>>,
        removals: impl IntoIterator<Item = RouteKey>,
    ) -> (HashSet<RouteKey>, Vec<Rejected>) {
        let mut rejected = Vec::new();
        let mut affected = HashSet::new();
        let mut admitted = Vec::new();
        for route in upserts {
            let key = route.key.clone();
            match self.admit(peer, route) {
                Ok(route) => admitted.push(route),
                Err(r) => {
                    rejected.push(r);
                    if let Some(set) = self.imported.get_mut(peer)
                        && set.remove(&key).is_some()
                    {
                        affected.insert(key);
                    }
                }
            }
        }
        let set = self.imported.entry(peer.clone()).or_default();
        for key in removals {
            if set.remove(&key).is_some() {
                affected.insert(key);
            }
        }
        for route in admitted {
            let key = route.key.clone();
            if put(set, route) {
                affected.insert(key);
            }
        }
        (affected, rejected)
    }

    /// The route served for `key`: the local one, else the lowest cluster's (the imports
    /// are a `BTreeMap`, lowest cluster name first).
    fn winner(&self, key: &RouteKey) -> Option<&Arc<Route>> {
        self.local
            .get(key)
            .or_else(|| self.imported.values().find_map(|set| set.get(key)))
    }

    /// What the merged table must do for `keys`.
    pub fn resolve(&self, keys: impl IntoIterator<Item = RouteKey>) -> MergeDelta {
        let mut delta = MergeDelta::default();
        for key in keys {
            match self.winner(&key) {
                Some(route) => delta.upserts.push(Arc::clone(route)),
                None => delta.removals.push(key),
            }
        }
        delta
    }

    /// Every route of the merged table.
    pub fn all(&self) -> Vec<Arc<Route>> {
        let mut keys: BTreeSet<&RouteKey> = self.local.keys().collect();
        for set in self.imported.values() {
            keys.extend(set.keys());
        }
        keys.into_iter()
            .filter_map(|k| self.winner(k).cloned())
            .collect()
    }

    /// Keys offered by more than one cluster.
    pub fn conflicts(&self) -> Vec<Conflict> {
        let mut seen: BTreeMap<&RouteKey, Vec<ClusterName>> = BTreeMap::new();
        for key in self.local.keys() {
            seen.entry(key).or_default().push(self.cluster.clone());
        }
        for (cluster, set) in &self.imported {
            for key in set.keys() {
                seen.entry(key).or_default().push(cluster.clone());
            }
        }
        seen.into_iter()
            .filter(|(_, c)| c.len() > 1)
            .map(|(key, mut clusters)| {
                let winner = if self.local.contains_key(key) {
                    self.cluster.clone()
                } else {
                    clusters
                        .iter()
                        .min()
                        .cloned()
                        .unwrap_or_else(|| self.cluster.clone())
                };
                clusters.sort();
                Conflict {
                    key: key.clone(),
                    clusters,
                    winner,
                }
            })
            .collect()
    }

    /// How many routes would be imported from `peer` after a delta of `upserts` and
    /// `removals`: checked before the delta is applied.
    pub fn imported_after_delta(
        &self,
        peer: &ClusterName,
        upserts: &[Arc<Route>],
        removals: &[RouteKey],
    ) -> usize {
        let empty = Routes::default();
        let set = self.imported.get(peer).unwrap_or(&empty);
        let upserted: HashSet<&RouteKey> = upserts.iter().map(|r| &r.key).collect();
        let added = upserted.iter().filter(|k| !set.contains_key(**k)).count();
        let removed: HashSet<&RouteKey> = removals
            .iter()
            .filter(|k| set.contains_key(*k) && !upserted.contains(k))
            .collect();
        (set.len() + added).saturating_sub(removed.len())
    }

    /// How many routes came from `peer`.
    pub fn imported_count(&self, peer: &ClusterName) -> usize {
        self.imported.get(peer).map_or(0, HashMap::len)
    }

    /// How many local routes there are.
    pub fn local_count(&self) -> usize {
        self.local.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, Protocol, RouteName};

    fn route(name: &str, home: &str, exported: bool) -> Arc<Route> {
        Arc::new(Route {
            key: RouteKey::new(RouteName::parse(name).unwrap(), 8080),
            protocol: Protocol::Tcp,
            home_cluster: ClusterName::parse(home).unwrap(),
            exported,
            allowed_peers: vec![],
            backends: vec![Backend::parse("10.0.0.1:8080").unwrap()],
            weights: Default::default(),
            vip: None,
            egress_port: None,
            revision: 0,
        })
    }

    fn c(s: &str) -> ClusterName {
        ClusterName::parse(s).unwrap()
    }

    #[test]
    fn imports_are_checked_and_stripped() {
        let mut m = Merger::new(c("diego"));
        let (_, rejected) = m.import_snapshot(
            &c("k8s"),
            vec![
                route("a.apps.internal", "k8s", true),
                route("b.apps.internal", "k8s", false),
                route("c.apps.internal", "other", true),
                route("d.apps.internal", "diego", true),
            ],
        );
        assert_eq!(rejected.len(), 3, "{rejected:?}");
        let all = m.all();
        assert_eq!(all.len(), 1);
        assert!(all[0].backends.is_empty(), "backends never cross clusters");
    }

    #[test]
    fn local_routes_must_be_homed_here() {
        let mut m = Merger::new(c("diego"));
        let (_, rejected) = m.set_local(vec![route("a.apps.internal", "k8s", true)]);
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].reason.contains("peering"));
    }

    #[test]
    fn conflicts_resolve_local_first_then_lowest_cluster() {
        let mut m = Merger::new(c("diego"));
        m.import_snapshot(&c("k8s"), vec![route("a.apps.internal", "k8s", true)]);
        m.import_snapshot(&c("eu"), vec![route("a.apps.internal", "eu", true)]);
        let key = RouteKey::new(RouteName::parse("a.apps.internal").unwrap(), 8080);
        assert_eq!(
            m.resolve([key.clone()]).upserts[0].home_cluster.as_str(),
            "eu"
        );
        m.set_local(vec![route("a.apps.internal", "diego", true)]);
        assert_eq!(
            m.resolve([key.clone()]).upserts[0].home_cluster.as_str(),
            "diego"
        );
        let conflicts = m.conflicts();
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].winner.as_str(), "diego");
        assert_eq!(conflicts[0].clusters.len(), 3);
        // The local route goes: the lowest peer takes over; the peer leaves: the other one.
        m.set_local(vec![]);
        m.import_delta(&c("eu"), vec![], vec![key.clone()]);
        assert_eq!(
            m.resolve([key.clone()]).upserts[0].home_cluster.as_str(),
            "k8s"
        );
        m.import_delta(&c("k8s"), vec![], vec![key.clone()]);
        assert_eq!(m.resolve([key.clone()]).removals, [key]);
        assert!(m.conflicts().is_empty());
    }

    #[test]
    fn unchanged_routes_keep_their_arc_and_affect_nothing() {
        let mut m = Merger::new(c("diego"));
        // As peers send them: without backends.
        let imported = || {
            let mut r = (*route("a.apps.internal", "k8s", true)).clone();
            r.backends.clear();
            Arc::new(r)
        };
        let first = imported();
        let (affected, _) = m.import_snapshot(&c("k8s"), vec![Arc::clone(&first)]);
        assert_eq!(affected.len(), 1);
        // The peer sends the same route again (a reconnect): a new `Arc`, equal content.
        let again = imported();
        let (affected, _) = m.import_snapshot(&c("k8s"), vec![again.clone()]);
        assert!(affected.is_empty(), "{affected:?}");
        let (affected, _) = m.import_delta(&c("k8s"), vec![again], vec![]);
        assert!(affected.is_empty(), "{affected:?}");
        let kept = m.imported(&c("k8s")).next().unwrap();
        assert!(
            Arc::ptr_eq(kept, &first),
            "the merged table's copy stays the one"
        );

        // Local routes are shared with the local store as they are.
        let local = route("b.apps.internal", "diego", true);
        let (affected, _) = m.set_local(vec![Arc::clone(&local)]);
        assert_eq!(affected.len(), 1);
        let winner = m.resolve(affected).upserts.pop().unwrap();
        assert!(Arc::ptr_eq(&winner, &local));
        let (affected, _) = m.set_local(vec![Arc::clone(&local)]);
        assert!(affected.is_empty());
    }

    #[test]
    fn a_refused_delta_upsert_withdraws_the_previous_route() {
        let mut m = Merger::new(c("diego"));
        m.import_snapshot(&c("k8s"), vec![route("a.apps.internal", "k8s", true)]);
        let (affected, rejected) = m.import_delta(
            &c("k8s"),
            vec![route("a.apps.internal", "k8s", false)],
            vec![],
        );
        assert_eq!(rejected.len(), 1);
        assert_eq!(affected.len(), 1);
        assert!(m.all().is_empty());
    }
}
