//! Virtual IPs for route names.
//!
//! Two allocations live here. [`VipAllocator`] (in [`alloc`]) is the one that counts: a
//! cluster's route-sync runs it over its merged table and carries each name's VIP with the
//! route, so the DNS shim and the egress read the same address and never compute it apart.
//! [`VipMap`] below is the older stateless allocation that each consumer ran over its own
//! view; it is deprecated (see its docs) and kept only until the egress reads `route.vip`.
//!
//! # The stateless allocation (`VipMap`, deprecated)
//!
//! Apps reach a remote route through an address: the DNS shim answers
//! `orders.apps.internal` with a virtual IP (VIP), and the egress gateway recognises the
//! route by the VIP a connection arrives on. Every DNS-shim replica, every egress gateway
//! and every restart must give the same name the same address, and they must agree
//! without talking to each other. So the address is computed from the set of names alone.
//!
//! # Algorithm
//!
//! 1. Usable addresses of a [`VipRange`] are numbered as slots `0..capacity`: slot `i` is
//!    the network address plus `i + 1`. The network address is never used, nor, for IPv4
//!    prefixes of /30 and shorter, the broadcast address.
//! 2. Names are lowercased (DNS names are case-insensitive) and de-duplicated.
//! 3. Each name's preferred slot is the 64-bit FNV-1a hash of its lowercase bytes modulo
//!    the capacity. FNV-1a is written out here, with its published constants, because the
//!    mapping must never change with a Rust release: std's `DefaultHasher` has an
//!    unspecified algorithm and `RandomState` is seeded per process.
//! 4. Names are visited in canonical order, sorted by `(preferred slot, name)`, and each
//!    takes its preferred slot or, if that is taken, the next free one after it, wrapping
//!    to slot 0 past the end (linear probing).
//!
//! The result depends only on the set of names, never on their order or repetitions.
//! Because names are visited in order of preferred slot, linear probing reduces to one
//! sweep with a "next free slot" cursor, so allocation costs a sort: 50,000 names in a
//! /16 take about 40 ms in a release build, and no input can make probing quadratic.
//!
//! # Trade-off: stability when the set changes
//!
//! Without coordination the mapping cannot be perfectly stable. A name keeps its address
//! unless a name added to the set takes that slot first in the canonical order, which
//! needs a collision: the newcomer prefers the same slot, or lands in the same probe run.
//! A /16 holds 65,534 addresses, so with sparse use such collisions are rare. When one
//! happens, DNS answers have TTL 0 so new lookups see the new address at once, and
//! existing connections are keyed by the address they arrived on, which the gateway
//! resolved when the connection was accepted, so they are unaffected. Removing a name can
//! likewise move a name that had probed past it.

pub mod alloc;

pub use alloc::{VipAllocator, VipCounts};

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why a VIP range or allocation was refused. Each names the input and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VipError {
    /// Text that is not an IPv4 or IPv6 CIDR with its host bits clear.
    #[error(
        "VIP range {input:?} is invalid: {reason}; expected a network in CIDR notation such as 100.64.0.0/16 or fd00::/112"
    )]
    InvalidRange {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// More distinct names than usable addresses in the range.
    #[error(
        "VIP range {range} has {capacity} usable addresses but {names} distinct route names need one each: use a range with a shorter prefix"
    )]
    Exhausted {
        /// The range, in CIDR notation.
        range: String,
        /// How many distinct (case-insensitive) names were given.
        names: usize,
        /// How many addresses the range can hand out.
        capacity: u128,
    },
}

/// An IPv4 or IPv6 network that VIPs are drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VipRange {
    /// The network address, host bits clear.
    network: IpAddr,
    /// Prefix length, at most 32 for IPv4 and 128 for IPv6.
    prefix: u8,
}

impl VipRange {
    /// Parses `address/prefix`, e.g. `100.64.0.0/16` or `fd00::/112`.
    ///
    /// # Errors
    ///
    /// [`VipError::InvalidRange`] when the text is not an address and a decimal prefix,
    /// the prefix is longer than the address, or host bits are set (`100.64.1.0/16` is
    /// refused rather than silently widened, since it is usually a typo).
    pub fn parse(cidr: &str) -> Result<Self, VipError> {
        let invalid = |reason| VipError::InvalidRange {
            input: cidr.to_owned(),
            reason,
        };
        let (address, prefix) = cidr
            .split_once('/')
            .ok_or_else(|| invalid("the /prefix is missing"))?;
        let network: IpAddr = address
            .parse()
            .map_err(|_| invalid("the address is not IPv4 or IPv6"))?;
        // `u8::from_str` accepts a leading '+'; CIDR notation does not.
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("the prefix is not a decimal number"));
        }
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| invalid("the prefix is too long for the address"))?;
        if prefix > address_bits(network) {
            return Err(invalid("the prefix is too long for the address"));
        }
        let range = Self { network, prefix };
        if to_bits(network) & range.host_mask() != 0 {
            return Err(invalid(
                "host bits are set; write the network address itself",
            ));
        }
        Ok(range)
    }

    /// Whether `ip` lies in this network, network and broadcast addresses included.
    ///
    /// An IPv4-mapped IPv6 address (`::ffff:100.64.0.1`, as dual-stack sockets report
    /// IPv4 peers) counts as the IPv4 address it maps.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.network.is_ipv4()
            && to_bits(ip) & !self.host_mask() == to_bits(self.network)
    }

    /// How many addresses can be handed out: all of the network except the network
    /// address and, for IPv4 prefixes of /30 and shorter, the broadcast address.
    ///
    /// IPv4 /31 (RFC 3021) has one usable address here and /32 none. `::/0` reports
    /// `u128::MAX`, one short of the true count, which is more than any caller can use.
    pub fn capacity(&self) -> u128 {
        let broadcast = u128::from(self.network.is_ipv4() && self.prefix <= 30);
        self.host_mask().saturating_sub(broadcast)
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Mask of the host bits of an address in this network.
    fn host_mask(&self) -> u128 {
        let host_bits = address_bits(self.network).saturating_sub(self.prefix);
        u128::MAX
            .checked_shr(128 - u32::from(host_bits))
            .unwrap_or(0)
    }

    /// The slot of `ip`: `Some` only for an address this range hands out.
    pub(crate) fn slot_of(&self, ip: IpAddr) -> Option<u128> {
        let ip = ip.to_canonical();
        if !self.contains(ip) {
            return None;
        }
        let slot = (to_bits(ip) & self.host_mask()).checked_sub(1)?;
        (slot < self.capacity()).then_some(slot)
    }

    /// The address of `slot`, which must be below [`VipRange::capacity`].
    pub(crate) fn address(&self, slot: u128) -> IpAddr {
        // The network address plus at most `capacity` stays within the host mask, so the
        // sum neither overflows nor leaves the network (nor, for IPv4, 32 bits).
        let bits = to_bits(self.network) | (slot.saturating_add(1) & self.host_mask());
        match self.network {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from_bits(bits as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from_bits(bits)),
        }
    }
}

impl FromStr for VipRange {
    type Err = VipError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for VipRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The VIP of every route name, and the route name of every VIP.
///
/// Deprecated: computed apart by each consumer over its own view, two consumers whose tables
/// differ for a moment can give one VIP to two names. Route-sync's [`VipAllocator`] replaces
/// it (the VIP travels with the route as `Route::vip`); this stays only until the egress
/// gateway reads `route.vip`, and is then removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipMap {
    range: VipRange,
    by_name: HashMap<String, IpAddr>,
    by_ip: HashMap<IpAddr, String>,
}

impl VipMap {
    /// Gives each distinct name (compared ignoring ASCII case) an address in `range`, as
    /// described in the [module docs](self). The same set of names always yields the same
    /// map, whatever their order or repetitions.
    ///
    /// # Errors
    ///
    /// [`VipError::Exhausted`] when there are more distinct names than
    /// [`VipRange::capacity`].
    pub fn allocate<'a>(
        range: &VipRange,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<VipMap, VipError> {
        let mut names: Vec<String> = names.into_iter().map(str::to_ascii_lowercase).collect();
        names.sort_unstable();
        names.dedup();
        let capacity = range.capacity();
        if u128::try_from(names.len()).unwrap_or(u128::MAX) > capacity {
            return Err(VipError::Exhausted {
                range: range.to_string(),
                names: names.len(),
                capacity,
            });
        }
        let mut wanted: Vec<(u128, String)> = names
            .into_iter()
            .map(|name| (preferred_slot(&name, capacity), name))
            .collect();
        // Canonical order: the one thing every replica agrees on without talking.
        wanted.sort_unstable();
        let preferred: Vec<u128> = wanted.iter().map(|(slot, _)| *slot).collect();
        let slots = probe(&preferred, capacity);

        let mut by_name = HashMap::with_capacity(wanted.len());
        let mut by_ip = HashMap::with_capacity(wanted.len());
        for ((_, name), slot) in wanted.into_iter().zip(slots) {
            let ip = range.address(slot);
            by_ip.insert(ip, name.clone());
            by_name.insert(name, ip);
        }
        Ok(VipMap {
            range: *range,
            by_name,
            by_ip,
        })
    }

    /// The VIP of `name` (compared ignoring ASCII case), if it was allocated one.
    pub fn ip_of(&self, name: &str) -> Option<IpAddr> {
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_name.get(&name.to_ascii_lowercase()).copied()
        } else {
            self.by_name.get(name).copied()
        }
    }

    /// The lowercase route name that owns `ip`, if any. IPv4-mapped IPv6 addresses are
    /// looked up as the IPv4 address they map.
    pub fn name_of(&self, ip: IpAddr) -> Option<&str> {
        self.by_ip.get(&ip.to_canonical()).map(String::as_str)
    }

    /// How many names have a VIP.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether no name has a VIP.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The range the VIPs were drawn from.
    pub fn range(&self) -> &VipRange {
        &self.range
    }

    /// Every `(name, VIP)` pair, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, IpAddr)> {
        self.by_name.iter().map(|(name, ip)| (name.as_str(), *ip))
    }
}

/// FNV-1a, 64-bit, with the published offset basis and prime. Fixed forever: changing it
/// would move every VIP.
fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(PRIME)
    })
}

/// The slot a lowercase name would like; `capacity` is at least 1 whenever it is called.
pub(crate) fn preferred_slot(name: &str, capacity: u128) -> u128 {
    u128::from(fnv1a64(name.as_bytes()))
        .checked_rem(capacity)
        .unwrap_or(0)
}

/// Linear probing with wrap-around, for preferred slots sorted ascending, in O(n).
///
/// Visiting names in ascending preferred order keeps an invariant: every slot from the
/// last name's preferred slot up to `next_free` is taken. So a name's probe from its
/// preferred slot `p` ends at `max(p, next_free)`, with no search. Once `next_free`
/// reaches the end every later name wraps, and wrapped names take the lowest free slots
/// from 0 upwards, which is where their probes would land. Needs
/// `preferred.len() <= capacity` and every `p < capacity`.
fn probe(preferred: &[u128], capacity: u128) -> Vec<u128> {
    let mut slots = Vec::with_capacity(preferred.len());
    let mut next_free = 0u128;
    let mut wrapped = 0usize;
    for &p in preferred {
        let slot = p.max(next_free);
        if slot < capacity {
            slots.push(slot);
            next_free = slot.saturating_add(1);
        } else {
            wrapped += 1;
        }
    }
    // The slots placed so far are strictly ascending: walk them to find the gaps.
    let placed = slots.len();
    let mut taken = 0usize;
    let mut candidate = 0u128;
    for _ in 0..wrapped {
        while taken < placed && slots.get(taken) == Some(&candidate) {
            candidate = candidate.saturating_add(1);
            taken += 1;
        }
        slots.push(candidate);
        candidate = candidate.saturating_add(1);
    }
    slots
}

fn address_bits(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn to_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_bits()),
        IpAddr::V6(v6) => v6.to_bits(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn range(cidr: &str) -> VipRange {
        VipRange::parse(cidr).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// xorshift64: deterministic shuffles and inputs without a crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    #[test]
    fn fnv1a64_matches_published_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// Pins the mapping across versions: if this fails, every deployed VIP would move.
    #[test]
    fn golden_addresses_never_change() {
        let map = VipMap::allocate(
            &range("100.64.0.0/16"),
            ["orders.apps.internal", "payments.apps.internal"],
        )
        .unwrap();
        assert_eq!(map.ip_of("orders.apps.internal"), Some(ip("100.64.105.32")));
        assert_eq!(
            map.ip_of("payments.apps.internal"),
            Some(ip("100.64.220.120"))
        );
    }

    #[test]
    fn parse_and_capacity() {
        let cases = [
            ("100.64.0.0/16", 65_534),
            ("10.0.0.0/29", 6),
            ("10.0.0.0/30", 2),
            ("10.0.0.0/31", 1),
            ("10.0.0.1/32", 0),
            ("0.0.0.0/0", (1 << 32) - 2),
            ("fd00::/112", 65_535),
            ("fd00::/127", 1),
            ("fd00::1/128", 0),
            ("::/0", u128::MAX),
        ];
        for (cidr, capacity) in cases {
            let parsed = range(cidr);
            assert_eq!(parsed.capacity(), capacity, "{cidr}");
            assert_eq!(parsed.to_string(), cidr);
            assert_eq!(cidr.parse::<VipRange>(), Ok(parsed));
        }
        for bad in [
            "100.64.0.0",
            "100.64.0.0/33",
            "100.64.0.0/",
            "100.64.0.0/+16",
            "100.64.0.0/300",
            "100.64.1.0/16",
            "orders/16",
            "fd00::/129",
            "fd00::1/112",
            "",
        ] {
            let Err(err @ VipError::InvalidRange { .. }) = VipRange::parse(bad) else {
                panic!("{bad:?} must be refused");
            };
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn contains_respects_family_and_prefix() {
        let v4 = range("100.64.0.0/16");
        assert!(v4.contains(ip("100.64.0.0")));
        assert!(v4.contains(ip("100.64.255.255")));
        assert!(v4.contains(ip("::ffff:100.64.3.4")));
        assert!(!v4.contains(ip("100.65.0.0")));
        assert!(!v4.contains(ip("::6440:1")));
        let v6 = range("fd00::/112");
        assert!(v6.contains(ip("fd00::ffff")));
        assert!(!v6.contains(ip("fd00::1:0")));
        assert!(!v6.contains(ip("100.64.0.1")));
        assert!(range("::/0").contains(ip("2001:db8::1")));
        assert!(range("0.0.0.0/0").contains(ip("255.255.255.255")));
    }

    #[test]
    fn same_set_gives_the_same_map_whatever_the_order() {
        let names: Vec<String> = (0..300).map(|i| format!("svc-{i}.apps.internal")).collect();
        // A /23 makes collisions certain, so probing order matters.
        let r = range("10.1.0.0/23");
        let reference = VipMap::allocate(&r, names.iter().map(String::as_str)).unwrap();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for _ in 0..20 {
            let mut shuffled = names.clone();
            for i in (1..shuffled.len()).rev() {
                shuffled.swap(i, rng.below(i + 1));
            }
            // Repeats and other spellings of the same name must not change anything.
            for _ in 0..50 {
                let dup = shuffled[rng.below(shuffled.len())].to_ascii_uppercase();
                shuffled.push(dup);
            }
            let map = VipMap::allocate(&r, shuffled.iter().map(String::as_str)).unwrap();
            assert_eq!(map, reference);
        }
        assert_eq!(reference.len(), names.len());
        assert_eq!(
            reference.ip_of("SVC-7.Apps.Internal"),
            reference.ip_of("svc-7.apps.internal")
        );
    }

    #[test]
    fn a_full_tiny_range_uses_every_slot_once() {
        let r = range("192.0.2.8/29");
        let names = ["a", "b", "c", "d", "e", "f"];
        let map = VipMap::allocate(&r, names).unwrap();
        let ips: HashSet<IpAddr> = names.iter().map(|n| map.ip_of(n).unwrap()).collect();
        let usable: HashSet<IpAddr> = (9..=14).map(|i| ip(&format!("192.0.2.{i}"))).collect();
        assert_eq!(
            ips, usable,
            "network .8 and broadcast .15 are never handed out"
        );
        for name in names {
            assert_eq!(map.name_of(map.ip_of(name).unwrap()), Some(name));
        }
        assert_eq!(map.name_of(ip("192.0.2.8")), None);
        assert_eq!(
            map.name_of(ip("::ffff:192.0.2.9")),
            map.name_of(ip("192.0.2.9"))
        );
    }

    #[test]
    fn exhausted_names_the_range_and_the_counts() {
        let r = range("192.0.2.8/29");
        let err = VipMap::allocate(&r, ["a", "b", "c", "d", "e", "f", "g"]).unwrap_err();
        assert_eq!(
            err,
            VipError::Exhausted {
                range: "192.0.2.8/29".into(),
                names: 7,
                capacity: 6
            }
        );
        let shown = err.to_string();
        assert!(shown.contains("192.0.2.8/29") && shown.contains(" 6 ") && shown.contains(" 7 "));
        // Duplicates are one name.
        assert!(VipMap::allocate(&r, ["a", "A", "b", "c", "d", "e", "f"]).is_ok());
        // A range with no usable address still maps the empty set.
        let none = range("192.0.2.1/32");
        assert!(VipMap::allocate(&none, []).unwrap().is_empty());
        assert!(VipMap::allocate(&none, ["a"]).is_err());
    }

    #[test]
    fn small_ranges_keep_network_and_broadcast_free() {
        for (cidr, usable) in [
            ("192.0.2.0/30", &["192.0.2.1", "192.0.2.2"][..]),
            ("192.0.2.0/31", &["192.0.2.1"][..]),
            ("fd00::/126", &["fd00::1", "fd00::2", "fd00::3"][..]),
        ] {
            let r = range(cidr);
            let names: Vec<String> = (0..usable.len()).map(|i| format!("n{i}")).collect();
            let map = VipMap::allocate(&r, names.iter().map(String::as_str)).unwrap();
            let got: HashSet<IpAddr> = map.iter().map(|(_, ip)| ip).collect();
            let want: HashSet<IpAddr> = usable.iter().map(|s| ip(s)).collect();
            assert_eq!(got, want, "{cidr}");
        }
    }

    #[test]
    fn ipv6_ranges_work() {
        for cidr in ["fd00::/112", "fd00:1234::/64", "::/0"] {
            let r = range(cidr);
            let names: Vec<String> = (0..1000)
                .map(|i| format!("svc-{i}.apps.internal"))
                .collect();
            let map = VipMap::allocate(&r, names.iter().map(String::as_str)).unwrap();
            assert_eq!(map.len(), 1000);
            for name in &names {
                let vip = map.ip_of(name).unwrap();
                assert!(
                    vip.is_ipv6() && r.contains(vip) && vip != r.network(),
                    "{cidr} {vip}"
                );
                assert_eq!(map.name_of(vip), Some(name.as_str()));
            }
        }
    }

    #[test]
    fn fifty_thousand_names_in_a_slash_16() {
        let r = range("100.64.0.0/16");
        let names: Vec<String> = (0..50_000)
            .map(|i| format!("svc-{i}.ns-{}.apps.internal", i % 97))
            .collect();
        let map = VipMap::allocate(&r, names.iter().map(String::as_str)).unwrap();
        assert_eq!(map.len(), 50_000);
        assert_eq!(map.by_ip.len(), 50_000, "every name has its own address");
        for (name, vip) in map.iter() {
            assert!(r.contains(vip), "{vip}");
            assert_ne!(vip, ip("100.64.0.0"));
            assert_ne!(vip, ip("100.64.255.255"));
            assert_eq!(map.name_of(vip), Some(name));
        }
    }

    /// The textbook algorithm the sweep in [`probe`] must equal.
    fn naive_probe(preferred: &[u128], capacity: u128) -> Vec<u128> {
        let mut taken = HashSet::new();
        preferred
            .iter()
            .map(|&p| {
                let mut slot = p;
                while !taken.insert(slot) {
                    slot = (slot + 1) % capacity;
                }
                slot
            })
            .collect()
    }

    #[test]
    fn sweep_equals_textbook_linear_probing() {
        let mut rng = Rng(0xdead_beef_cafe_f00d);
        for _ in 0..5000 {
            let capacity = 1 + rng.below(24);
            let n = rng.below(capacity + 1);
            // Few distinct preferences force long runs and wrap-around.
            let spread = 1 + rng.below(capacity);
            let mut preferred: Vec<u128> = (0..n)
                .map(|_| ((capacity - spread + rng.below(spread)) % capacity) as u128)
                .collect();
            preferred.sort_unstable();
            let capacity = capacity as u128;
            assert_eq!(
                probe(&preferred, capacity),
                naive_probe(&preferred, capacity),
                "{preferred:?} in {capacity}"
            );
        }
    }
}
