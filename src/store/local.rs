//! The local store: a fixed table of slots in proxy shared data.
//!
//! Envoy's shared data can neither delete nor expire keys, so the set of keys
//! must be bounded by design. The table has `buckets` x `ways` slots:
//!
//! * bucket key `idempotency/v1/{B}x{W}/b{i}`: one small value holding the
//!   `W` entries of bucket `i` (state, key digest, fingerprint, owner,
//!   deadlines). A key digest maps to one bucket; claiming it is a single
//!   compare-and-swap of that value, atomic across all worker threads.
//! * data key `idempotency/v1/{B}x{W}/d{slot}`: the recorded response of the
//!   entry in `slot`, written before the entry is marked completed.
//!
//! So there are never more than `B + B*W` keys and `B*W` records. Each entry
//! carries an `epoch` that grows with every claim of its slot; a data record
//! names the epoch that wrote it, so a replay can tell its own record from a
//! newer or older one, and reclamation never erases a newer record.
//!
//! Buckets and data keys are created by [`LocalTable::init`] from
//! `on_configure`. Envoy runs that first on the main thread's VM while it
//! loads the configuration (checked: the table is created by the thread whose
//! id is Envoy's pid), before the worker VMs start; they find the keys there.
//! That order matters because a set on a missing key ignores CAS: two workers
//! creating the same bucket could each believe they claimed a slot in it. A
//! configuration with a new table shape (another `max_entries`) loaded while
//! traffic runs has the same window for its first requests.

use super::{Claim, ClaimEffects, ClaimOutcome, SharedData, StoreError, SweepStats};
use crate::decision::{decide, Decision, Existing};
use crate::fingerprint::Digest16;
use crate::record::{DataRecord, Reader, StoredResponse};

pub mod operations;

/// Bounded, like istio's local_rate_limit token bucket: under pathological
/// contention the request fails closed (503) instead of spinning.
pub const MAX_CAS_ATTEMPTS: u32 = 16;

const BUCKET_VERSION: u8 = 1;
const ENTRY_SIZE: usize = 66;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Free = 0,
    InFlight = 1,
    Completed = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub state: State,
    /// The slot's data key holds bytes that are not yet reclaimed.
    pub has_data: bool,
    pub epoch: u64,
    pub digest: Digest16,
    pub fingerprint: Digest16,
    pub token: u64,
    /// Lock deadline when in flight, expiry when completed.
    pub deadline_ms: u64,
    /// Claim or completion time: eviction takes the oldest completion first.
    pub since_ms: u64,
}

impl Entry {
    const FREE: Entry = Entry {
        state: State::Free,
        has_data: false,
        epoch: 0,
        digest: [0; 16],
        fingerprint: [0; 16],
        token: 0,
        deadline_ms: 0,
        since_ms: 0,
    };

    fn existing(&self) -> Option<Existing> {
        match self.state {
            State::Free => None,
            State::InFlight => Some(Existing::InFlight {
                fingerprint: self.fingerprint,
                lock_deadline_ms: self.deadline_ms,
            }),
            State::Completed => Some(Existing::Completed {
                fingerprint: self.fingerprint,
                expires_ms: self.deadline_ms,
            }),
        }
    }

    fn is_dead(&self, now_ms: u64) -> bool {
        self.state != State::Free && now_ms >= self.deadline_ms
    }

    fn owned_by(&self, claim: &Claim) -> bool {
        self.state == State::InFlight && self.epoch == claim.epoch && self.token == claim.token
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub entries: Vec<Entry>,
}

impl Bucket {
    fn empty(ways: u32) -> Bucket {
        Bucket {
            entries: vec![Entry::FREE; ways as usize],
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.entries.len() * ENTRY_SIZE);
        out.push(BUCKET_VERSION);
        for e in &self.entries {
            out.push(e.state as u8);
            out.push(u8::from(e.has_data));
            out.extend_from_slice(&e.epoch.to_le_bytes());
            out.extend_from_slice(&e.digest);
            out.extend_from_slice(&e.fingerprint);
            out.extend_from_slice(&e.token.to_le_bytes());
            out.extend_from_slice(&e.deadline_ms.to_le_bytes());
            out.extend_from_slice(&e.since_ms.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8], ways: u32) -> Result<Bucket, StoreError> {
        let corrupt = |_| StoreError::Corrupt("bucket");
        if bytes.len() != 1 + ways as usize * ENTRY_SIZE {
            return Err(StoreError::Corrupt("bucket size"));
        }
        let mut r = Reader { bytes, pos: 0 };
        if r.u8().map_err(corrupt)? != BUCKET_VERSION {
            return Err(StoreError::Corrupt("bucket version"));
        }
        let mut entries = Vec::with_capacity(ways as usize);
        for _ in 0..ways {
            let state = match r.u8().map_err(corrupt)? {
                0 => State::Free,
                1 => State::InFlight,
                2 => State::Completed,
                _ => return Err(StoreError::Corrupt("entry state")),
            };
            entries.push(Entry {
                state,
                has_data: match r.u8().map_err(corrupt)? {
                    0 => false,
                    1 => true,
                    _ => return Err(StoreError::Corrupt("entry flags")),
                },
                epoch: r.u64().map_err(corrupt)?,
                digest: r.digest().map_err(corrupt)?,
                fingerprint: r.digest().map_err(corrupt)?,
                token: r.u64().map_err(corrupt)?,
                deadline_ms: r.u64().map_err(corrupt)?,
                since_ms: r.u64().map_err(corrupt)?,
            });
        }
        Ok(Bucket { entries })
    }

    fn find(&self, digest: &Digest16) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.state != State::Free && &e.digest == digest)
    }

    /// Where a new key goes: a free slot (one without leftover bytes first),
    /// else a dead one (expired record or abandoned claim), else the oldest
    /// completed record, which is evicted. Live claims are never taken.
    fn pick_slot(&self, now_ms: u64) -> Option<(usize, ClaimEffects)> {
        let free = |want_data: bool| {
            self.entries
                .iter()
                .position(|e| e.state == State::Free && e.has_data == want_data)
        };
        if let Some(i) = free(false).or_else(|| free(true)) {
            return Some((
                i,
                ClaimEffects {
                    new_entry: true,
                    ..ClaimEffects::default()
                },
            ));
        }
        let dead = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_dead(now_ms))
            .min_by_key(|(_, e)| e.deadline_ms)
            .map(|(i, _)| i);
        if let Some(i) = dead {
            return Some((
                i,
                ClaimEffects {
                    expired: true,
                    ..ClaimEffects::default()
                },
            ));
        }
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.state == State::Completed)
            .min_by_key(|(_, e)| e.since_ms)
            .map(|(i, _)| {
                (
                    i,
                    ClaimEffects {
                        evicted: true,
                        ..ClaimEffects::default()
                    },
                )
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTable {
    buckets: u32,
    ways: u32,
    prefix: String,
}

impl LocalTable {
    /// Keys are namespaced by the table's shape, so a configuration with
    /// another `max_entries` starts a fresh table instead of misreading one.
    pub fn new(buckets: u32, ways: u32) -> LocalTable {
        LocalTable {
            buckets: buckets.max(1),
            ways: ways.max(1),
            prefix: format!("idempotency/v1/{}x{}/", buckets.max(1), ways.max(1)),
        }
    }

    /// A table for another purpose (the Redis store's replay cache) in the
    /// same shared data, with keys that cannot meet the store's.
    pub fn named(name: &str, buckets: u32, ways: u32) -> LocalTable {
        LocalTable {
            prefix: format!("idempotency/v1/{name}/{}x{}/", buckets.max(1), ways.max(1)),
            ..LocalTable::new(buckets, ways)
        }
    }

    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    pub fn capacity(&self) -> u64 {
        u64::from(self.buckets) * u64::from(self.ways)
    }

    fn bucket_key(&self, bucket: u32) -> String {
        format!("{}b{}", self.prefix, bucket)
    }

    fn data_key(&self, slot: u32) -> String {
        format!("{}d{}", self.prefix, slot)
    }

    fn bucket_of(&self, digest: &Digest16) -> u32 {
        let mut low = [0u8; 8];
        low.copy_from_slice(&digest[8..16]);
        (u64::from_le_bytes(low) % u64::from(self.buckets)) as u32
    }

    fn slot_of(&self, bucket: u32, way: usize) -> u32 {
        bucket * self.ways + way as u32
    }

    fn split(&self, slot: u32) -> (u32, usize) {
        (slot / self.ways, (slot % self.ways) as usize)
    }

    /// Creates every missing bucket and data key. Returns how many buckets
    /// were created. Data keys are created too (as tombstones) because only a
    /// key that exists honours CAS, and completions must CAS their data.
    pub fn init<S: SharedData>(&self, shared: &S) -> Result<u32, StoreError> {
        let empty = Bucket::empty(self.ways).encode();
        let tombstone = DataRecord::tombstone();
        let mut created = 0;
        for b in 0..self.buckets {
            let key = self.bucket_key(b);
            if shared.shared_get(&key)?.is_none() {
                shared.shared_set(&key, &empty, None)?;
                created += 1;
                for way in 0..self.ways as usize {
                    shared.shared_set(&self.data_key(self.slot_of(b, way)), &tombstone, None)?;
                }
            }
        }
        Ok(created)
    }

    fn load<S: SharedData>(
        &self,
        shared: &S,
        bucket: u32,
    ) -> Result<(Bucket, Option<u32>), StoreError> {
        match shared.shared_get(&self.bucket_key(bucket))? {
            Some((bytes, cas)) => Ok((Bucket::decode(&bytes, self.ways)?, Some(cas))),
            // Only reachable if init did not run for this shape; the first
            // write then creates the bucket (see the module note on the race).
            None => Ok((Bucket::empty(self.ways), None)),
        }
    }

    fn store<S: SharedData>(
        &self,
        shared: &S,
        bucket: u32,
        b: &Bucket,
        cas: Option<u32>,
    ) -> Result<bool, StoreError> {
        Ok(shared.shared_set(&self.bucket_key(bucket), &b.encode(), cas)?)
    }

    /// The one atomic step of a request: claim the key, or learn what holds it.
    pub fn claim<S: SharedData>(
        &self,
        shared: &S,
        digest: &Digest16,
        fingerprint: &Digest16,
        token: u64,
        now_ms: u64,
        lock_ms: u64,
    ) -> Result<(ClaimOutcome, ClaimEffects), StoreError> {
        let b = self.bucket_of(digest);
        let mut unreadable_replays = 0;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (mut bucket, cas) = self.load(shared, b)?;
            let found = bucket.find(digest);
            let existing = found
                .and_then(|i| bucket.entries.get(i))
                .and_then(Entry::existing);
            let decision = decide(existing.as_ref(), fingerprint, now_ms);
            let (way, effects) = match (decision, found) {
                (Decision::Conflict, _) => {
                    return Ok((ClaimOutcome::InFlight, ClaimEffects::default()))
                }
                (Decision::Mismatch, _) => {
                    return Ok((ClaimOutcome::Mismatch, ClaimEffects::default()))
                }
                (Decision::Replay, Some(i)) => {
                    let entry = bucket.entries.get(i).copied().unwrap_or(Entry::FREE);
                    match self.read_data(shared, self.slot_of(b, i))? {
                        Some(rec) if rec.epoch == entry.epoch && rec.digest == *digest => {
                            return Ok((
                                ClaimOutcome::Replay(rec.response),
                                ClaimEffects::default(),
                            ))
                        }
                        // The slot moved on between the two reads: look again.
                        // If it keeps happening the record is really gone.
                        _ => {
                            unreadable_replays += 1;
                            if unreadable_replays >= 3 {
                                return Err(StoreError::Inconsistent);
                            }
                            continue;
                        }
                    }
                }
                (Decision::Execute | Decision::TakeOver, Some(i)) => (
                    i,
                    ClaimEffects {
                        expired: true,
                        ..ClaimEffects::default()
                    },
                ),
                (_, _) => match bucket.pick_slot(now_ms) {
                    Some(choice) => choice,
                    None => return Ok((ClaimOutcome::Full, ClaimEffects::default())),
                },
            };
            let Some(entry) = bucket.entries.get_mut(way) else {
                return Err(StoreError::Corrupt("slot index"));
            };
            let epoch = entry.epoch.wrapping_add(1);
            *entry = Entry {
                state: State::InFlight,
                has_data: entry.has_data,
                epoch,
                digest: *digest,
                fingerprint: *fingerprint,
                token,
                deadline_ms: now_ms.saturating_add(lock_ms),
                since_ms: now_ms,
            };
            if self.store(shared, b, &bucket, cas)? {
                let claim = Claim {
                    slot: self.slot_of(b, way),
                    epoch,
                    token,
                };
                return Ok((ClaimOutcome::Claimed(claim), effects));
            }
        }
        Err(StoreError::Contention)
    }

    /// A live completed record of `digest`, with its fingerprint, without
    /// claiming anything: `None` when there is none (or it changed while
    /// being read, which a cache may treat as a miss).
    pub fn lookup<S: SharedData>(
        &self,
        shared: &S,
        digest: &Digest16,
        now_ms: u64,
    ) -> Result<Option<(Digest16, StoredResponse)>, StoreError> {
        let b = self.bucket_of(digest);
        let (bucket, _) = self.load(shared, b)?;
        let Some((way, entry)) = bucket
            .find(digest)
            .and_then(|i| Some((i, *bucket.entries.get(i)?)))
        else {
            return Ok(None);
        };
        if entry.state != State::Completed || entry.is_dead(now_ms) {
            return Ok(None);
        }
        Ok(self
            .read_data(shared, self.slot_of(b, way))?
            .filter(|rec| rec.epoch == entry.epoch && rec.digest == *digest)
            .map(|rec| (entry.fingerprint, rec.response)))
    }

    /// Stores a completed record directly (a cache fill): a claim and its
    /// completion. `Ok(false)` when the key is already there (another
    /// worker filled it first) or the table has no room.
    #[allow(clippy::too_many_arguments)]
    pub fn remember<S: SharedData>(
        &self,
        shared: &S,
        digest: &Digest16,
        fingerprint: &Digest16,
        response: StoredResponse,
        token: u64,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Result<bool, StoreError> {
        // The claim lives only as long as the two steps take; if this VM dies
        // in between, the slot is free again a second later.
        const FILL_LOCK_MS: u64 = 1000;
        match self.claim(shared, digest, fingerprint, token, now_ms, FILL_LOCK_MS)? {
            (ClaimOutcome::Claimed(claim), _) => {
                self.complete(shared, &claim, digest, response, now_ms, ttl_ms)
            }
            _ => Ok(false),
        }
    }

    fn read_data<S: SharedData>(
        &self,
        shared: &S,
        slot: u32,
    ) -> Result<Option<DataRecord>, StoreError> {
        match shared.shared_get(&self.data_key(slot))? {
            None => Ok(None),
            Some((bytes, _)) => match DataRecord::decode(&bytes) {
                Ok(rec) => Ok(Some(rec)),
                Err(_) => Err(StoreError::Corrupt("data record")),
            },
        }
    }

    /// Records the response of a claim. `Ok(false)`: the claim was no longer
    /// ours (abandoned and taken over), and nothing was marked completed.
    pub fn complete<S: SharedData>(
        &self,
        shared: &S,
        claim: &Claim,
        digest: &Digest16,
        response: StoredResponse,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Result<bool, StoreError> {
        let (b, way) = self.split(claim.slot);
        let data_key = self.data_key(claim.slot);
        let bytes = DataRecord {
            epoch: claim.epoch,
            digest: *digest,
            response,
        }
        .encode();
        // Data first, then the entry: a reader that sees "completed" finds the
        // bytes already there. The data write is a CAS that never replaces a
        // newer epoch, so a late original whose lock expired cannot overwrite
        // the record of the request that took its slot over.
        // No ownership check before writing: if the claim was taken over,
        // the data CAS below never replaces a newer epoch, readers ignore an
        // older one, and the bucket CAS after it finds the claim gone.
        let mut written = false;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let current = shared.shared_get(&data_key)?;
            if let Some((old, _)) = &current {
                if DataRecord::peek_owner(old).is_ok_and(|(epoch, _)| epoch > claim.epoch) {
                    return Ok(false);
                }
            }
            if shared.shared_set(&data_key, &bytes, current.map(|(_, cas)| cas))? {
                written = true;
                break;
            }
        }
        if !written {
            return Err(StoreError::Contention);
        }
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (mut bucket, cas) = self.load(shared, b)?;
            let Some(entry) = bucket.entries.get_mut(way).filter(|e| e.owned_by(claim)) else {
                return Ok(false);
            };
            entry.state = State::Completed;
            entry.has_data = true;
            entry.token = 0;
            entry.deadline_ms = now_ms.saturating_add(ttl_ms);
            entry.since_ms = now_ms;
            if self.store(shared, b, &bucket, cas)? {
                return Ok(true);
            }
        }
        Err(StoreError::Contention)
    }

    /// Extends a claim its request still holds to `lock_ms` from now, so that
    /// the lock timeout bounds only a gateway that died, not a slow upstream.
    /// `Ok(false)`: the claim was no longer ours (it lapsed and was taken
    /// over, or was completed or released).
    pub fn renew<S: SharedData>(
        &self,
        shared: &S,
        claim: &Claim,
        now_ms: u64,
        lock_ms: u64,
    ) -> Result<bool, StoreError> {
        let (b, way) = self.split(claim.slot);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (mut bucket, cas) = self.load(shared, b)?;
            let Some(entry) = bucket.entries.get_mut(way).filter(|e| e.owned_by(claim)) else {
                return Ok(false);
            };
            entry.deadline_ms = now_ms.saturating_add(lock_ms);
            if self.store(shared, b, &bucket, cas)? {
                return Ok(true);
            }
        }
        Err(StoreError::Contention)
    }

    /// Frees a claim so that a retry executes again (5xx responses).
    /// `Ok(false)`: the claim was no longer ours.
    pub fn release<S: SharedData>(&self, shared: &S, claim: &Claim) -> Result<bool, StoreError> {
        let (b, way) = self.split(claim.slot);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (mut bucket, cas) = self.load(shared, b)?;
            let Some(entry) = bucket.entries.get_mut(way).filter(|e| e.owned_by(claim)) else {
                return Ok(false);
            };
            entry.state = State::Free;
            entry.token = 0;
            if self.store(shared, b, &bucket, cas)? {
                return Ok(true);
            }
        }
        Err(StoreError::Contention)
    }

    /// Frees expired records and abandoned claims in `count` buckets from
    /// `first`, and releases the response bytes no live record needs.
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
            match self.reclaim_data(shared, b) {
                Ok((reclaimed, occupied)) => {
                    stats.data_reclaimed += reclaimed;
                    stats.occupied += occupied;
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

    /// Returns the data keys reclaimed and the bucket's occupied slots (the
    /// bucket it read after `free_dead`, so the sweep reads each bucket once
    /// more, not twice).
    fn reclaim_data<S: SharedData>(&self, shared: &S, b: u32) -> Result<(u32, u64), StoreError> {
        let (bucket, _) = self.load(shared, b)?;
        let occupied = bucket
            .entries
            .iter()
            .filter(|e| e.state != State::Free)
            .count() as u64;
        let mut cleared: Vec<(usize, u64)> = Vec::new();
        for (way, e) in bucket.entries.iter().enumerate() {
            if !e.has_data || e.state == State::Completed {
                continue;
            }
            let key = self.data_key(self.slot_of(b, way));
            let Some((bytes, dcas)) = shared.shared_get(&key)? else {
                cleared.push((way, e.epoch));
                continue;
            };
            let owner_epoch = DataRecord::peek_owner(&bytes)
                .map(|(epoch, _)| epoch)
                .unwrap_or(0);
            // `e` may be stale: the slot can have been claimed and completed
            // since the bucket was read, leaving a newer epoch in the data.
            // Epochs only grow, so only older bytes are garbage, plus the
            // bytes of the same epoch when the slot is free. (An in-flight
            // owner's own bytes, written just before it marks them completed,
            // have the entry's epoch and are kept.)
            let garbage =
                owner_epoch < e.epoch || (e.state == State::Free && owner_epoch == e.epoch);
            if !garbage {
                continue;
            }
            // CAS on the data key: if the owner writes between our read and
            // our write, our tombstone loses and its record stays.
            if shared.shared_set(&key, &DataRecord::tombstone(), Some(dcas))? {
                cleared.push((way, e.epoch));
            }
        }
        if cleared.is_empty() {
            return Ok((0, occupied));
        }
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (mut bucket, cas) = self.load(shared, b)?;
            for (way, epoch) in &cleared {
                if let Some(e) = bucket.entries.get_mut(*way) {
                    if e.epoch == *epoch && e.state != State::Completed {
                        e.has_data = false;
                    }
                }
            }
            if self.store(shared, b, &bucket, cas)? {
                return Ok((cleared.len() as u32, occupied));
            }
        }
        Ok((0, occupied))
    }

    /// Counts live entries (tests).
    #[cfg(test)]
    pub fn count_live<S: SharedData>(&self, shared: &S, now_ms: u64) -> Result<u64, StoreError> {
        let mut n = 0;
        for b in 0..self.buckets {
            let (bucket, _) = self.load(shared, b)?;
            n += bucket
                .entries
                .iter()
                .filter(|e| e.state != State::Free && !e.is_dead(now_ms))
                .count() as u64;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_host::FakeShared;

    const FP: Digest16 = [9; 16];

    fn d(i: u32) -> Digest16 {
        crate::fingerprint::key_digest(&[], &format!("key-{i}"))
    }

    fn resp(body: &str) -> StoredResponse {
        StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            body: body.as_bytes().to_vec(),
            body_omitted: false,
        }
    }

    fn claimed(o: (ClaimOutcome, ClaimEffects)) -> Claim {
        match o.0 {
            ClaimOutcome::Claimed(c) => c,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    #[test]
    fn bucket_round_trip_and_corruption() {
        let mut b = Bucket::empty(8);
        b.entries[3] = Entry {
            state: State::Completed,
            has_data: true,
            epoch: 7,
            digest: [1; 16],
            fingerprint: [2; 16],
            token: 5,
            deadline_ms: 99,
            since_ms: 3,
        };
        let bytes = b.encode();
        assert_eq!(bytes.len(), 1 + 8 * ENTRY_SIZE);
        assert_eq!(Bucket::decode(&bytes, 8).unwrap(), b);
        assert!(Bucket::decode(&bytes[..bytes.len() - 1], 8).is_err());
        let mut bad = bytes.clone();
        bad[1 + 3 * ENTRY_SIZE] = 9;
        assert_eq!(
            Bucket::decode(&bad, 8),
            Err(StoreError::Corrupt("entry state"))
        );
    }

    /// Found by the record_decoder fuzzer: a non-canonical flag byte was
    /// accepted (and silently rewritten), so corrupt buckets passed as valid.
    #[test]
    fn fuzz_regression_bucket_flags_must_be_canonical() {
        let crash: &[u8] = &[
            1, 0, 32, 4, 0, 0, 0, 0, 0, 100, 198, 199, 100, 100, 0, 0, 0, 45, 0, 0, 101, 32, 4, 0,
            0, 0, 0, 0, 0, 66, 66, 66, 66, 66, 66, 66, 66, 66, 66, 66, 37, 0, 0, 0, 0, 0, 0, 0, 66,
            66, 66, 198, 199, 66, 66, 66, 66, 66, 255, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(
            Bucket::decode(crash, 1),
            Err(StoreError::Corrupt("entry flags"))
        );
    }

    #[test]
    fn lifecycle_claim_conflict_complete_replay_mismatch() {
        let s = FakeShared::default();
        let t = LocalTable::new(4, 8);
        assert_eq!(t.init(&s).unwrap(), 4);
        assert_eq!(t.init(&s).unwrap(), 0, "init never overwrites");
        let (o, fx) = t.claim(&s, &d(1), &FP, 11, 1000, 30_000).unwrap();
        assert!(fx.new_entry);
        let c = claimed((o, fx));
        assert_eq!(
            t.claim(&s, &d(1), &FP, 12, 1001, 30_000).unwrap().0,
            ClaimOutcome::InFlight
        );
        assert_eq!(
            t.claim(&s, &d(1), &[0; 16], 12, 1001, 30_000).unwrap().0,
            ClaimOutcome::Mismatch
        );
        assert!(t.complete(&s, &c, &d(1), resp("r1"), 2000, 60_000).unwrap());
        assert_eq!(
            t.claim(&s, &d(1), &FP, 13, 2001, 30_000).unwrap().0,
            ClaimOutcome::Replay(resp("r1"))
        );
        assert_eq!(
            t.claim(&s, &d(1), &[0; 16], 13, 2001, 30_000).unwrap().0,
            ClaimOutcome::Mismatch
        );
        // After the TTL the key is forgotten and runs again.
        let c2 = claimed(t.claim(&s, &d(1), &FP, 14, 62_000, 30_000).unwrap());
        assert_eq!(c2.epoch, c.epoch + 1);
        // The old owner cannot touch the new claim.
        assert!(!t.release(&s, &c).unwrap());
        assert!(!t
            .complete(&s, &c, &d(1), resp("late"), 62_001, 60_000)
            .unwrap());
        assert!(t.release(&s, &c2).unwrap());
        let c3 = claimed(t.claim(&s, &d(1), &FP, 15, 62_002, 30_000).unwrap());
        assert!(
            c3.slot != c2.slot || c3.epoch > c2.epoch,
            "a claim is never reissued"
        );
    }

    #[test]
    fn abandoned_claim_is_taken_over_after_the_lock_timeout() {
        let s = FakeShared::default();
        let t = LocalTable::new(1, 8);
        t.init(&s).unwrap();
        let c1 = claimed(t.claim(&s, &d(1), &FP, 1, 0, 1000).unwrap());
        assert_eq!(
            t.claim(&s, &d(1), &FP, 2, 999, 1000).unwrap().0,
            ClaimOutcome::InFlight
        );
        let c2 = claimed(t.claim(&s, &d(1), &FP, 2, 1000, 1000).unwrap());
        // The late original finds its claim gone; the new owner's record wins.
        assert!(!t
            .complete(&s, &c1, &d(1), resp("old"), 1001, 60_000)
            .unwrap());
        assert!(t
            .complete(&s, &c2, &d(1), resp("new"), 1002, 60_000)
            .unwrap());
        assert_eq!(
            t.claim(&s, &d(1), &FP, 3, 1003, 1000).unwrap().0,
            ClaimOutcome::Replay(resp("new"))
        );
    }

    #[test]
    fn a_renewed_claim_outlives_its_lock_timeout_and_a_lost_one_is_said() {
        let s = FakeShared::default();
        let t = LocalTable::new(1, 8);
        t.init(&s).unwrap();
        let c1 = claimed(t.claim(&s, &d(1), &FP, 1, 0, 1000).unwrap());
        // Renewed at 900 to 1900: still held at 1500 (its first lock was 1000).
        assert!(t.renew(&s, &c1, 900, 1000).unwrap());
        assert_eq!(
            t.claim(&s, &d(1), &FP, 2, 1500, 1000).unwrap().0,
            ClaimOutcome::InFlight
        );
        // Not renewed again: taken over at 1900; the original learns it lost.
        let c2 = claimed(t.claim(&s, &d(1), &FP, 2, 1900, 1000).unwrap());
        assert!(!t.renew(&s, &c1, 1901, 1000).unwrap());
        assert!(t.renew(&s, &c2, 1901, 1000).unwrap());
        // A completed or released claim is not renewed.
        assert!(t
            .complete(&s, &c2, &d(1), resp("done"), 1902, 60_000)
            .unwrap());
        assert!(!t.renew(&s, &c2, 1903, 1000).unwrap());
        let c3 = claimed(t.claim(&s, &d(2), &FP, 3, 0, 1000).unwrap());
        assert!(t.release(&s, &c3).unwrap());
        assert!(!t.renew(&s, &c3, 1, 1000).unwrap());
    }

    /// Two workers race for one key: the loser's CAS fails, it re-reads, and
    /// sees the winner's claim. Exactly one forward.
    #[test]
    fn concurrent_claims_of_one_key_yield_exactly_one_owner() {
        let s = FakeShared::default();
        let t = LocalTable::new(2, 8);
        t.init(&s).unwrap();
        let t2 = t.clone();
        let racer = std::rc::Rc::new(std::cell::RefCell::new(None));
        let r = racer.clone();
        // Between worker A's read and its write, worker B claims the same key.
        s.before_next_set(Box::new(move |shared: &FakeShared| {
            *r.borrow_mut() = Some(t2.claim(shared, &d(7), &FP, 222, 10, 30_000).unwrap().0);
        }));
        let a = t.claim(&s, &d(7), &FP, 111, 10, 30_000).unwrap().0;
        let b = racer.borrow().clone().unwrap();
        let owners = [&a, &b]
            .iter()
            .filter(|o| matches!(o, ClaimOutcome::Claimed(_)))
            .count();
        assert_eq!(owners, 1, "a={a:?} b={b:?}");
        assert!(matches!(b, ClaimOutcome::Claimed(_)));
        assert_eq!(a, ClaimOutcome::InFlight);
        assert_eq!(s.cas_failures(), 1);
    }

    #[test]
    fn capacity_is_never_exceeded_and_oldest_completed_is_evicted() {
        let s = FakeShared::default();
        let t = LocalTable::new(2, 8);
        t.init(&s).unwrap();
        let mut evicted = 0;
        for i in 0..200u32 {
            let (o, fx) = t
                .claim(&s, &d(i), &FP, u64::from(i) + 1, u64::from(i), 30_000)
                .unwrap();
            evicted += u32::from(fx.evicted);
            let c = claimed((o, fx));
            assert!(t
                .complete(
                    &s,
                    &c,
                    &d(i),
                    resp(&format!("{i}")),
                    u64::from(i),
                    1_000_000
                )
                .unwrap());
            assert!(t.count_live(&s, u64::from(i)).unwrap() <= 16);
        }
        assert_eq!(evicted, 200 - 16);
        // Shared-data keys stay bounded: 2 buckets + at most 16 data slots.
        assert_eq!(
            s.key_count(),
            2 + 16,
            "keys are created up front, never more"
        );
        // The newest records survive and replay.
        assert_eq!(
            t.claim(&s, &d(199), &FP, 999, 300, 30_000).unwrap().0,
            ClaimOutcome::Replay(resp("199"))
        );
    }

    #[test]
    fn a_table_full_of_live_claims_refuses_new_keys() {
        let s = FakeShared::default();
        let t = LocalTable::new(1, 8);
        t.init(&s).unwrap();
        for i in 0..8 {
            claimed(t.claim(&s, &d(i), &FP, 1, 0, 30_000).unwrap());
        }
        assert_eq!(
            t.claim(&s, &d(100), &FP, 1, 10, 30_000).unwrap().0,
            ClaimOutcome::Full
        );
        // Once the locks are abandoned, their slots are reused.
        assert!(matches!(
            t.claim(&s, &d(100), &FP, 1, 30_000, 30_000).unwrap().0,
            ClaimOutcome::Claimed(_)
        ));
    }

    #[test]
    fn sweep_reclaims_expired_records_and_their_bytes_but_not_live_ones() {
        let s = FakeShared::default();
        let t = LocalTable::new(1, 8);
        t.init(&s).unwrap();
        let big = "x".repeat(10_000);
        for i in 0..4 {
            let c = claimed(t.claim(&s, &d(i), &FP, 1, 0, 1000).unwrap());
            t.complete(
                &s,
                &c,
                &d(i),
                resp(&big),
                0,
                if i < 2 { 100 } else { 1_000_000 },
            )
            .unwrap();
        }
        let before = s.total_bytes();
        let stats = t.sweep(&s, 0, 1, 200);
        assert_eq!(
            stats,
            SweepStats {
                freed: 2,
                data_reclaimed: 2,
                occupied: 2,
                errors: 0
            }
        );
        assert!(s.total_bytes() + 2 * 10_000 <= before);
        assert_eq!(t.count_live(&s, 200).unwrap(), 2);
        assert_eq!(
            t.claim(&s, &d(3), &FP, 1, 300, 1000).unwrap().0,
            ClaimOutcome::Replay(resp(&big))
        );
        // A second sweep finds nothing more to do.
        assert_eq!(
            t.sweep(&s, 0, 1, 300),
            SweepStats {
                occupied: 2,
                ..SweepStats::default()
            }
        );
    }

    #[test]
    fn sweep_never_erases_a_record_written_after_it_looked() {
        let s = FakeShared::default();
        let t = LocalTable::new(1, 1);
        t.init(&s).unwrap();
        let c1 = claimed(t.claim(&s, &d(1), &FP, 1, 0, 1000).unwrap());
        t.complete(&s, &c1, &d(1), resp("old"), 0, 10).unwrap();
        // Expired; a new key takes the slot and is in flight.
        let c2 = claimed(t.claim(&s, &d(2), &FP, 2, 20, 1000).unwrap());
        // The sweeper reads the old bytes; before it writes its tombstone the
        // new owner stores its record: the tombstone's CAS must lose.
        let t2 = t.clone();
        s.before_next_set(Box::new(move |shared: &FakeShared| {
            assert!(t2
                .complete(shared, &c2, &d(2), resp("new"), 21, 1000)
                .unwrap());
        }));
        t.sweep(&s, 0, 1, 22);
        assert_eq!(
            t.claim(&s, &d(2), &FP, 3, 23, 1000).unwrap().0,
            ClaimOutcome::Replay(resp("new"))
        );
    }

    /// Runs a hook right before a given key is read (found by review: the
    /// sweeper's bucket snapshot can be older than the data it reads).
    struct BeforeGet<'a> {
        inner: &'a FakeShared,
        key: String,
        hook: std::cell::RefCell<Option<Box<dyn FnOnce(&FakeShared) + 'a>>>,
    }

    impl SharedData for BeforeGet<'_> {
        fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, crate::host::HostError> {
            if key == self.key {
                if let Some(h) = self.hook.borrow_mut().take() {
                    h(self.inner);
                }
            }
            self.inner.shared_get(key)
        }
        fn shared_set(
            &self,
            k: &str,
            v: &[u8],
            c: Option<u32>,
        ) -> Result<bool, crate::host::HostError> {
            self.inner.shared_set(k, v, c)
        }
    }

    #[test]
    fn sweep_keeps_a_record_completed_after_its_bucket_snapshot() {
        let s = FakeShared::default();
        let t = LocalTable::new(1, 1);
        t.init(&s).unwrap();
        let c1 = claimed(t.claim(&s, &d(1), &FP, 1, 0, 1000).unwrap());
        assert!(t.complete(&s, &c1, &d(1), resp("old"), 0, 10).unwrap());
        let t2 = t.clone();
        // The sweeper has read the bucket (slot expired) and is about to read
        // the data key: meanwhile another key takes the slot and completes.
        let g = BeforeGet {
            inner: &s,
            key: "idempotency/v1/1x1/d0".into(),
            hook: std::cell::RefCell::new(Some(Box::new(move |sh: &FakeShared| {
                let c2 = claimed(t2.claim(sh, &d(2), &FP, 2, 21, 1000).unwrap());
                assert!(t2
                    .complete(sh, &c2, &d(2), resp("new"), 21, 1_000_000)
                    .unwrap());
            }))),
        };
        t.sweep(&g, 0, 1, 20);
        assert_eq!(
            t.claim(&s, &d(2), &FP, 3, 30, 1000).unwrap().0,
            ClaimOutcome::Replay(resp("new"))
        );
    }

    #[test]
    fn a_late_completer_never_overwrites_the_record_of_its_successor() {
        let s = FakeShared::default();
        let t = LocalTable::new(1, 16);
        t.init(&s).unwrap();
        let c1 = claimed(t.claim(&s, &d(1), &FP, 1, 0, 1000).unwrap());
        let t2 = t.clone();
        // c1's lock expires; c2 takes over and completes while c1 is about
        // to write its own (late) data.
        s.before_next_set(Box::new(move |sh: &FakeShared| {
            let c2 = claimed(t2.claim(sh, &d(1), &FP, 2, 1000, 1000).unwrap());
            assert!(t2
                .complete(sh, &c2, &d(1), resp("new"), 1000, 60_000)
                .unwrap());
        }));
        assert!(!t
            .complete(&s, &c1, &d(1), resp("old"), 1000, 60_000)
            .unwrap());
        assert_eq!(
            t.claim(&s, &d(1), &FP, 3, 1001, 1000).unwrap().0,
            ClaimOutcome::Replay(resp("new"))
        );
    }

    #[test]
    fn sweep_counts_what_it_did_even_when_a_bucket_fails() {
        let s = FakeShared::default();
        let t = LocalTable::new(2, 1);
        t.init(&s).unwrap();
        let k0 = (0..100).find(|i| t.bucket_of(&d(*i)) == 0).unwrap();
        let c = claimed(t.claim(&s, &d(k0), &FP, 1, 0, 1000).unwrap());
        t.complete(&s, &c, &d(k0), resp("x"), 0, 10).unwrap();
        s.shared_set("idempotency/v1/2x1/b1", b"junk", None)
            .unwrap();
        let stats = t.sweep(&s, 0, 2, 100);
        assert_eq!(stats.freed, 1, "bucket 0's free is reported");
        assert!(stats.errors >= 1, "bucket 1's failure is counted");
    }

    #[test]
    fn host_errors_surface_as_store_errors() {
        let s = FakeShared::default();
        let t = LocalTable::new(1, 8);
        s.fail_with(12);
        assert!(matches!(
            t.claim(&s, &d(1), &FP, 1, 0, 1000),
            Err(StoreError::Host(_))
        ));
    }
}
