//! Room for a record in its bucket's share of `max_bytes`: evicting the
//! oldest completed records, keeping a record too large without its body,
//! and holding a key in flight for the TTL when its record cannot be kept.

use super::*;

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
    contend(&s, t.clone(), super::super::super::local::MAX_CAS_ATTEMPTS);
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
