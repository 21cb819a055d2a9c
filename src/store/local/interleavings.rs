//! The slot table under sampled interleavings of its steps. The property
//! tests run each operation whole; here actors on threads take turns at
//! every shared-data read and write, in an order a seeded generator picks,
//! so that each operation's compare-and-swap windows meet every other's,
//! as Envoy's workers meet in one process. No two actors ever hold a live
//! claim of one key; the byte budget is audited after every write; replays
//! must be the key's own; a completion of a live claim must land; and at
//! the end the bytes gauge must be what the table is charged. (A review's explorer of this kind found a sweeper taking off
//! the charge of bytes it had not wiped, in 45 of 3,000 runs.)

use super::super::budget::{charge, SpaceEffects};
use super::super::testing::audit_budget;
use super::super::{ClaimOutcome, SharedData};
use super::LocalTable;
use crate::fake_host::{envoy_set, SharedMap};
use crate::fingerprint::Digest16;
use crate::host::HostError;
use crate::record::StoredResponse;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

/// Whose turn it is, and who is still running.
struct Baton {
    state: Mutex<(usize, Vec<bool>, u64)>,
    turn: Condvar,
}

impl Baton {
    fn new(actors: usize, seed: u64) -> Baton {
        Baton {
            state: Mutex::new((0, vec![true; actors], seed | 1)),
            turn: Condvar::new(),
        }
    }

    fn pick_next(state: &mut (usize, Vec<bool>, u64)) {
        let alive: Vec<usize> = (0..state.1.len()).filter(|a| state.1[*a]).collect();
        // xorshift: the order is the seed's, run after run.
        state.2 ^= state.2 << 13;
        state.2 ^= state.2 >> 7;
        state.2 ^= state.2 << 17;
        state.0 = match alive.len() {
            0 => usize::MAX,
            n => alive[(state.2 % n as u64) as usize],
        };
    }

    fn wait_turn(&self, me: usize) {
        let mut state = self.state.lock().unwrap();
        while state.0 != me {
            state = self.turn.wait(state).unwrap();
        }
    }

    /// Before each step: someone (perhaps `me` again) goes next.
    fn pass(&self, me: usize) {
        let mut state = self.state.lock().unwrap();
        Self::pick_next(&mut state);
        self.turn.notify_all();
        while state.0 != me {
            state = self.turn.wait(state).unwrap();
        }
    }

    fn finish(&self, me: usize) {
        let mut state = self.state.lock().unwrap();
        state.1[me] = false;
        Self::pick_next(&mut state);
        self.turn.notify_all();
    }
}

/// The values and the last write's number.
type Map = Mutex<(SharedMap, u32)>;

/// Envoy's shared data (CAS ignored on a missing key), one actor's view:
/// every step waits for its turn, and every write is audited (once the
/// table exists: `init` writes a bucket before its data keys).
struct Stepped {
    map: Arc<Map>,
    baton: Arc<Baton>,
    me: usize,
    table: LocalTable,
    audited: bool,
}

impl SharedData for Stepped {
    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        self.baton.pass(self.me);
        Ok(self.map.lock().unwrap().0.get(key).cloned())
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, HostError> {
        self.baton.pass(self.me);
        let mut guard = self.map.lock().unwrap();
        let map = &mut *guard;
        if !envoy_set(&mut map.0, &mut map.1, key, value, cas) {
            return Ok(false);
        }
        if self.audited {
            audit_budget(
                &self.table,
                |key| map.0.get(key).map(|(v, _)| v.clone()),
                "",
            );
        }
        Ok(true)
    }
}

const KEYS: u32 = 3;
const NOW: u64 = 1_000;
/// No claim lapses and no record expires: every step's effect is the
/// interleaving's alone.
const LONG_MS: u64 = 3_600_000;

fn key(k: u32) -> Digest16 {
    crate::fingerprint::key_digest(&[], &format!("k{k}"))
}

/// A response only this actor's `n`-th request could have recorded for key `k`.
fn response(k: u32, actor: usize, n: u64, size: usize) -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![("x-key".into(), k.to_le_bytes().to_vec())],
        body: [vec![k as u8, actor as u8, n as u8], vec![0; size]].concat(),
        body_omitted: false,
    }
}

/// Which actor holds each key's live claim, as the actors learn it: set
/// when a claim returns, cleared before its record or release is sent (so
/// a claim the table grants after that is no overlap).
type Holders = Mutex<HashMap<u32, usize>>;

/// One actor: requests on random keys (claimed ones completed or
/// released), sweeps and forgets, in an order from `seed`. Returns the
/// bytes it moved on the gauge.
fn actor(s: &Stepped, holders: &Holders, seed: u64) -> i64 {
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let (t, mut gauge) = (&s.table, 0i64);
    for n in 0..4u64 {
        let k = next(u64::from(KEYS)) as u32;
        let mut fx = SpaceEffects::default();
        match next(6) {
            0 => gauge += t.sweep(s, 0, t.buckets, NOW).space.bytes,
            1 => {
                t.forget(s, &key(k), NOW, false, &mut fx).unwrap();
            }
            _ => {
                let token = (s.me as u64) << 32 | n;
                let outcome = t.claim(s, &key(k), &[1; 16], token, NOW, LONG_MS);
                if let Ok((ClaimOutcome::Claimed(_), _)) = outcome {
                    let earlier = holders.lock().unwrap().insert(k, s.me);
                    assert_eq!(earlier, None, "two live claims of key {}", k);
                    // The others' steps while it "runs upstream".
                    for _ in 0..next(3) {
                        s.shared_get("elsewhere").unwrap();
                    }
                    // Let go before the table is told.
                    holders.lock().unwrap().remove(&k);
                }
                match outcome.unwrap().0 {
                    ClaimOutcome::Claimed(claim) if next(4) == 0 => {
                        assert!(t.release(s, &claim).unwrap(), "a live claim releases");
                    }
                    ClaimOutcome::Claimed(claim) => {
                        let size = [10, 300, 900][next(3) as usize];
                        let recorded = t.complete(
                            s,
                            &claim,
                            &key(k),
                            response(k, s.me, n, size),
                            NOW,
                            LONG_MS,
                            &mut fx,
                        );
                        assert_eq!(recorded, Ok(true), "a live claim's record lands");
                    }
                    ClaimOutcome::Replay(r) => {
                        assert_eq!(
                            r.headers,
                            response(k, 0, 0, 0).headers,
                            "the key's own record"
                        );
                        assert!(r.body_omitted || r.body.first() == Some(&(k as u8)));
                    }
                    ClaimOutcome::InFlight | ClaimOutcome::Full => {}
                    ClaimOutcome::Mismatch => panic!("one payload a key"),
                }
            }
        }
        gauge += fx.bytes;
    }
    gauge
}

#[test]
fn claims_records_and_the_budget_hold_in_every_sampled_interleaving() {
    run_seeds(1..=1000, TableMadeBy::Configuration);
}

/// A configuration with a new table shape, loaded while traffic runs: every
/// worker's VM creates the table in its `on_configure`, at once, and serves
/// requests as soon as its own call returns, while the others' still run.
#[test]
fn a_table_created_by_every_worker_at_once_loses_no_claim() {
    run_seeds(1..=500, TableMadeBy::EveryWorker);
}

#[derive(Clone, Copy, PartialEq)]
enum TableMadeBy {
    /// Once, before the workers start (Envoy's main thread).
    Configuration,
    /// Each actor's first steps.
    EveryWorker,
}

fn run_seeds(seeds: std::ops::RangeInclusive<u64>, made_by: TableMadeBy) {
    for seed in seeds {
        // One bucket of two slots for three keys (entries are evicted too),
        // and room for about two records (bytes are reclaimed).
        let table = LocalTable::new(1, 2, 2 * charge(1_000));
        let map: Arc<Map> = Arc::new(Mutex::new((HashMap::new(), 0)));
        let actors = 3;
        let baton = Arc::new(Baton::new(actors, seed));
        let holders = Holders::default();
        let plain = Stepped {
            map: map.clone(),
            baton: Arc::new(Baton::new(1, 1)),
            me: 0,
            table: table.clone(),
            audited: false,
        };
        if made_by == TableMadeBy::Configuration {
            table.init(&plain).unwrap();
        }
        let gauge: i64 = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..actors)
                .map(|me| {
                    let s = Stepped {
                        map: map.clone(),
                        baton: baton.clone(),
                        me,
                        table: table.clone(),
                        audited: true,
                    };
                    let (baton, holders) = (baton.clone(), &holders);
                    scope.spawn(move || {
                        baton.wait_turn(me);
                        let moved = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            if made_by == TableMadeBy::EveryWorker {
                                s.table.init(&s).unwrap();
                            }
                            actor(&s, holders, seed * 31 + me as u64)
                        }));
                        baton.finish(me);
                        moved.unwrap_or_else(|e| std::panic::resume_unwind(e))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        // A last sweep, alone, takes back whatever garbage is left.
        let after = table.sweep(&plain, 0, table.buckets, NOW).space.bytes;
        audit_budget(
            &table,
            |key| map.lock().unwrap().0.get(key).map(|(v, _)| v.clone()),
            "after the last sweep",
        );
        assert_eq!(
            (gauge + after) as u64,
            table.charged(&plain).unwrap(),
            "seed {seed}: the gauge is what the table is charged"
        );
    }
}
