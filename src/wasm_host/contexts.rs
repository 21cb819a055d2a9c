//! The SDK's contexts: the root context (configuration, tick) and one HTTP
//! context per request, which hands each callback to the [`Filter`] with a
//! [`WasmHost`] and maps its verdict to the host's action.

#[cfg(feature = "self-profile")]
use super::self_profile;
use super::{
    get_buffer, get_pairs, host_log, now_ms, set_tick_period, MetricIds, WasmHost,
    BUFFER_HTTP_CALL_RESPONSE_BODY, BUFFER_PLUGIN_CONFIGURATION, MAP_HTTP_CALL_RESPONSE_HEADERS,
    OK,
};
use crate::config::{Config, Platform};
use crate::filter::{CallResponse, Filter, FilterContext};
use crate::host::{Host, Level};
use crate::metrics::Metric;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use std::rc::Rc;

const TICK_MS: u32 = 1000;

struct Root {
    ctx: Option<Rc<FilterContext>>,
    metrics: Rc<MetricIds>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = match get_buffer(BUFFER_PLUGIN_CONFIGURATION, 0, plugin_configuration_size) {
            Ok(b) => b,
            Err(e) => {
                host_log(
                    Level::Error,
                    &format!("cannot read the plugin configuration: {e}"),
                );
                return false;
            }
        };
        let config = match Config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                host_log(Level::Error, &format!("{e}"));
                return false;
            }
        };
        self.metrics.define();
        let mut ctx = FilterContext::new(config);
        let host = WasmHost::new(self.metrics.clone(), Platform::Envoy);
        let ticks = match ctx.store.init(&host) {
            Ok(ticks) => ticks,
            Err(e) => {
                host_log(Level::Error, &e);
                return false;
            }
        };
        // The profiling build reports from the tick, whatever the store.
        #[cfg(feature = "self-profile")]
        if !ticks {
            let _ = set_tick_period(TICK_MS);
        }
        if ticks {
            let status = set_tick_period(TICK_MS);
            if status != OK {
                host_log(Level::Warn, &format!("no tick (status {status}): expired records are reclaimed only when their slot is reused"));
            }
        }
        self.ctx = Some(Rc::new(ctx));
        true
    }

    fn on_tick(&mut self) {
        #[cfg(feature = "self-profile")]
        host_log(Level::Warn, &self_profile::report());
        profile!(7);
        let Some(ctx) = &self.ctx else { return };
        let host = WasmHost::new(self.metrics.clone(), Platform::Envoy);
        if let Some(occupied) = ctx.store.tick(&host, now_ms()) {
            self.metrics.set(Metric::Entries, occupied);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        profile!(0);
        // Always Some: the SDK panics on None. Without a configuration (the
        // host would not normally create contexts then) the filter fails closed.
        Some(Box::new(HttpFilter {
            filter: self.ctx.clone().map(Filter::new),
            host: WasmHost::new(
                self.metrics.clone(),
                self.ctx
                    .as_ref()
                    .map_or(Platform::Envoy, |c| c.config.platform),
            ),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct HttpFilter {
    filter: Option<Filter>,
    host: WasmHost,
}

impl HttpFilter {
    fn unconfigured(&self) -> Action {
        let problem =
            crate::problem::Problem::internal("The idempotency filter has no valid configuration.");
        let _ = self
            .host
            .send_response(problem.status, &problem.headers(), &problem.body());
        Action::Pause
    }
}

impl Context for HttpFilter {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        profile!(5);
        let Some(f) = self.filter.as_mut() else {
            return;
        };
        if let Some(rules) = &self.host.rules {
            rules.pending.set(rules.pending.get().saturating_sub(1));
        }
        // No headers at all: the call failed (timeout, connection refused).
        let headers = get_pairs(MAP_HTTP_CALL_RESPONSE_HEADERS).unwrap_or_default();
        let status = headers
            .get(":status")
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u16>().ok());
        let body = if body_size > 0 {
            get_buffer(BUFFER_HTTP_CALL_RESPONSE_BODY, 0, body_size).unwrap_or_default()
        } else {
            Vec::new()
        };
        f.on_call_response(
            &self.host,
            token_id,
            &CallResponse {
                status,
                headers: headers.to_list(),
                body,
            },
        );
        // Under APISIX's rules a callback must leave the request either
        // waiting on a new call or settled (answered or let go on).
        if let Some(rules) = &self.host.rules {
            if !rules.in_response.get() && rules.pending.get() == 0 && !rules.settled.get() {
                self.host
                    .violation("an HTTP call answer left the request held with nothing pending");
            }
        }
    }

    fn on_done(&mut self) -> bool {
        profile!(6);
        if let Some(f) = self.filter.as_mut() {
            f.on_done(&self.host);
        }
        true
    }
}

impl HttpContext for HttpFilter {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        profile!(1);
        self.host.enter(false);
        match self.filter.as_mut() {
            Some(f) => {
                let v = f.on_request_headers(&self.host, end_of_stream);
                self.host.action(v, true)
            }
            None => self.unconfigured(),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        profile!(2);
        self.host.enter(false);
        match self.filter.as_mut() {
            Some(f) => {
                let v = f.on_request_body(&self.host, body_size, end_of_stream);
                self.host.action(v, true)
            }
            None => Action::Pause,
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.host.enter(false);
        match self.filter.as_mut() {
            Some(f) => {
                let v = f.on_request_trailers(&self.host);
                self.host.action(v, true)
            }
            None => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        profile!(3);
        self.host.enter(true);
        match self.filter.as_mut() {
            Some(f) => {
                let v = f.on_response_headers(&self.host, end_of_stream);
                self.host.action(v, false)
            }
            None => Action::Continue,
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        profile!(4);
        self.host.enter(true);
        match self.filter.as_mut() {
            Some(f) => {
                let v = f.on_response_body(&self.host, body_size, end_of_stream);
                self.host.action(v, false)
            }
            None => Action::Continue,
        }
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        self.host.enter(true);
        match self.filter.as_mut() {
            Some(f) => {
                let v = f.on_response_trailers(&self.host);
                self.host.action(v, false)
            }
            None => Action::Continue,
        }
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        Box::new(Root {
            ctx: None,
            metrics: Rc::new(MetricIds::default()),
        })
    });
}}
