//! The SDK's contexts: the root context (configuration, tick) and one HTTP
//! context per request, which hands each callback to the [`Filter`] with a
//! [`WasmHost`] and maps its verdict to the host's action.

use super::owner::{Caller, Owner};
#[cfg(feature = "self-profile")]
use super::self_profile;
use super::{
    get_buffer, host_log, now_ms, read_call_response, read_call_status_and_body, register_queue,
    root_done, set_tick_period, share_clock, MetricIds, WasmHost, BUFFER_PLUGIN_CONFIGURATION, OK,
};
use crate::config::{Config, Platform};
use crate::filter::{Filter, FilterContext};
use crate::host::{Host, Level};
use crate::metrics::Metric;
use crate::store::batch::OpReply;
use crate::store::redis::RedisConfig;
use crate::store::renewals::TICK_MS;
use crate::store::{Renewal, StoreError};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use std::cell::RefCell;
use std::rc::Rc;

struct Root {
    id: u32,
    ctx: Option<Rc<FilterContext>>,
    metrics: Rc<MetricIds>,
    /// The requests' calls, where the platform lets the worker own them.
    owner: Option<Rc<Owner>>,
    /// The host is done with this configuration and waits for the root to
    /// say it may go (`on_done` answered "not yet").
    retiring: bool,
}

impl Root {
    fn platform(&self) -> Platform {
        self.ctx
            .as_ref()
            .map_or(Platform::Envoy, |c| c.config.platform)
    }

    /// A host for the filter of `stream`, run from the root.
    fn stream_host(&self, owner: &Rc<Owner>, stream: u32) -> WasmHost {
        WasmHost::new(self.metrics.clone(), self.platform()).routed(Some(owner.route(stream)))
    }

    /// Takes the worker's ownership of the requests' calls: a queue of this
    /// VM, under a name no other VM uses, wakes the root to send them, and
    /// the root batches the Redis store's operations (`store`). Without it
    /// an answer after a client has gone would be lost, and Redis claims
    /// could not be renewed: the configuration is refused.
    fn own_calls(&mut self, host: &WasmHost, store: Option<RedisConfig>) -> Result<(), String> {
        if self.owner.is_some() {
            return Ok(());
        }
        let name = format!(
            "idempotency-filter/calls/{:016x}{:016x}",
            host.random_u64(),
            host.random_u64()
        );
        let queue = register_queue(&name)
            .map_err(|e| format!("cannot register the worker's call queue: {e}"))?;
        self.owner = Some(Rc::new(Owner::new(self.id, queue, store)));
        Ok(())
    }

    /// Renews the claims of this VM's running requests that are due. Redis:
    /// in the worker's next batch, one renewal out per claim at most.
    fn renew_claims(&mut self, host: &WasmHost) {
        let Some(ctx) = self.ctx.clone() else { return };
        let lock_ms = ctx.config.lock_timeout_ms;
        let now = host.now_ms();
        let due = ctx.renewals.due(now, ctx.config.renew_after_ms);
        if due.is_empty() {
            return;
        }
        match ctx.store.renew(host, &due, lock_ms) {
            Renewal::Done(claims) => {
                for (token, result) in claims {
                    self.renewed(host, token, result, now);
                }
            }
            Renewal::Ops(ops) => {
                let Some(owner) = self.owner.clone() else {
                    return;
                };
                for (token, op) in ops {
                    let caller = Caller::Renewal {
                        token,
                        sent_ms: now,
                    };
                    if let Err(e) = owner.push_op(caller, op) {
                        host_log(Level::Warn, &format!("claims not renewed this tick: {e}"));
                        return;
                    }
                    ctx.renewals.sent(token);
                }
            }
        }
    }

    /// Sends the worker's next batch of store operations unless one is out.
    /// A batch that cannot be sent fails each of its operations now.
    fn send_batches(&mut self, owner: &Rc<Owner>) {
        loop {
            let (failed, sent) = owner.send_batch();
            self.count_batch(sent);
            if failed.is_empty() {
                return;
            }
            self.deliver_replies(owner, failed);
        }
    }

    fn count_batch(&self, operations: usize) {
        if operations > 0 {
            self.metrics.add(Metric::StoreCalls, 1);
            self.metrics.add(Metric::StoreOperations, operations as i64);
        }
    }

    /// Nothing the root owns is under way.
    fn idle(&self) -> bool {
        self.owner.as_ref().is_none_or(|o| o.idle())
    }

    /// Called at the end of the root's callbacks: a retiring root whose
    /// last call has settled tells the host it may be deleted now.
    fn finish_if_retired(&mut self) {
        if !self.retiring || !self.idle() {
            return;
        }
        self.retiring = false;
        match root_done() {
            Ok(()) => host_log(
                Level::Info,
                "a replaced configuration's root has settled its calls and goes",
            ),
            Err(e) => host_log(
                Level::Warn,
                &format!("a replaced configuration's root could not go: {e}"),
            ),
        }
    }

    /// Hands each operation's reply to its request (acting for its stream),
    /// or to the tick's renewals.
    fn deliver_replies(&mut self, owner: &Rc<Owner>, replies: Vec<(Caller, OpReply)>) {
        for (caller, reply) in replies {
            match caller {
                Caller::Stream { stream, id } => {
                    let host = self.stream_host(owner, stream);
                    owner.deliver(stream, |f| f.on_store_reply(&host, id, reply));
                }
                Caller::Renewal { token, sent_ms } => {
                    let Some(ctx) = self.ctx.clone() else {
                        continue;
                    };
                    let host = WasmHost::new(self.metrics.clone(), Platform::Envoy);
                    let result = ctx.store.renew_answered(reply);
                    self.renewed(&host, token, result, sent_ms);
                }
            }
        }
    }

    /// A renewal sent at `sent_ms` was answered: the claim's deadline moves
    /// (counted from the send), or the claim is no longer this request's.
    fn renewed(&self, host: &WasmHost, token: u64, result: Result<bool, StoreError>, sent_ms: u64) {
        let Some(ctx) = &self.ctx else { return };
        match result {
            Ok(kept) => {
                if ctx.renewals.renewed(token, kept, sent_ms) {
                    host.metric_add(Metric::ClaimsRenewed, 1);
                }
            }
            // The next tick tries again, while the lock still runs (a long
            // lock leaves room for two failed renewals, a short one for none).
            Err(e) => {
                ctx.renewals.failed(token);
                host_log(
                    Level::Warn,
                    &format!("a claim was not renewed this tick: {e}"),
                );
            }
        }
    }
}

impl Context for Root {
    /// An answer to a call the root made: its own renewal, or one made for
    /// a request.
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        profile!(5);
        let Some(owner) = self.owner.clone() else {
            return;
        };
        if owner.is_batch(token_id) {
            let (status, body) = read_call_status_and_body(body_size);
            if let Some((replies, resent)) = owner.batch_answered(token_id, status, &body) {
                self.count_batch(resent);
                self.deliver_replies(&owner, replies);
            }
        } else if let Some((stream, call)) = owner.answered(token_id) {
            let response = read_call_response(body_size);
            let host = self.stream_host(&owner, stream);
            owner.deliver(stream, |f| f.on_call_response(&host, call, &response));
        }
        // What the answers made the requests do next goes out now.
        self.send_batches(&owner);
        self.finish_if_retired();
    }

    /// The host is done with this configuration: replaced (a listener or
    /// extension update, any change to the plugin's JSON) once its last
    /// stream has ended, or the VM shuts down. Deleting the root now would
    /// cancel the calls it owns, and lose what they were for: a forwarded
    /// request's answer (its client gone, the upstream acting), a batch's
    /// records. Its claims would lapse unrenewed and their retries run
    /// again. So the root stays, with its tick, until it is idle, and then
    /// says so (`proxy_done`). Envoy keeps such a root while its VM lives:
    /// an update on the same VM keeps it; a new module or `vm_config` starts
    /// a new VM, and the old one goes, with this root and its calls, once
    /// its last stream has ended (README, failure modes; e2e tested).
    fn on_done(&mut self) -> bool {
        if self.idle() {
            return true;
        }
        self.retiring = true;
        host_log(
            Level::Info,
            "configuration replaced: its root stays until the calls it owns are settled",
        );
        false
    }
}

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
        if ctx.config.platform.has_shared_data() {
            share_clock(&host);
        }
        // The operations endpoint claims nothing, so it has nothing to renew
        // and sweeps nothing, and it never creates a table: it works on the
        // one the protecting instance made, and says so if there is none.
        let operations = ctx.config.operations.is_some();
        if !operations {
            if let Err(e) = ctx.store.init(&host) {
                host_log(Level::Error, &e);
                return false;
            }
        }
        if ctx.config.platform.calls_outlive_streams() && !operations {
            if let Err(e) = self.own_calls(&host, ctx.store.redis_config().cloned()) {
                host_log(Level::Error, &e);
                return false;
            }
        }
        // The tick renews running requests' claims (any store), sweeps the
        // local store, and reports in the profiling build.
        if (ctx.config.platform.has_tick() && !operations) || cfg!(feature = "self-profile") {
            let status = set_tick_period(TICK_MS as u32);
            if status != OK {
                host_log(Level::Warn, &format!("no tick (status {status}): claims are not renewed (a response slower than lock_timeout_seconds loses its claim) and expired records are reclaimed only when their slot is reused"));
            }
        }
        self.ctx = Some(Rc::new(ctx));
        true
    }

    fn on_tick(&mut self) {
        #[cfg(feature = "self-profile")]
        host_log(Level::Warn, &self_profile::report());
        profile!(7);
        let Some(ctx) = self.ctx.clone() else { return };
        let host = WasmHost::new(self.metrics.clone(), Platform::Envoy);
        self.renew_claims(&host);
        if let Some(owner) = self.owner.clone() {
            self.send_batches(&owner);
        }
        if let Some(occupied) = ctx.store.tick(&host, now_ms()) {
            self.metrics.set(Metric::Entries, occupied);
        }
        self.finish_if_retired();
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let Some(owner) = self.owner.clone() else {
            return;
        };
        if owner.queue() != queue_id {
            return;
        }
        owner.send_queued(|stream, call, e| {
            let host = self.stream_host(&owner, stream);
            owner.deliver(stream, |f| f.on_call_failed(&host, call, e));
        });
        self.send_batches(&owner);
        self.finish_if_retired();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        profile!(0);
        // Always Some: the SDK panics on None. Without a configuration (the
        // host would not normally create contexts then) the filter fails closed.
        let filter = self
            .ctx
            .clone()
            .map(|c| Rc::new(RefCell::new(Filter::new(c))));
        let owner = self
            .owner
            .clone()
            .filter(|_| filter.is_some() && self.platform().calls_outlive_streams());
        if let (Some(owner), Some(filter)) = (&owner, &filter) {
            owner.add_stream(context_id, filter.clone());
        }
        Some(Box::new(HttpFilter {
            host: WasmHost::new(self.metrics.clone(), self.platform())
                .routed(owner.as_ref().map(|o| o.route(context_id))),
            filter,
            stream: context_id,
            owner,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct HttpFilter {
    filter: Option<Rc<RefCell<Filter>>>,
    host: WasmHost,
    stream: u32,
    owner: Option<Rc<Owner>>,
}

impl Drop for HttpFilter {
    fn drop(&mut self) {
        if let Some(owner) = &self.owner {
            owner.stream_gone(self.stream);
        }
    }
}

impl HttpFilter {
    /// Runs a callback on the filter; `otherwise` when there is none (no
    /// valid configuration) or it is busy (never expected: the host does
    /// not re-enter a context from within a callback).
    fn with<R>(&self, otherwise: R, run: impl FnOnce(&mut Filter, &WasmHost) -> R) -> R {
        match self.filter.as_ref().map(|f| f.try_borrow_mut()) {
            Some(Ok(mut f)) => run(&mut f, &self.host),
            Some(Err(_)) => {
                host_log(Level::Error, "filter busy: callback skipped");
                otherwise
            }
            None => otherwise,
        }
    }

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
        if self.filter.is_none() {
            return;
        }
        if let Some(rules) = &self.host.rules {
            rules.pending.set(rules.pending.get().saturating_sub(1));
        }
        let response = read_call_response(body_size);
        self.with((), |f, host| f.on_call_response(host, token_id, &response));
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
        self.with((), |f, host| f.on_done(host));
        true
    }
}

impl HttpContext for HttpFilter {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        profile!(1);
        self.host.enter(false);
        match self.with(None, |f, host| {
            Some(f.on_request_headers(host, end_of_stream))
        }) {
            Some(v) => self.host.action(v, true),
            None => self.unconfigured(),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        profile!(2);
        self.host.enter(false);
        match self.with(None, |f, host| {
            Some(f.on_request_body(host, body_size, end_of_stream))
        }) {
            Some(v) => self.host.action(v, true),
            None => Action::Pause,
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.host.enter(false);
        match self.with(None, |f, host| Some(f.on_request_trailers(host))) {
            Some(v) => self.host.action(v, true),
            None => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        profile!(3);
        self.host.enter(true);
        match self.with(None, |f, host| {
            Some(f.on_response_headers(host, end_of_stream))
        }) {
            Some(v) => self.host.action(v, false),
            None => Action::Continue,
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        profile!(4);
        self.host.enter(true);
        match self.with(None, |f, host| {
            Some(f.on_response_body(host, body_size, end_of_stream))
        }) {
            Some(v) => self.host.action(v, false),
            None => Action::Continue,
        }
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        self.host.enter(true);
        match self.with(None, |f, host| Some(f.on_response_trailers(host))) {
            Some(v) => self.host.action(v, false),
            None => Action::Continue,
        }
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root {
            id: context_id,
            ctx: None,
            metrics: Rc::new(MetricIds::default()),
            owner: None,
            retiring: false,
        })
    });
}}
