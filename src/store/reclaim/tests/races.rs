//! Steps of other workers between a read and a write: the sweep never
//! erases a newer record, running requests are never evicted, and the bytes
//! gauge and the budget stay exact.

use super::*;

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
        super::super::Room::Made
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
    let wiped = vec![super::super::wiped_slot(0, &e)];
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
        super::super::uncharge_wiped(&mut b, &wiped);
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
