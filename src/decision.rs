//! The decision: what to do with a keyed request given what the store holds
//! for its key. Every store (the local slot table, Redis) feeds its record
//! through this one function so the semantics cannot drift between stores.

use crate::fingerprint::Digest16;

/// What the store holds for a key, as far as the decision is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Claimed by a request that has not completed; the claim is abandoned at
    /// `lock_deadline_ms` (the gateway died or the client left mid-request).
    InFlight {
        fingerprint: Digest16,
        lock_deadline_ms: u64,
    },
    /// A recorded response, replayable until `expires_ms`.
    Completed {
        fingerprint: Digest16,
        expires_ms: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No live record: claim the key and forward the request.
    Execute,
    /// The previous claim was abandoned: take it over and forward.
    TakeOver,
    /// The original is still running: 409.
    Conflict,
    /// The key was used with another payload: 422, record untouched.
    Mismatch,
    /// Replay the recorded response.
    Replay,
}

/// A payload mismatch wins over "in flight": the client reused a key for a
/// different request, which retrying later would not fix (draft-07 section 2.7
/// gives both errors without an order; this one tells the client the truth
/// that matters more).
pub fn decide(existing: Option<&Existing>, fingerprint: &Digest16, now_ms: u64) -> Decision {
    match existing {
        None => Decision::Execute,
        Some(Existing::InFlight {
            lock_deadline_ms, ..
        }) if now_ms >= *lock_deadline_ms => Decision::TakeOver,
        Some(Existing::Completed { expires_ms, .. }) if now_ms >= *expires_ms => Decision::Execute,
        Some(Existing::InFlight { fingerprint: f, .. }) => {
            if f == fingerprint {
                Decision::Conflict
            } else {
                Decision::Mismatch
            }
        }
        Some(Existing::Completed { fingerprint: f, .. }) => {
            if f == fingerprint {
                Decision::Replay
            } else {
                Decision::Mismatch
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Digest16 = [1; 16];
    const B: Digest16 = [2; 16];

    #[test]
    fn decision_table() {
        let inflight = |fp, d| Existing::InFlight {
            fingerprint: fp,
            lock_deadline_ms: d,
        };
        let done = |fp, e| Existing::Completed {
            fingerprint: fp,
            expires_ms: e,
        };
        let cases = [
            (None, 0, Decision::Execute),
            (Some(inflight(A, 100)), 99, Decision::Conflict),
            (Some(inflight(B, 100)), 99, Decision::Mismatch),
            (Some(inflight(A, 100)), 100, Decision::TakeOver),
            (Some(inflight(B, 100)), 150, Decision::TakeOver),
            (Some(done(A, 100)), 99, Decision::Replay),
            (Some(done(B, 100)), 99, Decision::Mismatch),
            (Some(done(A, 100)), 100, Decision::Execute),
            (Some(done(B, 100)), 100, Decision::Execute),
        ];
        for (existing, now, expected) in cases {
            assert_eq!(
                decide(existing.as_ref(), &A, now),
                expected,
                "{existing:?} at {now}"
            );
        }
    }
}
