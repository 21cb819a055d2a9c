//! Reference filters on the proxy-wasm SDK (0.2.5, as the product), for
//! `make bench`. The plugin configuration names the mode:
//!
//! * `sdk-fresh-floor`: the host work no SDK filter can skip for a fresh key
//!   on the local store, and nothing else: read the request headers and
//!   find the key; hold the request until its whole body has come and read
//!   it; one shared-data read and one write (the claim); read the response
//!   headers and copy each response chunk as it streams; one shared-data
//!   read and one write (the record). The record's write is conditional, as
//!   any correct store's must be: a request whose lock expired must not
//!   overwrite the claim that took its key over, and Envoy's set does not
//!   return the new CAS, so a conditional write needs a read first (here
//!   the 7-byte claim). No hashing, no record format, no metrics.
//! * `sdk-replay-floor`: the same for a replay: read the headers, hold and
//!   read the body, one shared-data read of a record of the response's
//!   size, a 1 KiB local response.
//! * `sdk-redis-fresh-floor`: the same for a fresh key on the Redis store,
//!   with the worker's group commit ([`redis_floor`]).
//! * `sdk-apisix-replay-floor` and `sdk-apisix-fresh-floor`: the same on
//!   APISIX's runtime, one call at a time within the request
//!   ([`apisix_floor`]).
//! * any other configuration: no-op, every callback answers Continue: what
//!   any SDK filter costs the host (VM entries per request).
//!
//! Bench code, not the product: it may unwrap.
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use std::rc::Rc;

mod apisix_floor;
mod redis_floor;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Noop,
    FreshFloor,
    ReplayFloor,
}

struct Root {
    id: u32,
    mode: Mode,
    redis: Option<Rc<redis_floor::Worker>>,
    /// APISIX floors: Webdis and the upstream, and whether keys are fresh.
    apisix: Option<(String, String, bool)>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, _: u32, _: usize, body_size: usize, _: usize) {
        if let Some(worker) = &self.redis {
            worker.on_http_call_response(body_size);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let has = |s: &[u8]| config.windows(s.len()).any(|w| w == s);
        if has(b"sdk-apisix-replay-floor") || has(b"sdk-apisix-fresh-floor") {
            let text = String::from_utf8_lossy(&config);
            self.apisix = Some((
                apisix_floor::field(&text, "store"),
                apisix_floor::field(&text, "upstream"),
                has(b"sdk-apisix-fresh-floor"),
            ));
            return true;
        }
        if has(b"sdk-redis-fresh-floor") {
            self.redis = Some(redis_floor::Worker::new(self.id));
            return true;
        }
        self.mode = if has(b"sdk-fresh-floor") {
            Mode::FreshFloor
        } else if has(b"sdk-replay-floor") {
            Mode::ReplayFloor
        } else {
            Mode::Noop
        };
        true
    }

    fn on_queue_ready(&mut self, queue: u32) {
        if let Some(worker) = &self.redis {
            worker.on_queue_ready(queue);
        }
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        if let Some(worker) = &self.redis {
            return Some(Box::new(redis_floor::Stream::new(worker.clone(), id)));
        }
        if let Some((store, upstream, fresh)) = &self.apisix {
            return Some(Box::new(apisix_floor::Stream::new(
                store.clone(),
                upstream.clone(),
                *fresh,
            )));
        }
        Some(Box::new(Stream {
            mode: self.mode,
            key: String::new(),
            response: Vec::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    mode: Mode,
    key: String,
    response: Vec<u8>,
}

static REPLAY_BODY: [u8; 1024] = [b'x'; 1024];
/// What the product's record of that response weighs: the body and about
/// 60 bytes of status, owner and headers.
static REPLAY_RECORD: [u8; 1090] = [b'r'; 1090];

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        if self.mode == Mode::Noop {
            return Action::Continue;
        }
        for (name, value) in self.get_http_request_headers() {
            if name == "idempotency-key" {
                // Bounded like the product's table: at most 100,000 slots
                // (the bench's keys end in a counter).
                let tail = &value[value.len().saturating_sub(5)..];
                self.key = format!("floor/{tail}");
            }
        }
        if end_of_stream {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.mode == Mode::Noop {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, size).unwrap_or_default();
        let (found, cas) = self.get_shared_data(&self.key);
        match self.mode {
            Mode::ReplayFloor => {
                // The record (a 1 KiB body and its status and headers) is
                // read on every replay; the first request stores one.
                if found.is_none() {
                    let _ = self.set_shared_data(&self.key, Some(&REPLAY_RECORD), None);
                }
                let _ = (body, found);
                self.send_http_response(
                    200,
                    vec![
                        ("content-type", "application/json"),
                        ("idempotent-replayed", "true"),
                    ],
                    Some(&REPLAY_BODY),
                );
                Action::Pause
            }
            _ => {
                let _ = self.set_shared_data(&self.key, Some(b"claimed"), cas);
                Action::Continue
            }
        }
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if self.mode == Mode::FreshFloor {
            let headers = self.get_http_response_headers();
            self.response
                .extend_from_slice(&(headers.len() as u32).to_le_bytes());
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.mode != Mode::FreshFloor {
            return Action::Continue;
        }
        if size > 0 {
            if let Some(chunk) = self.get_http_response_body(0, size) {
                self.response.extend_from_slice(&chunk);
            }
        }
        if end_of_stream {
            let (_, cas) = self.get_shared_data(&self.key);
            let _ = self.set_shared_data(&self.key, Some(&self.response), cas);
        }
        Action::Continue
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> {
        Box::new(Root { id, mode: Mode::Noop, redis: None, apisix: None })
    });
}}
