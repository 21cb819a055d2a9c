//! Webdis + Redis in memory, for unit tests: decodes a call the filter
//! dispatched (found by what it is: a claim, a record, a release or a
//! cancel) and runs its script's semantics. Expiry is not modelled.

use crate::fake_host::{Call, FakeHost};
use crate::store::redis::{CANCEL_SCRIPT, CLAIM_SCRIPT, COMPLETE_SCRIPT, RELEASE_SCRIPT};
use std::cell::RefCell;
use std::collections::HashMap;

/// Which script a call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Claim,
    Complete,
    Release,
    Cancel,
}

#[derive(Default)]
pub struct FakeRedis {
    pub data: RefCell<HashMap<String, String>>,
}

pub fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// The script, key and arguments of a Webdis `EVAL` call.
fn decode(call: &Call) -> (String, String, Vec<String>) {
    let path = call.header(":path").unwrap();
    let segs: Vec<String> = path.split('/').skip(2).map(pct_decode).collect();
    (segs[0].clone(), segs[2].clone(), segs[3..].to_vec())
}

/// What the call with id `id` runs, if it is a Redis call at all.
pub fn op(call: &Call) -> Option<Op> {
    if !call
        .header(":path")
        .is_some_and(|p| p.starts_with("/EVAL/"))
    {
        return None;
    }
    let (script, _, _) = decode(call);
    [
        (CLAIM_SCRIPT, Op::Claim),
        (COMPLETE_SCRIPT, Op::Complete),
        (RELEASE_SCRIPT, Op::Release),
        (CANCEL_SCRIPT, Op::Cancel),
    ]
    .into_iter()
    .find(|(s, _)| *s == script)
    .map(|(_, op)| op)
}

/// The id of the last `op` call `host` sent.
pub fn last_call(host: &FakeHost, op: Op) -> u32 {
    host.calls()
        .iter()
        .rev()
        .find(|c| self::op(c) == Some(op))
        .map(|c| c.id)
        .unwrap_or_else(|| panic!("no {op:?} call was sent"))
}

impl FakeRedis {
    /// The id of the last `op` call `host` sent.
    pub fn last(&self, host: &FakeHost, op: Op) -> u32 {
        last_call(host, op)
    }

    /// Runs the call with id `id` that `host` sent; returns Webdis's JSON.
    pub fn answer(&self, host: &FakeHost, id: u32) -> Vec<u8> {
        let call = host.call(id);
        let (script, key, args) = decode(&call);
        let mut data = self.data.borrow_mut();
        let reply = if script == CLAIM_SCRIPT {
            let (marker, tombstone) = (&args[0], &args[2]);
            match data.get(&key).cloned() {
                Some(v) if &v == tombstone => {
                    data.remove(&key);
                    serde_json::json!("cancelled")
                }
                // Expiry is not modelled: every record has a minute left.
                Some(v) if !v.starts_with("X|") => serde_json::json!(format!("60000|{v}")),
                _ => {
                    data.insert(key.clone(), marker.clone());
                    serde_json::json!("claimed")
                }
            }
        } else if script == CANCEL_SCRIPT {
            let (owner, tombstone) = (&args[0], &args[1]);
            match data.get(&key).cloned() {
                None => {
                    data.insert(key.clone(), tombstone.clone());
                    serde_json::json!(2)
                }
                Some(v) if v.starts_with(owner.as_str()) => {
                    data.remove(&key);
                    serde_json::json!(1)
                }
                Some(_) => serde_json::json!(0),
            }
        } else {
            let owner = &args[0];
            let owned = data
                .get(&key)
                .is_some_and(|v| v.starts_with(owner.as_str()));
            if owned && script == COMPLETE_SCRIPT {
                data.insert(key.clone(), String::from_utf8(call.body.unwrap()).unwrap());
            } else if owned && script == RELEASE_SCRIPT {
                data.remove(&key);
            }
            serde_json::json!(i32::from(owned))
        };
        serde_json::to_vec(&serde_json::json!({ "EVAL": reply })).unwrap()
    }
}
