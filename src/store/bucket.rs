//! One bucket of the slot table: its entries and their byte format.
//!
//! A bucket is one shared-data value holding `ways` fixed-size entries, so a
//! claim, a completion or an eviction in it is a single compare-and-swap.
//! Each entry also carries the bytes its slot's data key is charged for
//! (see [`super::budget`]): the byte budget is kept inside the same CAS, with
//! no counter shared between buckets.
//!
//! Layout (little endian), version 2:
//! ```text
//! u8  version = 2
//! per entry (70 bytes):
//!   u8  state          0 free, 1 in flight, 2 completed
//!   u8  flags          bit 0: reserved (in flight: its completion is writing)
//!   u32 data_bytes     what the slot's data key is charged for (0: a tombstone)
//!   u64 epoch          grows with every claim of the slot
//!   [16] key digest
//!   [16] fingerprint
//!   u64 owner token    (in flight)
//!   u64 deadline_ms    lock deadline (in flight) or expiry (completed)
//!   u64 since_ms       claim or completion time
//! ```
//! Version 1 had a `has_data` byte where `data_bytes` now is; a version 1
//! bucket is refused (tables are namespaced by version, so one is never read).

use super::StoreError;
use crate::decision::Existing;
use crate::fingerprint::Digest16;
use crate::record::Reader;

use super::Claim;

pub(super) const BUCKET_VERSION: u8 = 2;
pub(super) const ENTRY_SIZE: usize = 70;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Free = 0,
    InFlight = 1,
    Completed = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub state: State,
    /// In flight only: its completion has reserved `data_bytes` for the
    /// record it is writing, so nobody else may take them. Without it, an
    /// in-flight slot's bytes are those of an earlier epoch: garbage that
    /// anyone may wipe.
    pub reserved: bool,
    /// Bytes the slot's data key is charged for: the record written there,
    /// a record about to be written (reserved by its completion), or bytes
    /// of an earlier epoch not reclaimed yet. Never less than what the data
    /// key holds, beyond the tombstone every slot starts with.
    pub data_bytes: u32,
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
    pub(super) const FREE: Entry = Entry {
        state: State::Free,
        reserved: false,
        data_bytes: 0,
        epoch: 0,
        digest: [0; 16],
        fingerprint: [0; 16],
        token: 0,
        deadline_ms: 0,
        since_ms: 0,
    };

    /// The slot's data key holds (or may hold) bytes not yet reclaimed.
    pub fn has_data(&self) -> bool {
        self.data_bytes > 0
    }

    pub(super) fn existing(&self) -> Option<Existing> {
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

    pub(super) fn is_dead(&self, now_ms: u64) -> bool {
        self.state != State::Free && now_ms >= self.deadline_ms
    }

    /// Its bytes are nobody's record: a free slot's, or a running request's
    /// leftovers of an earlier epoch (not reserved). Their charge can be
    /// reclaimed once they are wiped.
    pub(super) fn holds_garbage(&self) -> bool {
        self.has_data()
            && match self.state {
                State::Free => true,
                State::InFlight => !self.reserved,
                State::Completed => false,
            }
    }

    /// The newest epoch whose bytes in this slot are garbage: a free slot's
    /// own record is, a running request's own (about to be written) is not.
    pub(super) fn garbage_epoch(&self) -> u64 {
        match self.state {
            State::Free => self.epoch,
            _ => self.epoch.saturating_sub(1),
        }
    }

    pub(super) fn owned_by(&self, claim: &Claim) -> bool {
        self.state == State::InFlight && self.epoch == claim.epoch && self.token == claim.token
    }
}

/// What a claim did to the slot it took, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Taken {
    /// A free slot.
    Free,
    /// An expired record or an abandoned claim.
    Dead,
    /// The oldest live completed record, evicted (the bucket's slots are all
    /// in use: `max_entries`).
    Evicted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub entries: Vec<Entry>,
}

impl Bucket {
    pub(super) fn empty(ways: u32) -> Bucket {
        Bucket {
            entries: vec![Entry::FREE; ways as usize],
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.entries.len() * ENTRY_SIZE);
        out.push(BUCKET_VERSION);
        for e in &self.entries {
            out.push(e.state as u8);
            out.push(u8::from(e.reserved));
            out.extend_from_slice(&e.data_bytes.to_le_bytes());
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
            let reserved = match r.u8().map_err(corrupt)? {
                0 => false,
                1 if state == State::InFlight => true,
                _ => return Err(StoreError::Corrupt("entry flags")),
            };
            let entry = Entry {
                state,
                reserved,
                data_bytes: r.u32().map_err(corrupt)?,
                epoch: r.u64().map_err(corrupt)?,
                digest: r.digest().map_err(corrupt)?,
                fingerprint: r.digest().map_err(corrupt)?,
                token: r.u64().map_err(corrupt)?,
                deadline_ms: r.u64().map_err(corrupt)?,
                since_ms: r.u64().map_err(corrupt)?,
            };
            // A completed record is always charged for its bytes.
            if entry.state == State::Completed && !entry.has_data() {
                return Err(StoreError::Corrupt("completed entry without data"));
            }
            entries.push(entry);
        }
        Ok(Bucket { entries })
    }

    pub(super) fn find(&self, digest: &Digest16) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.state != State::Free && &e.digest == digest)
    }

    /// Where a new key goes: a free slot (one without leftover bytes first),
    /// else a dead one (expired record or abandoned claim), else the oldest
    /// completed record, which is evicted. Live claims are never taken.
    pub(super) fn pick_slot(&self, now_ms: u64) -> Option<(usize, Taken)> {
        let free = |want_data: bool| {
            self.entries
                .iter()
                .position(|e| e.state == State::Free && e.has_data() == want_data)
        };
        if let Some(i) = free(false).or_else(|| free(true)) {
            return Some((i, Taken::Free));
        }
        let dead = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_dead(now_ms))
            .min_by_key(|(_, e)| e.deadline_ms)
            .map(|(i, _)| i);
        if let Some(i) = dead {
            return Some((i, Taken::Dead));
        }
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.state == State::Completed)
            .min_by_key(|(_, e)| e.since_ms)
            .map(|(i, _)| (i, Taken::Evicted))
    }

    /// Bytes charged in this bucket.
    pub(super) fn charged(&self) -> u64 {
        self.entries.iter().map(|e| u64::from(e.data_bytes)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_round_trip_and_corruption() {
        let mut b = Bucket::empty(8);
        b.entries[3] = Entry {
            state: State::Completed,
            reserved: false,
            data_bytes: 1234,
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
        assert_eq!(Bucket::decode(&bytes, 8).unwrap().charged(), 1234);
        assert!(Bucket::decode(&bytes[..bytes.len() - 1], 8).is_err());
        let mut bad = bytes.clone();
        bad[1 + 3 * ENTRY_SIZE] = 9;
        assert_eq!(
            Bucket::decode(&bad, 8),
            Err(StoreError::Corrupt("entry state"))
        );
        // Only a running request's bytes can be reserved: the flag is
        // canonical (found by the record_decoder fuzzer on version 1).
        let mut flagged = bytes.clone();
        flagged[1 + 3 * ENTRY_SIZE + 1] = 1;
        assert_eq!(
            Bucket::decode(&flagged, 8),
            Err(StoreError::Corrupt("entry flags"))
        );
        flagged[1 + 3 * ENTRY_SIZE] = State::InFlight as u8;
        assert!(Bucket::decode(&flagged, 8).unwrap().entries[3].reserved);
        flagged[1 + 3 * ENTRY_SIZE + 1] = 2;
        assert_eq!(
            Bucket::decode(&flagged, 8),
            Err(StoreError::Corrupt("entry flags"))
        );
        // A completed entry charged nothing cannot be: its record has bytes.
        let mut uncharged = bytes.clone();
        uncharged[1 + 3 * ENTRY_SIZE + 2..1 + 3 * ENTRY_SIZE + 6].fill(0);
        assert_eq!(
            Bucket::decode(&uncharged, 8),
            Err(StoreError::Corrupt("completed entry without data"))
        );
    }

    /// Found by the record_decoder fuzzer on version 1 (a non-canonical flag
    /// byte was accepted and silently rewritten). Version 1 buckets are now
    /// refused whole; version 2's flag byte is checked above.
    #[test]
    fn fuzz_regression_version_1_buckets_are_refused() {
        let crash: &[u8] = &[
            1, 0, 32, 4, 0, 0, 0, 0, 0, 100, 198, 199, 100, 100, 0, 0, 0, 45, 0, 0, 101, 32, 4, 0,
            0, 0, 0, 0, 0, 66, 66, 66, 66, 66, 66, 66, 66, 66, 66, 66, 37, 0, 0, 0, 0, 0, 0, 0, 66,
            66, 66, 198, 199, 66, 66, 66, 66, 66, 255, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(
            Bucket::decode(crash, 1),
            Err(StoreError::Corrupt("bucket size"))
        );
        let mut v1_sized = vec![1u8];
        v1_sized.extend_from_slice(&[0; ENTRY_SIZE]);
        assert_eq!(
            Bucket::decode(&v1_sized, 1),
            Err(StoreError::Corrupt("bucket version"))
        );
    }

    #[test]
    fn a_new_key_prefers_a_slot_without_leftover_bytes_then_a_dead_one_then_evicts() {
        let mut b = Bucket::empty(3);
        b.entries[0].data_bytes = 500;
        assert_eq!(b.pick_slot(0), Some((1, Taken::Free)));
        for (i, e) in b.entries.iter_mut().enumerate() {
            *e = Entry {
                state: State::Completed,
                data_bytes: 100,
                deadline_ms: 1000 + i as u64,
                since_ms: 10 - i as u64,
                ..Entry::FREE
            };
        }
        assert_eq!(b.pick_slot(0), Some((2, Taken::Evicted)), "oldest first");
        assert_eq!(b.pick_slot(1001), Some((0, Taken::Dead)));
        for e in b.entries.iter_mut() {
            e.state = State::InFlight;
        }
        assert_eq!(b.pick_slot(0), None, "running requests are never taken");
    }
}
