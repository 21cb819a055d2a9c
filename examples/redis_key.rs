//! Prints the Redis key under which a gateway keeps an idempotency key's
//! state, so that an operator can inspect or delete one record:
//!
//!     cargo run -q --example redis_key -- conf.json '"order-1001"' 'Bearer sk_live_...'
//!     redis-cli GET "$(cargo run -q --example redis_key -- conf.json '"order-1001"' 'Bearer ...')"
//!
//! Arguments: the plugin configuration (a Redis store), the `Idempotency-Key`
//! header exactly as the client sent it, then one value per `scope_headers`
//! entry, in order (`-` for a header the request did not carry). The key is
//! `key_prefix` + hex of the same digest the filter computes; nothing else
//! about the request is needed.

use idempotency_filter::config::{Config, StoreConfig};
use idempotency_filter::fingerprint::key_digest;
use idempotency_filter::store::redis::RedisStore;

fn fail(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [conf_path, key_header, scope @ ..] = args.as_slice() else {
        fail("usage: redis_key CONFIG.json KEY-HEADER-VALUE [SCOPE-HEADER-VALUE|- ...]");
    };
    let bytes = std::fs::read(conf_path)
        .unwrap_or_else(|e| fail(&format!("cannot read the configuration {conf_path}: {e}")));
    let config = Config::parse(&bytes).unwrap_or_else(|e| {
        fail(&format!(
            "{conf_path}: {e}\n(make check-config FILES={conf_path} explains it further)"
        ))
    });
    let StoreConfig::Redis { redis, .. } = &config.store else {
        fail(
            "the configuration's store is not Redis: the local store lives in Envoy's shared data",
        );
    };
    if scope.len() != config.scope_headers.len() {
        fail(&format!(
            "scope_headers is {}: give one value per header after the key, in that order \
             (- for a header the request did not carry); got {}",
            config.scope_headers.join(", "),
            scope.len()
        ));
    }
    // As the filter reads it: structured or opaque (`key_syntax`).
    let key = match config
        .key_syntax
        .parse_headers(&[key_header.as_bytes()], config.max_key_length)
    {
        Ok(Some(k)) => k,
        Ok(None) => fail("empty key"),
        Err(e) => fail(&format!(
            "the filter would refuse this key with 400 invalid-key: {e}"
        )),
    };
    let scope: Vec<Option<&[u8]>> = scope
        .iter()
        .map(|v| (v != "-").then_some(v.as_bytes()))
        .collect();
    let store = RedisStore::new(redis.clone());
    println!("{}", store.redis_key(&key_digest(&scope, &key)));
}
