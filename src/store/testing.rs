//! Helpers shared by the slot table's unit tests.

use super::budget::charge;
use super::local::LocalTable;
use super::{Claim, ClaimEffects, ClaimOutcome, SharedData};
use crate::fake_host::FakeShared;
use crate::fingerprint::Digest16;
use crate::record::{DataRecord, StoredResponse};
use std::cell::Cell;

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

/// Shared data that checks the budget after every single write, so that a
/// step order that exceeds it even for an instant fails the test: each
/// bucket within its share, and every slot's bytes within what its entry is
/// charged (beyond the tombstone every slot starts with).
pub struct Audited<'a> {
    inner: &'a FakeShared,
    table: LocalTable,
    writes: Cell<u32>,
}

impl<'a> Audited<'a> {
    pub fn new(inner: &'a FakeShared, table: &LocalTable) -> Audited<'a> {
        Audited {
            inner,
            table: table.clone(),
            writes: Cell::new(0),
        }
    }

    pub fn audit(&self) {
        audit_budget(
            &self.table,
            |key| self.inner.peek(key),
            &format!("after write {}", self.writes.get()),
        );
    }
}

/// The budget as the values `value_of` shows: each bucket within its share,
/// and every slot's bytes within what its entry is charged (beyond the
/// tombstone every slot starts with).
pub fn audit_budget(t: &LocalTable, value_of: impl Fn(&str) -> Option<Vec<u8>>, when: &str) {
    for b in 0..t.buckets {
        let Some(bytes) = value_of(&t.bucket_key(b)) else {
            continue;
        };
        let bucket = super::bucket::Bucket::decode(&bytes, t.ways).unwrap();
        assert!(
            bucket.charged() <= t.budget.share(),
            "bucket {b} charged {} over its share {} {when}",
            bucket.charged(),
            t.budget.share(),
        );
        for (way, e) in bucket.entries.iter().enumerate() {
            let data = value_of(&t.data_key(t.slot_of(b, way)))
                .unwrap_or_else(|| panic!("slot {way} of bucket {b} has no data key {when}"));
            if data == DataRecord::tombstone() {
                continue;
            }
            assert!(
                charge(data.len() as u64) <= u64::from(e.data_bytes),
                "slot {way} of bucket {b} holds {} bytes, charged {} ({:?}) {when}",
                data.len(),
                e.data_bytes,
                e.state,
            );
        }
    }
}

impl SharedData for Audited<'_> {
    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, crate::host::HostError> {
        self.inner.shared_get(key)
    }
    fn shared_set(
        &self,
        k: &str,
        v: &[u8],
        c: Option<u32>,
    ) -> Result<bool, crate::host::HostError> {
        let r = self.inner.shared_set(k, v, c);
        self.writes.set(self.writes.get() + 1);
        self.audit();
        r
    }
}
