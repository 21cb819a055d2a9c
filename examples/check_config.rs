//! Validates plugin configurations before they reach a gateway: the same
//! parser and checks as the filter's `on_configure`.
//!
//!     cargo run --example check_config -- conf.json [more.json ...]
//!     echo '{"ttl_seconds": 0}' | cargo run --example check_config
//!
//! Prints `ok: <file>` or the exact line the filter would log, and exits 1
//! if any configuration is refused.

use idempotency_filter::config::Config;
use std::io::Read;

fn main() {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    let inputs: Vec<(String, Vec<u8>)> = if paths.is_empty() {
        let mut buf = Vec::new();
        if let Err(e) = std::io::stdin().read_to_end(&mut buf) {
            eprintln!("cannot read stdin: {e}");
            std::process::exit(2);
        }
        vec![("<stdin>".to_string(), buf)]
    } else {
        paths
            .into_iter()
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap_or_else(|e| {
                    eprintln!("cannot read {p}: {e}");
                    std::process::exit(2);
                });
                (p, bytes)
            })
            .collect()
    };
    let mut failed = false;
    for (name, bytes) in inputs {
        match Config::parse(&bytes) {
            Ok(_) => println!("ok: {name}"),
            Err(e) => {
                println!("{name}: {e}");
                failed = true;
            }
        }
    }
    std::process::exit(i32::from(failed));
}
