//! The local store: a fixed table of slots in proxy shared data.
//!
//! Envoy's shared data can neither delete nor expire keys, so the set of keys
//! must be bounded by design. The table has `buckets` x `ways` slots:
//!
//! * bucket key `idempotency/v2/{B}x{W}/b{i}`: one small value holding the
//!   `W` entries of bucket `i` (state, key digest, fingerprint, owner,
//!   deadlines, bytes charged; see [`super::bucket`]). A key digest maps to
//!   one bucket; claiming it is a single compare-and-swap of that value,
//!   atomic across all worker threads.
//! * data key `idempotency/v2/{B}x{W}/d{slot}`: the recorded response of the
//!   entry in `slot`, written before the entry is marked completed.
//!
//! So there are never more than `B + B*W` keys and `B*W` records, and the
//! records' bytes stay within `max_bytes` ([`super::budget`]): a completion
//! reserves its record's bytes in its bucket (evicting the oldest completed
//! records of the bucket if it must, their bytes wiped first) before it
//! writes them. Each entry carries an `epoch` that grows with every claim
//! of its slot; a data record names the epoch that wrote it, so a replay
//! can tell its own record from a newer or older one, and reclamation never
//! erases a newer record.
//!
//! Buckets and data keys are created by [`LocalTable::init`] from
//! `on_configure`. Envoy runs that first on the main thread's VM while it
//! loads the configuration (checked: the table is created by the thread whose
//! id is Envoy's pid), before the worker VMs start; they find the keys there.
//! A set on a missing key ignores CAS, so two workers creating the same
//! bucket could each believe they claimed a slot in it; every write here is
//! therefore [`SharedData::set_if_unchanged`], whose "still missing" a key
//! created meanwhile refuses. That covers a configuration with a new table
//! shape (another `max_entries`) loaded while traffic runs, whose VMs all
//! run `init` at once.

pub use super::bucket::{Bucket, Entry, State};
use super::bucket::{Taken, BUCKET_VERSION};
use super::budget::{charge, Budget, SpaceEffects};
use super::reclaim::Room;
use super::{Claim, ClaimEffects, ClaimOutcome, SharedData, StoreError};
use crate::decision::{decide, Decision};
use crate::fingerprint::Digest16;
use crate::record::{DataRecord, StoredResponse};

pub mod operations;

/// Bounded, like istio's local_rate_limit token bucket: under pathological
/// contention the request fails closed (503) instead of spinning.
pub const MAX_CAS_ATTEMPTS: u32 = 16;

/// What to do with a record larger than its bucket's share of the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TooLarge {
    /// Keep it without its body: the key's outcome must be kept (the
    /// local store, the only memory of it).
    OmitBody,
    /// Do not keep it (the replay cache: Redis has the whole record).
    Skip,
}

/// What became of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Stored,
    /// The claim was no longer ours (abandoned and taken over).
    ClaimLost,
    /// Too large for the budget, and [`TooLarge::Skip`].
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTable {
    pub(super) buckets: u32,
    pub(super) ways: u32,
    prefix: String,
    pub(super) budget: Budget,
}

impl LocalTable {
    /// Keys are namespaced by the bucket format's version and the table's
    /// shape, so a configuration with another `max_entries`, or a module
    /// with another bucket format, starts a fresh table instead of
    /// misreading one. `max_bytes` is not part of the name: changing it
    /// keeps the records, and the sweep brings the buckets within their new
    /// shares.
    pub fn new(buckets: u32, ways: u32, max_bytes: u64) -> LocalTable {
        let (buckets, ways) = (buckets.max(1), ways.max(1));
        LocalTable {
            buckets,
            ways,
            prefix: format!("idempotency/v{BUCKET_VERSION}/{buckets}x{ways}/"),
            budget: Budget::new(max_bytes, buckets),
        }
    }

    /// A table for another purpose (the Redis store's replay cache) in the
    /// same shared data, with keys that cannot meet the store's.
    pub fn named(name: &str, buckets: u32, ways: u32, max_bytes: u64) -> LocalTable {
        let table = LocalTable::new(buckets, ways, max_bytes);
        LocalTable {
            prefix: format!(
                "idempotency/v{BUCKET_VERSION}/{name}/{}x{}/",
                table.buckets, table.ways
            ),
            ..table
        }
    }

    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    pub fn capacity(&self) -> u64 {
        u64::from(self.buckets) * u64::from(self.ways)
    }

    pub(super) fn bucket_key(&self, bucket: u32) -> String {
        self.key(b'b', bucket)
    }

    pub(super) fn data_key(&self, slot: u32) -> String {
        self.key(b'd', slot)
    }

    /// The prefix, `kind`, then `n` in decimal: two keys per request are
    /// made here, and `format!`'s machinery costs several times this in Wasm.
    fn key(&self, kind: u8, n: u32) -> String {
        let mut digits = [0u8; 10];
        let mut start = digits.len();
        let mut rest = n;
        loop {
            start -= 1;
            digits[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        let mut key = String::with_capacity(self.prefix.len() + 1 + digits.len() - start);
        key.push_str(&self.prefix);
        key.push(char::from(kind));
        for &d in &digits[start..] {
            key.push(char::from(d));
        }
        key
    }

    pub(super) fn bucket_of(&self, digest: &Digest16) -> u32 {
        let mut low = [0u8; 8];
        low.copy_from_slice(&digest[8..16]);
        (u64::from_le_bytes(low) % u64::from(self.buckets)) as u32
    }

    pub(super) fn slot_of(&self, bucket: u32, way: usize) -> u32 {
        bucket * self.ways + way as u32
    }

    pub(super) fn split(&self, slot: u32) -> (u32, usize) {
        (slot / self.ways, (slot % self.ways) as usize)
    }

    /// Creates every missing bucket and data key. Returns how many buckets
    /// this call created. Data keys are created too (as tombstones) because
    /// only a key that exists honours CAS, and completions must CAS their
    /// data; they come before their bucket, so a bucket that exists has its
    /// data keys. Every creation is a set that a key created meanwhile
    /// refuses, so creating the table while requests run (a configuration
    /// with a new shape, each VM's `on_configure` at once) never overwrites
    /// a claim or a record another worker has made.
    pub fn init<S: SharedData>(&self, shared: &S) -> Result<u32, StoreError> {
        let empty = Bucket::empty(self.ways).encode();
        let tombstone = DataRecord::tombstone();
        let mut created = 0;
        for b in 0..self.buckets {
            let key = self.bucket_key(b);
            if shared.shared_get(&key)?.is_none() {
                for way in 0..self.ways as usize {
                    let data_key = self.data_key(self.slot_of(b, way));
                    shared.set_if_unchanged(&data_key, &tombstone, None)?;
                }
                if shared.set_if_unchanged(&key, &empty, None)? {
                    created += 1;
                }
            }
        }
        Ok(created)
    }

    pub(super) fn load<S: SharedData>(
        &self,
        shared: &S,
        bucket: u32,
    ) -> Result<(Bucket, Option<u32>), StoreError> {
        match shared.shared_get(&self.bucket_key(bucket))? {
            Some((bytes, cas)) => Ok((Bucket::decode(&bytes, self.ways)?, Some(cas))),
            // Only reachable if init did not run for this shape: the first
            // write creates the bucket, and refuses to if another did.
            None => Ok((Bucket::empty(self.ways), None)),
        }
    }

    pub(super) fn store<S: SharedData>(
        &self,
        shared: &S,
        bucket: u32,
        b: &Bucket,
        cas: Option<u32>,
    ) -> Result<bool, StoreError> {
        Ok(shared.set_if_unchanged(&self.bucket_key(bucket), &b.encode(), cas)?)
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
            let (way, taken) = match (decision, found) {
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
                        // The slot moved on between the two reads (evicted,
                        // or its bytes wiped to make room): look again. If
                        // it keeps happening the record is really gone.
                        _ => {
                            unreadable_replays += 1;
                            if unreadable_replays >= 3 {
                                return Err(StoreError::Inconsistent);
                            }
                            continue;
                        }
                    }
                }
                (Decision::Execute | Decision::TakeOver, Some(i)) => (i, Taken::Dead),
                (_, _) => match bucket.pick_slot(now_ms) {
                    Some(choice) => choice,
                    None => return Ok((ClaimOutcome::Full, ClaimEffects::default())),
                },
            };
            let Some(entry) = bucket.entries.get_mut(way) else {
                return Err(StoreError::Corrupt("slot index"));
            };
            let epoch = entry.epoch.wrapping_add(1);
            // The bytes the slot is charged for stay charged: they are still
            // in its data key until this claim's record replaces them or
            // someone wipes them (they are garbage: `holds_garbage`).
            *entry = Entry {
                state: State::InFlight,
                reserved: false,
                data_bytes: entry.data_bytes,
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
                let effects = ClaimEffects {
                    new_entry: taken == Taken::Free,
                    expired: taken == Taken::Dead,
                    evicted: taken == Taken::Evicted,
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
    /// worker filled it first), the table has no room, or the record is
    /// larger than the budget allows (the claim is then released).
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
        space: &mut SpaceEffects,
    ) -> Result<bool, StoreError> {
        // The claim lives only as long as the two steps take; if this VM dies
        // in between, the slot is free again a second later.
        const FILL_LOCK_MS: u64 = 1000;
        let (ClaimOutcome::Claimed(claim), _) =
            self.claim(shared, digest, fingerprint, token, now_ms, FILL_LOCK_MS)?
        else {
            return Ok(false);
        };
        let recorded = self.record(
            shared,
            &claim,
            digest,
            response,
            now_ms,
            ttl_ms,
            TooLarge::Skip,
            space,
        );
        match recorded {
            Ok(Recorded::Stored) => Ok(true),
            Ok(Recorded::ClaimLost) => Ok(false),
            // Nothing was written: free the slot at once.
            Ok(Recorded::Skipped) | Err(StoreError::NoRoom(_)) => {
                self.release(shared, &claim)?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    pub(super) fn read_data<S: SharedData>(
        &self,
        shared: &S,
        slot: u32,
    ) -> Result<Option<DataRecord>, StoreError> {
        match shared.shared_get(&self.data_key(slot))? {
            None => Ok(None),
            Some((bytes, _)) => match DataRecord::decode_owned(bytes) {
                Ok(rec) => Ok(Some(rec)),
                Err(_) => Err(StoreError::Corrupt("data record")),
            },
        }
    }

    /// Records the response of a claim. `Ok(false)`: the claim was no longer
    /// ours (abandoned and taken over), and nothing was marked completed. A
    /// record larger than its bucket's share is kept without its body.
    #[allow(clippy::too_many_arguments)]
    pub fn complete<S: SharedData>(
        &self,
        shared: &S,
        claim: &Claim,
        digest: &Digest16,
        response: StoredResponse,
        now_ms: u64,
        ttl_ms: u64,
        space: &mut SpaceEffects,
    ) -> Result<bool, StoreError> {
        let recorded = match self.record(
            shared,
            claim,
            digest,
            response,
            now_ms,
            ttl_ms,
            TooLarge::OmitBody,
            space,
        ) {
            // The operation ran and its record has no room, or could not be
            // kept because other workers' writes to its bucket won every
            // compare-and-swap: the key stays in flight for as long as its
            // record would have lived (retries get 409), as Redis keeps a
            // claim whose record it refused. Best effort: if even that
            // fails, the claim lapses at its lock.
            Err(e @ (StoreError::NoRoom(_) | StoreError::Contention)) => {
                let _ = self.renew(shared, claim, now_ms, ttl_ms);
                return Err(e);
            }
            other => other?,
        };
        Ok(recorded == Recorded::Stored)
    }

    /// Reserves the record's bytes in its bucket (making room if it must),
    /// writes them, then marks the entry completed. Reserving first means the
    /// bytes held never exceed the budget, even while being written.
    #[allow(clippy::too_many_arguments)]
    fn record<S: SharedData>(
        &self,
        shared: &S,
        claim: &Claim,
        digest: &Digest16,
        response: StoredResponse,
        now_ms: u64,
        ttl_ms: u64,
        too_large: TooLarge,
        space: &mut SpaceEffects,
    ) -> Result<Recorded, StoreError> {
        // Encoded from the record itself, never from a copy: a body is
        // copied once, into the bytes that go to shared data.
        let mut record = DataRecord {
            epoch: claim.epoch,
            digest: *digest,
            response,
        };
        let mut bytes = record.encode();
        let mut omitted = false;
        loop {
            let need = charge(bytes.len() as u64);
            // None: larger than a bucket's whole share, it can never fit.
            let room = if self.budget.could_fit(need) {
                Some(self.reserve(shared, claim, need, now_ms, space)?)
            } else {
                None
            };
            match room {
                Some(Room::Made) => break,
                Some(Room::NotOurs) => return Ok(Recorded::ClaimLost),
                _ if too_large == TooLarge::Skip => return Ok(Recorded::Skipped),
                // Keep the outcome without its body rather than lose the
                // key (a retry would run again) or grow past the budget.
                _ if !record.response.body.is_empty() => {
                    record.response.body = Vec::new();
                    record.response.body_omitted = true;
                    omitted = true;
                    bytes = record.encode();
                }
                // Larger than a share by its headers alone (a small share,
                // large headers): keep the status, so the key still never
                // runs twice.
                None if !record.response.headers.is_empty() => {
                    record.response.headers = Vec::new();
                    record.response.body_omitted = true;
                    omitted = true;
                    bytes = record.encode();
                }
                // A bare status larger than a share: below the smallest
                // budget the configuration accepts, never reached.
                None => {
                    return Err(StoreError::NoRoom(
                        "even its status alone is larger than a bucket's share of store.max_bytes",
                    ))
                }
                Some(Room::HeldByRunning) => {
                    return Err(StoreError::NoRoom(
                        "running requests hold the rest of its bucket's share of store.max_bytes",
                    ))
                }
            }
        }
        let (b, way) = self.split(claim.slot);
        let data_key = self.data_key(claim.slot);
        // Data first, then the entry: a reader that sees "completed" finds the
        // bytes already there. The data write is a CAS that never replaces a
        // newer epoch, so a late original whose lock expired cannot overwrite
        // the record of the request that took its slot over; readers ignore
        // an older one, and the bucket CAS after it finds the claim gone.
        let mut written = false;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let current = shared.shared_get(&data_key)?;
            if let Some((old, _)) = &current {
                if DataRecord::peek_owner(old).is_ok_and(|(epoch, _)| epoch > claim.epoch) {
                    return Ok(Recorded::ClaimLost);
                }
            }
            if shared.set_if_unchanged(&data_key, &bytes, current.map(|(_, cas)| cas))? {
                written = true;
                break;
            }
        }
        if !written {
            return Err(StoreError::Contention);
        }
        let charged = charge(bytes.len() as u64);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (mut bucket, cas) = self.load(shared, b)?;
            let before = bucket.charged();
            let Some(entry) = bucket.entries.get_mut(way).filter(|e| e.owned_by(claim)) else {
                // Taken over while we wrote: our bytes are garbage now.
                self.wipe_own(shared, claim)?;
                return Ok(Recorded::ClaimLost);
            };
            entry.state = State::Completed;
            entry.reserved = false;
            // Exact now (the reservation may have covered older, larger bytes).
            entry.data_bytes = u32::try_from(charged).unwrap_or(u32::MAX);
            entry.token = 0;
            entry.deadline_ms = now_ms.saturating_add(ttl_ms);
            entry.since_ms = now_ms;
            if self.store(shared, b, &bucket, cas)? {
                space.add_bytes(before, bucket.charged());
                space.bodies_omitted += u32::from(omitted);
                return Ok(Recorded::Stored);
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
            // Never shortens: a claim kept for the TTL (its record had no
            // room) stays kept.
            entry.deadline_ms = entry.deadline_ms.max(now_ms.saturating_add(lock_ms));
            if self.store(shared, b, &bucket, cas)? {
                return Ok(true);
            }
        }
        Err(StoreError::Contention)
    }

    /// Frees a claim so that a retry executes again (5xx responses).
    /// `Ok(false)`: the claim was no longer ours. Its slot's bytes stay
    /// charged until they are wiped.
    pub fn release<S: SharedData>(&self, shared: &S, claim: &Claim) -> Result<bool, StoreError> {
        let (b, way) = self.split(claim.slot);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (mut bucket, cas) = self.load(shared, b)?;
            let Some(entry) = bucket.entries.get_mut(way).filter(|e| e.owned_by(claim)) else {
                return Ok(false);
            };
            entry.state = State::Free;
            entry.reserved = false;
            entry.token = 0;
            if self.store(shared, b, &bucket, cas)? {
                return Ok(true);
            }
        }
        Err(StoreError::Contention)
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

    /// Bytes charged over the whole table (tests: the gauge's truth).
    #[cfg(test)]
    pub fn charged<S: SharedData>(&self, shared: &S) -> Result<u64, StoreError> {
        let mut n = 0;
        for b in 0..self.buckets {
            n += self.load(shared, b)?.0.charged();
        }
        Ok(n)
    }
}

#[cfg(test)]
mod interleavings;
#[cfg(test)]
mod tests;
