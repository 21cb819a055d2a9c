#![no_main]
//! Any bytes a client can put in Idempotency-Key headers, in either syntax.
use idempotency_filter::key::{parse_key, parse_key_headers, parse_opaque_key, to_sf_string, KeySyntax};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = parse_key(data, 255) {
        // A key that parses serialises back to itself.
        assert_eq!(parse_key(to_sf_string(&key).as_bytes(), 255).ok(), Some(key));
    }
    if let Ok(key) = parse_opaque_key(data, 255) {
        // An opaque key is its own value: reading it again changes nothing.
        assert_eq!(parse_opaque_key(key.as_bytes(), 255).ok(), Some(key));
    }
    let parts: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let _ = parse_key_headers(&parts, 64);
    let _ = KeySyntax::Opaque.parse_headers(&parts, 64);
});
