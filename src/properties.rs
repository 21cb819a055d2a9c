//! Property tests: invariants checked on many generated inputs.

use crate::decision::{decide, Decision, Existing};
use crate::fake_host::FakeShared;
use crate::fingerprint::{key_digest, Digest16, FingerprintHash, Fingerprinter};
use crate::key::{parse_key, to_sf_string};
use crate::record::{DataRecord, StoredResponse};
use crate::store::budget::SpaceEffects;
use crate::store::local::operations::{Forget, KeyState};
use crate::store::local::{LocalTable, State};
use crate::store::{Claim, ClaimOutcome};
use crate::wire::HeaderMap;
use proptest::prelude::*;

proptest! {
    /// Any printable key survives serialisation as an sf-string and back,
    /// and a bare value (no quotes, spaces, commas...) means the same key.
    #[test]
    fn sf_string_round_trip(key in "[ -~]{1,255}") {
        prop_assert_eq!(parse_key(to_sf_string(&key).as_bytes(), 255).unwrap(), key.clone());
        if !key.contains(['"', '\\', ' ', ',', ';']) {
            prop_assert_eq!(parse_key(key.as_bytes(), 255).unwrap(), key);
        }
    }

    /// Header maps read in place give back exactly the list the host
    /// serialised (order, repeats, binary values), and any bytes at all are
    /// either a map or an error, never a panic or a huge allocation.
    #[test]
    fn header_maps_round_trip_and_garbage_is_refused(
        list in proptest::collection::vec(("[a-z:-]{0,20}", proptest::collection::vec(any::<u8>(), 0..40)), 0..12),
        garbage in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let map = HeaderMap::from_list(&list);
        prop_assert_eq!(map.to_list(), list.clone());
        for (name, value) in &list {
            prop_assert_eq!(map.get(name), list.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice()));
            prop_assert!(map.values(name).any(|v| v == value.as_slice()));
        }
        if let Some(m) = HeaderMap::decode(garbage) {
            let _ = m.to_list();
        }
    }

    /// Nothing a client sends makes the key parser panic.
    #[test]
    fn key_parser_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse_key(&raw, 255);
    }

    /// However the body is cut into chunks, the fingerprint is the same.
    #[test]
    fn fingerprint_is_stable_across_chunkings(
        body in proptest::collection::vec(any::<u8>(), 0..4096),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let whole = {
            let mut f = Fingerprinter::new(FingerprintHash::Xxh3, "POST", "/p", &[Some(b"application/json")]);
            f.update(&body);
            f.finish()
        };
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        points.sort_unstable();
        let mut f = Fingerprinter::new(FingerprintHash::Xxh3, "POST", "/p", &[Some(b"application/json")]);
        let mut start = 0;
        for p in points.into_iter().chain(std::iter::once(body.len())) {
            f.update(&body[start..p]);
            start = p;
        }
        prop_assert_eq!(f.finish(), whole);
    }

    /// Records decode to what was encoded, and garbage never panics.
    #[test]
    fn records_round_trip_and_garbage_is_an_error(
        status in 100u16..600,
        headers in proptest::collection::vec(("[a-z-]{1,20}", proptest::collection::vec(any::<u8>(), 0..40)), 0..8),
        body in proptest::collection::vec(any::<u8>(), 0..2000),
        garbage in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let rec = DataRecord {
            epoch: 3,
            digest: [5; 16],
            response: StoredResponse { status, headers, body, body_omitted: false },
        };
        prop_assert_eq!(DataRecord::decode(&rec.encode()).unwrap(), rec);
        let _ = DataRecord::decode(&garbage);
    }
}

/// One step of the store model test.
#[derive(Debug, Clone)]
enum Op {
    Claim {
        worker: usize,
        key: usize,
        other_payload: bool,
    },
    Complete {
        worker: usize,
    },
    Release {
        worker: usize,
    },
    Abandon {
        worker: usize,
    },
    Sweep,
    Advance {
        ms: u64,
    },
    /// The operations endpoint: what the table holds for a key.
    Inspect {
        key: usize,
    },
    /// The operations endpoint forgets a key (a running one only if forced).
    Forget {
        key: usize,
        force: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..3usize, prop::bool::weighted(0.15))
            .prop_map(|(worker, key, other_payload)| Op::Claim { worker, key, other_payload }),
        3 => (0..3usize).prop_map(|worker| Op::Complete { worker }),
        1 => (0..3usize).prop_map(|worker| Op::Release { worker }),
        1 => (0..3usize).prop_map(|worker| Op::Abandon { worker }),
        1 => Just(Op::Sweep),
        2 => prop_oneof![Just(1u64), Just(500), Just(1000), Just(10_000)].prop_map(|ms| Op::Advance { ms }),
        1 => (0..3usize).prop_map(|key| Op::Inspect { key }),
        1 => (0..3usize, any::<bool>()).prop_map(|(key, force)| Op::Forget { key, force }),
    ]
}

/// What the model says a key holds (the reference the table must match).
#[derive(Debug, Clone, PartialEq)]
enum Model {
    Nothing,
    InFlight {
        token: u64,
        fingerprint: Digest16,
        deadline: u64,
    },
    Done {
        response: StoredResponse,
        fingerprint: Digest16,
        expires: u64,
    },
}

const LOCK_MS: u64 = 1000;
const TTL_MS: u64 = 5000;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// The slot table against an exact model, over random interleavings of
    /// several workers: claims, completions, releases, clients that vanish,
    /// sweeps, time, and the operations endpoint inspecting and forgetting
    /// keys. Every answer must be the model's. In particular no
    /// key is ever handed out ("forward") while a live claim or a live
    /// record holds it, and a replay is always the owner's recorded answer.
    #[test]
    fn the_slot_table_behaves_like_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        let shared = FakeShared::default();
        // 3 keys, 4 ways: no eviction, so the model needs none.
        let table = LocalTable::new(1, 4, u64::MAX);
        table.init(&shared).unwrap();
        let keys: Vec<Digest16> = (0..3).map(|i| key_digest(&[], &format!("k{i}"))).collect();
        let fp_a: Digest16 = [1; 16];
        let fp_b: Digest16 = [2; 16];
        let mut model = vec![Model::Nothing; 3];
        let mut workers: Vec<Option<(usize, Claim, Digest16)>> = vec![None; 3];
        let mut now = 1_000_000u64;
        let mut token = 0u64;
        let mut served = 0u32;
        for op in ops {
            match op {
                Op::Claim { worker, key, other_payload } => {
                    if workers[worker].is_some() {
                        continue;
                    }
                    let fp = if other_payload { fp_b } else { fp_a };
                    token += 1;
                    let (outcome, _) = table.claim(&shared, &keys[key], &fp, token, now, LOCK_MS).unwrap();
                    let existing = match &model[key] {
                        Model::Nothing => None,
                        Model::InFlight { fingerprint, deadline, .. } => {
                            Some(Existing::InFlight { fingerprint: *fingerprint, lock_deadline_ms: *deadline })
                        }
                        Model::Done { fingerprint, expires, .. } => {
                            Some(Existing::Completed { fingerprint: *fingerprint, expires_ms: *expires })
                        }
                    };
                    match (decide(existing.as_ref(), &fp, now), outcome) {
                        (Decision::Execute | Decision::TakeOver, ClaimOutcome::Claimed(c)) => {
                            model[key] = Model::InFlight { token, fingerprint: fp, deadline: now + LOCK_MS };
                            workers[worker] = Some((key, c, fp));
                        }
                        (Decision::Conflict, ClaimOutcome::InFlight) | (Decision::Mismatch, ClaimOutcome::Mismatch) => {}
                        (Decision::Replay, ClaimOutcome::Replay(r)) => {
                            let Model::Done { response, .. } = &model[key] else { unreachable!() };
                            prop_assert_eq!(&r, response, "a replay is the recorded answer");
                        }
                        (expected, got) => prop_assert!(false, "model says {:?}, table answered {:?}", expected, got),
                    }
                }
                Op::Complete { worker } => {
                    let Some((key, claim, fp)) = workers[worker].take() else { continue };
                    served += 1;
                    let response = StoredResponse { status: 201, headers: vec![], body: served.to_le_bytes().to_vec(), body_omitted: false };
                    let stored = table.complete(&shared, &claim, &keys[key], response.clone(), now, TTL_MS, &mut SpaceEffects::default()).unwrap();
                    let owns = matches!(model[key], Model::InFlight { token: t, .. } if t == claim.token);
                    prop_assert_eq!(stored, owns, "only the current owner records");
                    if stored {
                        model[key] = Model::Done { response, fingerprint: fp, expires: now + TTL_MS };
                    }
                }
                Op::Release { worker } => {
                    let Some((key, claim, _)) = workers[worker].take() else { continue };
                    let released = table.release(&shared, &claim).unwrap();
                    let owns = matches!(model[key], Model::InFlight { token: t, .. } if t == claim.token);
                    prop_assert_eq!(released, owns);
                    if released {
                        model[key] = Model::Nothing;
                    }
                }
                Op::Abandon { worker } => {
                    workers[worker] = None;
                }
                Op::Sweep => {
                    table.sweep(&shared, 0, 1, now);
                    for m in model.iter_mut() {
                        let dead = match m {
                            Model::InFlight { deadline, .. } => now >= *deadline,
                            Model::Done { expires, .. } => now >= *expires,
                            Model::Nothing => false,
                        };
                        if dead {
                            *m = Model::Nothing;
                        }
                    }
                }
                Op::Advance { ms } => now += ms,
                Op::Inspect { key } => {
                    let expected = match &model[key] {
                        Model::InFlight { deadline, .. } if now < *deadline => {
                            // The claim's time is not modelled: take the table's.
                            match table.inspect(&shared, &keys[key], now).unwrap() {
                                Some(KeyState::InFlight { since_ms, .. }) => {
                                    KeyState::InFlight { since_ms, lock_deadline_ms: *deadline }
                                }
                                other => { prop_assert!(false, "model says in flight, table {:?}", other); continue }
                            }
                        }
                        Model::Done { response, expires, .. } if now < *expires => KeyState::Completed {
                            since_ms: expires - TTL_MS,
                            expires_ms: *expires,
                            status: response.status,
                            body_bytes: response.body.len(),
                            body_omitted: false,
                        },
                        _ => KeyState::Absent,
                    };
                    prop_assert_eq!(table.inspect(&shared, &keys[key], now).unwrap(), Some(expected));
                }
                Op::Forget { key, force } => {
                    let got = table.forget(&shared, &keys[key], now, force, &mut SpaceEffects::default()).unwrap();
                    let expected = match &model[key] {
                        Model::InFlight { deadline, .. } if now < *deadline && !force => {
                            Forget::Running { lock_deadline_ms: *deadline }
                        }
                        Model::InFlight { deadline, .. } if now < *deadline => Forget::Forgotten(State::InFlight),
                        Model::Done { expires, .. } if now < *expires => Forget::Forgotten(State::Completed),
                        _ => Forget::Absent,
                    };
                    prop_assert_eq!(got, Some(expected));
                    if matches!(expected, Forget::Forgotten(_)) {
                        model[key] = Model::Nothing;
                    }
                }
            }
        }
    }
}

/// One step of the byte-budget model test.
#[derive(Debug, Clone)]
enum BudgetOp {
    Claim {
        worker: usize,
        key: usize,
        other_payload: bool,
    },
    Complete {
        worker: usize,
        size: usize,
    },
    Release {
        worker: usize,
    },
    Abandon {
        worker: usize,
    },
    Sweep,
    Advance {
        ms: u64,
    },
    /// The table's configuration changes: `max_bytes` halved, or back
    /// (two configurations on one table, in turn; the keys stay).
    Configure {
        tight: bool,
    },
    /// The operations endpoint forgets a key (a running one only if forced).
    Forget {
        key: usize,
        force: bool,
    },
}

fn budget_op() -> impl Strategy<Value = BudgetOp> {
    prop_oneof![
        4 => (0..3usize, 0..5usize, prop::bool::weighted(0.1))
            .prop_map(|(worker, key, other_payload)| BudgetOp::Claim { worker, key, other_payload }),
        4 => (0..3usize, prop_oneof![0..200usize, 200..1500usize, Just(2900usize), Just(5000usize)])
            .prop_map(|(worker, size)| BudgetOp::Complete { worker, size }),
        1 => (0..3usize).prop_map(|worker| BudgetOp::Release { worker }),
        1 => (0..3usize).prop_map(|worker| BudgetOp::Abandon { worker }),
        1 => Just(BudgetOp::Sweep),
        2 => prop_oneof![Just(1u64), Just(500), Just(1000), Just(10_000)].prop_map(|ms| BudgetOp::Advance { ms }),
        1 => any::<bool>().prop_map(|tight| BudgetOp::Configure { tight }),
        1 => (0..5usize, any::<bool>()).prop_map(|(key, force)| BudgetOp::Forget { key, force }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// The slot table under a byte budget that holds about two records,
    /// over random interleavings of claims, completions of any size,
    /// releases, vanished clients, sweeps and time: after every single
    /// shared-data write the budget holds (audited), the bytes gauge is
    /// the table's exact charge, a running claim is never evicted (its key
    /// always answers 409 and its completion always lands while its lock
    /// lives), and a replay is always the key's own recorded answer, whole
    /// or (when it could not fit) without its body: never another's bytes.
    /// `max_bytes` is halved and restored at random, the table kept: a
    /// completion is never refused for room the table could make. Keys are
    /// forgotten too (a running one only if forced), their bytes given back.
    #[test]
    fn the_byte_budget_holds_and_replays_are_never_wrong(ops in proptest::collection::vec(budget_op(), 1..80)) {
        use crate::store::budget::SpaceEffects;
        use crate::store::testing::Audited;
        let shared = FakeShared::default();
        // 5 keys on 4 ways: entry eviction too; 4096 bytes: two records.
        let roomy = LocalTable::new(1, 4, 4096);
        let tight = LocalTable::new(1, 4, 2048);
        roomy.init(&shared).unwrap();
        let s = Audited::new(&shared, &roomy);
        let mut table = &roomy;
        let keys: Vec<Digest16> = (0..5).map(|i| key_digest(&[], &format!("k{i}"))).collect();
        let (fp_a, fp_b): (Digest16, Digest16) = ([1; 16], [2; 16]);
        let mut model = vec![Model::Nothing; 5];
        let mut workers: Vec<Option<(usize, Claim, Digest16)>> = vec![None; 3];
        let (mut now, mut token, mut served, mut gauge) = (1_000_000u64, 0u64, 0u32, 0i64);
        for op in ops {
            match op {
                BudgetOp::Claim { worker, key, other_payload } => {
                    if workers[worker].is_some() {
                        continue;
                    }
                    let fp = if other_payload { fp_b } else { fp_a };
                    token += 1;
                    let (outcome, _) = table.claim(&s, &keys[key], &fp, token, now, LOCK_MS).unwrap();
                    let running = model.iter().filter(|m| matches!(m, Model::InFlight { deadline, .. } if now < *deadline)).count();
                    match (&model[key], outcome) {
                        (Model::InFlight { fingerprint, deadline, .. }, o) if now < *deadline => {
                            let expected = if *fingerprint == fp { ClaimOutcome::InFlight } else { ClaimOutcome::Mismatch };
                            prop_assert_eq!(o, expected, "a running claim is never evicted");
                        }
                        (Model::Done { response, fingerprint, expires }, ClaimOutcome::Replay(r)) if now < *expires => {
                            prop_assert!(*fingerprint == fp, "replayed for another payload");
                            let whole = &r == response;
                            let bodiless = r.body_omitted && r.body.is_empty() && r.status == response.status && r.headers == response.headers;
                            prop_assert!(whole || bodiless, "a replay is the key's own answer");
                        }
                        (Model::Done { fingerprint, expires, .. }, ClaimOutcome::Mismatch) if now < *expires => {
                            prop_assert!(*fingerprint != fp);
                        }
                        (_, ClaimOutcome::Claimed(c)) => {
                            // A new claim: the key had nothing live, or its
                            // completed record was evicted (entries or bytes).
                            model[key] = Model::InFlight { token, fingerprint: fp, deadline: now + LOCK_MS };
                            workers[worker] = Some((key, c, fp));
                        }
                        (_, ClaimOutcome::Full) => prop_assert!(running >= 4, "full with {} running", running),
                        (m, o) => prop_assert!(false, "model {:?}, table answered {:?}", m, o),
                    }
                }
                BudgetOp::Complete { worker, size } => {
                    let Some((key, claim, fp)) = workers[worker].take() else { continue };
                    served += 1;
                    let mut response = StoredResponse { status: 201, headers: vec![("x-n".into(), served.to_le_bytes().to_vec())], body: vec![served as u8; size], body_omitted: false };
                    let mut fx = SpaceEffects::default();
                    let result = table.complete(&s, &claim, &keys[key], response.clone(), now, TTL_MS, &mut fx);
                    gauge += fx.bytes;
                    let (owns, alive) = match model[key] {
                        Model::InFlight { token: t, deadline, .. } => (t == claim.token, now < deadline),
                        _ => (false, false),
                    };
                    match result {
                        Ok(true) => {
                            prop_assert!(owns, "only the current owner records");
                            if fx.bodies_omitted > 0 {
                                response.body.clear();
                                response.body_omitted = true;
                            }
                            model[key] = Model::Done { response, fingerprint: fp, expires: now + TTL_MS };
                        }
                        // A claim past its lock may have been reclaimed.
                        // (Past its lock, a claim may have been freed to make room.)
                        Ok(false) => prop_assert!(!owns || !alive, "a live claim's completion lands"),
                        Err(e) => prop_assert!(false, "complete failed: {}", e),
                    }
                }
                BudgetOp::Release { worker } => {
                    let Some((key, claim, _)) = workers[worker].take() else { continue };
                    let released = table.release(&s, &claim).unwrap();
                    let (owns, alive) = match model[key] {
                        Model::InFlight { token: t, deadline, .. } => (t == claim.token, now < deadline),
                        _ => (false, false),
                    };
                    prop_assert!(released == owns || (owns && !alive));
                    if released {
                        model[key] = Model::Nothing;
                    }
                }
                BudgetOp::Abandon { worker } => workers[worker] = None,
                BudgetOp::Sweep => {
                    let stats = table.sweep(&s, 0, 1, now);
                    gauge += stats.space.bytes;
                    for m in model.iter_mut() {
                        let dead = match m {
                            Model::InFlight { deadline, .. } => now >= *deadline,
                            Model::Done { expires, .. } => now >= *expires,
                            Model::Nothing => false,
                        };
                        if dead {
                            *m = Model::Nothing;
                        }
                    }
                }
                BudgetOp::Advance { ms } => now += ms,
                BudgetOp::Configure { tight: t } => table = if t { &tight } else { &roomy },
                BudgetOp::Forget { key, force } => {
                    let mut fx = SpaceEffects::default();
                    let got = table.forget(&s, &keys[key], now, force, &mut fx).unwrap();
                    gauge += fx.bytes;
                    let running = matches!(&model[key], Model::InFlight { deadline, .. } if now < *deadline);
                    let done = matches!(&model[key], Model::Done { expires, .. } if now < *expires);
                    match got {
                        Some(Forget::Forgotten(_)) if (running && force) || done => model[key] = Model::Nothing,
                        Some(Forget::Running { .. }) if running && !force => {}
                        // A record may have been evicted for space meanwhile
                        // (a running claim never is); a lapsed claim is
                        // nothing live, left as it is (its request may still
                        // record, if nobody took the key over).
                        Some(Forget::Absent) if !running => {
                            if done {
                                model[key] = Model::Nothing;
                            }
                        }
                        g => prop_assert!(false, "running {}, done {}, forget answered {:?}", running, done, g),
                    }
                }
            }
            prop_assert_eq!(gauge as u64, table.charged(&shared).unwrap(), "the gauge is the table");
            prop_assert!(table.charged(&shared).unwrap() <= 4096);
            s.audit();
        }
    }
}
