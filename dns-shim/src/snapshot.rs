//! What the query path reads: every name homed in another cluster and the egress address it
//! resolves to.
//!
//! A [`Snapshot`] is computed from a route table whenever the table changes, off the query
//! path, and published whole (`ArcSwap`); a query looks a name up with one hash lookup and
//! never waits for an update. In VIP mode the address of a name is the `vip` its routes
//! carry: the one VIP the cluster's route-sync assigned to the name, which the egress
//! gateway reads from the same table. The shim never computes a VIP of its own, so the two
//! cannot disagree about which route an address names. No sockets, no clock.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use isthmus_route_sync::{ClusterName, RouteTable};

/// How names homed elsewhere are answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerMode {
    /// Each name's own VIP, as its routes carry it (assigned by route-sync).
    Vip,
    /// The same shared egress addresses for every name.
    Shared {
        /// Answers to A queries.
        v4: Vec<Ipv4Addr>,
        /// Answers to AAAA queries.
        v6: Vec<Ipv6Addr>,
    },
}

/// Where one remote name points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Its own VIP.
    Vip(IpAddr),
    /// The shared egress addresses.
    Shared,
    /// VIP mode, but the route carries no VIP (route-sync's range is exhausted, or it has
    /// none). Answered SERVFAIL: forwarding would let the platform's answer bypass the
    /// tunnel, and any address the shim picked could name another route at the egress.
    Unallocated,
}

/// The remote names at one route-table revision.
#[derive(Debug, Default)]
pub struct Snapshot {
    revision: u64,
    remote: HashMap<Box<str>, Egress>,
    without_vip: usize,
}

impl Snapshot {
    /// No remote names, revision 0.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The snapshot of `table` for a shim in cluster `local`: a name is remote when any of
    /// its ports is homed elsewhere.
    pub fn build(table: &RouteTable, local: &ClusterName, mode: &AnswerMode) -> Snapshot {
        let mut remote: HashMap<Box<str>, Egress> = HashMap::new();
        let mut without_vip = 0;
        for route in table.iter().filter(|r| &r.home_cluster != local) {
            let name = route.key.name.as_str();
            if remote.contains_key(name) {
                continue;
            }
            let egress = match mode {
                AnswerMode::Shared { .. } => Egress::Shared,
                // Every port of a name carries the name's one VIP: any of them answers.
                AnswerMode::Vip => match table
                    .by_route_name(&route.key.name)
                    .iter()
                    .find_map(|r| r.vip)
                {
                    Some(ip) => Egress::Vip(ip),
                    None => {
                        without_vip += 1;
                        Egress::Unallocated
                    }
                },
            };
            remote.insert(Box::from(name), egress);
        }
        Snapshot {
            revision: table.revision(),
            remote,
            without_vip,
        }
    }

    /// Where `key` (lowercase, no trailing dot) points, if it is homed elsewhere.
    pub fn egress(&self, key: &str) -> Option<Egress> {
        self.remote.get(key).copied()
    }

    /// The route-table revision this snapshot was built from (the SOA serial).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// How many names are answered with an egress address.
    pub fn len(&self) -> usize {
        self.remote.len()
    }

    /// Whether no name is answered with an egress address.
    pub fn is_empty(&self) -> bool {
        self.remote.is_empty()
    }

    /// How many remote names are answered SERVFAIL for want of a VIP, in VIP mode.
    pub fn without_vip(&self) -> usize {
        self.without_vip
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_route_sync::RouteStore;
    use isthmus_route_sync::source::file::parse;
    use std::path::Path;
    use std::sync::Arc;

    fn table(yaml: &str) -> Arc<RouteTable> {
        let store = RouteStore::new();
        store.replace_all(parse(yaml, Path::new("t.yaml")).unwrap().routes);
        store.snapshot()
    }

    const ROUTES: &str = "routes:
  - {name: orders.apps.internal, port: 8080, home_cluster: k8s, vip: 100.64.0.7}
  - {name: orders.apps.internal, port: 9090, home_cluster: k8s, vip: 100.64.0.7}
  - {name: mixed.apps.internal, port: 8080, home_cluster: diego, vip: 100.64.0.9}
  - {name: mixed.apps.internal, port: 9000, home_cluster: k8s, vip: 100.64.0.9}
  - {name: billing.apps.internal, port: 8080, home_cluster: diego, vip: 100.64.0.3}
  - {name: bare.apps.internal, port: 8080, home_cluster: k8s}
";

    #[test]
    fn remote_names_get_exactly_the_vip_their_routes_carry() {
        let t = table(ROUTES);
        let local = ClusterName::parse("diego").unwrap();
        let s = Snapshot::build(&t, &local, &AnswerMode::Vip);
        assert_eq!(s.len(), 3);
        assert_eq!(s.revision(), t.revision());
        for (name, vip) in [
            ("orders.apps.internal", "100.64.0.7"),
            ("mixed.apps.internal", "100.64.0.9"),
        ] {
            assert_eq!(s.egress(name), Some(Egress::Vip(vip.parse().unwrap())));
        }
        assert_eq!(s.egress("billing.apps.internal"), None, "local: forwarded");
        // No VIP on the route: refused, never guessed.
        assert_eq!(s.egress("bare.apps.internal"), Some(Egress::Unallocated));
        assert_eq!(s.without_vip(), 1);
    }

    #[test]
    fn shared_mode_marks_every_remote_name() {
        let t = table(ROUTES);
        let local = ClusterName::parse("k8s").unwrap();
        let mode = AnswerMode::Shared {
            v4: vec![Ipv4Addr::new(10, 0, 4, 7)],
            v6: vec![],
        };
        let s = Snapshot::build(&t, &local, &mode);
        assert_eq!(s.egress("billing.apps.internal"), Some(Egress::Shared));
        assert_eq!(s.egress("mixed.apps.internal"), Some(Egress::Shared));
        assert_eq!(s.egress("orders.apps.internal"), None);
        assert_eq!(s.without_vip(), 0);
    }
}
