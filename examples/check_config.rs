//! Validates plugin configurations before they reach a gateway: the same
//! parser and checks as the filter's `on_configure`.
//!
//!     cargo run -q --example check_config -- conf.json [more.json ...]
//!     cargo run -q --example check_config -- envoy.yaml apisix.yaml
//!     echo '{"ttl_seconds": 0}' | cargo run -q --example check_config -- -
//!
//! A FILE is one of:
//! * a plugin configuration (JSON);
//! * a YAML (or JSON) file that embeds configurations: an Envoy bootstrap,
//!   an Istio `EnvoyFilter` or Envoy Gateway `EnvoyPatchPolicy` manifest
//!   (several `---` documents are fine): every Wasm `PluginConfig` in it
//!   (a mapping with `vm_config`) is checked, its `configuration` being a
//!   `google.protobuf.StringValue` (none at all means the defaults); or an
//!   APISIX routes file: every plugin with a `conf` is checked;
//! * `-`: a plugin configuration on standard input.
//!
//! Prints `ok: <what>` or the line the filter would log, made plainer where
//! the parser's words are serde's (a JSON syntax error gets its line and
//! column, "expected u64" becomes the allowed range, a field of the other
//! store says so), and exits 1 if any configuration is refused, 2 on a
//! usage or read error.

use idempotency_filter::config::Config;
use serde_json::{Map, Value};
use std::io::Read;
use yaml_rust2::{Yaml, YamlLoader};

const USAGE: &str = "\
usage: check_config FILE...        (make check-config FILES=\"FILE...\")
  FILE  a plugin configuration (JSON); an Envoy configuration, Istio EnvoyFilter,
        Envoy Gateway EnvoyPatchPolicy or APISIX routes file (YAML or JSON), whose
        embedded filter configurations are each checked; - for standard input";

fn main() {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.is_empty() || paths.iter().any(|p| p == "-h" || p == "--help") {
        eprintln!("{USAGE}");
        std::process::exit(2);
    }
    let mut failed = false;
    for path in paths {
        let bytes = match read(&path) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("cannot read {path}: {e}");
                std::process::exit(2);
            }
        };
        let name = if path == "-" { "<stdin>" } else { &path };
        let configs = match embedded(name, &bytes) {
            Ok(c) => c,
            Err(line) => {
                println!("{line}");
                failed = true;
                continue;
            }
        };
        for (what, conf) in configs {
            match check(&conf) {
                Ok(()) => println!("ok: {what}"),
                Err(line) => {
                    println!("{what}: {line}");
                    failed = true;
                }
            }
        }
    }
    std::process::exit(i32::from(failed));
}

fn read(path: &str) -> std::io::Result<Vec<u8>> {
    if path == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(buf)
    } else {
        std::fs::read(path)
    }
}

/// The plugin configurations a file holds, each with a name for the report.
fn embedded(name: &str, bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
    let docs: Vec<Value> = if yaml {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("{name}: not UTF-8: {e}"))?;
        YamlLoader::load_from_str(text)
            .map_err(|e| format!("{name}: YAML syntax error: {e}"))?
            .iter()
            .map(to_json)
            .collect()
    } else {
        match serde_json::from_slice::<Value>(bytes) {
            // A JSON Envoy bootstrap or APISIX file: look inside.
            Ok(Value::Object(o)) if CONTAINER_KEYS.iter().any(|k| o.contains_key(*k)) => {
                vec![Value::Object(o)]
            }
            _ => return Ok(vec![(name.to_string(), bytes.to_vec())]),
        }
    };
    let mut found = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let at = if docs.len() > 1 {
            format!("{name} (document {})", i + 1)
        } else {
            name.to_string()
        };
        walk(doc, "", &at, &mut found);
    }
    if found.is_empty() {
        return Err(format!(
            "{name}: no filter configuration found (looked for Wasm PluginConfigs, \
             mappings with `vm_config`, and APISIX plugins with a `conf`)"
        ));
    }
    Ok(found)
}

/// Top-level keys of files that hold configurations rather than being one.
const CONTAINER_KEYS: &[&str] = &["static_resources", "routes", "apiVersion", "admin"];

fn walk(v: &Value, path: &str, file: &str, out: &mut Vec<(String, Vec<u8>)>) {
    match v {
        Value::Object(o) => {
            if o.contains_key("vm_config") {
                let name = o.get("name").and_then(Value::as_str).unwrap_or("");
                let what = format!("{file}: Wasm filter {name:?} at {}", trim(path));
                out.push((what, plugin_config_value(o)));
                return;
            }
            if let Some(Value::Object(plugins)) = o.get("plugins") {
                for (pname, p) in plugins {
                    if let Some(conf) = p.get("conf") {
                        let what =
                            format!("{file}: plugin {pname:?} at {}.plugins.{pname}", trim(path));
                        let bytes = match conf {
                            Value::String(s) => s.as_bytes().to_vec(),
                            other => other.to_string().into_bytes(),
                        };
                        out.push((what, bytes));
                    }
                }
            }
            for (k, child) in o {
                walk(child, &format!("{path}.{k}"), file, out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                walk(child, &format!("{path}[{i}]"), file, out);
            }
        }
        _ => {}
    }
}

fn trim(path: &str) -> &str {
    let p = path.strip_prefix('.').unwrap_or(path);
    if p.is_empty() {
        "the top"
    } else {
        p
    }
}

/// What the filter receives from a Wasm PluginConfig: the StringValue's
/// text, or nothing (the defaults). Another type is passed on as a JSON
/// text that the parser refuses, naming the type.
fn plugin_config_value(o: &Map<String, Value>) -> Vec<u8> {
    match o.get("configuration") {
        None => Vec::new(),
        Some(c) => match (c.get("@type").and_then(Value::as_str), c.get("value")) {
            (Some(t), Some(Value::String(s))) if t.ends_with("google.protobuf.StringValue") => {
                s.as_bytes().to_vec()
            }
            (t, _) => format!(
                "[\"configuration is {}; the filter reads a google.protobuf.StringValue holding JSON\"]",
                t.unwrap_or("not a typed value")
            )
            .into_bytes(),
        },
    }
}

fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Real(s) => s.parse::<f64>().map_or(Value::Null, Value::from),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        Yaml::Real(s) => s.clone(),
                        _ => String::new(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Yaml::Alias(_) | Yaml::Null | Yaml::BadValue => Value::Null,
    }
}

/// One configuration: Ok, or the line to print.
fn check(bytes: &[u8]) -> Result<(), String> {
    let doc = match serde_json::from_slice::<Value>(bytes) {
        Ok(doc) => Some(doc),
        Err(e) if bytes.iter().all(u8::is_ascii_whitespace) => {
            let _ = e; // an empty document means the defaults
            None
        }
        Err(e) if e.is_syntax() || e.is_eof() => {
            let text = e.to_string();
            let text = text
                .rsplit_once(" at line ")
                .map_or(text.as_str(), |(t, _)| t);
            return Err(format!(
                "line {}, column {}: JSON syntax error: {text}",
                e.line(),
                e.column()
            ));
        }
        Err(_) => None,
    };
    let e = match Config::parse(bytes) {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    let Some(doc) = doc else {
        return Err(e.to_string());
    };
    if let Some(line) = number_range(&doc, &e.field, &e.message) {
        return Err(format!("invalid configuration: {}: {line}", e.field));
    }
    if let Some(line) = misplaced_store_field(&doc, &e.field, &e.message) {
        return Err(format!("invalid configuration: {}: {line}", e.field));
    }
    Err(e.to_string())
}

/// serde's "invalid type: string \"5\", expected u64" as the range the
/// parser allows, found by asking the parser itself about the field's
/// smallest and largest values.
fn number_range(doc: &Value, field: &str, message: &str) -> Option<String> {
    let (_, rest) = message.split_once("invalid ")?;
    let (got, expected) = rest.split_once(", expected ")?;
    let ty = expected
        .split(|c: char| !c.is_ascii_alphanumeric())
        .next()?;
    let type_max: u64 = match ty {
        "u8" => u8::MAX.into(),
        "u16" => u16::MAX.into(),
        "u32" => u32::MAX.into(),
        "u64" | "usize" => u64::MAX,
        _ => return None,
    };
    // "integer `-1`" reads as -1; "string \"5\"" stays as it is.
    let got = got.split_once(": ").map_or(got, |(_, g)| g);
    let got = match got
        .strip_prefix("integer ")
        .or_else(|| got.strip_prefix("floating point "))
    {
        Some(n) => n.trim_matches('`'),
        None => got,
    };
    let probe = |n: u64| -> Option<String> {
        let mut d = doc.clone();
        set(&mut d, field, Value::from(n))?;
        match Config::parse(d.to_string().as_bytes()) {
            Err(e) if e.field == field => Some(rule(&e.message)),
            _ => None,
        }
    };
    let (low, high) = (probe(0), probe(type_max));
    let range = match (&low, &high) {
        (None, None) => format!("a whole number from 0 to {type_max}"),
        (None, Some(h)) => match h.strip_prefix("must be at most ") {
            Some(max) => format!("a whole number from 0 to {max}"),
            None => format!("a whole number, {}", h.trim_start_matches("must be ")),
        },
        (Some(l), Some(h)) if l == h => {
            format!("a whole number {}", l.trim_start_matches("must be "))
        }
        (Some(l), None) => format!("a whole number {}", l.trim_start_matches("must be ")),
        (Some(l), Some(h)) => format!(
            "a whole number, {}, and {h}",
            l.trim_start_matches("must be "),
        ),
    };
    Some(format!(
        "must be {range} (got {got}); see the configuration table in README.md"
    ))
}

/// The rule of a validation message, without "(got N)" and what follows.
fn rule(message: &str) -> String {
    let mut m = message;
    if let Some(i) = m.find(" (got ") {
        m = &m[..i];
    }
    m.trim_end_matches([';', ' ']).to_string()
}

/// Sets the value at a dotted field path ("store.timeout_ms").
fn set(doc: &mut Value, field: &str, value: Value) -> Option<()> {
    let mut at = doc;
    let parts: Vec<&str> = field.split('.').collect();
    let (last, parents) = parts.split_last()?;
    for p in parents {
        at = at.as_object_mut()?.get_mut(*p)?;
    }
    at.as_object_mut()?.insert((*last).to_string(), value);
    Some(())
}

/// The fields each store type takes, from the parser's own "unknown field"
/// message for that type.
fn store_fields(kind: &str) -> Vec<String> {
    let probe = format!("{{\"store\": {{\"type\": \"{kind}\", \"\\u0001\": 0}}}}");
    let Err(e) = Config::parse(probe.as_bytes()) else {
        return Vec::new();
    };
    let Some((_, expected)) = e.message.split_once("expected ") else {
        return Vec::new();
    };
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// An unknown field that belongs to the other store, or inside `store`.
fn misplaced_store_field(doc: &Value, field: &str, message: &str) -> Option<String> {
    if !message.starts_with("unknown field") {
        return None;
    }
    let (local, redis) = (store_fields("local"), store_fields("redis"));
    let owner = |name: &str| {
        if local.iter().any(|f| f == name) {
            Some("local")
        } else if redis.iter().any(|f| f == name) {
            Some("redis")
        } else {
            None
        }
    };
    if let Some(name) = field.strip_prefix("store.") {
        let this = doc
            .get("store")
            .and_then(|s| s.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("local");
        let other = owner(name)?;
        return Some(format!(
            "`{name}` belongs to the {other} store, and this store is {this} (store.type); \
             set \"type\": \"{other}\" or remove `{name}`"
        ));
    }
    let other = owner(field)?;
    // A field both stores take (max_bytes) belongs to whichever is used.
    let which = if redis.iter().any(|f| f == field) && other == "local" {
        String::new()
    } else {
        format!("{other} ")
    };
    Some(format!(
        "`{field}` is a field of the {which}store: move it into \"store\", \
         e.g. {{\"store\": {{\"type\": \"{other}\", \"{field}\": ...}}}}"
    ))
}
