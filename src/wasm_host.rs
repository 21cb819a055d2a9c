//! The only module that talks to the proxy. It declares the few proxy-wasm
//! imports it needs itself instead of using the SDK's `hostcalls`, because
//! those `panic!` on any status they do not expect (an APISIX UNIMPLEMENTED,
//! say) and a panic traps the VM. Here every status becomes a [`HostError`]
//! that the filter turns into a decision. The SDK is used only for its
//! context dispatcher.
//!
//! Here: [`WasmHost`], the filter's [`Host`] over those calls, with the
//! APISIX profile's checks. Beside it: `abi` (the imports, constants and
//! status readers), `time` (the clock), `random` (tokens), `metric_ids`,
//! `calls` (HTTP calls and the worker's wake-up queue), `contexts` (the
//! SDK's root and HTTP contexts) and `owner` (Envoy: the worker owns the
//! requests' calls).

use crate::config::Platform;
use crate::filter::Verdict;
use crate::host::{HeaderMap, Host, HostError, Level};
use crate::metrics::Metric;
use crate::store::batch::RedisOp;
use crate::store::SharedData;
use crate::wire::encode_pairs;
use proxy_wasm::types::Action;
use std::cell::Cell;
use std::ptr::{null, null_mut};
use std::rc::Rc;

#[cfg(feature = "self-profile")]
mod self_profile;

macro_rules! profile {
    ($i:expr) => {
        #[cfg(feature = "self-profile")]
        let _span = crate::wasm_host::self_profile::span($i);
    };
}

mod abi;
mod calls;
mod metric_ids;
mod random;
mod time;

use abi::*;
use calls::{
    drain_queue, enqueue, read_call_response, read_call_status_and_body, register_queue,
    sdk_dispatch, set_effective_context,
};
use metric_ids::MetricIds;
use random::RNG;
use time::{now_ms, share_clock};

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

mod contexts;
mod owner;
