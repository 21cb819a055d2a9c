//! The sweep: expired records and abandoned claims freed, their bytes
//! wiped and their charge taken off, within a lowered `max_bytes` too.

use super::*;

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
