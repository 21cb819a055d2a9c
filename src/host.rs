//! The seam between the filter and its proxy. [`Host`] is everything the
//! filter asks of a proxy; `wasm_host.rs` implements it with proxy-wasm host
//! calls, and `fake_host.rs` (tests only) implements it in memory.

use crate::metrics::Metric;
use crate::store::batch::RedisOp;
use crate::store::SharedData;
use std::fmt;

/// A host call that did not succeed, with the proxy-wasm status it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError {
    pub call: &'static str,
    pub status: u32,
}

/// A status no proxy-wasm host returns: see [`HostError::no_host`].
const NO_HOST: u32 = 1000;

impl HostError {
    /// What this host does not do (proxy-wasm's `Unimplemented`).
    pub const fn unsupported(call: &'static str) -> HostError {
        HostError { call, status: 12 }
    }

    /// The request's headers cannot be listed: it has no `Host` header, and
    /// APISIX's wasm-nginx-module (0.7.0) builds `:authority` from `Host`
    /// for every listing without checking that there is one, so an
    /// HTTP/1.0 request without it crashes the nginx worker (every request
    /// on that worker fails, a forwarded one included). Single headers can
    /// still be read.
    pub const fn no_host() -> HostError {
        HostError {
            call: "get_header_map_pairs",
            status: NO_HOST,
        }
    }

    pub fn is_no_host(&self) -> bool {
        self.status == NO_HOST
    }
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.status {
            1 => "NotFound",
            2 => "BadArgument",
            3 => "SerializationFailure",
            4 => "ParseFailure",
            7 => "Empty",
            8 => "CasMismatch",
            10 => "InternalFailure",
            12 => "Unimplemented",
            NO_HOST => "no Host header",
            _ => "unknown status",
        };
        write!(f, "{} failed: {} ({})", self.call, name, self.status)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

pub type HeaderList = Vec<(String, Vec<u8>)>;
pub use crate::wire::HeaderMap;

/// What an HTTP call (store or upstream) brought back. `status` is `None`
/// when there was no HTTP answer at all (timeout, connection failure).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallResponse {
    pub status: Option<u16>,
    pub headers: HeaderList,
    pub body: Vec<u8>,
}

pub trait Host: SharedData {
    /// All the request's headers; [`HostError::no_host`] where the host
    /// cannot list them.
    fn request_headers(&self) -> Result<HeaderMap, HostError>;
    /// One request header's value (`None`: absent).
    fn request_header(&self, name: &str) -> Result<Option<Vec<u8>>, HostError>;
    fn set_request_header(&self, name: &str, value: &str) -> Result<(), HostError>;
    /// Bytes `start..start+len` of the request body seen so far.
    fn request_body(&self, start: usize, len: usize) -> Result<Vec<u8>, HostError>;
    fn response_headers(&self) -> Result<HeaderMap, HostError>;
    /// Why the proxy produced this response, where the host says
    /// (Envoy: `response.code_details`, "via_upstream" when the upstream
    /// answered). `None` when the host does not tell.
    fn response_code_details(&self) -> Option<String>;
    fn add_response_header(&self, name: &str, value: &str) -> Result<(), HostError>;
    /// Bytes `start..start+len` of the current response body chunk.
    fn response_body(&self, start: usize, len: usize) -> Result<Vec<u8>, HostError>;
    /// Answers the client directly; the request is not forwarded.
    fn send_response(
        &self,
        status: u16,
        headers: &[(String, Vec<u8>)],
        body: &[u8],
    ) -> Result<(), HostError>;
    /// Sends an HTTP request to `upstream` (Envoy: a cluster name; APISIX:
    /// host:port); the answer arrives later through the filter's
    /// `on_call_response` with the returned call id.
    fn dispatch_http_call(
        &self,
        upstream: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout_ms: u64,
    ) -> Result<u32, HostError>;
    /// Whether this host sends store operations in batches: Envoy's worker
    /// call owner groups its requests' operations ([`crate::store::group_commit`]).
    fn groups_store_ops(&self) -> bool {
        false
    }
    /// Hands a store operation to the worker's next batch; its reply comes
    /// through the filter's `on_store_reply` with the returned id. Only where
    /// [`Host::groups_store_ops`].
    fn send_store_op(&self, _op: RedisOp) -> Result<u32, HostError> {
        Err(HostError::unsupported("send_store_op"))
    }
    /// Sets a host property (APISIX: an nginx variable such as
    /// `wasm_process_req_body`, which makes it call the body callback).
    fn set_property(&self, name: &str, value: &[u8]) -> Result<(), HostError>;
    /// Lets a request held by the filter go on to the upstream.
    fn resume_request(&self) -> Result<(), HostError>;
    /// Lets a response held by the filter go on to the client.
    fn resume_response(&self) -> Result<(), HostError>;
    /// Wall-clock milliseconds (WASI clock: available on every host).
    fn now_ms(&self) -> u64;
    fn random_u64(&self) -> u64;
    fn metric_add(&self, metric: Metric, delta: i64);
    fn log(&self, level: Level, message: &str);
}
