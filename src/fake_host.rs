//! In-memory host for unit tests: Envoy's shared-data semantics (CAS ignored
//! on missing keys, no delete), hooks to interleave a competing worker between
//! a read and a write, and a recorded HTTP exchange.

use crate::host::{HeaderList, HeaderMap, Host, HostError, Level};
use crate::metrics::Metric;
use crate::store::SharedData;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

type Hook = Box<dyn FnOnce(&FakeShared)>;

/// Values by key, each with the CAS its last write got.
pub type SharedMap = HashMap<String, (Vec<u8>, u32)>;

/// A set as Envoy's shared data makes it: refused when `cas` is given and
/// differs from the key's, and, on a missing key, made whatever `cas` is;
/// `version` numbers the writes (never 0). `false`: refused.
pub fn envoy_set(
    map: &mut SharedMap,
    version: &mut u32,
    key: &str,
    value: &[u8],
    cas: Option<u32>,
) -> bool {
    if let (Some((_, current)), Some(cas)) = (map.get(key), cas) {
        if *current != cas {
            return false;
        }
    }
    *version = version.wrapping_add(1).max(1);
    map.insert(key.to_string(), (value.to_vec(), *version));
    true
}

#[derive(Default)]
pub struct FakeShared {
    map: RefCell<SharedMap>,
    next_cas: Cell<u32>,
    hook: RefCell<Option<Hook>>,
    after_hook: RefCell<Option<Hook>>,
    cas_failures: Cell<u32>,
    fail_status: Cell<Option<u32>>,
    /// Reads and writes so far: each one is a host call, which is where a
    /// protected request spends its time in a real proxy.
    pub gets: Cell<u32>,
    pub sets: Cell<u32>,
}

impl FakeShared {
    /// Runs `hook` right before the next set, as another worker would.
    pub fn before_next_set(&self, hook: Hook) {
        *self.hook.borrow_mut() = Some(hook);
    }
    /// Runs `hook` right after the next set has landed (successful or
    /// not), before its caller's next step.
    pub fn after_next_set(&self, hook: Hook) {
        *self.after_hook.borrow_mut() = Some(hook);
    }
    pub fn fail_with(&self, status: u32) {
        self.fail_status.set(Some(status));
    }
    pub fn cas_failures(&self) -> u32 {
        self.cas_failures.get()
    }
    pub fn key_count(&self) -> usize {
        self.map.borrow().len()
    }
    pub fn total_bytes(&self) -> usize {
        self.map.borrow().values().map(|(v, _)| v.len()).sum()
    }
    /// The value of `key` as it is now, without counting a read.
    pub fn peek(&self, key: &str) -> Option<Vec<u8>> {
        self.map.borrow().get(key).map(|(v, _)| v.clone())
    }
    fn set_now(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        let mut version = self.next_cas.get();
        let landed = envoy_set(&mut self.map.borrow_mut(), &mut version, key, value, cas);
        self.next_cas.set(version);
        if !landed {
            self.cas_failures.set(self.cas_failures.get() + 1);
        }
        landed
    }

    fn check(&self, call: &'static str) -> Result<(), HostError> {
        match self.fail_status.get() {
            Some(status) => Err(HostError { call, status }),
            None => Ok(()),
        }
    }
}

impl SharedData for FakeShared {
    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        self.check("get_shared_data")?;
        self.gets.set(self.gets.get() + 1);
        Ok(self.map.borrow().get(key).cloned())
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, HostError> {
        self.check("set_shared_data")?;
        self.sets.set(self.sets.get() + 1);
        let hook = self.hook.borrow_mut().take();
        if let Some(hook) = hook {
            hook(self);
        }
        let landed = self.set_now(key, value, cas);
        let after = self.after_hook.borrow_mut().take();
        if let Some(hook) = after {
            hook(self);
        }
        Ok(landed)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentResponse {
    pub status: u16,
    pub headers: HeaderList,
    pub body: Vec<u8>,
}

impl SentResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// An HTTP call the filter dispatched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The id the host returned (its answer comes back with it).
    pub id: u32,
    pub upstream: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl Call {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn header_list(headers: &[(&str, &str)]) -> HeaderList {
    headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect()
}

/// One HTTP exchange as the proxy would present it to the filter. Set up
/// with the builder and setter methods; read back with the query methods.
#[derive(Default)]
pub struct FakeHost {
    pub shared: FakeShared,
    pub request_headers: RefCell<HeaderList>,
    pub request_body: RefCell<Vec<u8>>,
    pub response_headers: RefCell<HeaderList>,
    pub response_chunk: RefCell<Vec<u8>>,
    pub code_details: RefCell<Option<String>>,
    pub added_response_headers: RefCell<HeaderList>,
    pub sent: RefCell<Option<SentResponse>>,
    pub now: Cell<u64>,
    pub rng: Cell<u64>,
    pub metrics: RefCell<HashMap<&'static str, i64>>,
    pub logs: RefCell<Vec<(Level, String)>>,
    /// HTTP calls sent (store and upstream), in order.
    calls: RefCell<Vec<Call>>,
    pub resumed_requests: Cell<u32>,
    pub resumed_responses: Cell<u32>,
    pub dispatch_fails: Cell<bool>,
    /// Calls to this upstream alone fail to be sent.
    pub refused_upstream: RefCell<Option<String>>,
    pub properties: RefCell<Vec<(String, Vec<u8>)>>,
    /// As APISIX: the request's headers are listed only when it has `Host`.
    pub lists_headers_only_with_host: Cell<bool>,
}

impl FakeHost {
    // Builders.

    /// The host's clock starts at `now_ms`.
    pub fn at(self, now_ms: u64) -> Self {
        self.now.set(now_ms);
        self
    }

    /// Every HTTP call fails to be sent.
    pub fn refusing_calls(self) -> Self {
        self.dispatch_fails.set(true);
        self
    }

    // Setters, for what changes during a test.

    pub fn set_clock(&self, now_ms: u64) {
        self.now.set(now_ms);
    }

    pub fn advance_clock(&self, ms: u64) {
        self.now.set(self.now.get() + ms);
    }

    /// From now on every HTTP call fails to be sent.
    pub fn refuse_calls(&self) {
        self.dispatch_fails.set(true);
    }

    /// The upstream's response headers (`:status` included).
    pub fn set_response(&self, headers: &[(&str, &str)]) {
        *self.response_headers.borrow_mut() = header_list(headers);
    }

    /// The response body chunk the next body callback sees.
    pub fn set_response_chunk(&self, chunk: &[u8]) {
        *self.response_chunk.borrow_mut() = chunk.to_vec();
    }

    /// Who made the response (Envoy's `response.code_details`).
    pub fn set_code_details(&self, details: &str) {
        *self.code_details.borrow_mut() = Some(details.to_string());
    }

    // Queries.

    pub fn metric(&self, m: Metric) -> i64 {
        self.metrics.borrow().get(m.name()).copied().unwrap_or(0)
    }

    /// The answer the filter sent itself, if it sent one.
    pub fn sent(&self) -> Option<SentResponse> {
        self.sent.borrow().clone()
    }

    pub fn sent_status(&self) -> Option<u16> {
        self.sent.borrow().as_ref().map(|s| s.status)
    }

    /// Every HTTP call sent so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    pub fn call_count(&self) -> usize {
        self.calls.borrow().len()
    }

    /// The call with id `id`.
    pub fn call(&self, id: u32) -> Call {
        self.calls
            .borrow()
            .iter()
            .find(|c| c.id == id)
            .cloned()
            .unwrap_or_else(|| panic!("no call {id}"))
    }

    /// The last call sent to `upstream`.
    pub fn last_call_to(&self, upstream: &str) -> Option<Call> {
        self.calls
            .borrow()
            .iter()
            .rev()
            .find(|c| c.upstream == upstream)
            .cloned()
    }

    /// The value of request header `name` (as the filter left it).
    pub fn request_header(&self, name: &str) -> Option<String> {
        self.request_headers
            .borrow()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// The last property the filter set, as text.
    pub fn last_property(&self) -> Option<(String, String)> {
        self.properties
            .borrow()
            .last()
            .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
    }
    /// Starts a new exchange on the same store, clock and metrics.
    pub fn reset_exchange(&self, headers: &[(&str, &str)], body: &[u8]) {
        *self.request_headers.borrow_mut() = header_list(headers);
        *self.request_body.borrow_mut() = body.to_vec();
        self.response_headers.borrow_mut().clear();
        self.response_chunk.borrow_mut().clear();
        *self.code_details.borrow_mut() = None;
        self.added_response_headers.borrow_mut().clear();
        *self.sent.borrow_mut() = None;
    }
}

fn slice(buf: &[u8], start: usize, len: usize) -> Vec<u8> {
    let end = start.saturating_add(len).min(buf.len());
    buf.get(start.min(end)..end).unwrap_or(&[]).to_vec()
}

impl SharedData for FakeHost {
    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        self.shared.shared_get(key)
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, HostError> {
        self.shared.shared_set(key, value, cas)
    }
}

impl Host for FakeHost {
    fn request_headers(&self) -> Result<HeaderMap, HostError> {
        let headers = self.request_headers.borrow();
        if self.lists_headers_only_with_host.get() && !headers.iter().any(|(n, _)| n == "host") {
            return Err(HostError::no_host());
        }
        Ok(HeaderMap::from_list(&headers))
    }
    fn request_header(&self, name: &str) -> Result<Option<Vec<u8>>, HostError> {
        Ok(self
            .request_headers
            .borrow()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone()))
    }
    fn set_request_header(&self, name: &str, value: &str) -> Result<(), HostError> {
        let mut h = self.request_headers.borrow_mut();
        h.retain(|(n, _)| n != name);
        h.push((name.to_string(), value.as_bytes().to_vec()));
        Ok(())
    }
    fn request_body(&self, start: usize, len: usize) -> Result<Vec<u8>, HostError> {
        Ok(slice(&self.request_body.borrow(), start, len))
    }
    fn response_headers(&self) -> Result<HeaderMap, HostError> {
        Ok(HeaderMap::from_list(&self.response_headers.borrow()))
    }
    fn response_code_details(&self) -> Option<String> {
        self.code_details.borrow().clone()
    }
    fn add_response_header(&self, name: &str, value: &str) -> Result<(), HostError> {
        self.added_response_headers
            .borrow_mut()
            .push((name.to_string(), value.as_bytes().to_vec()));
        Ok(())
    }
    fn response_body(&self, start: usize, len: usize) -> Result<Vec<u8>, HostError> {
        Ok(slice(&self.response_chunk.borrow(), start, len))
    }
    fn send_response(
        &self,
        status: u16,
        headers: &[(String, Vec<u8>)],
        body: &[u8],
    ) -> Result<(), HostError> {
        *self.sent.borrow_mut() = Some(SentResponse {
            status,
            headers: headers.to_vec(),
            body: body.to_vec(),
        });
        Ok(())
    }
    fn dispatch_http_call(
        &self,
        upstream: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        _timeout_ms: u64,
    ) -> Result<u32, HostError> {
        let refused = self.refused_upstream.borrow().as_deref() == Some(upstream);
        if self.dispatch_fails.get() || refused {
            return Err(HostError {
                call: "http_call",
                status: 2,
            });
        }
        let mut calls = self.calls.borrow_mut();
        let id = calls.len() as u32 + 1;
        calls.push(Call {
            id,
            upstream: upstream.to_string(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: body.map(<[u8]>::to_vec),
        });
        Ok(id)
    }
    fn set_property(&self, name: &str, value: &[u8]) -> Result<(), HostError> {
        self.properties
            .borrow_mut()
            .push((name.to_string(), value.to_vec()));
        Ok(())
    }
    fn resume_request(&self) -> Result<(), HostError> {
        self.resumed_requests.set(self.resumed_requests.get() + 1);
        Ok(())
    }
    fn resume_response(&self) -> Result<(), HostError> {
        self.resumed_responses.set(self.resumed_responses.get() + 1);
        Ok(())
    }
    fn now_ms(&self) -> u64 {
        self.now.get()
    }
    fn random_u64(&self) -> u64 {
        // xorshift: deterministic, distinct values.
        let mut x = self.rng.get() ^ 0x9e37_79b9_7f4a_7c15;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        x
    }
    fn metric_add(&self, metric: Metric, delta: i64) {
        *self.metrics.borrow_mut().entry(metric.name()).or_insert(0) += delta;
    }
    fn log(&self, level: Level, message: &str) {
        self.logs.borrow_mut().push((level, message.to_string()));
    }
}
