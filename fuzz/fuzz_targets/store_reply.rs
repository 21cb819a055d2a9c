#![no_main]
//! What the Redis front end (or anything posing as it) answers to a batch,
//! each operation's share of it, and the base64 the filter decodes. (Header
//! maps: the `header_map` target.)
use idempotency_filter::store::batch::{answer, BatchAnswer};
use idempotency_filter::store::redis::{RedisConfig, RedisStore};
use idempotency_filter::wire::{base64_decode, base64_encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let store = RedisStore::new(RedisConfig::with_defaults("webdis"));
    let status = data.first().map(|b| if b % 4 == 0 { 503 } else { 200 });
    let count = data.get(1).map_or(1, |b| usize::from(b % 5));
    if let BatchAnswer::Each(replies) = answer(status, data, count) {
        assert_eq!(replies.len(), count);
        for reply in replies {
            let _ = store.claim_outcome(reply.clone(), &[0xab; 16], &[1; 16], 7);
            let _ = store.complete_outcome(reply.clone());
            let _ = store.release_outcome(reply.clone());
            let _ = store.cancel_outcome(reply);
        }
    }
    // Each operation's reply as it would come out of a well-formed batch.
    let text = String::from_utf8_lossy(data).into_owned();
    let _ = store.claim_outcome(Ok(text), &[0xab; 16], &[1; 16], 7);
    if let Some(bytes) = base64_decode(data) {
        assert_eq!(base64_encode(&bytes).as_bytes(), data);
    }
});
