//! The answering rules: given one question and a [`Snapshot`], answer locally, forward, or
//! refuse. No sockets, no clock, no upstream: the engine carries the decision out.
//!
//! | question | decision |
//! |---|---|
//! | class not IN/ANY, name outside the domains, AXFR/IXFR | REFUSED |
//! | a route name homed elsewhere, A/AAAA/ANY with an address of that family | the egress address(es), TTL `ttl` |
//! | the same name, any other type or a family without an address | NODATA: NOERROR, no answer, SOA in authority |
//! | the same name in VIP mode when its routes carry no VIP (route-sync's range ran out) | SERVFAIL |
//! | SOA at a domain's apex | the shim's SOA |
//! | anything else in the domains (local routes, unknown names, per-instance names such as `0.orders.apps.internal`) | forward to the platform resolver |

use std::net::IpAddr;

use hickory_proto::op::{Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use isthmus_route_sync::RouteName;

use crate::snapshot::{AnswerMode, Egress, Snapshot};
use crate::wire::{answerable_class, lookup_key};

/// One internal domain the shim is authoritative for.
#[derive(Debug, Clone)]
struct Zone {
    /// The apex as a DNS name, `apps.internal.`.
    apex: Name,
    /// SOA MNAME: the apex itself (there is no separate primary server to name).
    mname: Name,
    /// SOA RNAME: `hostmaster.<apex>`.
    rname: Name,
}

/// The fixed inputs of every decision, from the configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    zones: Vec<Zone>,
    ttl: u32,
    negative_ttl: u32,
    shared: Vec<IpAddr>,
}

/// What to do with one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Answer from the shim, authoritatively.
    Answer(Answer),
    /// Ask the platform resolver; `zone` indexes the domain the name is in (for the SOA of
    /// negative answers synthesised from an HTTP upstream).
    Forward {
        /// Index of the matching domain.
        zone: usize,
    },
    /// REFUSED: not a question for this server.
    Refuse,
}

/// A reply's rcode and records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// NOERROR, NXDOMAIN or SERVFAIL.
    pub rcode: ResponseCode,
    /// The answer section.
    pub answers: Vec<Record>,
    /// The authority section (the SOA of a negative answer).
    pub authorities: Vec<Record>,
}

impl Policy {
    /// A policy for `domains` (already validated), answering remote names with `ttl` and
    /// negative answers with `negative_ttl` as the SOA minimum.
    pub fn new(domains: &[RouteName], mode: &AnswerMode, ttl: u32, negative_ttl: u32) -> Self {
        let zones = domains
            .iter()
            .filter_map(|d| {
                let apex = Name::from_ascii(format!("{d}.")).ok()?;
                let rname = Name::from_ascii(format!("hostmaster.{d}.")).ok()?;
                Some(Zone {
                    mname: apex.clone(),
                    apex,
                    rname,
                })
            })
            .collect();
        let shared = match mode {
            AnswerMode::Vip => Vec::new(),
            AnswerMode::Shared { v4, v6 } => v4
                .iter()
                .copied()
                .map(IpAddr::V4)
                .chain(v6.iter().copied().map(IpAddr::V6))
                .collect(),
        };
        Self {
            zones,
            ttl,
            negative_ttl,
            shared,
        }
    }

    /// The index of the most specific domain that holds `name`.
    pub fn zone_of(&self, name: &Name) -> Option<usize> {
        self.zones
            .iter()
            .enumerate()
            .filter(|(_, z)| z.apex.zone_of(name))
            .max_by_key(|(_, z)| z.apex.num_labels())
            .map(|(i, _)| i)
    }

    /// The SOA record of domain `zone` at `serial`, its TTL the negative TTL (RFC 2308).
    pub fn soa(&self, zone: usize, serial: u64) -> Option<Record> {
        let z = self.zones.get(zone)?;
        // Serial arithmetic wraps (RFC 1982): the low 32 bits of the table revision.
        let serial = (serial & u64::from(u32::MAX)) as u32;
        let soa = SOA::new(
            z.mname.clone(),
            z.rname.clone(),
            serial,
            3600,
            600,
            86_400,
            self.negative_ttl,
        );
        Some(Record::from_rdata(
            z.apex.clone(),
            self.negative_ttl,
            RData::SOA(soa),
        ))
    }

    /// The TTL of positive answers.
    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    /// A negative answer (`rcode` with no records) carrying domain `zone`'s SOA.
    pub fn negative(&self, rcode: ResponseCode, zone: usize, serial: u64) -> Answer {
        Answer {
            rcode,
            answers: Vec::new(),
            authorities: self.soa(zone, serial).into_iter().collect(),
        }
    }
}

/// Whether an address of this family answers a query of type `qtype`.
pub fn family_matches(qtype: RecordType, ip: IpAddr) -> bool {
    match qtype {
        RecordType::A => ip.is_ipv4(),
        RecordType::AAAA => ip.is_ipv6(),
        RecordType::ANY => true,
        _ => false,
    }
}

/// An A or AAAA record for `ip`.
pub fn address_record(owner: &Name, ttl: u32, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(owner.clone(), ttl, rdata)
}

/// Decides what to do with `query`. Answers use the query's name as written, so the case
/// the client asked in is the case it gets back.
pub fn decide(query: &Query, snapshot: &Snapshot, policy: &Policy) -> Decision {
    if !answerable_class(query.query_class()) {
        return Decision::Refuse;
    }
    let Some(zone) = policy.zone_of(query.name()) else {
        return Decision::Refuse;
    };
    let qtype = query.query_type();
    if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
        return Decision::Refuse;
    }
    let egress = lookup_key(query.name()).and_then(|key| snapshot.egress(&key));
    if let Some(egress) = egress {
        let addrs: &[IpAddr] = match egress {
            Egress::Vip(ref ip) => std::slice::from_ref(ip),
            Egress::Shared => &policy.shared,
            Egress::Unallocated => {
                return Decision::Answer(Answer {
                    rcode: ResponseCode::ServFail,
                    answers: Vec::new(),
                    authorities: Vec::new(),
                });
            }
        };
        let answers: Vec<Record> = addrs
            .iter()
            .filter(|ip| family_matches(qtype, **ip))
            .map(|ip| address_record(query.name(), policy.ttl, *ip))
            .collect();
        if answers.is_empty() {
            return Decision::Answer(policy.negative(
                ResponseCode::NoError,
                zone,
                snapshot.revision(),
            ));
        }
        return Decision::Answer(Answer {
            rcode: ResponseCode::NoError,
            answers,
            authorities: Vec::new(),
        });
    }
    let at_apex = policy
        .zones
        .get(zone)
        .is_some_and(|z| z.apex == *query.name());
    if at_apex && qtype == RecordType::SOA {
        return Decision::Answer(Answer {
            rcode: ResponseCode::NoError,
            answers: policy.soa(zone, snapshot.revision()).into_iter().collect(),
            authorities: Vec::new(),
        });
    }
    Decision::Forward { zone }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::DNSClass;
    use isthmus_route_sync::source::file::parse;
    use isthmus_route_sync::{ClusterName, RouteStore};
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::path::Path;

    const ROUTES: &str = "routes:
  - {name: orders.apps.internal, port: 8080, home_cluster: k8s, vip: 100.64.105.32}
  - {name: billing.apps.internal, port: 8080, home_cluster: diego}
  - {name: cart.other.internal, port: 8080, home_cluster: k8s, vip: 100.64.0.8}
  - {name: bare.apps.internal, port: 8080, home_cluster: k8s}
";

    fn setup(mode: AnswerMode) -> (Snapshot, Policy) {
        let store = RouteStore::new();
        store.replace_all(parse(ROUTES, Path::new("t.yaml")).unwrap().routes);
        let local = ClusterName::parse("diego").unwrap();
        let snap = Snapshot::build(&store.snapshot(), &local, &mode);
        let domains = [RouteName::parse("apps.internal").unwrap()];
        (snap, Policy::new(&domains, &mode, 0, 5))
    }

    fn vip_mode() -> AnswerMode {
        AnswerMode::Vip
    }

    fn shared_mode() -> AnswerMode {
        AnswerMode::Shared {
            v4: vec![Ipv4Addr::new(10, 0, 4, 7), Ipv4Addr::new(10, 0, 4, 8)],
            v6: vec![Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7)],
        }
    }

    fn q(name: &str, t: RecordType) -> Query {
        Query::query(Name::from_ascii(name).unwrap(), t)
    }

    fn answer(d: Decision) -> Answer {
        match d {
            Decision::Answer(a) => a,
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    #[test]
    fn remote_name_gets_its_vip_in_the_queried_case() {
        let (snap, policy) = setup(vip_mode());
        let a = answer(decide(
            &q("ORDERS.apps.Internal.", RecordType::A),
            &snap,
            &policy,
        ));
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(a.answers[0].name.to_ascii(), "ORDERS.apps.Internal.");
        assert_eq!(a.answers[0].ttl, 0);
        // Exactly the VIP the route carries.
        assert_eq!(
            a.answers[0].data,
            RData::A(A(Ipv4Addr::new(100, 64, 105, 32)))
        );
    }

    #[test]
    fn a_remote_name_without_a_vip_is_servfail_not_a_guess() {
        let (snap, policy) = setup(vip_mode());
        for t in [RecordType::A, RecordType::AAAA, RecordType::ANY] {
            let a = answer(decide(&q("bare.apps.internal.", t), &snap, &policy));
            assert_eq!(a.rcode, ResponseCode::ServFail, "{t}");
            assert!(a.answers.is_empty());
        }
    }

    #[test]
    fn aaaa_for_a_v4_only_route_is_nodata_with_soa() {
        let (snap, policy) = setup(vip_mode());
        let a = answer(decide(
            &q("orders.apps.internal.", RecordType::AAAA),
            &snap,
            &policy,
        ));
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert!(a.answers.is_empty());
        assert_eq!(a.authorities.len(), 1);
        let RData::SOA(soa) = &a.authorities[0].data else {
            panic!("expected SOA")
        };
        assert_eq!(soa.minimum, 5);
        assert_eq!(a.authorities[0].ttl, 5);
        assert_eq!(a.authorities[0].name.to_ascii(), "apps.internal.");
        let mx = answer(decide(
            &q("orders.apps.internal.", RecordType::MX),
            &snap,
            &policy,
        ));
        assert!(mx.answers.is_empty() && mx.authorities.len() == 1);
    }

    #[test]
    fn shared_mode_answers_every_address_of_the_family() {
        let (snap, policy) = setup(shared_mode());
        let a = answer(decide(
            &q("orders.apps.internal.", RecordType::A),
            &snap,
            &policy,
        ));
        assert_eq!(a.answers.len(), 2);
        let aaaa = answer(decide(
            &q("orders.apps.internal.", RecordType::AAAA),
            &snap,
            &policy,
        ));
        assert_eq!(aaaa.answers.len(), 1);
        let any = answer(decide(
            &q("orders.apps.internal.", RecordType::ANY),
            &snap,
            &policy,
        ));
        assert_eq!(any.answers.len(), 3);
    }

    #[test]
    fn local_unknown_and_per_instance_names_are_forwarded() {
        let (snap, policy) = setup(vip_mode());
        for name in [
            "billing.apps.internal.",
            "nobody.apps.internal.",
            "0.orders.apps.internal.",
            "apps.internal.",
        ] {
            assert_eq!(
                decide(&q(name, RecordType::A), &snap, &policy),
                Decision::Forward { zone: 0 },
                "{name}"
            );
        }
    }

    #[test]
    fn outside_the_domains_wrong_class_and_transfers_are_refused() {
        let (snap, policy) = setup(vip_mode());
        // Homed elsewhere, but not in a domain this shim was delegated.
        assert_eq!(
            decide(&q("cart.other.internal.", RecordType::A), &snap, &policy),
            Decision::Refuse
        );
        assert_eq!(
            decide(&q("example.com.", RecordType::A), &snap, &policy),
            Decision::Refuse
        );
        let mut chaos = q("orders.apps.internal.", RecordType::TXT);
        chaos.set_query_class(DNSClass::CH);
        assert_eq!(decide(&chaos, &snap, &policy), Decision::Refuse);
        assert_eq!(
            decide(&q("apps.internal.", RecordType::AXFR), &snap, &policy),
            Decision::Refuse
        );
    }

    #[test]
    fn apex_soa_is_answered_locally() {
        let (snap, policy) = setup(vip_mode());
        let a = answer(decide(
            &q("Apps.Internal.", RecordType::SOA),
            &snap,
            &policy,
        ));
        assert_eq!(a.answers.len(), 1);
        assert!(matches!(a.answers[0].data, RData::SOA(_)));
    }

    #[test]
    fn most_specific_domain_wins() {
        let domains = [
            RouteName::parse("apps.internal").unwrap(),
            RouteName::parse("eu.apps.internal").unwrap(),
        ];
        let policy = Policy::new(&domains, &vip_mode(), 0, 0);
        let name = Name::from_ascii("x.eu.apps.internal.").unwrap();
        assert_eq!(policy.zone_of(&name), Some(1));
        assert_eq!(
            policy.zone_of(&Name::from_ascii("x.apps.internal.").unwrap()),
            Some(0)
        );
    }
}
