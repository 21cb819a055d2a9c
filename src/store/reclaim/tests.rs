//! The sweep and eviction for space: bytes come back, never a newer record's,
//! never a running request's, and the budget holds. By concern: `sweep`,
//! `space` (room for a record), `races` (other workers' steps between a
//! read and a write).

use super::super::budget::{charge, SpaceEffects};
use super::super::local::{LocalTable, State};
use super::super::testing::Audited;
use super::super::{Claim, ClaimOutcome, SharedData, SweepStats};
use crate::fake_host::FakeShared;
use crate::record::{DataRecord, StoredResponse};
use crate::store::testing::{claimed, d, resp, FP, NO_LIMIT};
use std::cell::Cell;

mod races;
mod space;
mod sweep;

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
