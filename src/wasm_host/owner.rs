//! Calls owned by the worker (Envoy): a request's HTTP calls are made by its
//! VM's root context, which lives as long as its configuration and, once
//! that is replaced on the same VM, until its calls are settled
//! ([`Owner::idle`]), so that an answer is handled even when the request
//! that made the call has gone (the client timed out, say). The SDK drops
//! an answer whose context is gone; made by the root, the answer reaches the root, which hands it to the request's
//! filter, acting for the request's stream when it still exists.
//!
//! ```text
//! stream callback ──call──▶ outbox + per-VM queue ──on_queue_ready──▶ root sends
//! root: answer ──token──▶ (stream, call id) ──▶ filter.on_call_response
//!         stream alive: effective context = the stream (resume, reply)
//!         stream gone:  the filter records / releases / cancels, answers no one
//! ```
//! A call made while the root already runs (a record after the claim's
//! answer, say) is sent at once, as the root. The queue's name is random:
//! names are per VM id, and every worker's VM registers its own.
//!
//! Store operations (Redis) are not calls of their own: they join the
//! worker's group commit ([`GroupCommit`]), one batch out at a time; the
//! root sends the next batch when the queue wakes it, or at the end of any
//! callback of its own (a batch's answer above all), and hands each
//! operation's reply to its request.

use super::{drain_queue, enqueue, now_ms, sdk_dispatch, set_effective_context};
use crate::filter::Filter;
use crate::host::HostError;
use crate::store::batch::{OpReply, RedisOp};
use crate::store::group_commit::{Answered, GroupCommit};
use crate::store::redis::RedisConfig;
use crate::store::StoreError;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;

/// Whose store operation a batch carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Caller {
    /// A request's (its stream, the filter's call id).
    Stream { stream: u32, id: u32 },
    /// The root's renewal of the claim with this token, sent at `sent_ms`.
    Renewal { token: u64, sent_ms: u64 },
}

/// The worker's group commit and where its batches go.
struct Batches {
    store: RedisConfig,
    group: RefCell<GroupCommit<Caller>>,
    /// The root's token for the batch that is out.
    token: Cell<Option<u32>>,
    /// The queue has been signalled and the root has not run since.
    woken: Cell<bool>,
}

/// A call a stream made, waiting for the root to send it.
struct Outgoing {
    stream: u32,
    id: u32,
    upstream: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
    timeout_ms: u64,
}

pub(super) struct Owner {
    root: u32,
    queue: u32,
    next_id: Cell<u32>,
    outbox: RefCell<VecDeque<Outgoing>>,
    /// The root's call tokens: whose call each is (stream, the filter's id).
    tokens: RefCell<HashMap<u32, (u32, u32)>>,
    /// Each stream's filter, while the stream lives or a call of its is out.
    filters: RefCell<HashMap<u32, Rc<RefCell<Filter>>>>,
    alive: RefCell<HashSet<u32>>,
    /// The root is running: calls are sent at once.
    in_root: Cell<bool>,
    /// The stream the root acts for (the effective context), if any.
    acting_for: Cell<Option<u32>>,
    /// Redis store: the operations of this worker's requests, batched.
    batches: Option<Batches>,
}

/// What a stream's host uses to make its calls through the owner.
#[derive(Clone)]
pub(super) struct Route {
    owner: Rc<Owner>,
    stream: u32,
}

impl Route {
    pub(super) fn dispatch(
        &self,
        upstream: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout_ms: u64,
    ) -> Result<u32, HostError> {
        self.owner
            .dispatch(self.stream, upstream, headers, body, timeout_ms)
    }

    pub(super) fn groups_store_ops(&self) -> bool {
        self.owner.batches.is_some()
    }

    pub(super) fn send_store_op(&self, op: RedisOp) -> Result<u32, HostError> {
        let id = self.owner.next_id();
        self.owner.push_op(
            Caller::Stream {
                stream: self.stream,
                id,
            },
            op,
        )?;
        Ok(id)
    }
}

impl Owner {
    /// `store`: the Redis store whose operations this worker batches.
    pub(super) fn new(root: u32, queue: u32, store: Option<RedisConfig>) -> Owner {
        Owner {
            root,
            queue,
            next_id: Cell::new(0),
            outbox: RefCell::new(VecDeque::new()),
            tokens: RefCell::new(HashMap::new()),
            filters: RefCell::new(HashMap::new()),
            alive: RefCell::new(HashSet::new()),
            in_root: Cell::new(false),
            acting_for: Cell::new(None),
            batches: store.map(|store| Batches {
                store,
                group: RefCell::new(GroupCommit::default()),
                token: Cell::new(None),
                woken: Cell::new(false),
            }),
        }
    }

    /// Queues a store operation for the next batch, waking the root unless
    /// it will send that batch anyway: it is running, or a batch is out
    /// (its answer sends the next), or the queue was already signalled.
    pub(super) fn push_op(&self, caller: Caller, op: RedisOp) -> Result<(), HostError> {
        let Some(batches) = &self.batches else {
            return Err(HostError::unsupported("send_store_op"));
        };
        let wake = !self.in_root.get() && !batches.group.borrow().busy() && !batches.woken.get();
        if wake {
            enqueue(self.queue)?;
            batches.woken.set(true);
        }
        batches.group.borrow_mut().push(caller, op, now_ms);
        Ok(())
    }

    /// Sends the next batch if none is out. Returns the replies of
    /// operations failed instead (a batch that could not be sent, or claims
    /// that waited longer than the store's timeout: `expire_claims`), and
    /// how many operations the batch sent carried (0: none sent).
    pub(super) fn send_batch(&self) -> (Vec<(Caller, OpReply)>, usize) {
        let Some(batches) = &self.batches else {
            return (Vec::new(), 0);
        };
        batches.woken.set(false);
        let mut group = batches.group.borrow_mut();
        if group.busy() {
            return (Vec::new(), 0);
        }
        let expired = group.expire_claims(now_ms(), batches.store.timeout_ms);
        if !expired.is_empty() {
            // Failed now; the caller hands them over and asks again.
            return (expired, 0);
        }
        let next = group.next_batch();
        drop(group);
        let Some(request) = next else {
            return (Vec::new(), 0);
        };
        self.send_batch_request(batches, &request)
    }

    fn send_batch_request(
        &self,
        batches: &Batches,
        request: &crate::store::webdis::StoreRequest,
    ) -> (Vec<(Caller, OpReply)>, usize) {
        let store = &batches.store;
        let sent = self.send_as_root(
            &store.cluster,
            &store.call_headers(request),
            request.body.as_deref(),
            store.timeout_ms,
        );
        let mut group = batches.group.borrow_mut();
        match sent {
            Ok(token) => {
                batches.token.set(Some(token));
                (Vec::new(), group.in_flight_ops())
            }
            Err(e) => (group.send_failed(&StoreError::not_sent(e)), 0),
        }
    }

    /// Whether the root's call `token` is the batch that is out.
    pub(super) fn is_batch(&self, token: u32) -> bool {
        self.batches
            .as_ref()
            .is_some_and(|b| b.token.get() == Some(token))
    }

    /// The answer to the root's call `token`, if it is the batch that is
    /// out: each operation's reply (none yet when the batch had to be sent
    /// again by source, which `resent` then counts).
    pub(super) fn batch_answered(
        &self,
        token: u32,
        status: Option<u16>,
        body: &[u8],
    ) -> Option<(Vec<(Caller, OpReply)>, usize)> {
        let batches = self.batches.as_ref()?;
        if batches.token.get() != Some(token) {
            return None;
        }
        batches.token.set(None);
        let answered = batches.group.borrow_mut().answered(status, body);
        Some(match answered {
            Answered::Replies(replies) => (replies, 0),
            Answered::Resend(request) => self.send_batch_request(batches, &request),
        })
    }

    /// Nothing of any request is left here: no call out or queued, no
    /// batch out or waiting, no filter kept for a call (nor a stream).
    pub(super) fn idle(&self) -> bool {
        self.filters.borrow().is_empty()
            && self.outbox.borrow().is_empty()
            && self.tokens.borrow().is_empty()
            && self
                .batches
                .as_ref()
                .is_none_or(|b| b.group.borrow().is_empty())
    }

    pub(super) fn route(self: &Rc<Self>, stream: u32) -> Route {
        Route {
            owner: self.clone(),
            stream,
        }
    }

    pub(super) fn queue(&self) -> u32 {
        self.queue
    }

    pub(super) fn add_stream(&self, stream: u32, filter: Rc<RefCell<Filter>>) {
        self.alive.borrow_mut().insert(stream);
        self.filters.borrow_mut().insert(stream, filter);
    }

    /// The stream's context is deleted; its filter stays while a call is out.
    pub(super) fn stream_gone(&self, stream: u32) {
        self.alive.borrow_mut().remove(&stream);
        self.settle(stream);
    }

    fn settle(&self, stream: u32) {
        if self.alive.borrow().contains(&stream) {
            return;
        }
        let pending = self
            .filters
            .borrow()
            .get(&stream)
            .is_some_and(|f| f.try_borrow().map_or(true, |f| f.waiting()));
        if !pending {
            self.filters.borrow_mut().remove(&stream);
        }
    }

    pub(super) fn next_id(&self) -> u32 {
        let id = self.next_id.get().wrapping_add(1).max(1);
        self.next_id.set(id);
        id
    }

    fn dispatch(
        &self,
        stream: u32,
        upstream: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout_ms: u64,
    ) -> Result<u32, HostError> {
        let id = self.next_id();
        if self.in_root.get() {
            let token = self.send_as_root(upstream, headers, body, timeout_ms)?;
            self.tokens.borrow_mut().insert(token, (stream, id));
            return Ok(id);
        }
        self.outbox.borrow_mut().push_back(Outgoing {
            stream,
            id,
            upstream: upstream.to_string(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: body.map(<[u8]>::to_vec),
            timeout_ms,
        });
        if let Err(e) = enqueue(self.queue) {
            self.outbox.borrow_mut().pop_back();
            return Err(e);
        }
        Ok(id)
    }

    /// Sends a call from the root's own callback. A call belongs to the
    /// context it is made from: the root's, not the stream it acts for.
    fn send_as_root(
        &self,
        upstream: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout_ms: u64,
    ) -> Result<u32, HostError> {
        let acting = self.acting_for.get();
        if acting.is_some() {
            set_effective_context(self.root);
        }
        let result = sdk_dispatch(upstream, headers, body, timeout_ms);
        if let Some(stream) = acting {
            set_effective_context(stream);
        }
        result
    }

    /// The root's `on_queue_ready`: sends every queued call. One that cannot
    /// be sent goes to `failed` with its stream and id.
    pub(super) fn send_queued(&self, mut failed: impl FnMut(u32, u32, HostError)) {
        drain_queue(self.queue);
        let was = self.in_root.replace(true);
        loop {
            let next = self.outbox.borrow_mut().pop_front();
            let Some(call) = next else { break };
            let headers: Vec<(&str, &str)> = call
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            match sdk_dispatch(
                &call.upstream,
                &headers,
                call.body.as_deref(),
                call.timeout_ms,
            ) {
                Ok(token) => {
                    self.tokens
                        .borrow_mut()
                        .insert(token, (call.stream, call.id));
                }
                Err(e) => failed(call.stream, call.id, e),
            }
        }
        self.in_root.set(was);
    }

    /// Whose call an answer to the root's `token` is: (stream, call id).
    pub(super) fn answered(&self, token: u32) -> Option<(u32, u32)> {
        self.tokens.borrow_mut().remove(&token)
    }

    /// Runs `apply` on the filter of `stream`, acting for the stream when
    /// it still exists. `false` when the filter is gone or busy.
    pub(super) fn deliver(&self, stream: u32, apply: impl FnOnce(&mut Filter)) -> bool {
        let Some(filter) = self.filters.borrow().get(&stream).cloned() else {
            return false;
        };
        let alive = self.alive.borrow().contains(&stream);
        let switched = alive && set_effective_context(stream);
        let was = (self.in_root.replace(true), self.acting_for.get());
        self.acting_for.set(switched.then_some(stream));
        let applied = match filter.try_borrow_mut() {
            Ok(mut f) => {
                apply(&mut f);
                true
            }
            Err(_) => false,
        };
        self.in_root.set(was.0);
        self.acting_for.set(was.1);
        if switched {
            set_effective_context(was.1.unwrap_or(self.root));
        }
        self.settle(stream);
        applied
    }
}
