//! Virtual IPs for route names.
//!
//! Apps reach a remote route through an address: the DNS shim answers
//! `orders.apps.internal` with a virtual IP (VIP), and the egress gateway recognises the
//! route by the VIP a connection arrives on. The two must agree on that address, and a
//! client may cache it long past its TTL (a JVM caches it forever).
//!
//! # One allocation per cluster, made by route-sync
//!
//! A cluster's route-sync, configured with `vips: {range, hold}`, runs one
//! [`VipAllocator`] (in [`alloc`]) over the names of its merged table, local and imported
//! routes alike, and carries each name's VIP on every route it serves to local consumers
//! (`Route::vip`). The DNS shim and the egress read that field; neither computes a VIP, so
//! they cannot disagree about which route an address names.
//!
//! - A name keeps its VIP for as long as it is in the table, whatever cluster it is homed
//!   in, so a cached address still reaches the same route after a cutover and a rollback.
//! - A name that leaves the table keeps its VIP held for `hold`: nobody else gets it unless
//!   no free VIP is left (then the oldest hold goes first), and the name gets it back if it
//!   returns in time.
//! - When no VIP is free or held, a new name waits without one and gets the next released.
//! - With a `state_dir`, route-sync saves the assigned and held VIPs (with the time each
//!   hold began) and restores them at start, so VIPs survive a restart; saved VIPs that lie
//!   outside a changed range are dropped.
//!
//! # Usable addresses and the preferred slot
//!
//! The usable addresses of a [`VipRange`] are numbered as slots `0..capacity`: slot `i` is
//! the network address plus `i + 1`. The network address is never used, nor, for IPv4
//! prefixes of /30 and shorter, the broadcast address.
//!
//! A new name first tries its preferred slot: the 64-bit FNV-1a hash of its lowercase bytes
//! modulo the capacity, and otherwise the next free slot after it, wrapping around. So a
//! name that did not collide has the VIP its name alone determines, and a node that starts
//! without saved state gives it that VIP again unless another name takes it first. FNV-1a
//! is written out here, with its published constants, because the slot must never change
//! with a Rust release: std's `DefaultHasher` has an unspecified algorithm and
//! `RandomState` is seeded per process.

pub mod alloc;

pub use alloc::{VipAllocator, VipCounts};

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why a VIP range was refused. It names the input and what was expected.
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

/// FNV-1a, 64-bit, with the published offset basis and prime. Fixed forever: changing it
/// would change the VIP of every new name, and of every name on a node without saved state.
fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(PRIME)
    })
}

/// The slot a lowercase name would like, below `capacity`; 0 when `capacity` is 0 (a range
/// with no usable address, where the allocator then finds no free slot).
pub(crate) fn preferred_slot(name: &str, capacity: u128) -> u128 {
    u128::from(fnv1a64(name.as_bytes()))
        .checked_rem(capacity)
        .unwrap_or(0)
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

    fn range(cidr: &str) -> VipRange {
        VipRange::parse(cidr).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn fnv1a64_matches_published_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// Pins the preferred slot across versions: if this fails, new names would move.
    #[test]
    fn golden_preferred_slots_never_change() {
        let r = range("100.64.0.0/16");
        let vip = |name| r.address(preferred_slot(name, r.capacity()));
        assert_eq!(vip("orders.apps.internal"), ip("100.64.105.32"));
        assert_eq!(vip("payments.apps.internal"), ip("100.64.220.120"));
        assert_eq!(preferred_slot("a", 0), 0, "no capacity, no panic");
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
    fn slots_skip_network_and_broadcast() {
        for (cidr, usable) in [
            (
                "192.0.2.8/29",
                &[
                    "192.0.2.9",
                    "192.0.2.10",
                    "192.0.2.11",
                    "192.0.2.12",
                    "192.0.2.13",
                    "192.0.2.14",
                ][..],
            ),
            ("192.0.2.0/30", &["192.0.2.1", "192.0.2.2"][..]),
            ("192.0.2.0/31", &["192.0.2.1"][..]),
            ("fd00::/126", &["fd00::1", "fd00::2", "fd00::3"][..]),
        ] {
            let r = range(cidr);
            let got: Vec<IpAddr> = (0..r.capacity()).map(|slot| r.address(slot)).collect();
            let want: Vec<IpAddr> = usable.iter().map(|s| ip(s)).collect();
            assert_eq!(got, want, "{cidr}");
            for (slot, vip) in (0..).zip(&want) {
                assert_eq!(r.slot_of(*vip), Some(slot), "{cidr} {vip}");
            }
            assert_eq!(r.slot_of(r.network()), None, "{cidr}");
        }
        let r = range("192.0.2.8/29");
        assert_eq!(r.slot_of(ip("192.0.2.15")), None, "broadcast");
        assert_eq!(r.slot_of(ip("192.0.2.16")), None, "outside");
        assert_eq!(r.slot_of(ip("::ffff:192.0.2.9")), Some(0), "IPv4-mapped");
        let v6 = range("fd00::/126");
        assert_eq!(v6.slot_of(ip("fd00::3")), Some(2), "no broadcast in IPv6");
    }
}
