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
use crate::store::local::operations::{Forget, KeyState};
use crate::store::local::State;
use crate::store::{Store, StoreError};

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
    let about = serde_json::json!({"key": key, "digest": hex(&digest)});
    if method == "GET" {
        let state = table.inspect(host, &digest, now).map_err(failed)?;
        return Ok(json_reply(
            200,
            described(about, &state.ok_or_else(no_table)?, now),
        ));
    }
    let force = query.split('&').any(|p| p == "force=true");
    match table.forget(host, &digest, now, force).map_err(failed)? {
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
                &format!("operations: forgot key digest {} ({was})", hex(&digest)),
            );
            let mut body = about;
            body["state"] = "absent".into();
            body["forgotten"] = was.into();
            Ok(json_reply(200, body))
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

/// `about` (key and digest) with what the store holds, times relative to now.
fn described(mut about: serde_json::Value, state: &KeyState, now: u64) -> serde_json::Value {
    match *state {
        KeyState::Absent => about["state"] = "absent".into(),
        KeyState::InFlight {
            since_ms,
            lock_deadline_ms,
        } => {
            about["state"] = "in-flight".into();
            about["age_ms"] = now.saturating_sub(since_ms).into();
            about["expires_in_ms"] = lock_deadline_ms.saturating_sub(now).into();
        }
        KeyState::Completed {
            since_ms,
            expires_ms,
            status,
            body_bytes,
            body_omitted,
        } => {
            about["state"] = "completed".into();
            about["status"] = status.into();
            about["body_bytes"] = body_bytes.into();
            about["body_omitted"] = body_omitted.into();
            about["age_ms"] = now.saturating_sub(since_ms).into();
            about["expires_in_ms"] = expires_ms.saturating_sub(now).into();
        }
    }
    about
}

fn json_reply(status: u16, body: serde_json::Value) -> Reply {
    Reply {
        status,
        headers: vec![
            ("content-type".into(), b"application/json".to_vec()),
            ("cache-control".into(), b"no-store".to_vec()),
        ],
        body: serde_json::to_vec(&body).unwrap_or_default(),
    }
}
