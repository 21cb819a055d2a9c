//! A client that pays N times through the gateway and retries like a careful
//! client should: one Idempotency-Key per payment, a timeout per attempt,
//! exponential backoff with full jitter between attempts, and Retry-After
//! honoured on 409. At the end it asks the payment service how often it
//! executed those payments: with the filter in front, exactly N.
//!
//!     cargo run --release --example payments_client -- \
//!         --gateway 127.0.0.1:10000 --upstream 127.0.0.1:8081 -n 50
//!
//! Options: --timeout-ms (2000) --base-ms (50) --cap-ms (2000)
//! --attempts (12) --seed (random). Exit status 0 when executions == N.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

struct Options {
    gateway: String,
    upstream: String,
    n: u32,
    timeout: Duration,
    base_ms: u64,
    cap_ms: u64,
    attempts: u32,
    seed: u64,
}

fn parse_options() -> Result<Options, String> {
    let mut o = Options {
        gateway: "127.0.0.1:10000".into(),
        upstream: "127.0.0.1:8081".into(),
        n: 20,
        timeout: Duration::from_millis(2000),
        base_ms: 50,
        cap_ms: 2000,
        attempts: 12,
        seed: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {value}"))
        };
        match flag.as_str() {
            "--gateway" => o.gateway = value.clone(),
            "--upstream" => o.upstream = value.clone(),
            "-n" => o.n = num()? as u32,
            "--timeout-ms" => o.timeout = Duration::from_millis(num()?),
            "--base-ms" => o.base_ms = num()?,
            "--cap-ms" => o.cap_ms = num()?,
            "--attempts" => o.attempts = num()? as u32,
            "--seed" => o.seed = num()?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(o)
}

/// xorshift64*: deterministic with --seed, so a run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Full jitter (AWS architecture blog): uniform in [0, min(cap, base * 2^attempt)].
    fn backoff(&mut self, attempt: u32, base_ms: u64, cap_ms: u64) -> Duration {
        let ceiling = base_ms.saturating_mul(1u64 << attempt.min(20)).min(cap_ms);
        Duration::from_millis(self.next() % (ceiling + 1))
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 exchange on a fresh connection. Any failure (refused, reset,
/// closed before a full response, timeout) is an Err: the client cannot know
/// whether the payment ran.
fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Response, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    s.write_all(body).map_err(|e| format!("send: {e}"))?;
    // Read by Content-Length, not to EOF: a proxy may keep the connection
    // open a while after the response (Envoy's delayed close).
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let end = loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let n = s.read(&mut buf).map_err(|e| format!("receive: {e}"))?;
        if n == 0 {
            return Err("connection closed before a response".into());
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or("bad status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let declared = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let mut body = raw[end + 4..].to_vec();
    match declared {
        Some(n) => {
            while body.len() < n {
                let got = s.read(&mut buf).map_err(|e| format!("receive: {e}"))?;
                if got == 0 {
                    return Err("connection closed mid-body".into());
                }
                body.extend_from_slice(&buf[..got]);
            }
            body.truncate(n);
        }
        None => {
            s.read_to_end(&mut body)
                .map_err(|e| format!("receive: {e}"))?;
        }
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

#[derive(Default)]
struct Tally {
    attempts: u32,
    retries: u32,
    lost: u32,
    conflicts: u32,
    replays: u32,
    server_errors: u32,
    failed: u32,
}

fn main() {
    let o = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("payments_client: {e}");
            std::process::exit(2);
        }
    };
    let mut rng = Rng(o.seed | 1);
    let mut t = Tally::default();
    let mut keys = Vec::new();
    let started = Instant::now();
    for i in 0..o.n {
        let key = format!("pay-{:016x}", rng.next());
        keys.push(key.clone());
        let body = format!("{{\"amount\": {}, \"order\": {i}}}", 100 + i);
        let mut done = false;
        for attempt in 0..o.attempts {
            if attempt > 0 {
                t.retries += 1;
            }
            t.attempts += 1;
            let headers = [
                ("Idempotency-Key", key.as_str()),
                ("Content-Type", "application/json"),
            ];
            let wait = match exchange(
                &o.gateway,
                "POST",
                "/payments",
                &headers,
                body.as_bytes(),
                o.timeout,
            ) {
                Ok(r) if (200..300).contains(&r.status) => {
                    if r.header("idempotent-replayed") == Some("true") {
                        t.replays += 1;
                    }
                    done = true;
                    break;
                }
                Ok(r) if r.status == 409 => {
                    t.conflicts += 1;
                    let secs = r
                        .header("retry-after")
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(1);
                    Duration::from_secs(secs)
                }
                Ok(r) if r.status >= 500 || r.status == 429 => {
                    t.server_errors += 1;
                    rng.backoff(attempt, o.base_ms, o.cap_ms)
                }
                Ok(r) => {
                    eprintln!(
                        "payment {i}: {} {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    );
                    break;
                }
                Err(_) => {
                    t.lost += 1;
                    rng.backoff(attempt, o.base_ms, o.cap_ms)
                }
            };
            std::thread::sleep(wait);
        }
        if !done {
            t.failed += 1;
        }
    }
    let executions = match exchange(&o.upstream, "GET", "/__executions", &[], b"", o.timeout) {
        Ok(r) => {
            let doc: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            keys.iter()
                .map(|k| doc["by_key"][k].as_u64().unwrap_or(0))
                .sum::<u64>()
        }
        Err(e) => {
            eprintln!("cannot read the upstream's executions: {e}");
            std::process::exit(2);
        }
    };
    println!("payments:            {}", o.n);
    println!("attempts:            {}", t.attempts);
    println!("retries:             {}", t.retries);
    println!("responses lost:      {}", t.lost);
    println!("409 in progress:     {}", t.conflicts);
    println!("5xx/429 answers:     {}", t.server_errors);
    println!("replayed answers:    {}", t.replays);
    println!("payments given up:   {}", t.failed);
    println!("upstream executions: {executions}");
    println!(
        "elapsed:             {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let exactly_once = executions == u64::from(o.n) && t.failed == 0;
    println!(
        "{}",
        if exactly_once {
            "exactly once: yes"
        } else {
            "exactly once: NO"
        }
    );
    std::process::exit(if exactly_once { 0 } else { 1 });
}
