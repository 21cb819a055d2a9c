//! Reference filters for `make bench`: the least a Wasm filter can do to
//! answer like the idempotency filter does, written against the raw
//! proxy-wasm ABI (no SDK, only the callbacks each mode needs), so that the
//! benchmark can show the host's own floor under each scenario:
//!
//! * `reply-after-body`: waits for the whole request body, then answers a
//!   1 KiB local response. No Wasm filter can replay for less.
//! * `forward-after-body`: waits for the whole body, then lets the request
//!   go on. No filter that must see the body before the upstream does (a
//!   fresh key's claim) can forward for less.
//! * `store-call`: waits for the whole body, makes one HTTP call to the
//!   `webdis` cluster (`GET /PING`), and forwards the request when it is
//!   answered. One store round trip, nothing else.
//!
//! The plugin configuration is the mode's name. Not part of the product.

use std::cell::RefCell;
use std::collections::HashMap;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    ReplyAfterBody,
    ForwardAfterBody,
    StoreCall,
}

thread_local! {
    static MODE: RefCell<Mode> = const { RefCell::new(Mode::ReplyAfterBody) };
    /// HTTP call token -> the stream that waits for it.
    static WAITING: RefCell<HashMap<u32, u32>> = RefCell::new(HashMap::new());
    /// The stream whose callback is running.
    static CURRENT: RefCell<u32> = const { RefCell::new(0) };
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_buffer_bytes(
        t: u32,
        start: usize,
        max: usize,
        d: *mut *mut u8,
        s: *mut usize,
    ) -> u32;
    fn proxy_send_local_response(
        code: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc: i32,
    ) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_http_call(
        upstream: *const u8,
        upstream_size: usize,
        headers: *const u8,
        headers_size: usize,
        body: *const u8,
        body_size: usize,
        trailers: *const u8,
        trailers_size: usize,
        timeout_ms: u32,
        token: *mut u32,
    ) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_continue_stream(stream: u32) -> u32;
}

const CONTINUE: u32 = 0;
const PAUSE: u32 = 1;
static BODY: [u8; 1024] = [b'x'; 1024];

fn pairs(h: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(h.len() as u32).to_le_bytes());
    for (k, v) in h {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in h {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut v: Vec<u8> = Vec::with_capacity(size);
    let p = v.as_mut_ptr();
    std::mem::forget(v);
    p
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_: u32, _: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(_: u32, size: usize) -> u32 {
    let mut data = std::ptr::null_mut();
    let mut len = 0;
    unsafe { proxy_get_buffer_bytes(7, 0, size, &mut data, &mut len) };
    let config = if data.is_null() {
        Vec::new()
    } else {
        unsafe { Vec::from_raw_parts(data, len, len) }
    };
    let mode = if config.windows(10).any(|w| w == b"store-call") {
        Mode::StoreCall
    } else if config.windows(18).any(|w| w == b"forward-after-body") {
        Mode::ForwardAfterBody
    } else {
        Mode::ReplyAfterBody
    };
    MODE.with(|m| *m.borrow_mut() = mode);
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(_: u32, _: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(context_id: u32, _: usize, end_of_stream: u32) -> u32 {
    on_request(context_id, end_of_stream)
}

#[no_mangle]
pub extern "C" fn proxy_on_request_body(context_id: u32, _: usize, end_of_stream: u32) -> u32 {
    on_request(context_id, end_of_stream)
}

/// Headers and body alike: hold the request until it has all arrived, then act.
fn on_request(context_id: u32, end_of_stream: u32) -> u32 {
    CURRENT.with(|c| *c.borrow_mut() = context_id);
    if end_of_stream != 0 {
        return act();
    }
    PAUSE
}

fn act() -> u32 {
    match MODE.with(|m| *m.borrow()) {
        Mode::ReplyAfterBody => {
            let h = pairs(&[
                ("content-type", "application/json"),
                ("idempotent-replayed", "true"),
            ]);
            let details = b"reference";
            unsafe {
                proxy_send_local_response(
                    200,
                    details.as_ptr(),
                    details.len(),
                    BODY.as_ptr(),
                    BODY.len(),
                    h.as_ptr(),
                    h.len(),
                    -1,
                )
            };
            PAUSE
        }
        Mode::ForwardAfterBody => CONTINUE,
        Mode::StoreCall => {
            let h = pairs(&[
                (":method", "GET"),
                (":path", "/PING"),
                (":authority", "webdis"),
            ]);
            let mut token = 0u32;
            let cluster = b"webdis";
            let status = unsafe {
                proxy_http_call(
                    cluster.as_ptr(),
                    cluster.len(),
                    h.as_ptr(),
                    h.len(),
                    std::ptr::null(),
                    0,
                    std::ptr::null(),
                    0,
                    1000,
                    &mut token,
                )
            };
            if status != 0 {
                return CONTINUE;
            }
            let stream = CURRENT.with(|c| *c.borrow());
            WAITING.with(|w| w.borrow_mut().insert(token, stream));
            PAUSE
        }
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_http_call_response(_: u32, token: u32, _: usize, _: usize, _: usize) {
    if let Some(stream) = WAITING.with(|w| w.borrow_mut().remove(&token)) {
        unsafe {
            proxy_set_effective_context(stream);
            proxy_continue_stream(0);
        }
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(_: u32) {}
