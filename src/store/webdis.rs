//! How a script call travels over HTTP to Redis's front end. Webdis today;
//! another front end (an Upstash-style JSON `POST /`) is one more
//! implementation of [`Dialect`].

use super::StoreError;
use crate::wire::push_percent_encoded;

/// A Redis reply, as far as the store's script needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisValue {
    Nil,
    Int(i64),
    Text(String),
    /// An array of strings: the batch script answers one per operation.
    List(Vec<String>),
    /// A Redis error reply (script error, OOM, `NOSCRIPT`, ...).
    Error(String),
}

/// One HTTP request to the store's front end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRequest {
    pub method: &'static str,
    pub path: String,
    pub body: Option<Vec<u8>>,
}

/// How the script travels: its source (`EVAL`), or its SHA-1 (`EVALSHA`),
/// which Redis answers with `NOSCRIPT` until it has seen the source once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script<'a> {
    Source(&'a str),
    Sha(&'a str),
}

/// How a script call travels over HTTP to one kind of front end.
pub trait Dialect {
    /// `EVAL[SHA] script numkeys keys... args... [last]`; `last`, when given,
    /// is the final argument, sent in the body where the dialect allows
    /// (records can be large).
    fn eval(
        &self,
        script: Script,
        keys: &[&str],
        args: &[&str],
        last: Option<Vec<u8>>,
    ) -> StoreRequest;
    /// Parses the front end's answer to an `eval` request.
    fn parse(&self, status: u16, body: &[u8]) -> Result<RedisValue, StoreError>;
}

/// Webdis: `GET /EVAL/<script>/<numkeys>/<key>/<arg>...` (or `/EVALSHA/<sha>/...`)
/// with every segment percent-encoded; a `PUT` body is appended as the last
/// argument. Replies are JSON named by the command: `{"EVAL": <value>}`,
/// errors as `{"EVAL": [false, "ERR ..."]}`.
///
/// Webdis reads a dot in the *last* path segment as a format suffix
/// (`.json`, `.raw`): every last segment built here is digits or ends in `|`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Webdis;

impl Dialect for Webdis {
    fn eval(
        &self,
        script: Script,
        keys: &[&str],
        args: &[&str],
        last: Option<Vec<u8>>,
    ) -> StoreRequest {
        let (command, text) = match script {
            Script::Source(source) => ("/EVAL/", source),
            Script::Sha(sha) => ("/EVALSHA/", sha),
        };
        let segments: usize = keys.iter().chain(args.iter()).map(|p| p.len() + 1).sum();
        let mut path = String::with_capacity(command.len() + text.len() + 8 + segments);
        path.push_str(command);
        push_percent_encoded(&mut path, text.as_bytes());
        path.push('/');
        path.push_str(&keys.len().to_string());
        for part in keys.iter().chain(args.iter()) {
            path.push('/');
            push_percent_encoded(&mut path, part.as_bytes());
        }
        StoreRequest {
            method: if last.is_some() { "PUT" } else { "GET" },
            path,
            body: last,
        }
    }

    fn parse(&self, status: u16, body: &[u8]) -> Result<RedisValue, StoreError> {
        if status != 200 {
            return Err(StoreError::Unavailable(format!(
                "webdis answered HTTP {status}"
            )));
        }
        let doc: serde_json::Value = serde_json::from_slice(body)
            .map_err(|_| StoreError::Corrupt("webdis reply is not JSON"))?;
        let value = match doc.as_object().map(|o| (o.len(), o.values().next())) {
            Some((1, Some(v))) => v,
            _ => return Err(StoreError::Corrupt("webdis reply without one command")),
        };
        match value {
            serde_json::Value::Null => Ok(RedisValue::Nil),
            serde_json::Value::String(s) => Ok(RedisValue::Text(s.clone())),
            serde_json::Value::Number(n) => n
                .as_i64()
                .map(RedisValue::Int)
                .ok_or(StoreError::Corrupt("webdis number")),
            serde_json::Value::Array(a) if a.first() == Some(&serde_json::Value::Bool(false)) => {
                Ok(RedisValue::Error(
                    a.get(1)
                        .and_then(|m| m.as_str())
                        .unwrap_or("unknown error")
                        .to_string(),
                ))
            }
            serde_json::Value::Array(a) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<String>>>()
                .map(RedisValue::List)
                .ok_or(StoreError::Corrupt("webdis array of non-strings")),
            _ => Err(StoreError::Corrupt("unexpected webdis reply")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_of_every_shape() {
        let w = Webdis;
        assert_eq!(
            w.parse(200, br#"{"EVAL":"x"}"#),
            Ok(RedisValue::Text("x".into()))
        );
        assert_eq!(w.parse(200, br#"{"EVALSHA":3}"#), Ok(RedisValue::Int(3)));
        assert_eq!(w.parse(200, br#"{"EVAL":null}"#), Ok(RedisValue::Nil));
        assert_eq!(
            w.parse(200, br#"{"EVALSHA":["a","1"]}"#),
            Ok(RedisValue::List(vec!["a".into(), "1".into()]))
        );
        assert_eq!(
            w.parse(200, br#"{"EVALSHA":[false,"NOSCRIPT No matching script"]}"#),
            Ok(RedisValue::Error("NOSCRIPT No matching script".into()))
        );
        for bad in [
            &br#"{}"#[..],
            br#"{"A":1,"B":2}"#,
            br#"{"EVAL":["a",1]}"#,
            b"[1]",
            b"x",
        ] {
            assert!(
                w.parse(200, bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(w.parse(503, b""), Err(StoreError::Unavailable(_))));
    }

    #[test]
    fn the_script_goes_by_source_or_by_sha() {
        let w = Webdis;
        let by_source = w.eval(Script::Source("return 1"), &["k"], &["a|"], None);
        assert_eq!(by_source.path, "/EVAL/return%201/1/k/a%7C");
        assert_eq!(by_source.method, "GET");
        let by_sha = w.eval(Script::Sha("ab12"), &[], &["7"], Some(b"rec".to_vec()));
        assert_eq!(by_sha.path, "/EVALSHA/ab12/0/7");
        assert_eq!(
            (by_sha.method, by_sha.body.as_deref()),
            ("PUT", Some(&b"rec"[..]))
        );
    }
}
