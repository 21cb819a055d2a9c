//! HTTP idempotency filter (IETF draft-ietf-httpapi-idempotency-key-header-07)
//! for proxy-wasm hosts.
//!
//! Everything except `wasm_host` is plain Rust with no proxy-wasm dependency:
//! key parsing, fingerprints, the record format, the decision, the stores and
//! the filter's phases all run natively under `cargo test`. `wasm_host` is the
//! one module that makes host calls and turns their statuses into errors.

// Tests may unwrap; the filter may not (Cargo.toml denies these lints).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod clock;
pub mod config;
pub mod decision;
pub mod envoy_reply;
pub mod filter;
pub mod fingerprint;
pub mod host;
pub mod in_flight;
pub mod key;
pub mod metrics;
pub mod problem;
pub mod record;
pub mod store;
pub mod wire;

#[cfg(test)]
pub mod fake_host;
#[cfg(test)]
pub mod fake_redis;
#[cfg(test)]
mod properties;

#[cfg(target_arch = "wasm32")]
mod wasm_host;
