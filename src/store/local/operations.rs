//! Operations on one key of the local store, for the operations endpoint
//! (`operations` in the configuration): what the table holds for a key, and
//! forgetting it so that its next request runs again.
//!
//! Both go through the table's own bucket load and store, so forgetting is a
//! compare-and-swap of the key's bucket like every other change of it (at
//! most [`MAX_CAS_ATTEMPTS`]), and frees only the entry it read: a CAS that
//! succeeds means the bucket, and so the entry's epoch, had not changed. The
//! response bytes are then released by the sweep's own reclamation, which
//! never erases a record of a newer epoch.
//!
//! Neither creates the table: the protecting instance does. An operations
//! endpoint configured with another `max_entries` (or on another `vm_id`)
//! finds no table, and says so, rather than creating an empty one.

use super::{LocalTable, State, MAX_CAS_ATTEMPTS};
use crate::fingerprint::Digest16;
use crate::store::budget::SpaceEffects;
use crate::store::{SharedData, StoreError};

/// Reading a completed record takes two reads (bucket, then data); if the
/// slot moves on in between, look again, this many times at most.
const MAX_READS: u32 = 3;

/// What the table holds for one key, at `now_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    /// Nothing live: never seen, forgotten, released, expired or evicted.
    Absent,
    /// A request holds the key: retries get `409` until it ends, or until
    /// its claim lapses (renewed while its gateway runs).
    InFlight {
        since_ms: u64,
        lock_deadline_ms: u64,
    },
    /// A recorded response, replayed until `expires_ms`.
    Completed {
        since_ms: u64,
        expires_ms: u64,
        status: u16,
        body_bytes: usize,
        /// The body was over `max_response_body_bytes`: replays carry none.
        body_omitted: bool,
    },
}

/// What forgetting a key did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forget {
    /// The key was in this state (completed, or in flight when forced) and
    /// is free now: its next request runs.
    Forgotten(State),
    /// Nothing live to forget.
    Absent,
    /// A request holds the key and forgetting was not forced: unchanged.
    /// Forgetting it would let a retry run while the original may still act.
    Running { lock_deadline_ms: u64 },
}

impl LocalTable {
    /// What the table holds for `digest`. `Ok(None)`: there is no table of
    /// this shape in this shared data.
    pub fn inspect<S: SharedData>(
        &self,
        shared: &S,
        digest: &Digest16,
        now_ms: u64,
    ) -> Result<Option<KeyState>, StoreError> {
        let b = self.bucket_of(digest);
        for _ in 0..MAX_READS {
            let (bucket, cas) = self.load(shared, b)?;
            if cas.is_none() {
                return Ok(None);
            }
            let Some((way, entry)) = bucket
                .find(digest)
                .and_then(|i| Some((i, *bucket.entries.get(i)?)))
                .filter(|(_, e)| !e.is_dead(now_ms))
            else {
                return Ok(Some(KeyState::Absent));
            };
            match entry.state {
                State::Free => return Ok(Some(KeyState::Absent)),
                State::InFlight => {
                    return Ok(Some(KeyState::InFlight {
                        since_ms: entry.since_ms,
                        lock_deadline_ms: entry.deadline_ms,
                    }))
                }
                State::Completed => match self.read_data(shared, self.slot_of(b, way))? {
                    Some(rec) if rec.epoch == entry.epoch && rec.digest == *digest => {
                        return Ok(Some(KeyState::Completed {
                            since_ms: entry.since_ms,
                            expires_ms: entry.deadline_ms,
                            status: rec.response.status,
                            body_bytes: rec.response.body.len(),
                            body_omitted: rec.response.body_omitted,
                        }))
                    }
                    // The slot moved on between the two reads: look again.
                    _ => continue,
                },
            }
        }
        Err(StoreError::Inconsistent)
    }

    /// Frees the entry of `digest`, so that its next request runs again. A
    /// running request's claim is freed only when `force` is set. The
    /// record's bytes are overwritten with a tombstone (shared data cannot
    /// delete a key), and taken off its bucket's byte budget (`space`).
    /// `Ok(None)`: no table of this shape.
    pub fn forget<S: SharedData>(
        &self,
        shared: &S,
        digest: &Digest16,
        now_ms: u64,
        force: bool,
        space: &mut SpaceEffects,
    ) -> Result<Option<Forget>, StoreError> {
        let b = self.bucket_of(digest);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (mut bucket, cas) = self.load(shared, b)?;
            if cas.is_none() {
                return Ok(None);
            }
            let Some(entry) = bucket
                .find(digest)
                .and_then(|i| bucket.entries.get_mut(i))
                .filter(|e| !e.is_dead(now_ms))
            else {
                return Ok(Some(Forget::Absent));
            };
            let was = entry.state;
            if was == State::InFlight && !force {
                return Ok(Some(Forget::Running {
                    lock_deadline_ms: entry.deadline_ms,
                }));
            }
            entry.state = State::Free;
            entry.token = 0;
            // A forced claim's request may still write its response into the
            // slot's data key, but only if it has reserved its bytes (the
            // reservation checks the claim): they stay charged to the free
            // slot until the sweep wipes them. A free entry reserves nothing.
            entry.reserved = false;
            if !self.store(shared, b, &bucket, cas)? {
                continue;
            }
            if was == State::Completed {
                // The sweep's step: tombstones the bytes of this epoch (CAS,
                // never over a newer record) and clears the entry's flag. If
                // it fails, the sweep does it on its next pass.
                let _ = self.reclaim_data(shared, b, space);
            }
            return Ok(Some(Forget::Forgotten(was)));
        }
        Err(StoreError::Contention)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_host::FakeShared;
    use crate::record::{DataRecord, StoredResponse};
    use crate::store::{Claim, ClaimOutcome};

    const FP: Digest16 = [9; 16];

    fn d(i: u32) -> Digest16 {
        crate::fingerprint::key_digest(&[], &format!("key-{i}"))
    }

    fn resp(body: &str) -> StoredResponse {
        StoredResponse {
            status: 201,
            headers: vec![],
            body: body.as_bytes().to_vec(),
            body_omitted: false,
        }
    }

    fn claim(t: &LocalTable, s: &FakeShared, key: u32, now: u64) -> Claim {
        match t.claim(s, &d(key), &FP, 7, now, 30_000).unwrap().0 {
            ClaimOutcome::Claimed(c) => c,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    fn data_of(s: &FakeShared, t: &LocalTable, slot: u32) -> DataRecord {
        let (bytes, _) = s.shared_get(&t.data_key(slot)).unwrap().unwrap();
        DataRecord::decode(&bytes).unwrap()
    }

    #[test]
    fn inspect_tells_each_state_and_forget_frees_a_record_and_its_bytes() {
        let s = FakeShared::default();
        let t = LocalTable::new(2, 8, u64::MAX);
        t.init(&s).unwrap();
        assert_eq!(t.inspect(&s, &d(1), 0).unwrap(), Some(KeyState::Absent));
        let c = claim(&t, &s, 1, 100);
        assert_eq!(
            t.inspect(&s, &d(1), 150).unwrap(),
            Some(KeyState::InFlight {
                since_ms: 100,
                lock_deadline_ms: 30_100
            })
        );
        let big = "x".repeat(5000);
        assert!(t
            .complete(
                &s,
                &c,
                &d(1),
                resp(&big),
                200,
                60_000,
                &mut SpaceEffects::default()
            )
            .unwrap());
        assert_eq!(
            t.inspect(&s, &d(1), 300).unwrap(),
            Some(KeyState::Completed {
                since_ms: 200,
                expires_ms: 60_200,
                status: 201,
                body_bytes: 5000,
                body_omitted: false
            })
        );
        let before = s.total_bytes();
        assert_eq!(
            t.forget(&s, &d(1), 300, false, &mut SpaceEffects::default())
                .unwrap(),
            Some(Forget::Forgotten(State::Completed))
        );
        assert!(
            s.total_bytes() + 5000 <= before,
            "the record's bytes are freed"
        );
        assert_eq!(data_of(&s, &t, c.slot).epoch, 0, "a tombstone");
        assert_eq!(t.inspect(&s, &d(1), 301).unwrap(), Some(KeyState::Absent));
        assert_eq!(
            t.forget(&s, &d(1), 301, false, &mut SpaceEffects::default())
                .unwrap(),
            Some(Forget::Absent)
        );
        // The key runs again, in a later epoch.
        let again = claim(&t, &s, 1, 302);
        assert!(again.slot != c.slot || again.epoch > c.epoch);
        // The sweep finds nothing left to reclaim.
        assert_eq!(t.sweep(&s, 0, 2, 303).data_reclaimed, 0);
    }

    #[test]
    fn an_expired_record_is_absent() {
        let s = FakeShared::default();
        let t = LocalTable::new(1, 8, u64::MAX);
        t.init(&s).unwrap();
        let c = claim(&t, &s, 1, 0);
        t.complete(
            &s,
            &c,
            &d(1),
            resp("r"),
            0,
            100,
            &mut SpaceEffects::default(),
        )
        .unwrap();
        assert_eq!(t.inspect(&s, &d(1), 100).unwrap(), Some(KeyState::Absent));
        assert_eq!(
            t.forget(&s, &d(1), 100, true, &mut SpaceEffects::default())
                .unwrap(),
            Some(Forget::Absent)
        );
    }

    /// Forgetting a running request lets a retry run while the original
    /// may still act: refused unless forced. A forced forget makes the
    /// original's claim stale: it can neither record nor release anything.
    #[test]
    fn a_running_claim_is_kept_unless_forced_and_its_owner_then_loses_it() {
        let s = FakeShared::default();
        let t = LocalTable::new(1, 8, u64::MAX);
        t.init(&s).unwrap();
        let c = claim(&t, &s, 1, 0);
        assert_eq!(
            t.forget(&s, &d(1), 10, false, &mut SpaceEffects::default())
                .unwrap(),
            Some(Forget::Running {
                lock_deadline_ms: 30_000
            })
        );
        assert!(
            matches!(
                t.inspect(&s, &d(1), 10).unwrap(),
                Some(KeyState::InFlight { .. })
            ),
            "unchanged"
        );
        assert_eq!(
            t.forget(&s, &d(1), 10, true, &mut SpaceEffects::default())
                .unwrap(),
            Some(Forget::Forgotten(State::InFlight))
        );
        let retry = claim(&t, &s, 1, 20);
        assert!(!t.renew(&s, &c, 21, 30_000).unwrap());
        assert!(!t
            .complete(
                &s,
                &c,
                &d(1),
                resp("old"),
                22,
                60_000,
                &mut SpaceEffects::default()
            )
            .unwrap());
        assert!(!t.release(&s, &c).unwrap());
        assert!(t
            .complete(
                &s,
                &retry,
                &d(1),
                resp("new"),
                23,
                60_000,
                &mut SpaceEffects::default()
            )
            .unwrap());
        assert_eq!(
            t.claim(&s, &d(1), &FP, 8, 24, 30_000).unwrap().0,
            ClaimOutcome::Replay(resp("new"))
        );
    }

    /// A forced claim's request writes nothing once forgotten: its
    /// completion must first reserve its bytes in the bucket, which checks
    /// the claim. Forgotten between its reservation and its entry, the bytes
    /// it wrote are its own to wipe, and their charge, left on the free
    /// slot, is taken off by the sweep.
    #[test]
    fn a_forced_claims_late_bytes_are_never_left_behind() {
        let s = FakeShared::default();
        let t = LocalTable::new(1, 1, u64::MAX);
        t.init(&s).unwrap();
        let c = claim(&t, &s, 1, 0);
        t.forget(&s, &d(1), 1, true, &mut SpaceEffects::default())
            .unwrap();
        let mut fx = SpaceEffects::default();
        assert!(!t
            .complete(
                &s,
                &c,
                &d(1),
                resp(&"late".repeat(1000)),
                2,
                60_000,
                &mut fx
            )
            .unwrap());
        assert_eq!(data_of(&s, &t, c.slot).epoch, 0, "nothing written");
        assert_eq!(fx, SpaceEffects::default());
        // Forgotten right after its reservation (the completion's first write).
        let c = claim(&t, &s, 2, 10);
        let t2 = t.clone();
        s.before_next_set(Box::new(move |sh: &FakeShared| {
            sh.before_next_set(Box::new(move |sh: &FakeShared| {
                t2.forget(sh, &d(2), 11, true, &mut SpaceEffects::default())
                    .unwrap();
            }));
        }));
        let mut fx = SpaceEffects::default();
        assert!(!t
            .complete(
                &s,
                &c,
                &d(2),
                resp(&"late".repeat(1000)),
                12,
                60_000,
                &mut fx
            )
            .unwrap());
        assert_eq!(data_of(&s, &t, c.slot).epoch, 0, "written, then wiped");
        assert!(
            fx.bytes > 0,
            "the reservation stays charged to the free slot"
        );
        let stats = t.sweep(&s, 0, 1, 13);
        assert_eq!(stats.space.bytes, -fx.bytes, "until the sweep takes it off");
        assert_eq!(t.charged(&s).unwrap(), 0);
    }

    /// Another worker changes the bucket between the forget's read and its
    /// write: the CAS fails, the forget reads again and changes only its key.
    #[test]
    fn a_concurrent_change_of_the_bucket_is_kept() {
        let s = FakeShared::default();
        let t = LocalTable::new(1, 8, u64::MAX);
        t.init(&s).unwrap();
        let c = claim(&t, &s, 1, 0);
        t.complete(
            &s,
            &c,
            &d(1),
            resp("one"),
            0,
            60_000,
            &mut SpaceEffects::default(),
        )
        .unwrap();
        let t2 = t.clone();
        s.before_next_set(Box::new(move |sh: &FakeShared| {
            let c2 = match t2.claim(sh, &d(2), &FP, 9, 5, 30_000).unwrap().0 {
                ClaimOutcome::Claimed(c) => c,
                other => panic!("{other:?}"),
            };
            assert!(t2
                .complete(
                    sh,
                    &c2,
                    &d(2),
                    resp("two"),
                    5,
                    60_000,
                    &mut SpaceEffects::default()
                )
                .unwrap());
        }));
        assert_eq!(
            t.forget(&s, &d(1), 10, false, &mut SpaceEffects::default())
                .unwrap(),
            Some(Forget::Forgotten(State::Completed))
        );
        assert_eq!(s.cas_failures(), 1);
        assert_eq!(t.inspect(&s, &d(1), 11).unwrap(), Some(KeyState::Absent));
        assert!(matches!(
            t.inspect(&s, &d(2), 11).unwrap(),
            Some(KeyState::Completed { body_bytes: 3, .. })
        ));
    }

    /// The slot is forgotten, then claimed and recorded again by another key
    /// before the forget tombstones its bytes: the newer record stays.
    #[test]
    fn forgetting_never_erases_a_newer_record_of_the_slot() {
        let s = FakeShared::default();
        let t = LocalTable::new(1, 1, u64::MAX);
        t.init(&s).unwrap();
        let c = claim(&t, &s, 1, 0);
        t.complete(
            &s,
            &c,
            &d(1),
            resp("old"),
            0,
            60_000,
            &mut SpaceEffects::default(),
        )
        .unwrap();
        let t2 = t.clone();
        // Runs before the forget's first write (its bucket CAS), so make
        // the hook fire on the write after it: the data tombstone.
        s.before_next_set(Box::new(move |sh: &FakeShared| {
            sh.before_next_set(Box::new(move |sh: &FakeShared| {
                let c2 = match t2.claim(sh, &d(2), &FP, 9, 5, 30_000).unwrap().0 {
                    ClaimOutcome::Claimed(c) => c,
                    other => panic!("{other:?}"),
                };
                assert!(t2
                    .complete(
                        sh,
                        &c2,
                        &d(2),
                        resp("new"),
                        5,
                        60_000,
                        &mut SpaceEffects::default()
                    )
                    .unwrap());
            }));
        }));
        t.forget(&s, &d(1), 10, false, &mut SpaceEffects::default())
            .unwrap();
        assert_eq!(
            t.claim(&s, &d(2), &FP, 3, 11, 30_000).unwrap().0,
            ClaimOutcome::Replay(resp("new"))
        );
    }

    #[test]
    fn another_table_shape_is_no_table_and_host_errors_are_store_errors() {
        let s = FakeShared::default();
        LocalTable::new(2, 8, u64::MAX).init(&s).unwrap();
        let other = LocalTable::new(4, 8, u64::MAX);
        assert_eq!(other.inspect(&s, &d(1), 0).unwrap(), None);
        assert_eq!(
            other
                .forget(&s, &d(1), 0, true, &mut SpaceEffects::default())
                .unwrap(),
            None
        );
        s.fail_with(10);
        let t = LocalTable::new(2, 8, u64::MAX);
        assert!(matches!(t.inspect(&s, &d(1), 1), Err(StoreError::Host(_))));
        assert!(matches!(
            t.forget(&s, &d(1), 1, false, &mut SpaceEffects::default()),
            Err(StoreError::Host(_))
        ));
    }

    /// Rewrites `key` before every set from now on, as a worker that
    /// always wins the race would.
    fn always_first(s: &FakeShared, key: String, writes: std::rc::Rc<std::cell::Cell<u32>>) {
        s.before_next_set(Box::new(move |sh: &FakeShared| {
            let (v, _) = sh.shared_get(&key).unwrap().unwrap();
            sh.shared_set(&key, &v, None).unwrap();
            writes.set(writes.get() + 1);
            always_first(sh, key, writes);
        }));
    }

    #[test]
    fn a_forget_that_always_loses_its_cas_gives_up_after_the_bound() {
        let s = FakeShared::default();
        let t = LocalTable::new(1, 8, u64::MAX);
        t.init(&s).unwrap();
        let c = claim(&t, &s, 1, 0);
        t.complete(
            &s,
            &c,
            &d(1),
            resp("r"),
            0,
            60_000,
            &mut SpaceEffects::default(),
        )
        .unwrap();
        let writes = std::rc::Rc::new(std::cell::Cell::new(0));
        always_first(&s, t.bucket_key(0), writes.clone());
        assert_eq!(
            t.forget(&s, &d(1), 1, false, &mut SpaceEffects::default()),
            Err(StoreError::Contention)
        );
        assert_eq!(writes.get(), MAX_CAS_ATTEMPTS);
    }
}
