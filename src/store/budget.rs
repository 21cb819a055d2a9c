//! The byte budget of a slot table (`store.max_bytes`): what a record costs,
//! each bucket's share, and which records make room for a new one. Pure
//! decisions on a [`Bucket`]; the table carries them out (`reclaim.rs`).
//!
//! Each bucket owns an equal share of the budget (`max_bytes / buckets`) and
//! every entry records the bytes its slot's data key is charged for, so the
//! accounting lives inside the bucket's own compare-and-swap: no counter is
//! shared between buckets, and the sum of the shares never exceeds
//! `max_bytes`. A record larger than a share can never be stored whole (the
//! local store keeps it without its body; the replay cache skips it).

use super::bucket::{Bucket, Entry, State};
use crate::host::Host;
use crate::metrics::Metric;

/// What Envoy allocates for a record beyond its encoded bytes. Measured on
/// Envoy 1.40 (its tcmalloc, `/memory` "allocated" per stored record, over
/// 46 record sizes from 0 to 300 KB, the data keys already existing): the
/// value is one heap allocation rounded up to the allocator's size class,
/// which costs up to 32% more than asked (22 KB took 29 KB, 50 KB took
/// 64 KiB, 160 KB took 200 KiB) and about 8 KiB above 256 KiB. So a record
/// is charged its length plus a third, plus this much for the smallest
/// records, and what Envoy really holds stays within the budget.
pub const RECORD_OVERHEAD: u64 = 64;

/// The bytes a record of `encoded_len` bytes is charged (see
/// [`RECORD_OVERHEAD`]).
pub fn charge(encoded_len: u64) -> u64 {
    encoded_len
        .saturating_add(encoded_len / 3)
        .saturating_add(RECORD_OVERHEAD)
}

/// The framing every record has around its headers and body (record.rs).
const RECORD_FRAMING: u64 = 1 + 8 + 16 + 2 + 1 + 2 + 4;

/// A bucket's share of the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    share: u64,
}

impl Budget {
    pub fn new(max_bytes: u64, buckets: u32) -> Budget {
        Budget {
            share: max_bytes / u64::from(buckets.max(1)),
        }
    }

    /// No limit (tests of everything else).
    #[cfg(test)]
    pub fn unlimited() -> Budget {
        Budget { share: u64::MAX }
    }

    pub fn share(&self) -> u64 {
        self.share
    }

    /// The largest body a record can have and still fit in one bucket's
    /// share, before its headers: capturing more is pointless.
    pub fn largest_body(&self) -> u64 {
        // Inverse of `charge`, rounded down: n + n/3 <= room => n <= 3*room/4.
        let room = self.share.saturating_sub(RECORD_OVERHEAD);
        (room / 4).saturating_mul(3).saturating_sub(RECORD_FRAMING)
    }

    /// Whether a record charged `bytes` could fit in an empty bucket.
    pub fn could_fit(&self, bytes: u64) -> bool {
        bytes <= self.share && bytes <= u64::from(u32::MAX)
    }

    /// What makes room in `bucket` for `own_bytes` charged to slot `own`
    /// (its current charge is replaced), or, with no slot, for nothing
    /// more (the sweep, when a bucket is over its share). Running requests
    /// are never evicted; only the bytes their slots held before them go.
    pub fn plan(&self, bucket: &Bucket, own: Option<usize>, own_bytes: u64, now_ms: u64) -> Plan {
        let others = || {
            bucket
                .entries
                .iter()
                .enumerate()
                .filter(move |(i, _)| Some(*i) != own)
        };
        // What no one may take: the bytes other completions have reserved
        // (for microseconds: between their reservation and their entry).
        let reserved: u64 = others()
            .filter(|(_, e)| e.state == State::InFlight && e.reserved && !e.is_dead(now_ms))
            .map(|(_, e)| u64::from(e.data_bytes))
            .sum();
        if reserved.saturating_add(own_bytes) > self.share {
            return Plan::NoRoom;
        }
        let total: u64 = others()
            .map(|(_, e)| u64::from(e.data_bytes))
            .sum::<u64>()
            .saturating_add(own_bytes);
        if total <= self.share {
            return Plan::Fits;
        }
        // Cheapest first: bytes nobody owns any more (free slots' and
        // running requests' leftovers of earlier epochs, largest first),
        // then expired records and abandoned claims (soonest dead first),
        // then live completed records, oldest completion first. (Picked
        // one at a time: a bucket has 16 entries, and no sort is compiled
        // into the module.)
        let rank = |e: &Entry| -> Option<(u8, u64)> {
            if e.is_dead(now_ms) {
                Some((1, e.deadline_ms))
            } else if e.holds_garbage() {
                Some((0, u64::MAX - u64::from(e.data_bytes)))
            } else if e.state == State::Completed {
                Some((2, e.since_ms))
            } else {
                None
            }
        };
        let mut over = total - self.share;
        let mut victims: Vec<usize> = Vec::new();
        while let Some((way, e)) = others()
            .filter(|(i, _)| !victims.contains(i))
            .filter_map(|(i, e)| Some((rank(e)?, i, e)))
            .min_by_key(|(r, i, _)| (*r, *i))
            .map(|(_, i, e)| (i, e))
        {
            victims.push(way);
            over = over.saturating_sub(u64::from(e.data_bytes));
            if over == 0 {
                return Plan::Reclaim(victims);
            }
        }
        // Only reachable if the reserved total was miscounted: nothing else
        // holds bytes.
        Plan::NoRoom
    }
}

/// How to make room in a bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// It fits as the bucket is.
    Fits,
    /// It fits once these slots' bytes are reclaimed: free slots' leftovers,
    /// dead entries, then live completed records (evicted).
    Reclaim(Vec<usize>),
    /// It cannot fit now: other completions' reservations hold the rest
    /// of the share.
    NoRoom,
}

/// What an operation did to a table's bytes, for metrics. Counted as each
/// step is committed, so a step that succeeded counts even when a later
/// one failed, and the bytes gauge never drifts from the tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpaceEffects {
    /// Change in the bytes charged to the budget.
    pub bytes: i64,
    /// Live completed records evicted to make room for bytes.
    pub evicted: u32,
    /// Expired records and abandoned claims freed to make room.
    pub expired: u32,
    /// Records stored without their body: they did not fit.
    pub bodies_omitted: u32,
}

impl SpaceEffects {
    pub(super) fn add_bytes(&mut self, before: u64, after: u64) {
        // A bucket's charge is at most 16 x u32::MAX: the difference fits.
        let delta = (after as i64).wrapping_sub(before as i64);
        self.bytes = self.bytes.saturating_add(delta);
    }

    /// Only the bytes (the gauge of bytes held): the replay cache's effects
    /// (its evictions are cache misses, not lost records, and its entries
    /// are not the store's), and a forgotten key's (the operations
    /// endpoint counts the entry itself).
    pub fn report_bytes(&self, host: &impl Host) {
        if self.bytes != 0 {
            host.metric_add(Metric::BytesHeld, self.bytes);
        }
    }

    /// The local store's effects.
    pub fn report(&self, host: &impl Host) {
        if self.bytes != 0 {
            host.metric_add(Metric::BytesHeld, self.bytes);
        }
        if self.evicted > 0 {
            host.metric_add(Metric::EvictedForSpace, i64::from(self.evicted));
        }
        if self.expired > 0 {
            host.metric_add(Metric::Expired, i64::from(self.expired));
        }
        let freed = self.evicted + self.expired;
        if freed > 0 {
            host.metric_add(Metric::Entries, -i64::from(freed));
        }
        if self.bodies_omitted > 0 {
            host.metric_add(Metric::BodiesOmitted, i64::from(self.bodies_omitted));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: State, bytes: u32, since: u64, deadline: u64) -> Entry {
        Entry {
            state,
            data_bytes: bytes,
            since_ms: since,
            deadline_ms: deadline,
            ..Entry::FREE
        }
    }

    #[test]
    fn a_record_is_charged_its_bytes_plus_the_allocators_rounding() {
        assert_eq!(charge(0), RECORD_OVERHEAD);
        assert_eq!(charge(3000), 3000 + 1000 + RECORD_OVERHEAD);
        // Every allocation measured on Envoy 1.40 (record length, bytes
        // allocated per record) is within its charge.
        for (len, allocated) in [
            (6_166, 8_126 + 48),
            (13_166, 16_342 + 48),
            (22_166, 28_956 + 48),
            (50_166, 65_492 + 48),
            (160_166, 204_987 + 48),
            (262_166, 270_490 + 48),
        ] {
            assert!(charge(len) >= allocated, "{len}");
        }
        assert_eq!(charge(u64::MAX), u64::MAX);
    }

    #[test]
    fn the_shares_never_add_up_to_more_than_the_budget() {
        let b = Budget::new(1_000_003, 7);
        assert_eq!(b.share(), 142_857);
        assert!(b.share() * 7 <= 1_000_003);
        // The largest body fits with the record's framing and no headers.
        let body = b.largest_body();
        assert!(charge(body + RECORD_FRAMING) <= b.share());
        assert!(charge(body + RECORD_FRAMING + 8) > b.share());
        assert_eq!(Budget::new(100, 1).largest_body(), 0);
    }

    #[test]
    fn room_comes_from_garbage_then_dead_entries_then_the_oldest_records() {
        let b = Budget::new(1000, 1);
        let mut bucket = Bucket::empty(6);
        bucket.entries[0] = entry(State::Completed, 200, 10, 10_000); // older
        bucket.entries[1] = entry(State::Completed, 200, 20, 10_000);
        // A completion running until 1000 that reserved its 300 bytes.
        bucket.entries[2] = Entry {
            reserved: true,
            ..entry(State::InFlight, 300, 5, 1_000)
        };
        bucket.entries[3] = entry(State::Free, 100, 0, 0); // leftover
        bucket.entries[4] = entry(State::Completed, 100, 1, 50); // expired at 100
                                                                 // 900 held, own slot 5 wants 100: fits.
        assert_eq!(b.plan(&bucket, Some(5), 100, 100), Plan::Fits);
        // 250 more: the leftover, then the expired record, then the oldest live one.
        assert_eq!(
            b.plan(&bucket, Some(5), 250, 100),
            Plan::Reclaim(vec![3, 4])
        );
        assert_eq!(
            b.plan(&bucket, Some(5), 350, 100),
            Plan::Reclaim(vec![3, 4, 0])
        );
        // The running completion's 300 can never be taken: 700 at most.
        assert_eq!(
            b.plan(&bucket, Some(5), 700, 100),
            Plan::Reclaim(vec![3, 4, 0, 1])
        );
        assert_eq!(b.plan(&bucket, Some(5), 701, 100), Plan::NoRoom);
        // Its own slot's charge is replaced, not added to.
        assert_eq!(b.plan(&bucket, Some(2), 300, 100), Plan::Fits);
        // A claim abandoned past its lock is dead, not running.
        assert_eq!(
            b.plan(&bucket, Some(5), 800, 5_000),
            Plan::Reclaim(vec![3, 4, 2, 0])
        );
        // The sweep: over the share with nothing new, the oldest goes.
        bucket.entries[5] = entry(State::Completed, 250, 30, 10_000);
        assert_eq!(b.plan(&bucket, None, 0, 100), Plan::Reclaim(vec![3, 4]));
        // A running request that has not reserved holds only the bytes of
        // the record its slot had before: garbage, taken first.
        bucket.entries[2].reserved = false;
        assert_eq!(
            b.plan(&bucket, Some(5), 750, 100),
            Plan::Reclaim(vec![2, 3, 4, 0])
        );
    }
}
