//! Getting bytes back: making room in a bucket for a record (eviction for
//! space), and the sweep that frees expired records and abandoned claims and
//! wipes the response bytes nobody needs any more.
//!
//! Shared data cannot delete a key, so a record's bytes go by overwriting its
//! data key with a 40-byte tombstone. The order is always: the entry stops
//! being a record (bucket CAS: free), its bytes are wiped (data CAS, never
//! over a newer epoch), and only then is its charge taken off the bucket
//! (bucket CAS), so the bytes Envoy holds never exceed what the buckets are
//! charged, and a completion reserves its own bytes before writing them.
//!
//! One window is left: a request whose lock expired without being renewed
//! (its VM stalled past `lock_timeout_seconds`) may still write its record
//! after its slot was freed and wiped; it then finds its claim gone and
//! wipes its own bytes, so the excess lasts as long as its completion.

use super::bucket::{Bucket, Entry, State};
use super::budget::{Plan, SpaceEffects};
use super::local::{LocalTable, MAX_CAS_ATTEMPTS};
use super::{Claim, SharedData, StoreError, SweepStats};
use crate::record::DataRecord;

/// What making room achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Room {
    /// The bytes are reserved (or, for the sweep, the bucket is within its share).
    Made,
    /// The claim was no longer ours.
    NotOurs,
    /// Other running completions have reserved too much of the share (for
    /// longer than the bounded re-reads waited).
    HeldByRunning,
}

/// Slots whose bytes were wiped, with the garbage epoch they were wiped up
/// to ([`super::bucket::Entry::garbage_epoch`]): their charge comes off the
/// bucket only if it is still for garbage of that same epoch.
type Wiped = Vec<(usize, u64)>;

/// What is remembered of a slot whose garbage (entry `e`'s) was wiped.
fn wiped_slot(way: usize, e: &Entry) -> (usize, u64) {
    (way, e.garbage_epoch())
}

fn uncharge_wiped(bucket: &mut Bucket, wiped: &Wiped) {
    for (way, garbage_epoch) in wiped {
        if let Some(e) = bucket.entries.get_mut(*way) {
            // The bytes charged are still the garbage we wiped. Comparing
            // the entry's own epoch is not enough: a running request's slot
            // (garbage: the epoch before) that records its response and is
            // then forgotten is free at that same epoch, and its charge is
            // now for its record, which nobody wiped.
            if e.holds_garbage() && e.garbage_epoch() == *garbage_epoch {
                e.data_bytes = 0;
            }
        }
    }
}

impl LocalTable {
    /// Reserves `need` bytes for `claim`'s slot: its charge becomes at least
    /// `need`, and marked reserved, so that nobody takes it while the record
    /// is written. Takes the room from its bucket as
    /// [`super::budget::Budget::plan`] says: garbage first, then the oldest
    /// completed records; running requests are never evicted. Re-reads the
    /// bucket a bounded number of times while other completions' reservations
    /// hold the room (each lasts microseconds: one data write).
    pub(super) fn reserve<S: SharedData>(
        &self,
        shared: &S,
        claim: &Claim,
        need: u64,
        now_ms: u64,
        space: &mut SpaceEffects,
    ) -> Result<Room, StoreError> {
        self.make_room(
            shared,
            self.split(claim.slot).0,
            Some(claim),
            need,
            now_ms,
            space,
        )
    }

    /// Brings bucket `b` within its share, with `need` bytes for `claim`'s
    /// slot, or with nothing more (`claim` None: the sweep).
    fn make_room<S: SharedData>(
        &self,
        shared: &S,
        b: u32,
        claim: Option<&Claim>,
        need: u64,
        now_ms: u64,
        space: &mut SpaceEffects,
    ) -> Result<Room, StoreError> {
        let way = claim.map(|c| self.split(c.slot).1);
        let mut wiped: Wiped = Vec::new();
        let mut blocked = false;
        // The slot's own older bytes are gone: the record is charged its size.
        let mut own_wiped = false;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (mut bucket, cas) = self.load(shared, b)?;
            let before = bucket.charged();
            let own_bytes = match (claim, way) {
                (Some(c), Some(w)) => {
                    let Some(own) = bucket.entries.get(w).filter(|e| e.owned_by(c)) else {
                        return Ok(Room::NotOurs);
                    };
                    // Bytes of an older record in its own slot are replaced:
                    // charged whichever is larger until they are wiped.
                    if own_wiped {
                        need
                    } else {
                        need.max(u64::from(own.data_bytes))
                    }
                }
                _ => 0,
            };
            uncharge_wiped(&mut bucket, &wiped);
            let plan = self.budget.plan(&bucket, way, own_bytes, now_ms);
            // Those older bytes, charged more than this record needs, are the
            // cheapest room there is: wiped before anyone is evicted or the
            // record is refused. (Left charged, they can exceed the whole
            // share, after max_bytes was lowered or with another
            // configuration's table: the record could never be kept.)
            if let (Some(c), false) = (claim, matches!(plan, Plan::Fits)) {
                if !own_wiped && own_bytes > need {
                    own_wiped = self.wipe(shared, c.slot, c.epoch.saturating_sub(1))?;
                    continue;
                }
            }
            match plan {
                Plan::NoRoom => {
                    blocked = true;
                    continue;
                }
                Plan::Fits => {
                    let Some(w) = way else {
                        // The sweep: only the wiped slots' charges to drop.
                        if bucket.charged() == before || self.store(shared, b, &bucket, cas)? {
                            space.add_bytes(before, bucket.charged());
                            return Ok(Room::Made);
                        }
                        continue;
                    };
                    if let Some(own) = bucket.entries.get_mut(w) {
                        own.data_bytes = u32::try_from(own_bytes).unwrap_or(u32::MAX);
                        own.reserved = true;
                    }
                    if self.store(shared, b, &bucket, cas)? {
                        space.add_bytes(before, bucket.charged());
                        return Ok(Room::Made);
                    }
                }
                Plan::Reclaim(victims) => {
                    // First they stop being records, so that no replay can
                    // read them; their bytes stay charged until wiped.
                    // (Garbage needs no change: it is nobody's record.)
                    let (mut evicted, mut expired) = (0, 0);
                    for v in &victims {
                        if let Some(e) = bucket.entries.get_mut(*v) {
                            if e.is_dead(now_ms) {
                                expired += 1;
                            } else if e.state == State::Completed {
                                evicted += 1;
                            } else {
                                continue;
                            }
                            e.state = State::Free;
                            e.reserved = false;
                            e.token = 0;
                        }
                    }
                    // (Only bytes of free slots to wipe: nothing to write yet.)
                    if evicted + expired > 0 {
                        if !self.store(shared, b, &bucket, cas)? {
                            continue;
                        }
                        space.add_bytes(before, bucket.charged());
                        space.evicted += evicted;
                        space.expired += expired;
                    }
                    for v in victims {
                        let Some(e) = bucket.entries.get(v).copied() else {
                            continue;
                        };
                        if self.wipe(shared, self.slot_of(b, v), e.garbage_epoch())? {
                            wiped.push(wiped_slot(v, &e));
                        }
                    }
                    // The next round takes the wiped charges off and reserves.
                }
            }
        }
        if blocked {
            Ok(Room::HeldByRunning)
        } else {
            Err(StoreError::Contention)
        }
    }

    /// Overwrites a slot's bytes of `epoch` or older (garbage: see
    /// [`super::bucket::Entry::garbage_epoch`]) with a tombstone. `Ok(true)`
    /// when the slot holds no such bytes any more; `Ok(false)` when they
    /// belong to a newer epoch (never erased) or the CAS lost to a writer
    /// (whose bytes stay).
    fn wipe<S: SharedData>(&self, shared: &S, slot: u32, epoch: u64) -> Result<bool, StoreError> {
        let key = self.data_key(slot);
        let Some((bytes, cas)) = shared.shared_get(&key)? else {
            return Ok(true);
        };
        // Unreadable bytes are nobody's record: wipe them too.
        let owner = DataRecord::peek_owner(&bytes).map_or(0, |(e, _)| e);
        if owner > epoch {
            return Ok(false);
        }
        if bytes.len() <= DataRecord::tombstone().len() && owner == 0 {
            return Ok(true);
        }
        Ok(shared.shared_set(&key, &DataRecord::tombstone(), Some(cas))?)
    }

    /// A completion that lost its claim while writing: its own bytes, if
    /// still there, are garbage that nobody is charged for.
    pub(super) fn wipe_own<S: SharedData>(
        &self,
        shared: &S,
        claim: &Claim,
    ) -> Result<(), StoreError> {
        let key = self.data_key(claim.slot);
        if let Some((bytes, cas)) = shared.shared_get(&key)? {
            if DataRecord::peek_owner(&bytes).is_ok_and(|(e, _)| e == claim.epoch) {
                shared.shared_set(&key, &DataRecord::tombstone(), Some(cas))?;
            }
        }
        Ok(())
    }

    /// Frees expired records and abandoned claims in `count` buckets from
    /// `first`, releases the response bytes no live record needs, and brings
    /// a bucket over its share (after `max_bytes` was lowered) within it.
    /// Envoy runs this from the tick; every step is a CAS, so sweepers on
    /// several threads and live traffic can interleave freely. A bucket that
    /// fails is counted and skipped; what was done elsewhere still counts.
    pub fn sweep<S: SharedData>(
        &self,
        shared: &S,
        first: u32,
        count: u32,
        now_ms: u64,
    ) -> SweepStats {
        let mut stats = SweepStats::default();
        for n in 0..count.min(self.buckets) {
            let b = (first.wrapping_add(n)) % self.buckets;
            match self.free_dead(shared, b, now_ms) {
                Ok(freed) => stats.freed += freed,
                Err(_) => stats.errors += 1,
            }
            match self.reclaim_data(shared, b, &mut stats.space) {
                Ok((reclaimed, occupied, over)) => {
                    stats.data_reclaimed += reclaimed;
                    stats.occupied += occupied;
                    if over
                        && self
                            .make_room(shared, b, None, 0, now_ms, &mut stats.space)
                            .is_err()
                    {
                        stats.errors += 1;
                    }
                }
                Err(_) => stats.errors += 1,
            }
        }
        stats
    }

    fn free_dead<S: SharedData>(&self, shared: &S, b: u32, now_ms: u64) -> Result<u32, StoreError> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (mut bucket, cas) = self.load(shared, b)?;
            let mut freed = 0;
            for e in bucket.entries.iter_mut().filter(|e| e.is_dead(now_ms)) {
                e.state = State::Free;
                e.reserved = false;
                e.token = 0;
                freed += 1;
            }
            if freed == 0 || cas.is_none() {
                return Ok(0);
            }
            if self.store(shared, b, &bucket, cas)? {
                return Ok(freed);
            }
        }
        Ok(0)
    }

    /// Wipes the garbage slots still hold (free slots' bytes, running
    /// requests' leftovers of earlier epochs). Returns the data keys
    /// reclaimed, the bucket's occupied slots (from the bucket it read
    /// after `free_dead`, so the sweep reads each bucket once more, not
    /// twice), and whether the bucket is over its share.
    pub(super) fn reclaim_data<S: SharedData>(
        &self,
        shared: &S,
        b: u32,
        space: &mut SpaceEffects,
    ) -> Result<(u32, u64, bool), StoreError> {
        let (bucket, _) = self.load(shared, b)?;
        let occupied = bucket
            .entries
            .iter()
            .filter(|e| e.state != State::Free)
            .count() as u64;
        let mut wiped: Wiped = Vec::new();
        for (way, e) in bucket.entries.iter().enumerate() {
            if !e.holds_garbage() {
                continue;
            }
            // `e` may be stale: the slot can have been claimed and completed
            // since the bucket was read, leaving a newer epoch in the data,
            // which `wipe` never erases; and if the new owner writes between
            // our read and our write, our tombstone's CAS loses.
            if self.wipe(shared, self.slot_of(b, way), e.garbage_epoch())? {
                wiped.push(wiped_slot(way, e));
            }
        }
        let over = bucket.charged() > self.budget.share();
        if wiped.is_empty() {
            return Ok((0, occupied, over));
        }
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (mut bucket, cas) = self.load(shared, b)?;
            let before = bucket.charged();
            uncharge_wiped(&mut bucket, &wiped);
            if self.store(shared, b, &bucket, cas)? {
                space.add_bytes(before, bucket.charged());
                let over = bucket.charged() > self.budget.share();
                return Ok((wiped.len() as u32, occupied, over));
            }
        }
        Ok((0, occupied, over))
    }
}

#[cfg(test)]
mod tests;
