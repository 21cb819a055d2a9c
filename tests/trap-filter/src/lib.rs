//! A test module that traps on request: a request with `x-trap: 1` makes it
//! execute `unreachable`, any other passes. The end-to-end tests load it in
//! Envoy and in APISIX's runtime to show what each host does with a VM that
//! trapped (the idempotency filter itself has no input known to trap it).
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

struct Root;
impl Context for Root {}
impl RootContext for Root {
    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream))
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream;
impl Context for Stream {}
impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        if self.get_http_request_header("x-trap").as_deref() == Some("1") {
            core::arch::wasm32::unreachable();
        }
        Action::Continue
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}
