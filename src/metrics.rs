//! Counters and gauges, defined once per VM with `define_metric`. Envoy shows
//! them in `/stats` as `wasmcustom.idempotency.<name>`.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Keyed requests on a protected method that reached a decision.
    Protected,
    /// Protected-method requests without a key, forwarded unprotected.
    Unkeyed,
    Replays,
    Conflicts,
    Mismatches,
    InvalidKey,
    TooLarge,
    Stored,
    Released,
    Evicted,
    Expired,
    StoreFull,
    StoreErrors,
    /// Store unavailable with `on_unavailable: allow`: forwarded unprotected.
    StoreBypassed,
    /// A completion found its claim gone (lock expired and taken over).
    ClaimsLost,
    /// Gauge: records (in flight or completed) the store holds now.
    Entries,
    /// Redis store: answers (replays, 422s) the gateway's replay cache gave
    /// without asking Redis.
    CacheHits,
    /// Redis store: claims whose call timed out, cancelled so that they do
    /// not hold the key once Redis catches up (counted when sent).
    ClaimsCancelled,
    /// Claims of running requests renewed from the tick (Envoy), so that a
    /// slow upstream keeps its claim past `lock_timeout_seconds`.
    ClaimsRenewed,
    /// Keys whose outcome was unknowable (the exchange ended mid-response, an
    /// upstream reset), recorded as the `outcome-unknown` problem.
    OutcomesUnknown,
    /// Redis store: HTTP calls to the store, and the operations (claims,
    /// records, releases, cancels, renewals) they carried: on Envoy a
    /// worker batches its requests' operations, so the mean batch size is
    /// `store_operations / store_calls`.
    StoreCalls,
    StoreOperations,
    /// Gauge: bytes of recorded responses in shared data (the local store
    /// and the replay cache), as charged to `store.max_bytes`. Moves with
    /// every committed change, never reset, so it does not lag.
    BytesHeld,
    /// Live completed records evicted to fit a new record in its bucket's
    /// share of `store.max_bytes` (local store).
    EvictedForSpace,
    /// Responses recorded without their body: larger than
    /// `max_response_body_bytes`, or than the store's byte budget allows.
    BodiesOmitted,
    /// A VM's running requests held `max_in_flight_bytes` of bodies: a
    /// forwarding-mode request refused (503), or a response's copy for its
    /// record given up (the record keeps no body; `bodies_omitted` too).
    InFlightFull,
}

impl Metric {
    pub const ALL: [Metric; 26] = [
        Metric::Protected,
        Metric::Unkeyed,
        Metric::Replays,
        Metric::Conflicts,
        Metric::Mismatches,
        Metric::InvalidKey,
        Metric::TooLarge,
        Metric::Stored,
        Metric::Released,
        Metric::Evicted,
        Metric::Expired,
        Metric::StoreFull,
        Metric::StoreErrors,
        Metric::StoreBypassed,
        Metric::ClaimsLost,
        Metric::Entries,
        Metric::CacheHits,
        Metric::ClaimsCancelled,
        Metric::ClaimsRenewed,
        Metric::OutcomesUnknown,
        Metric::StoreCalls,
        Metric::StoreOperations,
        Metric::BytesHeld,
        Metric::EvictedForSpace,
        Metric::BodiesOmitted,
        Metric::InFlightFull,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::Protected => "idempotency.requests_protected",
            Metric::Unkeyed => "idempotency.requests_unkeyed",
            Metric::Replays => "idempotency.replays",
            Metric::Conflicts => "idempotency.conflicts",
            Metric::Mismatches => "idempotency.mismatches",
            Metric::InvalidKey => "idempotency.invalid_keys",
            Metric::TooLarge => "idempotency.too_large",
            Metric::Stored => "idempotency.stored",
            Metric::Released => "idempotency.released",
            Metric::Evicted => "idempotency.evicted",
            Metric::Expired => "idempotency.expired",
            Metric::StoreFull => "idempotency.store_full",
            Metric::StoreErrors => "idempotency.store_errors",
            Metric::StoreBypassed => "idempotency.store_bypassed",
            Metric::ClaimsLost => "idempotency.claims_lost",
            Metric::Entries => "idempotency.entries",
            Metric::CacheHits => "idempotency.cache_hits",
            Metric::ClaimsCancelled => "idempotency.claims_cancelled",
            Metric::ClaimsRenewed => "idempotency.claims_renewed",
            Metric::OutcomesUnknown => "idempotency.outcomes_unknown",
            Metric::StoreCalls => "idempotency.store_calls",
            Metric::StoreOperations => "idempotency.store_operations",
            Metric::BytesHeld => "idempotency.bytes_held",
            Metric::EvictedForSpace => "idempotency.evicted_for_space",
            Metric::BodiesOmitted => "idempotency.bodies_omitted",
            Metric::InFlightFull => "idempotency.in_flight_full",
        }
    }

    pub fn is_gauge(self) -> bool {
        matches!(self, Metric::Entries | Metric::BytesHeld)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_metric_in_index_order() {
        for (i, m) in Metric::ALL.iter().enumerate() {
            assert_eq!(m.index(), i);
            assert!(m.name().starts_with("idempotency."));
        }
    }
}
