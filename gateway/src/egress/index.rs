//! What the egress derives from the route table: which route name each VIP stands for, which
//! route each egress port stands for, and which ports and `vip:port` addresses need a
//! listener.
//!
//! The VIP is a field of the route, assigned once per cluster by route-sync; the egress never
//! computes one. This module only indexes it. The index is brought up to date from the
//! table's change log (`RouteStore::changes_since`), so a change of one route among 250,000
//! costs O(log n), not a pass over the table; a full rebuild happens only when the log no
//! longer reaches back (or at start). Maps are persistent (`imbl`): a new [`View`] shares
//! every untouched node with the previous one, so publishing it is cheap too.
//!
//! No sockets and no clock here: [`Index::view`] is called from the task that keeps
//! listeners in step with the table (which usually catches up first, right after a change)
//! and from the connection path, so that a connection decides with a table and an index
//! that match: whoever sees a newer table first brings the index up to it, once.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use isthmus_route_sync::{Route, RouteKey, RouteName, RouteStore, RouteTable};

/// Which route name a VIP stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VipOwner<'a> {
    /// No route of the table carries this VIP.
    None,
    /// Every route carrying it has this name (a name has one VIP for all its ports).
    One(&'a RouteName),
    /// Routes of several names carry it: the table contradicts itself for a moment (say, a
    /// name removed and another given its address in two steps). Refused, never guessed.
    Ambiguous,
}

/// Which route an egress port stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressPortOwner<'a> {
    /// No route of the table carries this egress port.
    None,
    /// Exactly this route carries it.
    One(&'a RouteKey),
    /// Several routes carry it: the table contradicts itself for a moment (a port handed
    /// from one route to another in two steps). Refused, never guessed.
    Ambiguous,
}

/// A table and the index built from exactly that table.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The table this view indexes.
    pub table: Arc<RouteTable>,
    /// VIP → the keys of the routes that carry it, sorted (usually one per port of one name).
    vips: imbl::HashMap<IpAddr, Vec<RouteKey>>,
    /// Port → how many routes use it.
    ports: imbl::OrdMap<u16, usize>,
    /// `vip:port` → how many routes use it (at most one; kept as a count for symmetry with
    /// the ports). Maintained only when the egress binds VIPs one by one.
    vip_addrs: imbl::OrdMap<SocketAddr, usize>,
    /// Egress port → the keys of the routes that carry it, sorted (one, but for a moment).
    egress_ports: imbl::OrdMap<u16, Vec<RouteKey>>,
    /// Bumped whenever the set of keys of `egress_ports` changes.
    egress_ports_generation: u64,
    /// Bumped whenever the set of keys of `ports` changes: listeners need a look only then.
    ports_generation: u64,
    /// As `ports_generation`, for `vip_addrs`.
    vip_addrs_generation: u64,
    /// Route changes applied to reach this view since the index was made: what keeping it
    /// up to date has cost, in routes.
    applied: u64,
}

impl View {
    /// The owner of `ip` (IPv4-mapped IPv6 addresses count as the IPv4 address).
    pub fn vip_owner(&self, ip: IpAddr) -> VipOwner<'_> {
        let Some(keys) = self.vips.get(&ip.to_canonical()) else {
            return VipOwner::None;
        };
        match keys.split_first() {
            None => VipOwner::None,
            Some((first, rest)) if rest.iter().all(|k| k.name == first.name) => {
                VipOwner::One(&first.name)
            }
            Some(_) => VipOwner::Ambiguous,
        }
    }

    /// The route `port` is the egress port of.
    pub fn egress_port_owner(&self, port: u16) -> EgressPortOwner<'_> {
        match self.egress_ports.get(&port).map(Vec::as_slice) {
            None | Some([]) => EgressPortOwner::None,
            Some([one]) => EgressPortOwner::One(one),
            Some(_) => EgressPortOwner::Ambiguous,
        }
    }

    /// Every egress port some route carries, ascending.
    pub fn egress_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.egress_ports.keys().copied()
    }

    /// Changes whenever the set of [`View::egress_ports`] changes.
    pub fn egress_ports_generation(&self) -> u64 {
        self.egress_ports_generation
    }

    /// Every port some route uses, ascending.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports.keys().copied()
    }

    /// Every `vip:port` of a route with a VIP, when VIP addresses are tracked.
    pub fn vip_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.vip_addrs.keys().copied()
    }

    /// Changes whenever the set of [`View::ports`] changes.
    pub fn ports_generation(&self) -> u64 {
        self.ports_generation
    }

    /// Changes whenever the set of [`View::vip_addrs`] changes.
    pub fn vip_addrs_generation(&self) -> u64 {
        self.vip_addrs_generation
    }

    /// Accounts for the route under `key` changing from `old` to `new` (either may be
    /// absent: added, removed).
    fn apply(&mut self, key: &RouteKey, old: Option<&Route>, new: Option<&Route>, addrs: bool) {
        self.applied += 1;
        let port_set_changed = match (old.is_some(), new.is_some()) {
            (false, true) => count_up(&mut self.ports, key.port),
            (true, false) => count_down(&mut self.ports, key.port),
            _ => false,
        };
        if port_set_changed {
            self.ports_generation += 1;
        }
        self.apply_egress_port(
            key,
            old.and_then(|r| r.egress_port),
            new.and_then(|r| r.egress_port),
        );
        let old_vip = old.and_then(|r| r.vip).map(|ip| ip.to_canonical());
        let new_vip = new.and_then(|r| r.vip).map(|ip| ip.to_canonical());
        if old_vip == new_vip {
            return;
        }
        if let Some(ip) = old_vip {
            let emptied = match self.vips.get_mut(&ip) {
                Some(keys) => {
                    keys.retain(|k| k != key);
                    keys.is_empty()
                }
                None => false,
            };
            if emptied {
                self.vips.remove(&ip);
            }
            if addrs && count_down(&mut self.vip_addrs, SocketAddr::new(ip, key.port)) {
                self.vip_addrs_generation += 1;
            }
        }
        if let Some(ip) = new_vip {
            // Sorted, so the index of a table is the same however it was reached.
            let keys = self.vips.entry(ip).or_default();
            if let Err(at) = keys.binary_search(key) {
                keys.insert(at, key.clone());
            }
            if addrs && count_up(&mut self.vip_addrs, SocketAddr::new(ip, key.port)) {
                self.vip_addrs_generation += 1;
            }
        }
    }

    /// Moves `key` from egress port `old` to `new` (either may be absent).
    fn apply_egress_port(&mut self, key: &RouteKey, old: Option<u16>, new: Option<u16>) {
        if old == new {
            return;
        }
        if let Some(port) = old {
            let emptied = match self.egress_ports.get_mut(&port) {
                Some(keys) => {
                    keys.retain(|k| k != key);
                    keys.is_empty()
                }
                None => false,
            };
            if emptied {
                self.egress_ports.remove(&port);
                self.egress_ports_generation += 1;
            }
        }
        if let Some(port) = new {
            let keys = self.egress_ports.entry(port).or_default();
            if keys.is_empty() {
                self.egress_ports_generation += 1;
            }
            // Sorted, so the index of a table is the same however it was reached.
            if let Err(at) = keys.binary_search(key) {
                keys.insert(at, key.clone());
            }
        }
    }

    /// The view of `table` built from nothing.
    fn build(table: Arc<RouteTable>, addrs: bool, from: &View) -> Self {
        let mut view = View {
            ports_generation: from.ports_generation + 1,
            vip_addrs_generation: from.vip_addrs_generation + 1,
            egress_ports_generation: from.egress_ports_generation + 1,
            applied: from.applied,
            ..View::default()
        };
        for route in table.iter() {
            view.apply(&route.key, None, Some(route), addrs);
        }
        view.table = table;
        view
    }

    /// The view of `table`, from this view of an older table and the keys that may have
    /// changed between the two (extra keys are harmless: they change nothing).
    fn advance<'a>(
        &self,
        table: Arc<RouteTable>,
        keys: impl IntoIterator<Item = &'a RouteKey>,
        addrs: bool,
    ) -> Self {
        let mut next = self.clone();
        for key in keys {
            let old = self.table.get(key).map(|r| &**r);
            let new = table.get(key).map(|r| &**r);
            next.apply(key, old, new, addrs);
        }
        next.table = table;
        next
    }
}

/// Adds one use of `key`; true when it was unused before.
fn count_up<K: Ord + Clone>(map: &mut imbl::OrdMap<K, usize>, key: K) -> bool {
    let count = map.entry(key).or_insert(0);
    *count += 1;
    *count == 1
}

/// Removes one use of `key`; true when it is unused now.
fn count_down<K: Ord + Clone>(map: &mut imbl::OrdMap<K, usize>, key: K) -> bool {
    match map.get_mut(&key) {
        Some(count) if *count > 1 => {
            *count -= 1;
            false
        }
        Some(_) => {
            map.remove(&key);
            true
        }
        None => false,
    }
}

/// The egress's index of the route table, kept in step on demand.
pub struct Index {
    published: ArcSwap<View>,
    /// Serialises catching up, so two callers never both rebuild.
    update: Mutex<()>,
    /// Whether `vip:port` addresses are tracked (only the `bind_vips` listeners need them).
    addrs: bool,
}

impl Index {
    /// An index of the empty table; `addrs` says whether to track `vip:port` addresses.
    pub fn new(addrs: bool) -> Self {
        Self {
            published: ArcSwap::from_pointee(View::default()),
            update: Mutex::new(()),
            addrs,
        }
    }

    /// A view at least as new as `store`'s table when this is called: one atomic load when
    /// nothing changed, else a catch-up over the changes since the last view.
    pub fn view(&self, store: &RouteStore) -> Arc<View> {
        let current = self.published.load_full();
        if current.table.revision() >= store.snapshot().revision() {
            return current;
        }
        let _guard = self.update.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.published.load_full();
        let table = store.snapshot();
        if current.table.revision() >= table.revision() {
            return current;
        }
        // The log answers with the keys changed up to a revision no older than `table`'s:
        // keys changed after `table` look the same in both tables and change nothing. More
        // changes than the table holds routes: a rebuild is no more work.
        let next = match store.changes_since(current.table.revision()) {
            Some((_, delta)) if delta.upserted.len() + delta.removed.len() <= table.len() => {
                let keys = delta
                    .upserted
                    .iter()
                    .map(|r| &r.key)
                    .chain(delta.removed.iter());
                current.advance(table, keys, self.addrs)
            }
            _ => View::build(table, self.addrs, &current),
        };
        let next = Arc::new(next);
        self.published.store(Arc::clone(&next));
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Routes from YAML, with VIPs set by name (`vips[i] = (name, ip)`).
    fn routes(yaml: &str, vips: &[(&str, &str)]) -> Vec<Route> {
        let mut loaded = isthmus_route_sync::source::file::parse(yaml, Path::new("t.yaml"))
            .unwrap()
            .routes;
        for route in &mut loaded {
            route.vip = vips
                .iter()
                .find(|(n, _)| *n == route.key.name.as_str())
                .map(|(_, ip)| ip.parse().unwrap());
        }
        loaded
    }

    fn key(s: &str) -> RouteKey {
        RouteKey::parse_authority(s).unwrap()
    }

    const TWO: &str = "routes:\n  - {name: a.apps.internal, port: 80, home_cluster: k8s}\n  \
                       - {name: a.apps.internal, port: 81, home_cluster: k8s}\n  \
                       - {name: b.apps.internal, port: 80, home_cluster: diego}\n";

    #[test]
    fn a_vip_names_its_route_and_ports_are_counted() {
        let store = RouteStore::new();
        store.replace_all(routes(
            TWO,
            &[
                ("a.apps.internal", "100.64.0.1"),
                ("b.apps.internal", "100.64.0.2"),
            ],
        ));
        let index = Index::new(true);
        let view = index.view(&store);
        let a = key("a.apps.internal:80").name;
        assert_eq!(
            view.vip_owner("100.64.0.1".parse().unwrap()),
            VipOwner::One(&a)
        );
        assert_eq!(
            view.vip_owner("::ffff:100.64.0.1".parse().unwrap()),
            VipOwner::One(&a)
        );
        assert_eq!(
            view.vip_owner("100.64.0.3".parse().unwrap()),
            VipOwner::None
        );
        assert_eq!(view.ports().collect::<Vec<_>>(), [80, 81]);
        assert_eq!(
            view.vip_addrs().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["100.64.0.1:80", "100.64.0.1:81", "100.64.0.2:80"]
        );
        // Nothing changed: the same view, no work.
        assert!(Arc::ptr_eq(&view, &index.view(&store)));
    }

    #[test]
    fn an_egress_port_names_its_route_and_follows_it() {
        let with_ports = |ports: &[(&str, u16)]| {
            let mut r = routes(TWO, &[]);
            for route in &mut r {
                route.egress_port = ports
                    .iter()
                    .find(|(k, _)| *k == route.key.to_string())
                    .map(|(_, p)| *p);
            }
            r
        };
        let store = RouteStore::new();
        store.replace_all(with_ports(&[
            ("a.apps.internal:80", 20000),
            ("a.apps.internal:81", 20001),
        ]));
        let index = Index::new(false);
        let first = index.view(&store);
        let a80 = key("a.apps.internal:80");
        assert_eq!(first.egress_port_owner(20000), EgressPortOwner::One(&a80));
        assert_eq!(first.egress_port_owner(20002), EgressPortOwner::None);
        assert_eq!(first.egress_ports().collect::<Vec<_>>(), [20000, 20001]);
        // a:80 moves to 20002, b takes 20000: each port names its new route.
        store.replace_all(with_ports(&[
            ("a.apps.internal:80", 20002),
            ("a.apps.internal:81", 20001),
            ("b.apps.internal:80", 20000),
        ]));
        let second = index.view(&store);
        let b80 = key("b.apps.internal:80");
        assert_eq!(second.egress_port_owner(20000), EgressPortOwner::One(&b80));
        assert_eq!(second.egress_port_owner(20002), EgressPortOwner::One(&a80));
        assert_ne!(
            second.egress_ports_generation(),
            first.egress_ports_generation()
        );
        // Two routes on one port for a moment: refused, not guessed.
        store.replace_all(with_ports(&[
            ("a.apps.internal:80", 20000),
            ("b.apps.internal:80", 20000),
        ]));
        assert_eq!(
            index.view(&store).egress_port_owner(20000),
            EgressPortOwner::Ambiguous
        );
    }

    #[test]
    fn a_vip_claimed_by_two_names_is_ambiguous() {
        let store = RouteStore::new();
        store.replace_all(routes(
            TWO,
            &[
                ("a.apps.internal", "100.64.0.1"),
                ("b.apps.internal", "100.64.0.1"),
            ],
        ));
        let view = Index::new(false).view(&store);
        assert_eq!(
            view.vip_owner("100.64.0.1".parse().unwrap()),
            VipOwner::Ambiguous
        );
        assert_eq!(view.vip_addrs().count(), 0, "not tracked");
    }

    #[test]
    fn incremental_updates_match_a_rebuild_under_churn() {
        let store = RouteStore::new();
        let index = Index::new(true);
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for step in 0..300 {
            let mut upserts = Vec::new();
            let mut removals = Vec::new();
            for _ in 0..=next(5) {
                let name = format!("n{}.apps.internal", next(40));
                let port = 80 + u16::try_from(next(3)).unwrap();
                if next(4) == 0 {
                    removals.push(key(&format!("{name}:{port}")));
                } else {
                    let yaml =
                        format!("routes:\n  - {{name: {name}, port: {port}, home_cluster: k8s}}\n");
                    let vip = format!("100.64.0.{}", next(50));
                    let vip = if next(5) == 0 { None } else { Some(vip) };
                    let mut r = routes(&yaml, &[]);
                    r[0].vip = vip.map(|v| v.parse().unwrap());
                    r[0].egress_port =
                        (next(3) != 0).then(|| 20_000 + u16::try_from(next(30)).unwrap());
                    upserts.extend(r);
                }
            }
            store.apply(upserts, removals);
            // Catch up every other step, so some catch-ups span several revisions.
            if step % 2 == 0 {
                continue;
            }
            let incremental = index.view(&store);
            let rebuilt = View::build(store.snapshot(), true, &View::default());
            assert_eq!(incremental.vips, rebuilt.vips, "step {step}");
            assert_eq!(incremental.ports, rebuilt.ports, "step {step}");
            assert_eq!(incremental.vip_addrs, rebuilt.vip_addrs, "step {step}");
            assert_eq!(
                incremental.egress_ports, rebuilt.egress_ports,
                "step {step}"
            );
        }
    }

    #[test]
    fn one_change_in_a_large_table_costs_one_route() {
        const N: usize = 20_000;
        let template = routes(TWO, &[]).remove(0);
        let route = |i: usize| {
            let mut r = template.clone();
            r.key = key(&format!("r{i}.apps.internal:80"));
            r.vip = Some(IpAddr::from([
                100,
                64,
                (i / 250) as u8,
                (i % 250) as u8 + 1,
            ]));
            r
        };
        let store = RouteStore::new();
        store.replace_all((0..N).map(route));
        let index = Index::new(true);
        let first = index.view(&store);
        assert_eq!(first.applied, N as u64);
        let mut moved = route(7);
        moved.vip = Some("100.64.255.1".parse().unwrap());
        store.apply([moved], [key("r9.apps.internal:80")]);
        let second = index.view(&store);
        assert_eq!(
            second.applied - first.applied,
            2,
            "only the two changed routes"
        );
        assert_eq!(
            second.vip_owner("100.64.255.1".parse().unwrap()),
            VipOwner::One(&key("r7.apps.internal:80").name)
        );
        assert_eq!(
            second.vip_owner(IpAddr::from([100, 64, 0, 8])),
            VipOwner::None
        );
        assert_eq!(
            second.vip_owner(IpAddr::from([100, 64, 0, 10])),
            VipOwner::None
        );
        assert_eq!(second.vip_addrs().count(), N - 1);
    }

    #[test]
    fn generations_move_only_when_the_address_sets_do() {
        let store = RouteStore::new();
        store.replace_all(routes(TWO, &[("a.apps.internal", "100.64.0.1")]));
        let index = Index::new(true);
        let first = index.view(&store);
        // A change that keeps every port and VIP address: no listener needs a look.
        store.replace_all(routes(
            &TWO.replace("home_cluster: diego", "home_cluster: k8s"),
            &[("a.apps.internal", "100.64.0.1")],
        ));
        let second = index.view(&store);
        assert!(second.table.revision() > first.table.revision());
        assert_eq!(second.ports_generation(), first.ports_generation());
        assert_eq!(second.vip_addrs_generation(), first.vip_addrs_generation());
        // b gets a VIP: one more address, same ports.
        store.replace_all(routes(
            TWO,
            &[
                ("a.apps.internal", "100.64.0.1"),
                ("b.apps.internal", "100.64.0.2"),
            ],
        ));
        let third = index.view(&store);
        assert_eq!(third.ports_generation(), second.ports_generation());
        assert_ne!(third.vip_addrs_generation(), second.vip_addrs_generation());
    }
}
