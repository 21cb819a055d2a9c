//! The key-operations endpoint (`operations` in the configuration): this
//! filter instance, on a listener the operator keeps internal, protects
//! nothing and answers every request itself:
//!
//! * `GET <path>`: what the local store holds for the key (JSON: `state`
//!   `absent`, `in-flight` or `completed`, with the recorded status, body
//!   size and expiry);
//! * `DELETE <path>`: forgets the key, so that its next request runs again.
//!   A key whose request is still running is refused (`409`) unless
//!   `?force=true`: forgetting it would let a retry run while the original
//!   may still act.
//!
//! The key and its scope come as a client sends them (the key header, the
//! `scope_headers`), and are read by the code and configuration the
//! protected listener uses, so the digest is the same by construction.

use super::inspect::{key_error_detail, scoped_digest};
use super::reply::{problem_reply, Reply};
use super::{Filter, Verdict};
use crate::config::{Config, Operations};
use crate::fingerprint::hex;
use crate::host::{HeaderMap, Host, Level};
use crate::metrics::Metric;
use crate::problem::Problem;
use crate::store::budget::SpaceEffects;
use crate::store::local::operations::{Forget, KeyState};
use crate::store::local::State;
use crate::store::{Store, StoreError};
use serde::Serialize;

impl Filter {
    /// Answers one key operation; nothing reaches the upstream.
    pub(super) fn operate(
        &mut self,
        host: &impl Host,
        headers: &HeaderMap,
        ops: &Operations,
    ) -> Verdict {
        let reply = operation(&self.ctx.config, &self.ctx.store, host, headers, ops)
            .unwrap_or_else(|problem| {
                let mut reply = problem_reply(&problem);
                if problem.status == 405 {
                    reply
                        .headers
                        .push(("allow".into(), b"GET, DELETE".to_vec()));
                }
                reply
            });
        self.send_reply(host, reply)
    }
}

fn operation(
    cfg: &Config,
    store: &Store,
    host: &impl Host,
    headers: &HeaderMap,
    ops: &Operations,
) -> Result<Reply, Problem> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or("")
    };
    let (path, query) = text(":path").split_once('?').unwrap_or((text(":path"), ""));
    if path != ops.path {
        return Err(Problem::not_found(&ops.path));
    }
    let method = text(":method");
    if method != "GET" && method != "DELETE" {
        return Err(Problem::method_not_allowed());
    }
    let values: Vec<&[u8]> = headers.values(&cfg.header).collect();
    let key = match cfg.key_syntax.parse_headers(&values, cfg.max_key_length) {
        Ok(Some(k)) => k,
        Ok(None) => return Err(Problem::missing_key(&cfg.header)),
        Err(e) => return Err(Problem::invalid_key(&key_error_detail(&e, &cfg.header))),
    };
    let digest = scoped_digest(cfg, headers, &key);
    let Store::Local { table, .. } = store else {
        // The configuration refuses `operations` with another store.
        return Err(Problem::internal(
            "The operations endpoint needs the local store.",
        ));
    };
    let failed = |e: StoreError| {
        host.log(Level::Error, &format!("operations: {e}"));
        Problem::store_unavailable("local")
    };
    let no_table = || Problem::no_table(table.capacity());
    let now = host.now_ms();
    let mut answer = Answer {
        key: &key,
        digest: hex(&digest),
        ..Answer::default()
    };
    if method == "GET" {
        let state = table.inspect(host, &digest, now).map_err(failed)?;
        answer.describe(&state.ok_or_else(no_table)?, now);
        return Ok(json_reply(&answer));
    }
    let force = query.split('&').any(|p| p == "force=true");
    let mut space = SpaceEffects::default();
    let forgotten = table.forget(host, &digest, now, force, &mut space);
    // The bytes it freed, whatever the result (the gauge follows the table).
    space.report_bytes(host);
    match forgotten.map_err(failed)? {
        None => Err(no_table()),
        Some(Forget::Absent) => Err(Problem::key_absent()),
        Some(Forget::Running { lock_deadline_ms }) => {
            Err(Problem::key_running(lock_deadline_ms.saturating_sub(now)))
        }
        Some(Forget::Forgotten(was)) => {
            host.metric_add(Metric::Entries, -1);
            let was = state_name(was);
            // Who let which key run again: the proxy's log is the trail.
            host.log(
                Level::Info,
                &format!("operations: forgot key digest {} ({was})", answer.digest),
            );
            answer.state = "absent";
            answer.forgotten = Some(was);
            Ok(json_reply(&answer))
        }
    }
}

fn state_name(state: State) -> &'static str {
    match state {
        State::Free => "absent",
        State::InFlight => "in-flight",
        State::Completed => "completed",
    }
}

/// The endpoint's JSON answer: the key, its digest (the store's address of
/// it, as the log names it), and what the store holds, times relative to now.
#[derive(Serialize, Default)]
struct Answer<'a> {
    key: &'a str,
    digest: String,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    forgotten: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_omitted: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    age_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in_ms: Option<u64>,
}

impl Answer<'_> {
    fn describe(&mut self, state: &KeyState, now: u64) {
        match *state {
            KeyState::Absent => self.state = "absent",
            KeyState::InFlight {
                since_ms,
                lock_deadline_ms,
            } => {
                self.state = "in-flight";
                self.age_ms = Some(now.saturating_sub(since_ms));
                self.expires_in_ms = Some(lock_deadline_ms.saturating_sub(now));
            }
            KeyState::Completed {
                since_ms,
                expires_ms,
                status,
                body_bytes,
                body_omitted,
            } => {
                self.state = "completed";
                self.status = Some(status);
                self.body_bytes = Some(body_bytes);
                self.body_omitted = Some(body_omitted);
                self.age_ms = Some(now.saturating_sub(since_ms));
                self.expires_in_ms = Some(expires_ms.saturating_sub(now));
            }
        }
    }
}

fn json_reply(answer: &Answer) -> Reply {
    Reply {
        status: 200,
        headers: vec![
            ("content-type".into(), b"application/json".to_vec()),
            ("cache-control".into(), b"no-store".to_vec()),
        ],
        body: serde_json::to_vec(answer).unwrap_or_default(),
    }
}
