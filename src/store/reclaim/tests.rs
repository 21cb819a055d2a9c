//! The sweep and eviction for space: bytes come back, never a newer record's,
//! never a running request's, and the budget holds.

use super::super::budget::SpaceEffects;
use super::super::local::LocalTable;
use super::super::{ClaimOutcome, SharedData, SweepStats};
use crate::fake_host::FakeShared;
use crate::store::testing::{claimed, d, resp, FP, NO_LIMIT};

#[test]
fn sweep_reclaims_expired_records_and_their_bytes_but_not_live_ones() {
    let s = FakeShared::default();
    let t = LocalTable::new(1, 8, NO_LIMIT);
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
            &mut SpaceEffects::default(),
        )
        .unwrap();
    }
    let before = s.total_bytes();
    let charged = t.charged(&s).unwrap();
    let stats = t.sweep(&s, 0, 1, 200);
    assert_eq!(
        stats,
        SweepStats {
            freed: 2,
            data_reclaimed: 2,
            occupied: 2,
            errors: 0,
            space: SpaceEffects {
                bytes: -(charged as i64) / 2,
                ..SpaceEffects::default()
            }
        }
    );
    assert_eq!(t.charged(&s).unwrap(), charged / 2);
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
    let t = LocalTable::new(1, 1, NO_LIMIT);
    t.init(&s).unwrap();
    let c1 = claimed(t.claim(&s, &d(1), &FP, 1, 0, 1000).unwrap());
    t.complete(
        &s,
        &c1,
        &d(1),
        resp("old"),
        0,
        10,
        &mut SpaceEffects::default(),
    )
    .unwrap();
    // Expired at 20: the sweep frees the slot (its first write), reads the
    // old bytes, and before it writes its tombstone a new key takes the
    // slot and stores its record: the tombstone's CAS must lose.
    let t2 = t.clone();
    s.before_next_set(Box::new(move |shared: &FakeShared| {
        shared.before_next_set(Box::new(move |shared: &FakeShared| {
            let c2 = claimed(t2.claim(shared, &d(2), &FP, 2, 20, 1000).unwrap());
            assert!(t2
                .complete(
                    shared,
                    &c2,
                    &d(2),
                    resp("new"),
                    21,
                    1000,
                    &mut SpaceEffects::default()
                )
                .unwrap());
        }));
    }));
    let stats = t.sweep(&s, 0, 1, 20);
    assert_eq!((stats.freed, stats.data_reclaimed), (1, 0));
    assert_eq!(
        t.claim(&s, &d(2), &FP, 3, 23, 1000).unwrap().0,
        ClaimOutcome::Replay(resp("new"))
    );
    assert!(t.charged(&s).unwrap() > 0, "the new record stays charged");
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
    let t = LocalTable::new(1, 1, NO_LIMIT);
    t.init(&s).unwrap();
    let c1 = claimed(t.claim(&s, &d(1), &FP, 1, 0, 1000).unwrap());
    assert!(t
        .complete(
            &s,
            &c1,
            &d(1),
            resp("old"),
            0,
            10,
            &mut SpaceEffects::default()
        )
        .unwrap());
    let t2 = t.clone();
    // The sweeper has read the bucket (slot expired) and is about to read
    // the data key: meanwhile another key takes the slot and completes.
    let g = BeforeGet {
        inner: &s,
        key: "idempotency/v2/1x1/d0".into(),
        hook: std::cell::RefCell::new(Some(Box::new(move |sh: &FakeShared| {
            let c2 = claimed(t2.claim(sh, &d(2), &FP, 2, 21, 1000).unwrap());
            assert!(t2
                .complete(
                    sh,
                    &c2,
                    &d(2),
                    resp("new"),
                    21,
                    1_000_000,
                    &mut SpaceEffects::default()
                )
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
fn sweep_counts_what_it_did_even_when_a_bucket_fails() {
    let s = FakeShared::default();
    let t = LocalTable::new(2, 1, NO_LIMIT);
    t.init(&s).unwrap();
    let k0 = (0..100).find(|i| t.bucket_of(&d(*i)) == 0).unwrap();
    let c = claimed(t.claim(&s, &d(k0), &FP, 1, 0, 1000).unwrap());
    t.complete(
        &s,
        &c,
        &d(k0),
        resp("x"),
        0,
        10,
        &mut SpaceEffects::default(),
    )
    .unwrap();
    s.shared_set("idempotency/v2/2x1/b1", b"junk", None)
        .unwrap();
    let stats = t.sweep(&s, 0, 2, 100);
    assert_eq!(stats.freed, 1, "bucket 0's free is reported");
    assert!(stats.errors >= 1, "bucket 1's failure is counted");
}

// ------------------------------------------------------------ byte budget

use super::super::budget::charge;
use super::super::local::State;
use super::super::testing::Audited;
use super::super::Claim;
use crate::record::{DataRecord, StoredResponse};
use std::cell::Cell;

fn body(n: usize, tag: u8) -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![("x-id".into(), vec![tag])],
        body: vec![tag; n],
        body_omitted: false,
    }
}

/// The charge of `body(n, _)` recorded.
fn charge_of(n: usize) -> u64 {
    charge(
        DataRecord {
            epoch: 1,
            digest: [0; 16],
            response: body(n, 0),
        }
        .encode()
        .len() as u64,
    )
}

#[test]
fn a_record_that_does_not_fit_evicts_the_oldest_completed_records_of_its_bucket() {
    let s = FakeShared::default();
    // One bucket of 16 slots whose share holds three 1000-byte records.
    let t = LocalTable::new(1, 16, 3 * charge_of(1000) + 10);
    t.init(&s).unwrap();
    let a = Audited::new(&s, &t);
    let mut total = SpaceEffects::default();
    for i in 0..10u32 {
        let c = claimed(t.claim(&a, &d(i), &FP, 1, u64::from(i), 30_000).unwrap());
        let mut fx = SpaceEffects::default();
        assert!(t
            .complete(
                &a,
                &c,
                &d(i),
                body(1000, i as u8),
                u64::from(i),
                60_000,
                &mut fx
            )
            .unwrap());
        // From the fourth on, each record evicts exactly the oldest one.
        assert_eq!(fx.evicted, u32::from(i >= 3), "record {i}");
        total.bytes += fx.bytes;
        total.evicted += fx.evicted;
        // The gauge's sum is the table's truth after every step.
        assert_eq!(total.bytes as u64, t.charged(&s).unwrap());
    }
    assert_eq!(total.evicted, 7);
    assert_eq!(t.charged(&s).unwrap(), 3 * charge_of(1000));
    // The three newest replay byte for byte; an evicted one runs again.
    for i in 7..10u32 {
        assert_eq!(
            t.claim(&s, &d(i), &FP, 9, 100, 30_000).unwrap().0,
            ClaimOutcome::Replay(body(1000, i as u8))
        );
    }
    assert!(matches!(
        t.claim(&s, &d(0), &FP, 9, 100, 30_000).unwrap().0,
        ClaimOutcome::Claimed(_)
    ));
    // Evicted records' bytes are gone, not merely uncounted: the data keys
    // hold three records and tombstones.
    let records: usize = (0..16)
        .map(|slot| s.peek(&t.data_key(slot)).unwrap())
        .filter(|v| *v != DataRecord::tombstone())
        .count();
    assert_eq!(records, 3);
}

#[test]
fn a_record_larger_than_its_buckets_share_is_kept_without_its_body() {
    let s = FakeShared::default();
    let t = LocalTable::new(1, 16, charge_of(1000));
    t.init(&s).unwrap();
    let a = Audited::new(&s, &t);
    let c = claimed(t.claim(&a, &d(1), &FP, 1, 0, 30_000).unwrap());
    let mut fx = SpaceEffects::default();
    assert!(t
        .complete(&a, &c, &d(1), body(1001, 7), 0, 60_000, &mut fx)
        .unwrap());
    assert_eq!(fx.bodies_omitted, 1);
    let ClaimOutcome::Replay(r) = t.claim(&s, &d(1), &FP, 2, 1, 30_000).unwrap().0 else {
        panic!("replayed")
    };
    assert_eq!((r.status, r.body_omitted, r.body.len()), (201, true, 0));
    assert_eq!(r.headers, body(0, 7).headers, "status and headers are kept");
    // A record that fits is kept whole.
    let c = claimed(t.claim(&a, &d(2), &FP, 1, 2, 30_000).unwrap());
    let mut fx = SpaceEffects::default();
    assert!(t
        .complete(&a, &c, &d(2), body(1000, 8), 2, 60_000, &mut fx)
        .unwrap());
    assert_eq!((fx.bodies_omitted, fx.evicted), (0, 1));
}

#[test]
fn a_record_whose_headers_alone_exceed_the_share_keeps_its_status() {
    // The smallest budget the configuration accepts: 4096 bytes per 16 entries.
    let s = FakeShared::default();
    let t = LocalTable::new(1, 16, 4096);
    t.init(&s).unwrap();
    let c = claimed(t.claim(&s, &d(1), &FP, 11, 0, 30_000).unwrap());
    let mut r = body(10, 7);
    r.headers
        .push(("content-security-policy".into(), vec![b'x'; 3100]));
    let mut fx = SpaceEffects::default();
    assert!(t.complete(&s, &c, &d(1), r, 10, 60_000, &mut fx).unwrap());
    assert_eq!(fx.bodies_omitted, 1);
    // Long after the lock, the retry gets the status, never a second run.
    let ClaimOutcome::Replay(r) = t.claim(&s, &d(1), &FP, 22, 30_001, 30_000).unwrap().0 else {
        panic!("replayed")
    };
    assert_eq!(
        (r.status, r.body_omitted, r.headers.len(), r.body.len()),
        (201, true, 0, 0)
    );
}

/// A completion whose bucket writes lose every compare-and-swap (other
/// workers writing the bucket each time) keeps its key in flight for the
/// TTL once the contention passes, as when there is no room: the operation
/// ran, so a retry after the lock must not run it again.
#[test]
fn a_record_lost_to_contention_keeps_its_key_in_flight_for_the_ttl() {
    let s = FakeShared::default();
    let t = LocalTable::new(1, 4, NO_LIMIT);
    t.init(&s).unwrap();
    let c = claimed(t.claim(&s, &d(1), &FP, 11, 0, 30_000).unwrap());
    // Before each of the next 16 writes, another worker rewrites the bucket.
    fn contend(s: &FakeShared, t: LocalTable, left: u32) {
        if left == 0 {
            return;
        }
        s.before_next_set(Box::new(move |sh: &FakeShared| {
            let (bucket, cas) = t.load(sh, 0).unwrap();
            assert!(t.store(sh, 0, &bucket, cas).unwrap());
            contend(sh, t, left - 1);
        }));
    }
    contend(&s, t.clone(), super::super::local::MAX_CAS_ATTEMPTS);
    let out = t.complete(
        &s,
        &c,
        &d(1),
        body(10, 7),
        10,
        60_000,
        &mut SpaceEffects::default(),
    );
    assert_eq!(out, Err(crate::store::StoreError::Contention));
    assert_eq!(
        t.claim(&s, &d(1), &FP, 22, 30_001, 30_000).unwrap().0,
        ClaimOutcome::InFlight,
        "past the lock, within the TTL: 409"
    );
}

#[test]
fn a_record_with_no_room_keeps_its_key_in_flight_for_the_ttl() {
    // Every other way of the bucket is completing: their reservations hold
    // the whole share while this record looks for room.
    let s = FakeShared::default();
    let t = LocalTable::new(1, 16, charge_of(1000));
    t.init(&s).unwrap();
    let c = claimed(t.claim(&s, &d(1), &FP, 11, 0, 30_000).unwrap());
    let other = claimed(t.claim(&s, &d(2), &FP, 12, 0, 30_000).unwrap());
    let mut fx = SpaceEffects::default();
    assert!(matches!(
        t.reserve(&s, &other, charge_of(1000), 0, &mut fx).unwrap(),
        crate::store::reclaim::Room::Made
    ));
    let out = t.complete(&s, &c, &d(1), body(0, 7), 10, 60_000, &mut fx);
    assert!(
        matches!(out, Err(crate::store::StoreError::NoRoom(_))),
        "{out:?}"
    );
    // A renewal that lands late (it was sent before the record's answer)
    // does not shorten the hold.
    assert!(t.renew(&s, &c, 20, 30_000).unwrap());
    // Past the lock, and until the TTL, retries get 409: it never runs twice.
    assert_eq!(
        t.claim(&s, &d(1), &FP, 22, 30_001, 30_000).unwrap().0,
        ClaimOutcome::InFlight
    );
    assert_eq!(
        t.claim(&s, &d(1), &FP, 23, 60_009, 30_000).unwrap().0,
        ClaimOutcome::InFlight
    );
    assert!(matches!(
        t.claim(&s, &d(1), &FP, 24, 60_010, 30_000).unwrap().0,
        ClaimOutcome::Claimed(_)
    ));
}

#[test]
fn the_replay_cache_skips_a_record_it_cannot_hold_and_frees_the_slot() {
    let s = FakeShared::default();
    let t = LocalTable::named("cache/x", 1, 16, charge_of(1000));
    t.init(&s).unwrap();
    let mut fx = SpaceEffects::default();
    assert!(!t
        .remember(&s, &d(1), &FP, body(1001, 1), 7, 0, 60_000, &mut fx)
        .unwrap());
    assert_eq!(fx, SpaceEffects::default(), "nothing kept, nothing charged");
    assert_eq!(t.lookup(&s, &d(1), 1).unwrap(), None);
    assert_eq!(
        t.count_live(&s, 1).unwrap(),
        0,
        "the fill's claim is released"
    );
    assert!(t
        .remember(&s, &d(2), &FP, body(1000, 2), 7, 0, 60_000, &mut fx)
        .unwrap());
    assert_eq!(fx.bytes as u64, charge_of(1000));
    assert_eq!(t.lookup(&s, &d(2), 1).unwrap(), Some((FP, body(1000, 2))));
}

#[test]
fn running_requests_are_never_evicted_for_space() {
    let s = FakeShared::default();
    let t = LocalTable::new(1, 16, 4 * charge_of(1000));
    t.init(&s).unwrap();
    let a = Audited::new(&s, &t);
    // Two records, then two requests that run (one reuses nothing).
    for i in 0..2u32 {
        let c = claimed(t.claim(&a, &d(i), &FP, 1, 0, 30_000).unwrap());
        t.complete(
            &a,
            &c,
            &d(i),
            body(1000, 0),
            0,
            60_000,
            &mut SpaceEffects::default(),
        )
        .unwrap();
    }
    let running: Vec<Claim> = (10..12u32)
        .map(|i| {
            claimed(
                t.claim(&a, &d(i), &FP, 100 + u64::from(i), 1, 30_000)
                    .unwrap(),
            )
        })
        .collect();
    // A record of nearly four records' worth: both records go, the
    // running requests stay.
    let c = claimed(t.claim(&a, &d(20), &FP, 5, 2, 30_000).unwrap());
    let mut fx = SpaceEffects::default();
    t.complete(&a, &c, &d(20), body(3900, 1), 2, 60_000, &mut fx)
        .unwrap();
    assert_eq!(fx.evicted, 2);
    for (i, r) in (10..12u32).zip(&running) {
        assert_eq!(
            t.claim(&s, &d(i), &FP, 9, 3, 30_000).unwrap().0,
            ClaimOutcome::InFlight,
            "still running"
        );
        // And they complete; the room they need comes from completed records.
        let mut fx = SpaceEffects::default();
        assert!(t
            .complete(&a, r, &d(i), body(1000, 2), 3, 60_000, &mut fx)
            .unwrap());
        assert_eq!(fx.bodies_omitted, 0);
    }
    // Running requests holding the share: a new record cannot evict them,
    // so it is kept without its body (the share's bytes belong to them).
    let s = FakeShared::default();
    let t = LocalTable::new(1, 16, 2 * charge_of(1000) + 100);
    t.init(&s).unwrap();
    let a = Audited::new(&s, &t);
    let c1 = claimed(t.claim(&a, &d(1), &FP, 1, 0, 30_000).unwrap());
    let c2 = claimed(t.claim(&a, &d(2), &FP, 2, 0, 30_000).unwrap());
    // c1 reserves its bytes (as a completion on another thread would, between
    // its reservation and its write), then c2 completes.
    assert_eq!(
        t.reserve(
            &a,
            &c1,
            charge_of(1000) + 101,
            0,
            &mut SpaceEffects::default()
        )
        .unwrap(),
        super::Room::Made
    );
    let mut fx = SpaceEffects::default();
    assert!(t
        .complete(&a, &c2, &d(2), body(1000, 2), 0, 60_000, &mut fx)
        .unwrap());
    assert_eq!((fx.bodies_omitted, fx.evicted), (1, 0));
    assert!(t
        .complete(
            &a,
            &c1,
            &d(1),
            body(1000, 1),
            0,
            60_000,
            &mut SpaceEffects::default()
        )
        .unwrap());
}

/// Claims and completes key `i` (if it can be claimed), adding what the
/// completion reports to `gauge`.
fn claim_and_complete<S: SharedData>(
    t: &LocalTable,
    sh: &S,
    i: u32,
    token: u64,
    gauge: &Cell<i64>,
) {
    let (o, _) = t
        .claim(sh, &d(i), &FP, token, u64::from(i), 30_000)
        .unwrap();
    let ClaimOutcome::Claimed(c) = o else { return };
    let mut fx = SpaceEffects::default();
    t.complete(
        sh,
        &c,
        &d(i),
        body(500, i as u8),
        u64::from(i),
        60_000,
        &mut fx,
    )
    .unwrap();
    gauge.set(gauge.get() + fx.bytes);
}

/// Before the `left`-th next write, another worker claims and completes
/// key 100.
fn race_before_write(
    s: &FakeShared,
    left: std::rc::Rc<Cell<u32>>,
    t: LocalTable,
    gauge: std::rc::Rc<Cell<i64>>,
) {
    s.before_next_set(Box::new(move |sh: &FakeShared| {
        if left.get() > 0 {
            left.set(left.get() - 1);
            race_before_write(sh, left, t, gauge);
            return;
        }
        claim_and_complete(&t, sh, 100, 77, &gauge);
    }));
}

/// Completions racing in one bucket (the fake shared data's CAS makes the
/// loser retry): whatever the interleaving, every committed step is counted
/// once, so the gauge equals the table, and the budget holds throughout.
#[test]
fn the_bytes_gauge_stays_exact_under_concurrent_claims_and_completions() {
    // Key 6's claim and completion write 6 times: its claim, the eviction
    // (the bucket), the victim's bytes, the reservation, its data, the entry.
    for racer_at in 0..6 {
        let s = FakeShared::default();
        // Three records fit: from the fourth on, each completion evicts.
        let t = LocalTable::new(1, 8, 3 * charge_of(500) + 1);
        t.init(&s).unwrap();
        let a = Audited::new(&s, &t);
        let gauge = std::rc::Rc::new(Cell::new(0i64));
        for i in 0..6u32 {
            claim_and_complete(&t, &a, i, 1, &gauge);
        }
        let before = s.cas_failures();
        race_before_write(
            &s,
            std::rc::Rc::new(Cell::new(racer_at)),
            t.clone(),
            gauge.clone(),
        );
        claim_and_complete(&t, &a, 6, 2, &gauge);
        assert!(
            t.lookup(&s, &d(100), 50).unwrap().is_some(),
            "the racer ran and its record is there ({racer_at})"
        );
        assert_eq!(
            gauge.get() as u64,
            t.charged(&s).unwrap(),
            "racer before write {racer_at}"
        );
        assert!(t.charged(&s).unwrap() <= t.budget.share());
        if racer_at < 4 {
            assert!(
                s.cas_failures() > before,
                "the race made a CAS fail ({racer_at})"
            );
        }
        // Both records are there: the racer's and key 6's (the newest two).
        for (key, tag) in [(6u32, 6u8), (100, 100)] {
            assert_eq!(
                t.claim(&s, &d(key), &FP, 9, 50, 30_000).unwrap().0,
                ClaimOutcome::Replay(body(500, tag)),
                "key {key}, racer before write {racer_at}"
            );
        }
    }
}

#[test]
fn a_lowered_max_bytes_is_reached_by_the_sweep() {
    let s = FakeShared::default();
    let roomy = LocalTable::new(1, 16, 10 * charge_of(1000));
    roomy.init(&s).unwrap();
    for i in 0..8u32 {
        let c = claimed(
            roomy
                .claim(&s, &d(i), &FP, 1, u64::from(i), 30_000)
                .unwrap(),
        );
        roomy
            .complete(
                &s,
                &c,
                &d(i),
                body(1000, 1),
                u64::from(i),
                60_000,
                &mut SpaceEffects::default(),
            )
            .unwrap();
    }
    // The same table (same shape, so the same keys) under a smaller budget.
    let tight = LocalTable::new(1, 16, 3 * charge_of(1000));
    let stats = tight.sweep(&s, 0, 1, 100);
    assert_eq!(stats.space.evicted, 5);
    assert_eq!(stats.space.bytes, -5 * charge_of(1000) as i64);
    assert_eq!(tight.charged(&s).unwrap(), 3 * charge_of(1000));
    // The newest stay.
    assert!(matches!(
        tight.claim(&s, &d(7), &FP, 2, 101, 30_000).unwrap().0,
        ClaimOutcome::Replay(_)
    ));
}

#[test]
fn a_completion_that_lost_its_claim_while_writing_wipes_its_own_bytes() {
    let s = FakeShared::default();
    let t = LocalTable::new(1, 1, 2 * charge_of(1000));
    t.init(&s).unwrap();
    let c1 = claimed(t.claim(&s, &d(1), &FP, 1, 0, 1000).unwrap());
    // Between its data write and its final CAS, its lock is found expired:
    // the sweep frees the slot.
    let t2 = t.clone();
    let writes = std::rc::Rc::new(Cell::new(0));
    let w = writes.clone();
    fn after_writes(s: &FakeShared, n: std::rc::Rc<Cell<u32>>, t: LocalTable) {
        let again = n.clone();
        s.before_next_set(Box::new(move |sh: &FakeShared| {
            n.set(n.get() + 1);
            // Writes: 1 reservation, 2 data; before the 3rd (final CAS)...
            if n.get() == 3 {
                t.sweep(sh, 0, 1, 5_000);
            } else {
                after_writes(sh, again, t);
            }
        }));
    }
    after_writes(&s, w, t2);
    let mut fx = SpaceEffects::default();
    assert!(!t
        .complete(&s, &c1, &d(1), body(1000, 1), 5_000, 60_000, &mut fx)
        .unwrap());
    assert_eq!(
        s.peek(&t.data_key(0)).unwrap(),
        DataRecord::tombstone(),
        "its bytes are wiped"
    );
    let (bucket, _) = t.load(&s, 0).unwrap();
    assert_eq!(bucket.entries[0].state, State::Free);
}

/// A slot's older record, charged more than the whole (lowered) share: a
/// new key that takes the slot wipes those bytes first and is charged its
/// own size, instead of finding no room and holding its key in flight for
/// the TTL (found by review: every retry got 409, even after the sweep).
#[test]
fn a_slots_older_record_larger_than_the_share_is_wiped_to_make_room() {
    let s = FakeShared::default();
    let roomy = LocalTable::new(1, 2, 40_000);
    roomy.init(&s).unwrap();
    for (i, n) in [(1u32, 20_000usize), (2, 10)] {
        let c = claimed(
            roomy
                .claim(&s, &d(i), &FP, 1, u64::from(i), 30_000)
                .unwrap(),
        );
        assert!(roomy
            .complete(
                &s,
                &c,
                &d(i),
                body(n, 1),
                u64::from(i),
                600_000,
                &mut SpaceEffects::default()
            )
            .unwrap());
    }
    // max_bytes lowered (the same table keys), before any sweep: a new key
    // evicts the oldest record, about 27 KB charged against a 10 KB share.
    let tight = LocalTable::new(1, 2, 10_000);
    let (outcome, effects) = tight.claim(&s, &d(3), &FP, 7, 10, 30_000).unwrap();
    assert!(effects.evicted);
    let c = claimed((outcome, effects));
    let mut space = SpaceEffects::default();
    assert!(tight
        .complete(&s, &c, &d(3), body(100, 3), 11, 600_000, &mut space)
        .unwrap());
    assert_eq!(space.bodies_omitted, 0, "kept whole");
    assert!(matches!(
        tight.claim(&s, &d(3), &FP, 8, 12, 30_000).unwrap().0,
        ClaimOutcome::Replay(_)
    ));
}

/// A sweeper wipes a running request's leftover bytes (garbage of the epoch
/// before its own) and, before it takes their charge off, the request
/// records its response and the key is forgotten: the slot is free at the
/// request's epoch, and its charge is now for the record nobody wiped. The
/// sweeper must leave that charge (found by review: it took it off between
/// the forget's bucket write and the forget's own wipe, and the record's
/// bytes stayed in shared data, charged nothing, wiped by no sweep).
#[test]
fn a_sweeper_takes_off_only_the_charge_of_bytes_it_wiped() {
    let s = FakeShared::default();
    let t = LocalTable::new(1, 1, NO_LIMIT);
    t.init(&s).unwrap();
    let c0 = claimed(t.claim(&s, &d(0), &FP, 1, 0, 30_000).unwrap());
    assert!(t
        .complete(
            &s,
            &c0,
            &d(0),
            body(3000, 0),
            0,
            600_000,
            &mut SpaceEffects::default()
        )
        .unwrap());
    // Key 1 evicts key 0: its slot holds key 0's bytes, garbage, charged.
    let c1 = claimed(t.claim(&s, &d(1), &FP, 2, 1, 30_000).unwrap());
    // The sweeper reads the bucket and wipes that garbage...
    let (bucket, _) = t.load(&s, 0).unwrap();
    let e = bucket.entries[0];
    assert!(e.holds_garbage());
    assert!(t.wipe(&s, 0, e.garbage_epoch()).unwrap());
    let wiped = vec![super::wiped_slot(0, &e)];
    // ...key 1 records its response...
    assert!(t
        .complete(
            &s,
            &c1,
            &d(1),
            body(3000, 1),
            2,
            600_000,
            &mut SpaceEffects::default()
        )
        .unwrap());
    // ...and is forgotten; right after the forget's bucket write, the
    // sweeper takes off the charges of what it wiped.
    let t2 = t.clone();
    s.after_next_set(Box::new(move |sh: &FakeShared| {
        let (mut b, cas) = t2.load(sh, 0).unwrap();
        super::uncharge_wiped(&mut b, &wiped);
        assert!(t2.store(sh, 0, &b, cas).unwrap());
    }));
    t.forget(&s, &d(1), 3, false, &mut SpaceEffects::default())
        .unwrap();
    for now in [5, 10_000_000] {
        t.sweep(&s, 0, 1, now);
    }
    let bytes = s.peek(&t.data_key(0)).unwrap();
    assert!(
        bytes == DataRecord::tombstone() || t.charged(&s).unwrap() >= charge(bytes.len() as u64),
        "{} bytes held, {} charged",
        bytes.len(),
        t.charged(&s).unwrap()
    );
}
