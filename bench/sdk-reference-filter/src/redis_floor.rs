//! `sdk-redis-fresh-floor`: the host work no SDK filter can skip for a fresh
//! key on the Redis store with the worker's group commit, and nothing else.
//!
//! ```text
//! request:  read headers, find the key ─▶ hold and read the body ─▶ claim op
//! response: copy chunks as they stream ─▶ hold the last one ─▶ record op
//! op ─▶ waiting (wakes the root through the VM's queue only if no batch is
//!       out and no wake is pending) ─▶ root: one batch out at a time, up to
//!       64 ops, one EVALSHA through Webdis ─▶ answer: the root resumes each
//!       op's stream (acting for it)
//! ```
//! Redis does the least any store must: `SET key 1 NX PX 60000` per claim,
//! `SET key <record> PX 86400000` per record (records back to back in the
//! PUT body, their lengths in the path), one answer byte per operation.
//! Keys are bounded: 100,000 per VM, under a random prefix per VM. No record
//! format, no fingerprint, no renewal, no metrics.
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt::Write;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::Duration;

/// KEYS[i]: op i's key. ARGV[1]: the ops' kinds (`C` claim, `W` record);
/// then each record's length; the last argument is the body (the records).
const SCRIPT: &str = "local kinds, out, a, at = ARGV[1], {}, 2, 1 \
for i = 1, #kinds do \
if string.byte(kinds, i) == 67 then \
out[i] = redis.call('SET', KEYS[i], '1', 'NX', 'PX', 60000) and '1' or '0' \
else local n = tonumber(ARGV[a]) a = a + 1 \
redis.call('SET', KEYS[i], string.sub(ARGV[#ARGV], at, at + n - 1), 'PX', 86400000) \
at = at + n out[i] = '1' end \
end \
return table.concat(out)";
/// SHA-1 of [`SCRIPT`]: a wrong one would fail every batch after the first.
const SCRIPT_SHA1: &str = "190b96112150880a5de5030701b951d62648a095";
const MAX_BATCH_OPS: usize = 64;

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    /// Reading the request; no key: the floor does nothing for it.
    Request,
    Claiming,
    Forwarded,
    Writing,
    Done,
}

struct Op {
    stream: u32,
    phase: Rc<Cell<Phase>>,
    key: String,
    record: Option<Vec<u8>>,
}

/// The worker's group commit, owned by its VM's root context.
pub struct Worker {
    root: u32,
    queue: u32,
    prefix: String,
    /// Numbers the keys (the key's own tail repeats from one wrk run to the
    /// next, and a claim on a recorded key would not be a fresh key's).
    keys: Cell<u32>,
    waiting: RefCell<VecDeque<Op>>,
    /// The batch that is out.
    out: RefCell<Option<Vec<Op>>>,
    woken: Cell<bool>,
    /// Redis has the script: send it by SHA-1 (after the first answer).
    by_sha: Cell<bool>,
}

impl Worker {
    pub fn new(root: u32) -> Rc<Worker> {
        // std seeds RandomState from WASI random_get: random per VM.
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let name = format!("sdk-redis-fresh-floor/{random:016x}");
        Rc::new(Worker {
            root,
            queue: hostcalls::register_shared_queue(&name).unwrap(),
            prefix: format!("floor-{random:016x}:"),
            keys: Cell::new(0),
            waiting: RefCell::new(VecDeque::new()),
            out: RefCell::new(None),
            woken: Cell::new(false),
            by_sha: Cell::new(false),
        })
    }

    fn push(&self, op: Op) {
        if self.out.borrow().is_none() && !self.woken.get() {
            hostcalls::enqueue_shared_queue(self.queue, Some(b"1")).unwrap();
            self.woken.set(true);
        }
        self.waiting.borrow_mut().push_back(op);
    }

    pub fn on_queue_ready(&self, queue: u32) {
        if queue != self.queue {
            return;
        }
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue) {}
        self.woken.set(false);
        self.send();
    }

    /// The next batch, if none is out and ops wait.
    fn send(&self) {
        let mut waiting = self.waiting.borrow_mut();
        if self.out.borrow().is_some() || waiting.is_empty() {
            return;
        }
        let n = waiting.len().min(MAX_BATCH_OPS);
        let mut ops: Vec<Op> = waiting.drain(..n).collect();
        let mut path = String::new();
        if self.by_sha.get() {
            write!(path, "/EVALSHA/{SCRIPT_SHA1}/{n}").unwrap();
        } else {
            path.push_str("/EVAL/");
            encode(&mut path, SCRIPT);
            write!(path, "/{n}").unwrap();
        }
        for op in &ops {
            path.push('/');
            encode(&mut path, &op.key);
        }
        path.push('/');
        path.extend(
            ops.iter()
                .map(|op| if op.record.is_some() { 'W' } else { 'C' }),
        );
        let mut body = Vec::new();
        for record in ops.iter_mut().filter_map(|op| op.record.take()) {
            write!(path, "/{}", record.len()).unwrap();
            body.extend_from_slice(&record);
        }
        let method = if body.is_empty() { "GET" } else { "PUT" };
        let headers = vec![
            (":method", method),
            (":path", &path),
            (":authority", "webdis"),
        ];
        let body = (!body.is_empty()).then_some(&body[..]);
        hostcalls::dispatch_http_call("webdis", headers, body, vec![], Duration::from_millis(500))
            .unwrap();
        *self.out.borrow_mut() = Some(ops);
    }

    /// The batch's answer: each op's stream goes on (a failed claim: 503).
    pub fn on_http_call_response(&self, body_size: usize) {
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status");
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size);
        let redis_error = body
            .ok()
            .flatten()
            .is_some_and(|b| b.windows(6).any(|w| w == b"[false"));
        let ok = status.ok().flatten().as_deref() == Some("200") && !redis_error;
        // Not ok: NOSCRIPT (Redis restarted), say; the next batch goes by source.
        self.by_sha.set(ok);
        for op in self.out.borrow_mut().take().unwrap_or_default() {
            let claim = op.phase.get() == Phase::Claiming;
            op.phase
                .set(if claim { Phase::Forwarded } else { Phase::Done });
            if hostcalls::set_effective_context(op.stream).is_err() {
                continue; // the stream has gone
            }
            match (claim, ok) {
                (true, true) => hostcalls::resume_http_request().unwrap(),
                (true, false) => hostcalls::send_http_response(503, vec![], None).unwrap(),
                (false, _) => hostcalls::resume_http_response().unwrap(),
            }
        }
        hostcalls::set_effective_context(self.root).unwrap();
        self.send();
    }
}

/// Percent-encodes a Webdis path segment: all but `A-Za-z0-9-_~` (a dot
/// too: Webdis reads one in the last segment as a format suffix).
fn encode(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_~".contains(&b) {
            out.push(b as char);
        } else {
            write!(out, "%{b:02X}").unwrap();
        }
    }
}

pub struct Stream {
    worker: Rc<Worker>,
    id: u32,
    phase: Rc<Cell<Phase>>,
    key: String,
    record: Vec<u8>,
    /// Response body bytes seen, and its Content-Length.
    seen: usize,
    expected: Option<usize>,
}

impl Stream {
    pub fn new(worker: Rc<Worker>, id: u32) -> Stream {
        Stream {
            worker,
            id,
            phase: Rc::new(Cell::new(Phase::Request)),
            key: String::new(),
            record: Vec::new(),
            seen: 0,
            expected: None,
        }
    }

    fn push(&mut self, phase: Phase, record: Option<Vec<u8>>) -> Action {
        self.phase.set(phase);
        self.worker.push(Op {
            stream: self.id,
            phase: self.phase.clone(),
            key: self.key.clone(),
            record,
        });
        Action::Pause
    }
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        let worker = &self.worker;
        if self
            .get_http_request_headers()
            .iter()
            .any(|(name, _)| name == "idempotency-key")
        {
            let n = worker.keys.get();
            worker.keys.set((n + 1) % 100_000);
            self.key = format!("{}{n}", worker.prefix);
        }
        if self.key.is_empty() {
            self.phase.set(Phase::Done);
            return Action::Continue;
        }
        if end_of_stream {
            return self.push(Phase::Claiming, None);
        }
        Action::Pause
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        match self.phase.get() {
            Phase::Request if end_of_stream => {
                let _body = self.get_http_request_body(0, size);
                self.push(Phase::Claiming, None)
            }
            Phase::Request | Phase::Claiming => Action::Pause,
            _ => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if self.phase.get() == Phase::Forwarded {
            for (name, value) in self.get_http_response_headers() {
                match name.as_str() {
                    ":status" => self.record.extend_from_slice(value.as_bytes()),
                    "content-length" => self.expected = value.parse().ok(),
                    _ => {}
                }
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        match self.phase.get() {
            Phase::Writing => return Action::Pause,
            Phase::Forwarded => {}
            _ => return Action::Continue,
        }
        if size > 0 {
            if let Some(chunk) = self.get_http_response_body(0, size) {
                self.record.extend_from_slice(&chunk);
            }
        }
        self.seen += size;
        // The last chunk: with a Content-Length, before Envoy's empty
        // end-of-stream frame. Held until the record is written.
        if end_of_stream || self.expected.is_some_and(|n| self.seen >= n) {
            let record = std::mem::take(&mut self.record);
            return self.push(Phase::Writing, Some(record));
        }
        Action::Continue
    }
}
