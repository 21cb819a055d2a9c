//! Webdis + Redis in memory, for unit tests: decodes a batch call the filter
//! (or the group commit) sent and runs the batch script's semantics, one
//! operation after the other. Expiry is not modelled.

use crate::fake_host::{Call, FakeHost};
use crate::store::batch::{OpKind, BATCH_SCRIPT, BATCH_SCRIPT_SHA1};
use crate::store::webdis::StoreRequest;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// What a call of one operation does.
pub type Op = OpKind;

#[derive(Default)]
pub struct FakeRedis {
    pub data: RefCell<HashMap<String, String>>,
    /// Redis has the script (an `EVAL` of it ran): `EVALSHA` works.
    pub script_loaded: Cell<bool>,
}

impl FakeRedis {
    /// A Redis that has run the script before (the usual case): `EVALSHA`
    /// works from the first call.
    pub fn with_script() -> FakeRedis {
        let redis = FakeRedis::default();
        redis.script_loaded.set(true);
        redis
    }
}

pub fn pct_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .unwrap()
        .into_owned()
}

/// A batch call, decoded.
struct Batch {
    by_sha: bool,
    script: String,
    keys: Vec<String>,
    kinds: Vec<Op>,
    args: Vec<String>,
    body: Option<String>,
}

fn kind_of(letter: char) -> Op {
    match letter {
        'C' => OpKind::Claim,
        'W' => OpKind::Record,
        'R' => OpKind::Release,
        'X' => OpKind::Cancel,
        'N' => OpKind::Renew,
        _ => panic!("unknown operation {letter}"),
    }
}

fn decode(path: &str, body: Option<&[u8]>) -> Option<Batch> {
    let by_sha = path.starts_with("/EVALSHA/");
    if !by_sha && !path.starts_with("/EVAL/") {
        return None;
    }
    let segs: Vec<String> = path.split('/').skip(2).map(pct_decode).collect();
    let n: usize = segs[1].parse().unwrap();
    let keys = segs[2..2 + n].to_vec();
    let kinds = segs[2 + n].chars().map(kind_of).collect();
    Some(Batch {
        by_sha,
        script: segs[0].clone(),
        keys,
        kinds,
        args: segs[3 + n..].to_vec(),
        body: body.map(|b| String::from_utf8(b.to_vec()).unwrap()),
    })
}

/// The kinds of the operations call `call` carries, if it is a store call.
pub fn ops(call: &Call) -> Option<Vec<Op>> {
    decode(call.header(":path")?, call.body.as_deref()).map(|b| b.kinds)
}

/// The id of the last call of one `op` that `host` sent.
pub fn last_call(host: &FakeHost, op: Op) -> u32 {
    host.calls()
        .iter()
        .rev()
        .find(|c| ops(c) == Some(vec![op]))
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
        let path = call.header(":path").unwrap().to_string();
        self.run(&path, call.body.as_deref())
    }

    /// Runs a batch request; returns Webdis's JSON.
    pub fn run_request(&self, request: &StoreRequest) -> Vec<u8> {
        self.run(&request.path, request.body.as_deref())
    }

    fn run(&self, path: &str, body: Option<&[u8]>) -> Vec<u8> {
        let batch = decode(path, body).expect("a store call");
        let command = if batch.by_sha { "EVALSHA" } else { "EVAL" };
        if batch.by_sha {
            assert_eq!(batch.script, BATCH_SCRIPT_SHA1);
            if !self.script_loaded.get() {
                return serde_json::to_vec(&serde_json::json!({
                    command: [false, "NOSCRIPT No matching script. Please use EVAL."]
                }))
                .unwrap();
            }
        } else {
            assert_eq!(batch.script, BATCH_SCRIPT);
            self.script_loaded.set(true);
        }
        let replies = self.apply(&batch);
        serde_json::to_vec(&serde_json::json!({ command: replies })).unwrap()
    }

    fn apply(&self, batch: &Batch) -> Vec<String> {
        let mut data = self.data.borrow_mut();
        let mut args = batch.args.iter();
        let mut next = || args.next().unwrap().clone();
        let mut at = 0;
        let mut out = Vec::new();
        for (kind, key) in batch.kinds.iter().zip(&batch.keys) {
            let value = data.get(key).cloned();
            let owned = |p: &str| value.as_deref().is_some_and(|v| v.starts_with(p));
            let reply = match kind {
                OpKind::Claim => {
                    let (marker, _ms) = (next(), next());
                    let token = &marker[2..18];
                    let tombstones: Vec<&str> = match value.as_deref() {
                        Some(v) if v.starts_with("X|") => v[2..].split('|').collect(),
                        _ => Vec::new(),
                    };
                    match value.as_deref() {
                        Some(_) if tombstones.contains(&token) => {
                            let rest: Vec<&str> =
                                tombstones.into_iter().filter(|t| *t != token).collect();
                            if rest.is_empty() {
                                data.remove(key);
                            } else {
                                data.insert(key.clone(), format!("X|{}", rest.join("|")));
                            }
                            "cancelled".to_string()
                        }
                        // Expiry is not modelled: every record has a minute left.
                        Some(v) if !v.starts_with("X|") => format!("60000|{v}"),
                        _ => {
                            data.insert(key.clone(), marker);
                            "claimed".to_string()
                        }
                    }
                }
                OpKind::Record => {
                    let (prefix, _ms, len) = (next(), next(), next());
                    let len: usize = len.parse().unwrap();
                    let record = batch.body.as_ref().unwrap()[at..at + len].to_string();
                    at += len;
                    let owned = owned(&prefix);
                    if owned {
                        data.insert(key.clone(), record);
                    }
                    u8::from(owned).to_string()
                }
                OpKind::Release => {
                    let owned = owned(&next());
                    if owned {
                        data.remove(key);
                    }
                    u8::from(owned).to_string()
                }
                OpKind::Cancel => {
                    let (prefix, _ms) = (next(), next());
                    let token = &prefix[2..18];
                    match value.as_deref() {
                        _ if owned(&prefix) => {
                            data.remove(key);
                            "1".to_string()
                        }
                        Some(v) if !v.starts_with("X|") => "0".to_string(),
                        Some(v) if v[2..].split('|').any(|t| t == token) => "2".to_string(),
                        Some(v) => {
                            data.insert(key.clone(), format!("{v}|{token}"));
                            "2".to_string()
                        }
                        None => {
                            data.insert(key.clone(), format!("X|{token}"));
                            "2".to_string()
                        }
                    }
                }
                OpKind::Renew => {
                    let (prefix, _ms) = (next(), next());
                    u8::from(owned(&prefix)).to_string()
                }
            };
            out.push(reply);
        }
        out
    }
}
