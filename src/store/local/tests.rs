//! The slot table's claims, records, replays and refusals (budget aside:
//! see `reclaim/tests.rs` for eviction for space and the sweep).

use super::*;
use crate::fake_host::FakeShared;
use crate::store::testing::{claimed, d, resp, FP, NO_LIMIT};

#[test]
fn keys_are_the_prefix_the_kind_and_the_number() {
    let t = LocalTable::new(4, 8, NO_LIMIT);
    for n in [0, 7, 10, 99, 4_096, u32::MAX] {
        assert_eq!(t.bucket_key(n), format!("idempotency/v2/4x8/b{n}"));
        assert_eq!(t.data_key(n), format!("idempotency/v2/4x8/d{n}"));
    }
}

#[test]
fn lifecycle_claim_conflict_complete_replay_mismatch() {
    let s = FakeShared::default();
    let t = LocalTable::new(4, 8, NO_LIMIT);
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
    assert!(t
        .complete(
            &s,
            &c,
            &d(1),
            resp("r1"),
            2000,
            60_000,
            &mut SpaceEffects::default()
        )
        .unwrap());
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
        .complete(
            &s,
            &c,
            &d(1),
            resp("late"),
            62_001,
            60_000,
            &mut SpaceEffects::default()
        )
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
    let t = LocalTable::new(1, 8, NO_LIMIT);
    t.init(&s).unwrap();
    let c1 = claimed(t.claim(&s, &d(1), &FP, 1, 0, 1000).unwrap());
    assert_eq!(
        t.claim(&s, &d(1), &FP, 2, 999, 1000).unwrap().0,
        ClaimOutcome::InFlight
    );
    let c2 = claimed(t.claim(&s, &d(1), &FP, 2, 1000, 1000).unwrap());
    // The late original finds its claim gone; the new owner's record wins.
    assert!(!t
        .complete(
            &s,
            &c1,
            &d(1),
            resp("old"),
            1001,
            60_000,
            &mut SpaceEffects::default()
        )
        .unwrap());
    assert!(t
        .complete(
            &s,
            &c2,
            &d(1),
            resp("new"),
            1002,
            60_000,
            &mut SpaceEffects::default()
        )
        .unwrap());
    assert_eq!(
        t.claim(&s, &d(1), &FP, 3, 1003, 1000).unwrap().0,
        ClaimOutcome::Replay(resp("new"))
    );
}

#[test]
fn a_renewed_claim_outlives_its_lock_timeout_and_a_lost_one_is_said() {
    let s = FakeShared::default();
    let t = LocalTable::new(1, 8, NO_LIMIT);
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
        .complete(
            &s,
            &c2,
            &d(1),
            resp("done"),
            1902,
            60_000,
            &mut SpaceEffects::default()
        )
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
    let t = LocalTable::new(2, 8, NO_LIMIT);
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
    let t = LocalTable::new(2, 8, NO_LIMIT);
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
                1_000_000,
                &mut SpaceEffects::default()
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
    let t = LocalTable::new(1, 8, NO_LIMIT);
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
fn a_late_completer_never_overwrites_the_record_of_its_successor() {
    let s = FakeShared::default();
    let t = LocalTable::new(1, 16, NO_LIMIT);
    t.init(&s).unwrap();
    let c1 = claimed(t.claim(&s, &d(1), &FP, 1, 0, 1000).unwrap());
    let t2 = t.clone();
    // c1's lock expires; c2 takes over and completes while c1 is about
    // to write its own (late) data.
    s.before_next_set(Box::new(move |sh: &FakeShared| {
        let c2 = claimed(t2.claim(sh, &d(1), &FP, 2, 1000, 1000).unwrap());
        assert!(t2
            .complete(
                sh,
                &c2,
                &d(1),
                resp("new"),
                1000,
                60_000,
                &mut SpaceEffects::default()
            )
            .unwrap());
    }));
    assert!(!t
        .complete(
            &s,
            &c1,
            &d(1),
            resp("old"),
            1000,
            60_000,
            &mut SpaceEffects::default()
        )
        .unwrap());
    assert_eq!(
        t.claim(&s, &d(1), &FP, 3, 1001, 1000).unwrap().0,
        ClaimOutcome::Replay(resp("new"))
    );
}

#[test]
fn host_errors_surface_as_store_errors() {
    let s = FakeShared::default();
    let t = LocalTable::new(1, 8, NO_LIMIT);
    s.fail_with(12);
    assert!(matches!(
        t.claim(&s, &d(1), &FP, 1, 0, 1000),
        Err(StoreError::Host(_))
    ));
}
