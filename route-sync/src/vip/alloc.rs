//! The cluster's one VIP allocation: a route name keeps its VIP for as long as it exists.
//!
//! A route-sync node runs one [`VipAllocator`] over the names of its merged table (local and
//! imported routes alike) and puts each name's VIP on every one of its routes. So a name
//! keeps its VIP while its home moves between clusters, and a client that cached the address
//! forever (a JVM does) still reaches the same route after a cutover and after a rollback.
//!
//! # Rules
//!
//! - A new name takes its preferred slot (the FNV-1a slot of its name, see the
//!   [module docs](super)) or the next free one after it, wrapping around.
//! - A name that leaves the table keeps its VIP *held* for `hold`: nobody else gets it, and
//!   the name gets it back if it returns in time. Held VIPs are handed to new names only when
//!   no free one is left, oldest hold first; a hold that ran out makes the VIP free.
//! - When nothing is free or held, the name waits without a VIP (counted in
//!   [`VipCounts::waiting`] and [`VipCounts::refused_total`]); it gets the next VIP released.
//!
//! Pure: no I/O, and no clock (callers pass the time, in Unix milliseconds, so a hold can be
//! saved and keep running across a restart). Each operation costs O(log n): free slots are
//! kept as disjoint intervals in a B-tree, holds in a B-tree ordered by age; nothing is ever
//! reallocated as a whole.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use super::{VipRange, preferred_slot};
use crate::model::RouteName;

/// How the allocation stands, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VipCounts {
    /// Names with a VIP.
    pub assigned: u64,
    /// VIPs of names that left, held for their return.
    pub held: u64,
    /// VIPs nobody has or holds (saturating at `u64::MAX` for huge IPv6 ranges).
    pub free: u64,
    /// Names in the table without a VIP because the range is exhausted.
    pub waiting: u64,
    /// How many times a name was left without a VIP, since start.
    pub refused_total: u64,
}

/// The VIP of every route name of one cluster. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct VipAllocator {
    range: VipRange,
    capacity: u128,
    hold_ms: u64,
    assigned: HashMap<RouteName, u128>,
    /// Free slots as disjoint, non-adjacent intervals: start -> end (exclusive).
    free: BTreeMap<u128, u128>,
    free_count: u128,
    /// Held VIPs by name: (slot, held since, Unix ms).
    held: HashMap<RouteName, (u128, u64)>,
    /// The same holds, oldest first.
    held_order: BTreeMap<(u64, u128), RouteName>,
    /// Names waiting for a VIP, in arrival order.
    waiting: BTreeMap<u64, RouteName>,
    waiting_seq: HashMap<RouteName, u64>,
    next_seq: u64,
    refused_total: u64,
    /// Grows with every change of what would be saved.
    generation: u64,
}

impl VipAllocator {
    /// An empty allocation over `range`; a name that leaves keeps its VIP held for `hold`.
    pub fn new(range: VipRange, hold: Duration) -> Self {
        let capacity = range.capacity();
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self {
            range,
            capacity,
            hold_ms: u64::try_from(hold.as_millis()).unwrap_or(u64::MAX),
            assigned: HashMap::new(),
            free,
            free_count: capacity,
            held: HashMap::new(),
            held_order: BTreeMap::new(),
            waiting: BTreeMap::new(),
            waiting_seq: HashMap::new(),
            next_seq: 0,
            refused_total: 0,
            generation: 0,
        }
    }

    /// An allocation restored from saved `assigned` names and `held` VIPs (with the Unix ms
    /// their hold began). Entries whose VIP lies outside this range (the range was changed),
    /// whose VIP or name was already restored, are dropped; the number dropped is returned.
    /// Holds keep their age, so one that ran out while the node was down is free at once.
    pub fn restore(
        range: VipRange,
        hold: Duration,
        assigned: impl IntoIterator<Item = (RouteName, IpAddr)>,
        held: impl IntoIterator<Item = (RouteName, IpAddr, u64)>,
        now_ms: u64,
    ) -> (Self, usize) {
        let mut me = Self::new(range, hold);
        let mut dropped = 0;
        for (name, ip) in assigned {
            match me.range.slot_of(ip) {
                Some(slot) if !me.knows(&name) && me.take_slot(slot) => {
                    me.assigned.insert(name, slot);
                }
                _ => dropped += 1,
            }
        }
        for (name, ip, since) in held {
            match me.range.slot_of(ip) {
                Some(slot) if !me.knows(&name) && me.take_slot(slot) => {
                    me.hold_slot(name, slot, since)
                }
                _ => dropped += 1,
            }
        }
        me.expire(now_ms);
        (me, dropped)
    }

    /// The range VIPs come from.
    pub fn range(&self) -> &VipRange {
        &self.range
    }

    /// How long a VIP stays held after its name left.
    pub fn hold(&self) -> Duration {
        Duration::from_millis(self.hold_ms)
    }

    /// The VIP of `name`, if it has one.
    pub fn vip_of(&self, name: &RouteName) -> Option<IpAddr> {
        self.assigned
            .get(name)
            .map(|&slot| self.range.address(slot))
    }

    /// Changes with every change of what [`VipAllocator::assigned`] or
    /// [`VipAllocator::held`] would list: save when it moved.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Gives `name` a VIP if it has none, as the [rules](self) say, and returns it; `None`
    /// while the range is exhausted (the name then waits for the next VIP released).
    /// Calling it again for a name that has a VIP changes nothing.
    pub fn add(&mut self, name: &RouteName, now_ms: u64) -> Option<IpAddr> {
        if let Some(&slot) = self.assigned.get(name) {
            return Some(self.range.address(slot));
        }
        if self.waiting_seq.contains_key(name) {
            return None;
        }
        self.expire(now_ms);
        let slot = if let Some((slot, since)) = self.held.remove(name) {
            // Back within its hold: the same VIP as before.
            self.held_order.remove(&(since, slot));
            Some(slot)
        } else {
            self.take_free_from(preferred_slot(name.as_str(), self.capacity))
                .or_else(|| self.take_oldest_held())
        };
        match slot {
            Some(slot) => {
                self.assigned.insert(name.clone(), slot);
                self.generation += 1;
                Some(self.range.address(slot))
            }
            None => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.waiting.insert(seq, name.clone());
                self.waiting_seq.insert(name.clone(), seq);
                self.refused_total += 1;
                None
            }
        }
    }

    /// `name` left the table: its VIP is held for the hold time (or free at once when the
    /// hold is zero). Returns the names that were waiting and got a VIP as a result, with it.
    pub fn remove(&mut self, name: &RouteName, now_ms: u64) -> Vec<(RouteName, IpAddr)> {
        if let Some(seq) = self.waiting_seq.remove(name) {
            self.waiting.remove(&seq);
            return Vec::new();
        }
        let Some(slot) = self.assigned.remove(name) else {
            return Vec::new();
        };
        self.generation += 1;
        if self.hold_ms == 0 {
            self.release(slot);
        } else {
            self.hold_slot(name.clone(), slot, now_ms);
        }
        self.expire(now_ms);
        let mut given = Vec::new();
        while !self.waiting.is_empty() {
            let Some(slot) = self.take_free_from(0).or_else(|| self.take_oldest_held()) else {
                break;
            };
            let Some((_, waiter)) = self.waiting.pop_first() else {
                break;
            };
            self.waiting_seq.remove(&waiter);
            self.assigned.insert(waiter.clone(), slot);
            given.push((waiter, self.range.address(slot)));
        }
        given
    }

    /// Frees the VIPs whose hold ran out by `now_ms`. True when any did.
    pub fn expire(&mut self, now_ms: u64) -> bool {
        let mut any = false;
        while let Some(entry) = self.held_order.first_entry() {
            let (since, slot) = *entry.key();
            if since.saturating_add(self.hold_ms) > now_ms {
                break;
            }
            let name = entry.remove();
            self.held.remove(&name);
            self.release(slot);
            any = true;
        }
        if any {
            self.generation += 1;
        }
        any
    }

    /// Every name with a VIP, in no particular order.
    pub fn assigned(&self) -> impl Iterator<Item = (&RouteName, IpAddr)> {
        self.assigned
            .iter()
            .map(|(name, &slot)| (name, self.range.address(slot)))
    }

    /// Every held VIP, with its former name and the Unix ms its hold began, oldest first.
    pub fn held(&self) -> impl Iterator<Item = (&RouteName, IpAddr, u64)> {
        self.held_order
            .iter()
            .map(|(&(since, slot), name)| (name, self.range.address(slot), since))
    }

    /// The counts, for status and metrics.
    pub fn counts(&self) -> VipCounts {
        VipCounts {
            assigned: self.assigned.len() as u64,
            held: self.held.len() as u64,
            free: u64::try_from(self.free_count).unwrap_or(u64::MAX),
            waiting: self.waiting.len() as u64,
            refused_total: self.refused_total,
        }
    }

    fn knows(&self, name: &RouteName) -> bool {
        self.assigned.contains_key(name) || self.held.contains_key(name)
    }

    fn hold_slot(&mut self, name: RouteName, slot: u128, since: u64) {
        self.held_order.insert((since, slot), name.clone());
        self.held.insert(name, (slot, since));
    }

    /// Takes the held VIP whose hold is oldest, forgetting whose it was.
    fn take_oldest_held(&mut self) -> Option<u128> {
        let ((_, slot), name) = self.held_order.pop_first()?;
        self.held.remove(&name);
        Some(slot)
    }

    /// Takes the first free slot at or after `from`, wrapping to the lowest one.
    fn take_free_from(&mut self, from: u128) -> Option<u128> {
        let slot = match self.free.range(..=from).next_back() {
            Some((_, &end)) if end > from => from,
            _ => match self.free.range(from..).next() {
                Some((&start, _)) => start,
                None => *self.free.keys().next()?,
            },
        };
        self.take_slot(slot).then_some(slot)
    }

    /// Marks `slot` taken; false when it was not free.
    fn take_slot(&mut self, slot: u128) -> bool {
        let Some((&start, &end)) = self.free.range(..=slot).next_back() else {
            return false;
        };
        if end <= slot {
            return false;
        }
        self.free.remove(&start);
        if start < slot {
            self.free.insert(start, slot);
        }
        if slot + 1 < end {
            self.free.insert(slot + 1, end);
        }
        self.free_count -= 1;
        true
    }

    /// Marks `slot` (taken) free again, merging it with the free intervals beside it.
    fn release(&mut self, slot: u128) {
        let mut start = slot;
        let mut end = slot + 1;
        if let Some((&s, &e)) = self.free.range(..slot).next_back()
            && e == slot
        {
            self.free.remove(&s);
            start = s;
        }
        if let Some(e) = self.free.remove(&end) {
            end = e;
        }
        self.free.insert(start, end);
        self.free_count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    const HOUR: Duration = Duration::from_secs(3600);

    fn n(s: &str) -> RouteName {
        RouteName::parse(s).unwrap()
    }

    fn range(cidr: &str) -> VipRange {
        VipRange::parse(cidr).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Every free slot is really free and every taken one is assigned or held exactly once.
    fn check(a: &VipAllocator) {
        let mut owners: HashMap<u128, &RouteName> = HashMap::new();
        for (name, &slot) in &a.assigned {
            assert!(owners.insert(slot, name).is_none(), "slot {slot} twice");
        }
        for (name, &(slot, _)) in &a.held {
            assert!(owners.insert(slot, name).is_none(), "slot {slot} twice");
        }
        let mut free = 0u128;
        let mut last_end = None;
        for (&s, &e) in &a.free {
            assert!(s < e && e <= a.capacity);
            assert!(last_end.is_none_or(|l| l < s), "intervals overlap or touch");
            last_end = Some(e);
            free += e - s;
            for slot in s..e {
                assert!(!owners.contains_key(&slot), "slot {slot} free and taken");
            }
        }
        assert_eq!(free, a.free_count);
        assert_eq!(free + owners.len() as u128, a.capacity);
        assert_eq!(a.held.len(), a.held_order.len());
        assert_eq!(a.waiting.len(), a.waiting_seq.len());
    }

    #[test]
    fn a_first_allocation_matches_the_fnv_slots() {
        let mut a = VipAllocator::new(range("100.64.0.0/16"), HOUR);
        assert_eq!(
            a.add(&n("orders.apps.internal"), 0),
            Some(ip("100.64.105.32"))
        );
        assert_eq!(
            a.add(&n("payments.apps.internal"), 0),
            Some(ip("100.64.220.120"))
        );
        check(&a);
    }

    #[test]
    fn vips_stay_put_across_adds_and_removes() {
        // A tiny range makes every name collide with others.
        let mut a = VipAllocator::new(range("10.0.0.0/26"), HOUR);
        let names: Vec<RouteName> = (0..40).map(|i| n(&format!("s{i}.apps.internal"))).collect();
        let mut vip = HashMap::new();
        for name in &names {
            vip.insert(name.clone(), a.add(name, 0).unwrap());
        }
        check(&a);
        let mut now = 1;
        // Churn: remove every third name, add new ones; survivors never move.
        for round in 0..20 {
            now += 1;
            for name in names.iter().skip(round % 3).step_by(3) {
                a.remove(name, now);
            }
            for i in 0..5 {
                a.add(&n(&format!("new{round}-{i}.apps.internal")), now);
            }
            for name in names.iter().skip(round % 3).step_by(3) {
                // Back within the hold: the very same VIP.
                assert_eq!(a.add(name, now), Some(vip[name]), "{name}");
            }
            for name in &names {
                assert_eq!(a.vip_of(name), Some(vip[name]), "{name} moved");
            }
            for i in 0..5 {
                a.remove(&n(&format!("new{round}-{i}.apps.internal")), now);
            }
            check(&a);
        }
        let all: HashSet<IpAddr> = a.assigned().map(|(_, ip)| ip).collect();
        assert_eq!(all.len(), a.assigned.len(), "no two names share a VIP");
    }

    #[test]
    fn held_vips_are_reused_only_when_nothing_is_free_oldest_first() {
        // 6 usable addresses.
        let r = range("192.0.2.8/29");
        let mut a = VipAllocator::new(r, HOUR);
        let first: Vec<(RouteName, IpAddr)> = ["a", "b", "c"]
            .iter()
            .map(|s| {
                let name = n(&format!("{s}.apps.internal"));
                let vip = a.add(&name, 0).unwrap();
                (name, vip)
            })
            .collect();
        a.remove(&first[1].0, 10); // b held since 10
        a.remove(&first[0].0, 20); // a held since 20
        assert_eq!(a.counts().held, 2);
        // Three free addresses go first; none of them is a held one.
        for i in 0..3 {
            let vip = a.add(&n(&format!("f{i}.apps.internal")), 30).unwrap();
            assert!(vip != first[0].1 && vip != first[1].1);
        }
        assert_eq!(a.counts().free, 0);
        // Then the oldest hold (b's), then a's.
        assert_eq!(a.add(&n("g.apps.internal"), 40), Some(first[1].1));
        assert_eq!(a.add(&n("h.apps.internal"), 40), Some(first[0].1));
        // b comes back: its VIP is gone to g, so it waits (the range is full).
        assert_eq!(a.add(&first[1].0, 50), None);
        check(&a);
    }

    #[test]
    fn a_hold_runs_out_and_the_vip_is_free_again() {
        let mut a = VipAllocator::new(range("10.0.0.0/24"), Duration::from_secs(10));
        let name = n("a.apps.internal");
        let vip = a.add(&name, 0).unwrap();
        a.remove(&name, 1_000);
        assert!(!a.expire(10_999));
        assert_eq!(a.counts().held, 1);
        assert!(a.expire(11_000));
        assert_eq!(
            a.counts(),
            VipCounts {
                free: 254,
                ..VipCounts::default()
            }
        );
        // Free again: the name's preferred slot, which is where it was.
        assert_eq!(a.add(&name, 12_000), Some(vip));
        check(&a);
    }

    #[test]
    fn exhaustion_leaves_names_waiting_counted_and_never_panics() {
        let mut a = VipAllocator::new(range("192.0.2.0/30"), Duration::ZERO);
        let names: Vec<RouteName> = (0..4).map(|i| n(&format!("n{i}.apps.internal"))).collect();
        let vips: Vec<Option<IpAddr>> = names.iter().map(|x| a.add(x, 0)).collect();
        assert_eq!(vips.iter().filter(|v| v.is_some()).count(), 2);
        assert_eq!(vips[2], None);
        assert_eq!(a.add(&names[2], 0), None, "asking again counts once");
        let counts = a.counts();
        assert_eq!(
            (counts.waiting, counts.refused_total, counts.free),
            (2, 2, 0)
        );
        // A name leaves: the first waiting name gets its VIP.
        let given = a.remove(&names[0], 1);
        assert_eq!(given, vec![(names[2].clone(), vips[0].unwrap())]);
        assert_eq!(a.vip_of(&names[2]), vips[0]);
        // A waiting name that leaves just stops waiting.
        assert!(a.remove(&names[3], 1).is_empty());
        assert_eq!(a.counts().waiting, 0);
        check(&a);
        // No address at all: every name waits.
        let mut none = VipAllocator::new(range("192.0.2.1/32"), HOUR);
        assert_eq!(none.add(&names[0], 0), None);
        assert_eq!(none.counts().waiting, 1);
    }

    #[test]
    fn restore_keeps_vips_and_hold_ages() {
        let r = range("10.0.0.0/24");
        let mut a = VipAllocator::new(r, Duration::from_secs(60));
        let kept = n("kept.apps.internal");
        let gone = n("gone.apps.internal");
        let old = n("old.apps.internal");
        let kept_vip = a.add(&kept, 0).unwrap();
        let gone_vip = a.add(&gone, 0).unwrap();
        a.add(&old, 0);
        a.remove(&old, 0);
        a.remove(&gone, 50_000);
        let assigned: Vec<_> = a.assigned().map(|(n, ip)| (n.clone(), ip)).collect();
        let held: Vec<_> = a.held().map(|(n, ip, s)| (n.clone(), ip, s)).collect();
        let outside = (n("x.apps.internal"), ip("10.9.0.1"));
        let twice = (n("y.apps.internal"), kept_vip);
        let (b, dropped) = VipAllocator::restore(
            r,
            Duration::from_secs(60),
            assigned.into_iter().chain([outside, twice]),
            held,
            70_000,
        );
        assert_eq!(dropped, 2);
        assert_eq!(b.vip_of(&kept), Some(kept_vip));
        // old's hold (since 0) ran out while the node was down; gone's (since 50 s) did not.
        let held: Vec<_> = b.held().map(|(n, ip, _)| (n.clone(), ip)).collect();
        assert_eq!(held, vec![(gone.clone(), gone_vip)]);
        check(&b);
    }

    #[test]
    fn a_huge_ipv6_range_works() {
        let mut a = VipAllocator::new(range("::/0"), HOUR);
        for i in 0..100 {
            let name = n(&format!("s{i}.apps.internal"));
            let vip = a.add(&name, 0).unwrap();
            assert!(vip.is_ipv6());
        }
        assert_eq!(a.counts().assigned, 100);
        assert_eq!(a.counts().free, u64::MAX);
    }
}
