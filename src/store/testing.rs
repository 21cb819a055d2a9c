//! Helpers shared by the slot table's unit tests.

use super::{Claim, ClaimEffects, ClaimOutcome};
use crate::fingerprint::Digest16;
use crate::record::StoredResponse;

/// A budget nothing in a test reaches (tests of everything but the budget).
pub const NO_LIMIT: u64 = u64::MAX;

pub const FP: Digest16 = [9; 16];

pub fn d(i: u32) -> Digest16 {
    crate::fingerprint::key_digest(&[], &format!("key-{i}"))
}

pub fn resp(body: &str) -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: body.as_bytes().to_vec(),
        body_omitted: false,
    }
}

pub fn claimed(o: (ClaimOutcome, ClaimEffects)) -> Claim {
    match o.0 {
        ClaimOutcome::Claimed(c) => c,
        other => panic!("expected a claim, got {other:?}"),
    }
}
