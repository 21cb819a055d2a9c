#![no_main]
//! What the Redis front end (or anything posing as it) answers, and the
//! base64 the filter decodes. (Header maps: the `header_map` target.)
use idempotency_filter::store::redis::{RedisConfig, RedisStore};
use idempotency_filter::wire::{base64_decode, base64_encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let store = RedisStore::new(RedisConfig::with_defaults("webdis"));
    let status = data.first().map_or(200, |b| if b % 4 == 0 { 503 } else { 200 });
    let _ = store.claim_outcome(status, data, &[0xab; 16], &[1; 16], 7);
    let _ = store.complete_outcome(status, data);
    let _ = store.release_outcome(status, data);
    let _ = store.cancel_outcome(status, data);
    if let Some(bytes) = base64_decode(data) {
        assert_eq!(base64_encode(&bytes).as_bytes(), data);
    }
});
