//! What the query path reads: every name homed in another cluster and the egress address it
//! resolves to.
//!
//! A [`Snapshot`] is computed from a route table whenever the table changes, off the query
//! path, and published whole (`ArcSwap`); a query looks a name up with one hash lookup and
//! never waits for an update. In VIP mode the addresses come from
//! [`VipMap::allocate`] over the names of the routes with `home_cluster != local` — exactly
//! the set the egress gateway allocates over, so the VIP a client gets is the VIP the egress
//! recognises. No sockets, no clock.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use isthmus_route_sync::vip::{VipError, VipMap, VipRange};
use isthmus_route_sync::{ClusterName, RouteTable};

/// How names homed elsewhere are answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerMode {
    /// One VIP per route name, from this range.
    Vip(VipRange),
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
    /// It should have a VIP but the range ran out; it is answered SERVFAIL rather than
    /// forwarded, since the platform's answer would bypass the tunnel.
    Unallocated,
}

/// The remote names at one route-table revision.
#[derive(Debug, Default)]
pub struct Snapshot {
    revision: u64,
    remote: HashMap<Box<str>, Egress>,
    vips: Option<Arc<VipMap>>,
}

/// The outcome of [`Snapshot::build`].
#[derive(Debug)]
pub struct Built {
    /// The new snapshot.
    pub snapshot: Snapshot,
    /// Set when VIP allocation failed; the previous VIP map was kept, and names it does not
    /// cover are [`Egress::Unallocated`].
    pub vip_error: Option<VipError>,
}

impl Snapshot {
    /// No remote names, revision 0.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The snapshot of `table` for a shim in cluster `local`. `previous` supplies the VIP
    /// map to keep when allocation fails (as the gateway keeps its own).
    pub fn build(
        table: &RouteTable,
        local: &ClusterName,
        mode: &AnswerMode,
        previous: &Snapshot,
    ) -> Built {
        let mut names: Vec<&str> = table
            .iter()
            .filter(|r| &r.home_cluster != local)
            .map(|r| r.key.name.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        let mut remote = HashMap::with_capacity(names.len());
        let mut vip_error = None;
        let mut vips = None;
        match mode {
            AnswerMode::Shared { .. } => {
                for name in names {
                    remote.insert(Box::from(name), Egress::Shared);
                }
            }
            AnswerMode::Vip(range) => {
                let map = match VipMap::allocate(range, names.iter().copied()) {
                    Ok(map) => Some(Arc::new(map)),
                    Err(e) => {
                        vip_error = Some(e);
                        previous.vips.clone()
                    }
                };
                for name in names {
                    let egress = map
                        .as_ref()
                        .and_then(|m| m.ip_of(name))
                        .map_or(Egress::Unallocated, Egress::Vip);
                    remote.insert(Box::from(name), egress);
                }
                vips = map;
            }
        }
        Built {
            snapshot: Snapshot {
                revision: table.revision(),
                remote,
                vips,
            },
            vip_error,
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

    /// The VIP map in force, in VIP mode.
    pub fn vips(&self) -> Option<&VipMap> {
        self.vips.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_route_sync::RouteStore;
    use isthmus_route_sync::source::file::parse;
    use std::path::Path;

    fn table(yaml: &str) -> Arc<RouteTable> {
        let store = RouteStore::new();
        store.replace_all(parse(yaml, Path::new("t.yaml")).unwrap().routes);
        store.snapshot()
    }

    const ROUTES: &str = "routes:
  - {name: orders.apps.internal, port: 8080, home_cluster: k8s}
  - {name: orders.apps.internal, port: 9090, home_cluster: k8s}
  - {name: mixed.apps.internal, port: 8080, home_cluster: diego}
  - {name: mixed.apps.internal, port: 9000, home_cluster: k8s}
  - {name: billing.apps.internal, port: 8080, home_cluster: diego}
";

    #[test]
    fn remote_names_get_the_gateways_vips() {
        let t = table(ROUTES);
        let local = ClusterName::parse("diego").unwrap();
        let range = VipRange::parse("100.64.0.0/16").unwrap();
        let built = Snapshot::build(&t, &local, &AnswerMode::Vip(range), &Snapshot::empty());
        assert!(built.vip_error.is_none());
        let s = built.snapshot;
        assert_eq!(s.len(), 2);
        assert_eq!(s.revision(), t.revision());
        // The gateway's allocation over the same set (any port homed elsewhere).
        let gw = VipMap::allocate(&range, ["orders.apps.internal", "mixed.apps.internal"]).unwrap();
        for name in ["orders.apps.internal", "mixed.apps.internal"] {
            assert_eq!(s.egress(name), gw.ip_of(name).map(Egress::Vip));
        }
        assert_eq!(s.egress("billing.apps.internal"), None);
    }

    #[test]
    fn exhausted_range_keeps_the_previous_map() {
        let local = ClusterName::parse("diego").unwrap();
        let range = VipRange::parse("10.0.0.0/30").unwrap();
        let mode = AnswerMode::Vip(range);
        let one = table("routes:\n  - {name: a.apps.internal, port: 80, home_cluster: k8s}\n");
        let first = Snapshot::build(&one, &local, &mode, &Snapshot::empty()).snapshot;
        let a = first.egress("a.apps.internal");
        assert!(matches!(a, Some(Egress::Vip(_))));
        let three = table(
            "routes:
  - {name: a.apps.internal, port: 80, home_cluster: k8s}
  - {name: b.apps.internal, port: 80, home_cluster: k8s}
  - {name: c.apps.internal, port: 80, home_cluster: k8s}
",
        );
        let built = Snapshot::build(&three, &local, &mode, &first);
        assert!(matches!(built.vip_error, Some(VipError::Exhausted { .. })));
        assert_eq!(built.snapshot.egress("a.apps.internal"), a);
        assert_eq!(
            built.snapshot.egress("b.apps.internal"),
            Some(Egress::Unallocated)
        );
    }

    #[test]
    fn shared_mode_marks_every_remote_name() {
        let t = table(ROUTES);
        let local = ClusterName::parse("k8s").unwrap();
        let mode = AnswerMode::Shared {
            v4: vec![Ipv4Addr::new(10, 0, 4, 7)],
            v6: vec![],
        };
        let s = Snapshot::build(&t, &local, &mode, &Snapshot::empty()).snapshot;
        assert_eq!(s.egress("billing.apps.internal"), Some(Egress::Shared));
        assert_eq!(s.egress("mixed.apps.internal"), Some(Egress::Shared));
        assert_eq!(s.egress("orders.apps.internal"), None);
    }
}
