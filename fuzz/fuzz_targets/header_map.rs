#![no_main]
//! Header maps as a host serialises them, read in place: whatever the bytes,
//! a map or an error; a map re-encodes to bytes that decode to the same map.
use idempotency_filter::wire::{encode_pairs, HeaderMap};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(map) = HeaderMap::decode(data.to_vec()) {
        let list = map.to_list();
        let again = HeaderMap::decode(encode_pairs(&list));
        assert_eq!(again.map(|m| m.to_list()), Some(list));
    }
});
