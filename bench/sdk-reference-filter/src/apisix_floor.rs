//! APISIX floors: the host work of the product's path on APISIX (forwarding
//! mode, Redis through Webdis, one call at a time within the request), and
//! nothing else.
//!
//! ```text
//! sdk-apisix-replay-floor: headers ─▶ body ─▶ GET the record ─▶ answer 1 KiB
//! sdk-apisix-fresh-floor:  headers ─▶ body ─▶ SET NX (claim) ─▶ forward the
//!                          request ─▶ SET the answer's body (record) ─▶ relay
//!                          the upstream's answer
//! ```
//! Webdis's plain commands, no script: Redis does the least any store must.
//! No key parsing, fingerprint, record format, metrics or checks of what
//! Redis answered.
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(5);
/// Every replay reads this key; the first request writes it.
const RECORD_KEY: &str = "apisix-floor-record";

#[derive(Clone, Copy, PartialEq)]
enum Step {
    Request,
    Claiming,
    Forwarding,
    Recording,
    Reading,
}

pub struct Stream {
    /// Webdis and the upstream, as `host:port` (APISIX calls addresses).
    store: String,
    upstream: String,
    fresh: bool,
    step: Step,
    key: String,
    path: String,
    body: Vec<u8>,
    answer: Option<(u32, Vec<(String, String)>, Vec<u8>)>,
}

/// The value of `"name": "value"` in the plugin configuration (bench code:
/// no JSON parser).
pub fn field(config: &str, name: &str) -> String {
    let tag = format!("\"{name}\"");
    let rest = &config[config.find(&tag).unwrap() + tag.len()..];
    let start = rest.find('"').unwrap() + 1;
    let len = rest[start..].find('"').unwrap();
    rest[start..start + len].to_string()
}

impl Stream {
    pub fn new(store: String, upstream: String, fresh: bool) -> Stream {
        Stream {
            store,
            upstream,
            fresh,
            step: Step::Request,
            key: String::new(),
            path: String::new(),
            body: Vec::new(),
            answer: None,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&[u8]>, to_store: bool) {
        let target = if to_store { &self.store } else { &self.upstream };
        let headers = vec![(":method", method), (":path", path), (":authority", target.as_str())];
        self.dispatch_http_call(target, headers, body, vec![], TIMEOUT)
            .unwrap();
    }
}

impl Context for Stream {
    fn on_http_call_response(&mut self, _: u32, _: usize, body_size: usize, _: usize) {
        let body = self.get_http_call_response_body(0, body_size).unwrap_or_default();
        // A store command Redis refused would make the floor do less than
        // any store must: fail loudly (the request then fails in wrk's count).
        if self.step != Step::Forwarding && body.starts_with(b"{") && body.windows(7).any(|w| w == b"[false,") {
            panic!("webdis refused a floor command: {}", String::from_utf8_lossy(&body));
        }
        match self.step {
            Step::Reading => {
                if body.len() < 64 {
                    // The first request: store a record of a replay's size.
                    let record = [b'r'; 1090];
                    self.call("PUT", &format!("/SET/{RECORD_KEY}"), Some(&record), true);
                    self.step = Step::Recording;
                    self.answer = Some((200, vec![], vec![b'x'; 1024]));
                    return;
                }
                self.send_http_response(
                    200,
                    vec![("content-type", "application/json"), ("idempotent-replayed", "true")],
                    Some(&[b'x'; 1024]),
                );
            }
            Step::Claiming => {
                let headers = vec![
                    (":method", "POST"),
                    (":path", self.path.as_str()),
                    (":authority", "upstream"),
                    ("content-type", "application/json"),
                ];
                self.dispatch_http_call(&self.upstream, headers, Some(&self.body), vec![], TIMEOUT)
                    .unwrap();
                self.step = Step::Forwarding;
            }
            Step::Forwarding => {
                let headers = self.get_http_call_response_headers();
                let status = headers
                    .iter()
                    .find(|(n, _)| n == ":status")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(502);
                let kept = headers.into_iter().filter(|(n, _)| !n.starts_with(':')).collect();
                self.call("PUT", &format!("/SET/{}", self.key), Some(&body), true);
                self.answer = Some((status, kept, body.to_vec()));
                self.step = Step::Recording;
            }
            Step::Recording => {
                let (status, headers, body) = self.answer.take().unwrap();
                let headers = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                self.send_http_response(status, headers, Some(&body));
            }
            Step::Request => {}
        }
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        self.set_property(vec!["wasm_process_req_body"], Some(b"true"));
        for (name, value) in self.get_http_request_headers() {
            match name.as_str() {
                // Webdis splits its path at every `/`: a key without one.
                "idempotency-key" => {
                    let safe: String = value
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
                        .collect();
                    self.key = format!("apisix-floor-{safe}");
                }
                ":path" => self.path = value,
                _ => {}
            }
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        self.body = self.get_http_request_body(0, size).unwrap_or_default();
        if self.fresh {
            let claim = format!("/SET/{}/1/NX/PX/60000", self.key);
            self.call("GET", &claim, None, true);
            self.step = Step::Claiming;
        } else {
            self.call("GET", &format!("/GET/{RECORD_KEY}"), None, true);
            self.step = Step::Reading;
        }
        Action::Pause
    }
}
