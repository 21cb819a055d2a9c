#![no_main]
//! Any bytes a client can put in Idempotency-Key headers.
use idempotency_filter::key::{parse_key, parse_key_headers, to_sf_string};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = parse_key(data, 255) {
        // A key that parses serialises back to itself.
        assert_eq!(parse_key(to_sf_string(&key).as_bytes(), 255).ok(), Some(key));
    }
    let parts: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let _ = parse_key_headers(&parts, 64);
});
