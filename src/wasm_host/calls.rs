//! HTTP calls and the worker's wake-up queue: sending a call for the
//! context being run, reading its answer, and the shared queue and
//! effective context through which the worker's root acts for its streams.

use super::abi::{
    check, get_buffer, get_pairs, get_value, proxy_dequeue_shared_queue,
    proxy_enqueue_shared_queue, proxy_register_shared_queue, proxy_set_effective_context,
    take_host_bytes, BUFFER_HTTP_CALL_RESPONSE_BODY, MAP_HTTP_CALL_RESPONSE_HEADERS, OK,
};
use crate::filter::CallResponse;
use crate::host::HostError;
use std::ptr::null_mut;

/// Sends an HTTP call for the context the SDK is running a callback of.
/// Through the SDK, not a raw import: its dispatcher routes the answer back
/// to that context only for calls it registered. It panics on statuses other
/// than Ok, BadArgument and InternalFailure; Envoy's and APISIX's http_call
/// return only those (APISIX: BadArgument outside request phases).
pub(super) fn sdk_dispatch(
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
pub(super) fn read_call_response(body_size: usize) -> CallResponse {
    let headers = get_pairs(MAP_HTTP_CALL_RESPONSE_HEADERS).unwrap_or_default();
    CallResponse {
        status: headers.get(":status").and_then(status_of),
        headers: headers.to_list(),
        body: call_body(body_size),
    }
}

/// A store batch's answer: its status and body are all that is read of
/// it, so the status is one header read instead of the whole map.
pub(super) fn read_call_status_and_body(body_size: usize) -> (Option<u16>, Vec<u8>) {
    let status = get_value(MAP_HTTP_CALL_RESPONSE_HEADERS, ":status")
        .ok()
        .flatten()
        .and_then(|v| status_of(&v));
    (status, call_body(body_size))
}

fn status_of(value: &[u8]) -> Option<u16> {
    std::str::from_utf8(value).ok()?.parse::<u16>().ok()
}

fn call_body(body_size: usize) -> Vec<u8> {
    if body_size == 0 {
        return Vec::new();
    }
    get_buffer(BUFFER_HTTP_CALL_RESPONSE_BODY, 0, body_size).unwrap_or_default()
}

/// Registers a shared queue of this VM under `name`.
pub(super) fn register_queue(name: &str) -> Result<u32, HostError> {
    let mut id = 0u32;
    check("register_shared_queue", unsafe {
        proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id)
    })?;
    Ok(id)
}

/// Wakes the queue's owner (its `on_queue_ready`).
pub(super) fn enqueue(queue: u32) -> Result<(), HostError> {
    let item = [1u8];
    check("enqueue_shared_queue", unsafe {
        proxy_enqueue_shared_queue(queue, item.as_ptr(), item.len())
    })
}

/// Empties the queue (its items only signal; the work is in the owner).
pub(super) fn drain_queue(queue: u32) {
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
pub(super) fn set_effective_context(context_id: u32) -> bool {
    unsafe { proxy_set_effective_context(context_id) == OK }
}
