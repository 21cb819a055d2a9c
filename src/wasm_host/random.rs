//! Random numbers for owner tokens and generated keys: one WASI
//! `random_get` per VM seeds a generator that needs no host call after.

use super::abi::host_log;
use crate::host::Level;
use crate::wire::Rng;
use std::cell::RefCell;

thread_local! {
    pub(super) static RNG: RefCell<Rng> = RefCell::new(seeded_rng());
}

/// One host call per VM (getrandom: WASI `random_get` on wasip1); the
/// generator then makes each token without a host call.
fn seeded_rng() -> Rng {
    let mut seed = [0u8; 40];
    // If random_get fails the clock alone seeds the generator: tokens stay
    // unique per VM, but log it because generated keys become guessable.
    if getrandom::fill(&mut seed[..32]).is_err() {
        host_log(
            Level::Warn,
            "WASI random_get failed; seeding from the clock",
        );
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    seed[32..].copy_from_slice(&t.to_le_bytes());
    Rng::new(&seed)
}
