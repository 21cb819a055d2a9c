//! The proxy-wasm ABI as this filter uses it: the few imports it declares
//! itself (the SDK's `hostcalls` `panic!` on statuses they do not expect,
//! and a panic traps the VM), the ABI's constants, and the small readers
//! that turn each status into a [`HostError`].

use crate::host::{HeaderMap, HostError, Level};
use std::ptr::null_mut;

pub(super) const OK: u32 = 0;
pub(super) const NOT_FOUND: u32 = 1;
pub(super) const CAS_MISMATCH: u32 = 8;

pub(super) const BUFFER_REQUEST_BODY: u32 = 0;
pub(super) const BUFFER_RESPONSE_BODY: u32 = 1;
pub(super) const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
pub(super) const BUFFER_HTTP_CALL_RESPONSE_BODY: u32 = 4;
pub(super) const MAP_REQUEST_HEADERS: u32 = 0;
pub(super) const MAP_RESPONSE_HEADERS: u32 = 2;
pub(super) const MAP_HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
pub(super) const STREAM_REQUEST: u32 = 0;
pub(super) const STREAM_RESPONSE: u32 = 1;

#[link(wasm_import_module = "env")]
extern "C" {
    pub(super) fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    pub(super) fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    pub(super) fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    pub(super) fn proxy_get_header_map_pairs(
        map_type: u32,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    pub(super) fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    pub(super) fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    pub(super) fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    pub(super) fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    pub(super) fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    #[allow(clippy::too_many_arguments)]
    pub(super) fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    pub(super) fn proxy_continue_stream(stream_type: u32) -> u32;
    pub(super) fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    pub(super) fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    pub(super) fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    pub(super) fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    pub(super) fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    pub(super) fn proxy_register_shared_queue(
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    pub(super) fn proxy_enqueue_shared_queue(
        queue_id: u32,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    pub(super) fn proxy_dequeue_shared_queue(
        queue_id: u32,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    pub(super) fn proxy_set_effective_context(context_id: u32) -> u32;
    pub(super) fn proxy_done() -> u32;
}

pub(super) fn check(call: &'static str, status: u32) -> Result<(), HostError> {
    if status == OK {
        Ok(())
    } else {
        Err(HostError { call, status })
    }
}

/// Takes ownership of bytes the host allocated in our memory (through the
/// SDK's exported `proxy_on_memory_allocate`).
pub(super) fn take_host_bytes(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        if !data.is_null() {
            // A zero-size allocation still came from our allocator.
            drop(unsafe { Vec::from_raw_parts(data, 0, 0) });
        }
        return Vec::new();
    }
    unsafe { Vec::from_raw_parts(data, size, size) }
}

pub(super) fn host_log(level: Level, message: &str) {
    let level = match level {
        Level::Debug => 1,
        Level::Info => 2,
        Level::Warn => 3,
        Level::Error => 4,
    };
    // Nothing sensible to do if logging itself fails.
    let _ = unsafe { proxy_log(level, message.as_ptr(), message.len()) };
}

pub(super) fn get_buffer(buffer_type: u32, start: usize, max: usize) -> Result<Vec<u8>, HostError> {
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
pub(super) fn get_pairs(map_type: u32) -> Result<HeaderMap, HostError> {
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

pub(super) fn get_value(map_type: u32, name: &str) -> Result<Option<Vec<u8>>, HostError> {
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

/// Asks for `on_tick` every `period_ms`; the host's status.
pub(super) fn set_tick_period(period_ms: u32) -> u32 {
    unsafe { proxy_set_tick_period_milliseconds(period_ms) }
}

/// Tells the host that the running root context, which answered `on_done`
/// with "not yet", may now be deleted.
pub(super) fn root_done() -> Result<(), HostError> {
    check("done", unsafe { proxy_done() })
}
