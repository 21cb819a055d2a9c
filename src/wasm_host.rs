//! The only module that talks to the proxy. It declares the few proxy-wasm
//! imports it needs itself instead of using the SDK's `hostcalls`, because
//! those `panic!` on any status they do not expect (an APISIX UNIMPLEMENTED,
//! say) and a panic traps the VM. Here every status becomes a [`HostError`]
//! that the filter turns into a decision. The SDK is used only for its
//! context dispatcher.

use crate::clock;
use crate::config::Platform;
use crate::filter::{CallResponse, Verdict};
use crate::host::{HeaderMap, Host, HostError, Level};
use crate::metrics::Metric;
use crate::store::batch::RedisOp;
use crate::store::SharedData;
use crate::wire::{encode_pairs, Rng};
use proxy_wasm::types::Action;
use std::cell::{Cell, RefCell};
use std::ptr::{null, null_mut};
use std::rc::Rc;

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const CAS_MISMATCH: u32 = 8;

const BUFFER_REQUEST_BODY: u32 = 0;
const BUFFER_RESPONSE_BODY: u32 = 1;
const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
const BUFFER_HTTP_CALL_RESPONSE_BODY: u32 = 4;
const MAP_REQUEST_HEADERS: u32 = 0;
const MAP_RESPONSE_HEADERS: u32 = 2;
const MAP_HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
const STREAM_REQUEST: u32 = 0;
const STREAM_RESPONSE: u32 = 1;

#[cfg(feature = "self-profile")]
mod self_profile;

macro_rules! profile {
    ($i:expr) => {
        #[cfg(feature = "self-profile")]
        let _span = self_profile::span($i);
    };
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_register_shared_queue(
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_enqueue_shared_queue(queue_id: u32, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_dequeue_shared_queue(
        queue_id: u32,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
}

fn check(call: &'static str, status: u32) -> Result<(), HostError> {
    if status == OK {
        Ok(())
    } else {
        Err(HostError { call, status })
    }
}

/// Takes ownership of bytes the host allocated in our memory (through the
/// SDK's exported `proxy_on_memory_allocate`).
fn take_host_bytes(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        if !data.is_null() {
            // A zero-size allocation still came from our allocator.
            drop(unsafe { Vec::from_raw_parts(data, 0, 0) });
        }
        return Vec::new();
    }
    unsafe { Vec::from_raw_parts(data, size, size) }
}

fn host_log(level: Level, message: &str) {
    let level = match level {
        Level::Debug => 1,
        Level::Info => 2,
        Level::Warn => 3,
        Level::Error => 4,
    };
    // Nothing sensible to do if logging itself fails.
    let _ = unsafe { proxy_log(level, message.as_ptr(), message.len()) };
}

fn get_buffer(buffer_type: u32, start: usize, max: usize) -> Result<Vec<u8>, HostError> {
    profile!(9);
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    match unsafe { proxy_get_buffer_bytes(buffer_type, start, max, &mut data, &mut size) } {
        OK => Ok(take_host_bytes(data, size)),
        // Envoy answers NotFound for an absent buffer: nothing to read.
        NOT_FOUND => Ok(Vec::new()),
        status => Err(HostError {
            call: "get_buffer_bytes",
            status,
        }),
    }
}

/// A header map, read in place in the bytes the host wrote into our memory.
fn get_pairs(map_type: u32) -> Result<HeaderMap, HostError> {
    profile!(8);
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    check("get_header_map_pairs", unsafe {
        proxy_get_header_map_pairs(map_type, &mut data, &mut size)
    })?;
    HeaderMap::decode(take_host_bytes(data, size)).ok_or(HostError {
        call: "get_header_map_pairs (decode)",
        status: 3,
    })
}

fn get_value(map_type: u32, name: &str) -> Result<Option<Vec<u8>>, HostError> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    match unsafe {
        proxy_get_header_map_value(map_type, name.as_ptr(), name.len(), &mut data, &mut size)
    } {
        OK => Ok(Some(take_host_bytes(data, size))),
        NOT_FOUND => Ok(None),
        status => Err(HostError {
            call: "get_header_map_value",
            status,
        }),
    }
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    /// WASI's clock (std imports it too): Envoy and APISIX's wasmtime both
    /// implement it, realtime and monotonic, unlike the proxy-wasm clock
    /// call that APISIX answers UNIMPLEMENTED.
    fn clock_time_get(clock_id: u32, precision: u64, time: *mut u64) -> u16;
}

const MONOTONIC: u32 = 1;

thread_local! {
    /// This VM's offset from the monotonic clock (see `crate::clock`).
    static CLOCK_OFFSET: Cell<Option<i64>> = const { Cell::new(None) };
    /// The missing monotonic clock was logged.
    static NO_MONOTONIC_LOGGED: Cell<bool> = const { Cell::new(false) };
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn monotonic_ms() -> Option<u64> {
    let mut ns: u64 = 0;
    (unsafe { clock_time_get(MONOTONIC, 1_000_000, &mut ns) } == 0).then_some(ns / 1_000_000)
}

/// Wall-clock milliseconds that never jump (`crate::clock`). A host
/// without a monotonic clock (none known) gets the wall clock, logged once:
/// the same scale, steps included.
fn now_ms() -> u64 {
    let Some(monotonic) = monotonic_ms() else {
        if !NO_MONOTONIC_LOGGED.replace(true) {
            host_log(
                Level::Warn,
                "no monotonic clock: deadlines follow the wall clock, steps included",
            );
        }
        return wall_ms();
    };
    let offset = CLOCK_OFFSET.get().unwrap_or_else(|| {
        let own = clock::sampled_offset(wall_ms(), monotonic);
        CLOCK_OFFSET.set(Some(own));
        own
    });
    clock::reading(monotonic, offset)
}

/// Takes the process's clock offset from shared data (Envoy), so that
/// every VM of the process reads the same time.
fn share_clock(shared: &impl SharedData) {
    if let Some(monotonic) = monotonic_ms() {
        let own = clock::sampled_offset(wall_ms(), monotonic);
        CLOCK_OFFSET.set(Some(clock::shared_offset(shared, own)));
    }
}

thread_local! {
    static RNG: RefCell<Rng> = RefCell::new(seeded_rng());
}

/// One host call per VM (getrandom: WASI `random_get` on wasip1); the
/// generator then makes each token without a host call.
fn seeded_rng() -> Rng {
    let mut seed = [0u8; 40];
    // If random_get fails the clock alone seeds the generator: tokens stay
    // unique per VM, but log it because generated keys become guessable.
    if getrandom::fill(&mut seed[..32]).is_err() {
        host_log(
            Level::Warn,
            "WASI random_get failed; seeding from the clock",
        );
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    seed[32..].copy_from_slice(&t.to_le_bytes());
    Rng::new(&seed)
}

/// Metric ids of this VM, indexed by [`Metric::index`].
#[derive(Default)]
struct MetricIds {
    ids: RefCell<Vec<Option<u32>>>,
}

impl MetricIds {
    fn define(&self) {
        let mut ids = self.ids.borrow_mut();
        if !ids.is_empty() {
            return;
        }
        for m in Metric::ALL {
            let mut id = 0u32;
            let kind = if m.is_gauge() { 1 } else { 0 };
            let status =
                unsafe { proxy_define_metric(kind, m.name().as_ptr(), m.name().len(), &mut id) };
            if status == OK {
                ids.push(Some(id));
            } else {
                host_log(
                    Level::Warn,
                    &format!("metric {} unavailable (status {status})", m.name()),
                );
                ids.push(None);
            }
        }
    }

    fn set(&self, m: Metric, value: u64) {
        if let Some(Some(id)) = self.ids.borrow().get(m.index()) {
            let _ = unsafe { proxy_record_metric(*id, value) };
        }
    }

    fn add(&self, m: Metric, delta: i64) {
        profile!(12);
        if let Some(Some(id)) = self.ids.borrow().get(m.index()) {
            let _ = unsafe { proxy_increment_metric(*id, delta) };
        }
    }
}

/// Sends an HTTP call for the context the SDK is running a callback of.
/// Through the SDK, not a raw import: its dispatcher routes the answer back
/// to that context only for calls it registered. It panics on statuses other
/// than Ok, BadArgument and InternalFailure; Envoy's and APISIX's http_call
/// return only those (APISIX: BadArgument outside request phases).
fn sdk_dispatch(
    upstream: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout_ms: u64,
) -> Result<u32, HostError> {
    proxy_wasm::hostcalls::dispatch_http_call(
        upstream,
        headers.to_vec(),
        body,
        vec![],
        std::time::Duration::from_millis(timeout_ms),
    )
    .map_err(|status| HostError {
        call: "http_call",
        status: status as u32,
    })
}

/// The answer to an HTTP call, read in its callback (before any switch of
/// the effective context: the answer belongs to the context that made the
/// call). No headers at all: the call failed (timeout, connection refused).
fn read_call_response(body_size: usize) -> CallResponse {
    let headers = get_pairs(MAP_HTTP_CALL_RESPONSE_HEADERS).unwrap_or_default();
    let status = headers
        .get(":status")
        .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u16>().ok());
    let body = if body_size > 0 {
        get_buffer(BUFFER_HTTP_CALL_RESPONSE_BODY, 0, body_size).unwrap_or_default()
    } else {
        Vec::new()
    };
    CallResponse {
        status,
        headers: headers.to_list(),
        body,
    }
}

/// Registers a shared queue of this VM under `name`.
fn register_queue(name: &str) -> Result<u32, HostError> {
    let mut id = 0u32;
    check("register_shared_queue", unsafe {
        proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id)
    })?;
    Ok(id)
}

/// Wakes the queue's owner (its `on_queue_ready`).
fn enqueue(queue: u32) -> Result<(), HostError> {
    let item = [1u8];
    check("enqueue_shared_queue", unsafe {
        proxy_enqueue_shared_queue(queue, item.as_ptr(), item.len())
    })
}

/// Empties the queue (its items only signal; the work is in the owner).
fn drain_queue(queue: u32) {
    for _ in 0..1024 {
        let mut data: *mut u8 = null_mut();
        let mut size: usize = 0;
        let status = unsafe { proxy_dequeue_shared_queue(queue, &mut data, &mut size) };
        if status != OK || data.is_null() {
            return;
        }
        drop(take_host_bytes(data, size));
    }
}

/// Makes `context_id` the context that request-scoped host calls act on.
fn set_effective_context(context_id: u32) -> bool {
    unsafe { proxy_set_effective_context(context_id) == OK }
}

/// [`Host`] over proxy-wasm host calls. Request-scoped calls act on the
/// context the host made current for the callback being run.
struct WasmHost {
    metrics: Rc<MetricIds>,
    /// Waiting for the request body pauses the request (not on APISIX).
    pauses_for_body: bool,
    /// `host: "apisix-profile"`: APISIX's rules, enforced while in Envoy.
    rules: Option<ApisixRules>,
    /// The request's headers are listed only when it has a `Host` header.
    lists_headers_only_with_host: bool,
    /// Calls owned by the worker's root context (Envoy): made for this
    /// request, answered through the root.
    route: Option<owner::Route>,
}

/// What APISIX (wasm-nginx-module 0.7.0) allows, checked on every call while
/// the filter runs in Envoy under the APISIX profile. A violation traps the
/// VM: with `failure_policy: FAIL_CLOSED` every request of the test then
/// fails, so a violation cannot pass as a log line.
#[derive(Default)]
struct ApisixRules {
    /// A response callback is running (APISIX refuses HTTP calls there).
    in_response: Cell<bool>,
    /// HTTP calls sent and not answered (APISIX runs one at a time).
    pending: Cell<u32>,
    /// A local response was sent, or the request was let go on.
    settled: Cell<bool>,
}

impl WasmHost {
    fn new(metrics: Rc<MetricIds>, platform: Platform) -> WasmHost {
        WasmHost {
            metrics,
            pauses_for_body: platform.pauses_for_body(),
            rules: platform.checks_apisix_rules().then(ApisixRules::default),
            lists_headers_only_with_host: platform.lists_headers_only_with_host(),
            route: None,
        }
    }

    fn routed(mut self, route: Option<owner::Route>) -> WasmHost {
        self.route = route;
        self
    }

    fn violation(&self, rule: &str) -> ! {
        host_log(Level::Error, &format!("APISIX profile violation: {rule}"));
        core::arch::wasm32::unreachable()
    }

    fn forbid(&self, what: &str) {
        if self.rules.is_some() {
            self.violation(&format!("{what} is UNIMPLEMENTED on APISIX"));
        }
    }

    /// Maps the filter's verdict to this host's mechanics, and checks that a
    /// request is never left paused with nothing that will resume it.
    fn action(&self, v: Verdict, request_phase: bool) -> Action {
        if let (Some(rules), true, Verdict::Pause) = (&self.rules, request_phase, v) {
            if rules.pending.get() == 0 && !rules.settled.get() {
                self.violation("Pause without a pending HTTP call or a local response");
            }
        }
        match v {
            Verdict::Continue => Action::Continue,
            Verdict::Pause => Action::Pause,
            // APISIX calls the body callback because the property is set; a
            // Pause there with nothing pending would stall its driver.
            Verdict::AwaitBody if self.pauses_for_body => Action::Pause,
            Verdict::AwaitBody => Action::Continue,
        }
    }

    fn enter(&self, response_phase: bool) {
        if let Some(rules) = &self.rules {
            rules.in_response.set(response_phase);
        }
    }
}

impl SharedData for WasmHost {
    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
        profile!(10);
        self.forbid("shared data");
        let mut data: *mut u8 = null_mut();
        let mut size: usize = 0;
        let mut cas: u32 = 0;
        match unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
        } {
            OK => Ok(Some((take_host_bytes(data, size), cas))),
            NOT_FOUND => Ok(None),
            status => Err(HostError {
                call: "get_shared_data",
                status,
            }),
        }
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, HostError> {
        profile!(11);
        self.forbid("shared data");
        match unsafe {
            proxy_set_shared_data(
                key.as_ptr(),
                key.len(),
                value.as_ptr(),
                value.len(),
                cas.unwrap_or(0),
            )
        } {
            OK => Ok(true),
            CAS_MISMATCH => Ok(false),
            status => Err(HostError {
                call: "set_shared_data",
                status,
            }),
        }
    }
}

impl Host for WasmHost {
    fn request_headers(&self) -> Result<HeaderMap, HostError> {
        if self.lists_headers_only_with_host && get_value(MAP_REQUEST_HEADERS, "host")?.is_none() {
            return Err(HostError::no_host());
        }
        get_pairs(MAP_REQUEST_HEADERS)
    }

    fn request_header(&self, name: &str) -> Result<Option<Vec<u8>>, HostError> {
        get_value(MAP_REQUEST_HEADERS, name)
    }

    fn set_request_header(&self, name: &str, value: &str) -> Result<(), HostError> {
        check("replace_header_map_value", unsafe {
            proxy_replace_header_map_value(
                MAP_REQUEST_HEADERS,
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            )
        })
    }

    fn request_body(&self, start: usize, len: usize) -> Result<Vec<u8>, HostError> {
        get_buffer(BUFFER_REQUEST_BODY, start, len)
    }

    fn response_headers(&self) -> Result<HeaderMap, HostError> {
        get_pairs(MAP_RESPONSE_HEADERS)
    }

    fn response_code_details(&self) -> Option<String> {
        // Property paths are segments separated by NUL bytes.
        let path = b"response\0code_details";
        let mut data: *mut u8 = null_mut();
        let mut size: usize = 0;
        match unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) } {
            OK => String::from_utf8(take_host_bytes(data, size)).ok(),
            _ => None,
        }
    }

    fn add_response_header(&self, name: &str, value: &str) -> Result<(), HostError> {
        check("add_header_map_value", unsafe {
            proxy_add_header_map_value(
                MAP_RESPONSE_HEADERS,
                name.as_ptr(),
                name.len(),
                value.as_ptr(),
                value.len(),
            )
        })
    }

    fn response_body(&self, start: usize, len: usize) -> Result<Vec<u8>, HostError> {
        get_buffer(BUFFER_RESPONSE_BODY, start, len)
    }

    fn send_response(
        &self,
        status: u16,
        headers: &[(String, Vec<u8>)],
        body: &[u8],
    ) -> Result<(), HostError> {
        if let Some(rules) = &self.rules {
            rules.settled.set(true);
        }
        profile!(13);
        let pairs = encode_pairs(headers);
        let details = "idempotency_filter";
        check("send_local_response", unsafe {
            proxy_send_local_response(
                u32::from(status),
                details.as_ptr(),
                details.len(),
                if body.is_empty() {
                    null()
                } else {
                    body.as_ptr()
                },
                body.len(),
                pairs.as_ptr(),
                pairs.len(),
                -1,
            )
        })
    }

    fn dispatch_http_call(
        &self,
        upstream: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout_ms: u64,
    ) -> Result<u32, HostError> {
        if let Some(rules) = &self.rules {
            if rules.in_response.get() {
                self.violation(
                    "HTTP call from a response phase (APISIX allows them only in request phases)",
                );
            }
            if rules.pending.get() > 0 {
                self.violation(
                    "a second HTTP call while one is pending (APISIX runs one at a time)",
                );
            }
        }
        // Envoy: the worker's root context owns the call, so that its answer
        // is handled even if this request has gone by then.
        if let Some(route) = &self.route {
            return route.dispatch(upstream, headers, body, timeout_ms);
        }
        let result = sdk_dispatch(upstream, headers, body, timeout_ms);
        if let (Some(rules), Ok(_)) = (&self.rules, &result) {
            rules.pending.set(rules.pending.get() + 1);
        }
        result
    }

    fn groups_store_ops(&self) -> bool {
        self.route
            .as_ref()
            .is_some_and(owner::Route::groups_store_ops)
    }

    fn send_store_op(&self, op: RedisOp) -> Result<u32, HostError> {
        match &self.route {
            Some(route) => route.send_store_op(op),
            None => Err(HostError::unsupported("send_store_op")),
        }
    }

    fn set_property(&self, name: &str, value: &[u8]) -> Result<(), HostError> {
        check("set_property", unsafe {
            proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len())
        })
    }

    fn resume_request(&self) -> Result<(), HostError> {
        if let Some(rules) = &self.rules {
            rules.settled.set(true);
        }
        check("continue_stream(request)", unsafe {
            proxy_continue_stream(STREAM_REQUEST)
        })
    }

    fn resume_response(&self) -> Result<(), HostError> {
        check("continue_stream(response)", unsafe {
            proxy_continue_stream(STREAM_RESPONSE)
        })
    }

    fn now_ms(&self) -> u64 {
        profile!(14);
        now_ms()
    }

    fn random_u64(&self) -> u64 {
        RNG.with(|r| r.borrow_mut().next_u64())
    }

    fn metric_add(&self, metric: Metric, delta: i64) {
        self.metrics.add(metric, delta);
    }

    fn log(&self, level: Level, message: &str) {
        host_log(level, message);
    }
}

/// Asks for `on_tick` every `period_ms`; the host's status.
fn set_tick_period(period_ms: u32) -> u32 {
    unsafe { proxy_set_tick_period_milliseconds(period_ms) }
}

mod contexts;
mod owner;
