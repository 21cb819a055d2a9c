#![no_main]
//! Plugin configurations: refused with a message, never a panic.
use idempotency_filter::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = Config::parse(data) {
        assert!(e.to_string().starts_with("invalid configuration: "));
    }
});
