//! Where key state lives. The local store keeps it in the proxy's shared data
//! through the [`SharedData`] seam; every store hands its records to
//! [`crate::decision::decide`], so they agree on semantics.

pub mod local;
pub mod redis;

use crate::host::HostError;
use crate::record::StoredResponse;
use std::fmt;

/// Proxy shared data with Envoy's semantics: values carry a CAS token; a set
/// with a stale CAS fails; a set on a missing key succeeds whatever CAS is
/// given; there is no delete, no TTL and no listing.
pub trait SharedData {
    /// `Ok(None)` when the key does not exist.
    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError>;
    /// `Ok(false)` when `cas` is stale (another writer came first).
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, HostError>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    Host(HostError),
    /// Bytes in the store that this version cannot read.
    Corrupt(&'static str),
    /// Every bounded CAS attempt lost to another writer.
    Contention,
    /// A completed record whose response bytes are gone.
    Inconsistent,
    /// The store could not be reached or answered an error (Redis store).
    Unavailable(String),
}

impl From<HostError> for StoreError {
    fn from(e: HostError) -> Self {
        StoreError::Host(e)
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Host(e) => write!(f, "{e}"),
            StoreError::Corrupt(what) => write!(f, "unreadable store data: {what}"),
            StoreError::Contention => write!(f, "store contention: every CAS attempt lost"),
            StoreError::Inconsistent => write!(f, "a completed record's response is missing"),
            StoreError::Unavailable(why) => write!(f, "store unavailable: {why}"),
        }
    }
}

/// Ownership of an in-flight key: only the holder may complete or release it,
/// and a claim that was abandoned and taken over is recognised as stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub slot: u32,
    pub epoch: u64,
    pub token: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    Claimed(Claim),
    InFlight,
    Mismatch,
    Replay(StoredResponse),
    /// No slot can take the key: all are held by live in-flight claims.
    Full,
}

/// Side effects of a claim, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClaimEffects {
    /// A free slot became occupied (the entries gauge grows).
    pub new_entry: bool,
    /// A live completed record was evicted to make room.
    pub evicted: bool,
    /// An expired record or abandoned claim was reused.
    pub expired: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Expired records and abandoned claims freed.
    pub freed: u32,
    /// Data slots whose response bytes were released.
    pub data_reclaimed: u32,
    /// Occupied slots seen in the swept buckets (resyncs the entries gauge).
    pub occupied: u64,
    /// Buckets whose sweep failed (host error, unreadable data).
    pub errors: u32,
}
