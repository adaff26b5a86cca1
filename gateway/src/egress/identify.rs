//! Which route a connection is for: a pure function of the facts the I/O layer gathered
//! (the listener it arrived on, its local address, what a peek found) and the table.
//!
//! The rules, in order:
//! 1. a **dedicated** listener names its route;
//! 2. an **egress-port** listener (`bind_egress_ports`) names the route whose `egress_port`
//!    the connection arrived on; a port that is no route's (yet) is refused as
//!    `unknown_egress_port`, after the caller's wait for the table. On Kubernetes this is
//!    all the egress sees of a call to a mirror Service: kube-proxy rewrote the ClusterIP
//!    to this pod's address and the Service's target port;
//! 3. a local address that is a route's **VIP** names that route's name, on the port dialled;
//!    an address that is a VIP of nobody (yet) but must be one (a `bind_vips` listener, or
//!    inside `vip_range`) is refused as `unknown_vip`, after the caller's wait for the table;
//! 4. otherwise the HTTP/1.x **Host** or TLS **SNI** the peek found names the route, on the
//!    port dialled;
//! 5. otherwise the connection is refused (`unidentified`): raw TCP on a shared address
//!    needs a VIP or a dedicated listener.
//!
//! Never "the only route on this port": the DNS shim may already answer a name with this
//! egress that the egress's own table does not hold as remote yet, and sending such a call
//! to the port's other route would deliver it to another app.
//!
//! Then [`admit`] checks the route in the table: known, and if homed here, exported and with
//! local backends (a connection for a local route reaches the egress only while the route
//! is coming home; it must never open a path to a route this cluster does not export).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use isthmus_route_sync::vip::VipRange;
use isthmus_route_sync::{ClusterName, Route, RouteKey, RouteName, RouteTable};

use super::index::{EgressPortOwner, View, VipOwner};
use crate::Refusal;

/// How a listener knows the route of its connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listener {
    /// Bound to one route by configuration.
    Dedicated(RouteKey),
    /// Bound on `listen_address`, shared by every route of its port.
    Shared,
    /// Bound on one route's `vip:port` (`bind_vips`).
    Vip,
    /// Bound on `listen_address:<egress_port>` of a route (`bind_egress_ports`): the port a
    /// connection arrived on names its route.
    EgressPort,
}

/// What a peek at the first bytes found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peek {
    /// Not peeked (yet): the decision says whether it must.
    NotYet,
    /// A Host header or SNI with this host name (normalised by the peek).
    Host(String),
    /// No name: the bytes are neither HTTP/1.x nor TLS, have no Host or SNI, are
    /// malformed, too long, or the connection closed first. Says which.
    NoName(String),
    /// Nothing decisive arrived within `peek_timeout`.
    TimedOut,
}

/// Everything the decision looks at besides the table.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    /// The listener that accepted the connection.
    pub listener: &'a Listener,
    /// The address the connection arrived on.
    pub local: SocketAddr,
    /// What the peek found.
    pub peek: &'a Peek,
}

/// The outcome of [`identify`] when it is not a refusal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identified {
    /// The connection is for this route (whether the table holds it is [`admit`]'s call).
    Route(RouteKey),
    /// Only the first bytes can tell: peek, then decide again with what was found.
    NeedsPeek,
}

/// Why a connection could not be mapped to a route.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unidentified {
    /// The address is a VIP (by listener or `vip_range`) that no route carries.
    #[error("{0} is no route's VIP (yet)")]
    UnknownVip(IpAddr),
    /// An egress-port listener on a port that no route carries (yet).
    #[error("port {0} is no route's egress port (yet)")]
    UnknownEgressPort(u16),
    /// Several routes carry this egress port.
    #[error("port {0} is the egress port of several routes at once")]
    AmbiguousEgressPort(u16),
    /// Routes of several names carry this VIP.
    #[error("{0} is the VIP of several route names at once")]
    AmbiguousVip(IpAddr),
    /// A shared address and no name in the first bytes.
    #[error(
        "nothing names a route on shared address {local}: {detail}; raw TCP on a shared \
         address needs a VIP or a dedicated listener"
    )]
    NoName {
        /// The address the connection arrived on.
        local: SocketAddr,
        /// What the peek saw instead of a name.
        detail: String,
    },
    /// A shared address and no decisive bytes before `peek_timeout`.
    #[error("no Host or SNI arrived on shared address {0} before the peek timeout")]
    PeekTimeout(SocketAddr),
    /// A Host or SNI that cannot be a route name (`localhost`, one label).
    #[error("host {host:?} is not a route name: {why}")]
    BadHost {
        /// The name as peeked.
        host: String,
        /// Why it is not a route name.
        why: String,
    },
}

impl Unidentified {
    /// The fixed metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Unidentified::UnknownVip(_) => "unknown_vip",
            Unidentified::AmbiguousVip(_) => "ambiguous_vip",
            Unidentified::UnknownEgressPort(_) => "unknown_egress_port",
            Unidentified::AmbiguousEgressPort(_) => "ambiguous_egress_port",
            Unidentified::NoName { .. } => "unidentified",
            Unidentified::PeekTimeout(_) => "peek_timeout",
            Unidentified::BadHost { .. } => "no_route",
        }
    }

    /// Whether a newer table may decide otherwise (so the caller waits for it).
    pub fn may_change(&self) -> bool {
        matches!(
            self,
            Unidentified::UnknownVip(_)
                | Unidentified::AmbiguousVip(_)
                | Unidentified::UnknownEgressPort(_)
                | Unidentified::AmbiguousEgressPort(_)
        )
    }
}

/// Maps a connection to a route key. See the module docs for the rules.
///
/// # Errors
/// [`Unidentified`] when the facts name no route; see [`Unidentified::may_change`].
pub fn identify(
    facts: &Facts<'_>,
    vip_range: Option<&VipRange>,
    view: &View,
) -> Result<Identified, Unidentified> {
    let local = facts.local;
    let ip = local.ip().to_canonical();
    match facts.listener {
        Listener::Dedicated(key) => return Ok(Identified::Route(key.clone())),
        // The port alone names the route: never a VIP lookup (the local address is the
        // pod's own) and never a peek (mirror Services carry raw TCP as often as HTTP).
        Listener::EgressPort => {
            let port = local.port();
            return match view.egress_port_owner(port) {
                EgressPortOwner::One(key) => Ok(Identified::Route(key.clone())),
                EgressPortOwner::Ambiguous => Err(Unidentified::AmbiguousEgressPort(port)),
                EgressPortOwner::None => Err(Unidentified::UnknownEgressPort(port)),
            };
        }
        Listener::Shared | Listener::Vip => {}
    }
    match view.vip_owner(ip) {
        VipOwner::One(name) => {
            return Ok(Identified::Route(RouteKey::new(name.clone(), local.port())));
        }
        VipOwner::Ambiguous => return Err(Unidentified::AmbiguousVip(ip)),
        VipOwner::None => {}
    }
    // A VIP's traffic is often not HTTP or TLS at all, and a name in it must not pick a
    // route other than the one its address stands for: never peek a VIP.
    if *facts.listener == Listener::Vip || vip_range.is_some_and(|r| r.contains(ip)) {
        return Err(Unidentified::UnknownVip(ip));
    }
    match facts.peek {
        Peek::NotYet => Ok(Identified::NeedsPeek),
        Peek::Host(host) => {
            let name = RouteName::parse(host).map_err(|e| Unidentified::BadHost {
                host: host.clone(),
                why: e.to_string(),
            })?;
            Ok(Identified::Route(RouteKey::new(name, local.port())))
        }
        Peek::NoName(detail) => Err(Unidentified::NoName {
            local,
            detail: detail.clone(),
        }),
        Peek::TimedOut => Err(Unidentified::PeekTimeout(local)),
    }
}

/// The route `key` names, if the egress may carry a connection for it: a remote route, or
/// a route homed here that is exported and has local backends.
///
/// # Errors
/// `NoRoute` (not in the table), `NotExported` (homed here, not exported), `LocalRoute`
/// (homed here, no backend). Each may change with the table: the route may be moving.
pub fn admit(
    key: &RouteKey,
    table: &RouteTable,
    cluster: &ClusterName,
) -> Result<Arc<Route>, Refusal> {
    match table.get(key) {
        None => Err(Refusal::NoRoute(format!("{key} is not a known route"))),
        Some(route) if route.home_cluster == *cluster && !route.exported => {
            Err(Refusal::NotExported(key.to_string()))
        }
        Some(route) if route.home_cluster == *cluster && route.backends.is_empty() => {
            Err(Refusal::LocalRoute(key.to_string()))
        }
        Some(route) => Ok(Arc::clone(route)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_route_sync::RouteStore;
    use std::path::Path;

    use crate::egress::index::Index;

    /// Two HTTP routes and a raw one on :8080, one homed here; `a` and `raw` have VIPs, and
    /// `x` and `y` share one (a table caught mid-change).
    const ROUTES: &str = "routes:\n  \
        - {name: a.apps.internal, port: 8080, protocol: http, home_cluster: k8s}\n  \
        - {name: b.apps.internal, port: 8080, protocol: http, home_cluster: diego, exported: true, backends: [\"10.0.0.1:80\"]}\n  \
        - {name: raw.apps.internal, port: 8080, home_cluster: k8s}\n  \
        - {name: hidden.apps.internal, port: 8080, home_cluster: diego, backends: [\"10.0.0.2:80\"]}\n  \
        - {name: empty.apps.internal, port: 8080, home_cluster: diego, exported: true}\n  \
        - {name: x.apps.internal, port: 9000, home_cluster: k8s}\n  \
        - {name: y.apps.internal, port: 9000, home_cluster: k8s}\n";

    fn view() -> Arc<View> {
        let mut routes = isthmus_route_sync::source::file::parse(ROUTES, Path::new("t.yaml"))
            .unwrap()
            .routes;
        for r in &mut routes {
            r.vip = match r.key.name.as_str() {
                "a.apps.internal" => Some("100.64.0.1".parse().unwrap()),
                "raw.apps.internal" => Some("100.64.0.3".parse().unwrap()),
                "x.apps.internal" | "y.apps.internal" => Some("100.64.0.9".parse().unwrap()),
                _ => None,
            };
            // raw and a carry egress ports; x and y share one (a table caught mid-change).
            r.egress_port = match r.key.name.as_str() {
                "raw.apps.internal" => Some(20000),
                "a.apps.internal" => Some(20001),
                "x.apps.internal" | "y.apps.internal" => Some(20009),
                _ => None,
            };
        }
        let store = RouteStore::new();
        store.replace_all(routes);
        Index::new(false).view(&store)
    }

    fn key(s: &str) -> RouteKey {
        RouteKey::parse_authority(s).unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn run(listener: &Listener, local: &str, peek: &Peek) -> Result<Identified, Unidentified> {
        let range = VipRange::parse("100.64.0.0/16").unwrap();
        let facts = Facts {
            listener,
            local: addr(local),
            peek,
        };
        identify(&facts, Some(&range), &view())
    }

    fn route(s: &str) -> Result<Identified, Unidentified> {
        Ok(Identified::Route(key(s)))
    }

    const SHARED: &Listener = &Listener::Shared;

    #[test]
    fn a_dedicated_listener_names_its_route_whatever_else_is_seen() {
        let dedicated = Listener::Dedicated(key("raw.apps.internal:8080"));
        for peek in [
            Peek::NotYet,
            Peek::Host("a.apps.internal".into()),
            Peek::TimedOut,
        ] {
            for local in ["127.0.0.1:18080", "100.64.0.1:18080", "100.64.9.9:1"] {
                assert_eq!(
                    run(&dedicated, local, &peek),
                    route("raw.apps.internal:8080")
                );
            }
        }
    }

    #[test]
    fn an_egress_port_listener_names_the_route_of_its_port_and_nothing_else_does() {
        let listener = Listener::EgressPort;
        for peek in [Peek::NotYet, Peek::Host("b.apps.internal".into())] {
            // Neither a VIP as local address nor a Host overrides the port.
            for ip in ["10.1.2.3", "100.64.0.1"] {
                assert_eq!(
                    run(&listener, &format!("{ip}:20000"), &peek),
                    route("raw.apps.internal:8080")
                );
                assert_eq!(
                    run(&listener, &format!("{ip}:20001"), &peek),
                    route("a.apps.internal:8080")
                );
            }
        }
        let unknown = run(&listener, "10.1.2.3:20002", &Peek::NotYet).unwrap_err();
        assert_eq!(unknown, Unidentified::UnknownEgressPort(20002));
        assert_eq!(unknown.reason(), "unknown_egress_port");
        assert!(unknown.may_change(), "the table may be about to carry it");
        let ambiguous = run(&listener, "10.1.2.3:20009", &Peek::NotYet).unwrap_err();
        assert_eq!(ambiguous, Unidentified::AmbiguousEgressPort(20009));
        assert!(ambiguous.may_change());
        // A shared listener on the same port ignores egress ports: Host decides there.
        assert_eq!(
            run(
                SHARED,
                "10.1.2.3:20000",
                &Peek::Host("b.apps.internal".into())
            ),
            route("b.apps.internal:20000")
        );
    }

    #[test]
    fn a_vip_names_its_route_on_the_port_dialled_and_is_never_peeked() {
        assert_eq!(
            run(SHARED, "100.64.0.3:8080", &Peek::NotYet),
            route("raw.apps.internal:8080")
        );
        // A Host naming another route does not override the address.
        assert_eq!(
            run(
                SHARED,
                "100.64.0.1:8080",
                &Peek::Host("b.apps.internal".into())
            ),
            route("a.apps.internal:8080")
        );
        // The port comes from the connection; admission refuses a port the name lacks.
        assert_eq!(
            run(&Listener::Vip, "100.64.0.1:9999", &Peek::NotYet),
            route("a.apps.internal:9999")
        );
        // Dual-stack sockets report IPv4 as mapped IPv6.
        assert_eq!(
            run(SHARED, "[::ffff:100.64.0.3]:8080", &Peek::NotYet),
            route("raw.apps.internal:8080")
        );
    }

    #[test]
    fn an_address_that_must_be_a_vip_but_is_nobodys_is_refused_unpeeked() {
        let unknown = Unidentified::UnknownVip("100.64.7.7".parse().unwrap());
        for peek in [Peek::NotYet, Peek::Host("b.apps.internal".into())] {
            assert_eq!(run(SHARED, "100.64.7.7:8080", &peek), Err(unknown.clone()));
        }
        // A bind_vips listener outside the range: its address was a VIP when it was bound.
        assert_eq!(
            run(&Listener::Vip, "127.77.0.5:8080", &Peek::NotYet),
            Err(Unidentified::UnknownVip("127.77.0.5".parse().unwrap()))
        );
        assert!(unknown.may_change());
        assert_eq!(unknown.reason(), "unknown_vip");
    }

    #[test]
    fn a_vip_of_two_names_is_refused_not_guessed() {
        let err = run(SHARED, "100.64.0.9:9000", &Peek::NotYet).unwrap_err();
        assert_eq!(
            err,
            Unidentified::AmbiguousVip("100.64.0.9".parse().unwrap())
        );
        assert!(err.may_change());
    }

    #[test]
    fn a_shared_address_is_identified_only_by_host_or_sni() {
        assert_eq!(
            run(SHARED, "127.0.0.1:8080", &Peek::NotYet),
            Ok(Identified::NeedsPeek)
        );
        assert_eq!(
            run(
                SHARED,
                "127.0.0.1:8080",
                &Peek::Host("b.apps.internal".into())
            ),
            route("b.apps.internal:8080")
        );
        // A name the table does not hold is still that name: admission waits or refuses,
        // the decision never swaps in another route of the port.
        assert_eq!(
            run(
                SHARED,
                "127.0.0.1:8080",
                &Peek::Host("new.apps.internal".into())
            ),
            route("new.apps.internal:8080")
        );
    }

    #[test]
    fn raw_tcp_on_a_shared_address_is_refused_even_with_one_candidate() {
        // Port 8080 has one raw route in the table (and once had only one remote route):
        // neither makes opaque bytes on a shared address that route's.
        let err = run(
            SHARED,
            "127.0.0.1:8080",
            &Peek::NoName("neither http/1.x nor tls".into()),
        )
        .unwrap_err();
        assert_eq!(err.reason(), "unidentified");
        assert!(!err.may_change());
        assert!(
            err.to_string()
                .contains("needs a VIP or a dedicated listener"),
            "{err}"
        );
        let err = run(SHARED, "127.0.0.1:8080", &Peek::TimedOut).unwrap_err();
        assert_eq!(err.reason(), "peek_timeout");
        assert!(!err.may_change());
        let err = run(SHARED, "127.0.0.1:8080", &Peek::Host("localhost".into())).unwrap_err();
        assert_eq!(err.reason(), "no_route");
    }

    #[test]
    fn admission_reaches_only_remote_and_exported_local_routes() {
        let view = view();
        let here = ClusterName::parse("diego").unwrap();
        let ok = |s: &str| admit(&key(s), &view.table, &here).map(|r| r.key.clone());
        assert_eq!(ok("a.apps.internal:8080"), Ok(key("a.apps.internal:8080")));
        assert_eq!(ok("b.apps.internal:8080"), Ok(key("b.apps.internal:8080")));
        assert_eq!(
            ok("hidden.apps.internal:8080"),
            Err(Refusal::NotExported("hidden.apps.internal:8080".into()))
        );
        assert_eq!(
            ok("empty.apps.internal:8080"),
            Err(Refusal::LocalRoute("empty.apps.internal:8080".into()))
        );
        assert_eq!(
            ok("a.apps.internal:9999").map_err(|e| e.reason()),
            Err("no_route")
        );
    }
}
