//! The `Idempotency-Key` header: an RFC 9651 sf-string (`"abc"`, with `\"` and
//! `\\` escapes), as draft-ietf-httpapi-idempotency-key-header-07 specifies.
//! A bare value (`abc`, as most clients send UUIDs) is accepted as the same key.
//!
//! Opt-in, [`KeySyntax::Opaque`] takes the value as sent (Stripe's rule: any
//! string up to its length limit), for applications whose own keys have
//! spaces or punctuation (`order 1001`).

use serde::Deserialize;
use std::fmt;

/// How the key header's value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySyntax {
    /// RFC 9651 sf-string, or a bare token (the draft's syntax).
    #[default]
    Structured,
    /// The value as sent, trimmed: visible ASCII and spaces; quotes are part
    /// of the key (`"a"` and `a` are two keys).
    Opaque,
}

impl KeySyntax {
    /// Every value the client sent for the key header; `Ok(None)` means none.
    pub fn parse_headers(
        self,
        values: &[&[u8]],
        max_len: usize,
    ) -> Result<Option<String>, KeyError> {
        let parse = match self {
            KeySyntax::Structured => parse_key,
            KeySyntax::Opaque => parse_opaque_key,
        };
        match values {
            [] => Ok(None),
            [one] => parse(one, max_len).map(Some),
            _ => Err(KeyError::Repeated),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// More than one key header: which one the client meant is unknowable.
    Repeated,
    Empty,
    TooLong {
        max: usize,
    },
    /// Control characters, non-ASCII bytes, unbalanced quotes, bad escapes,
    /// list or parameter syntax.
    Malformed(&'static str),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Repeated => write!(f, "the idempotency key header appears more than once"),
            KeyError::Empty => write!(f, "the idempotency key is empty"),
            KeyError::TooLong { max } => {
                write!(f, "the idempotency key is longer than {max} characters")
            }
            KeyError::Malformed(why) => write!(f, "the idempotency key is malformed: {why}"),
        }
    }
}

/// Parses every value the client sent for the key header. `Ok(None)` means no
/// key header at all.
pub fn parse_key_headers(values: &[&[u8]], max_len: usize) -> Result<Option<String>, KeyError> {
    KeySyntax::Structured.parse_headers(values, max_len)
}

fn is_sp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// The value without leading and trailing spaces and tabs.
fn trimmed(raw: &[u8]) -> &[u8] {
    let start = raw.iter().position(|&b| !is_sp(b)).unwrap_or(raw.len());
    let end = raw
        .iter()
        .rposition(|&b| !is_sp(b))
        .map_or(start, |p| p + 1);
    raw.get(start..end).unwrap_or(&[])
}

/// Parses one header value into the key it carries.
pub fn parse_key(raw: &[u8], max_len: usize) -> Result<String, KeyError> {
    // RFC 9651 4.2: leading and trailing spaces are discarded before parsing.
    let value = trimmed(raw);
    if value.is_empty() {
        return Err(KeyError::Empty);
    }
    let key = if value.first() == Some(&b'"') {
        parse_sf_string(value)?
    } else {
        parse_bare(value)?
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > max_len {
        return Err(KeyError::TooLong { max: max_len });
    }
    Ok(key)
}

/// Hand-written, not the `sfv` crate: it adds 26.8 KB to the module and cannot
/// read the bare keys (UUIDs starting with a digit) that clients send.
fn parse_sf_string(value: &[u8]) -> Result<String, KeyError> {
    let mut out = String::with_capacity(value.len());
    let mut iter = value.iter().copied().skip(1);
    loop {
        match iter.next() {
            None => return Err(KeyError::Malformed("missing closing quote")),
            Some(b'\\') => match iter.next() {
                Some(c @ (b'"' | b'\\')) => out.push(char::from(c)),
                _ => {
                    return Err(KeyError::Malformed(
                        "only \\\" and \\\\ escapes are allowed",
                    ))
                }
            },
            Some(b'"') => break,
            Some(c) if (0x20..=0x7e).contains(&c) => out.push(char::from(c)),
            Some(_) => {
                return Err(KeyError::Malformed(
                    "only printable ASCII characters are allowed",
                ))
            }
        }
    }
    if iter.next().is_some() {
        return Err(KeyError::Malformed(
            "nothing may follow the closing quote (parameters and lists are not accepted)",
        ));
    }
    Ok(out)
}

fn parse_bare(value: &[u8]) -> Result<String, KeyError> {
    let mut out = String::with_capacity(value.len());
    for &c in value {
        match c {
            b'"' | b'\\' => {
                return Err(KeyError::Malformed(
                    "quotes and backslashes are only allowed inside a quoted key",
                ))
            }
            // A comma means an intermediary folded several headers into one; a
            // semicolon starts sf parameters. Either way the key is ambiguous.
            b',' | b';' => {
                return Err(KeyError::Malformed(
                    "commas and semicolons are only allowed inside a quoted key",
                ))
            }
            b' ' | b'\t' => {
                return Err(KeyError::Malformed(
                    "spaces are only allowed inside a quoted key",
                ))
            }
            0x21..=0x7e => out.push(char::from(c)),
            _ => {
                return Err(KeyError::Malformed(
                    "only printable ASCII characters are allowed",
                ))
            }
        }
    }
    Ok(out)
}

/// One header value as an opaque key: trimmed, then visible ASCII and spaces.
pub fn parse_opaque_key(raw: &[u8], max_len: usize) -> Result<String, KeyError> {
    let value = trimmed(raw);
    if value.is_empty() {
        return Err(KeyError::Empty);
    }
    if !value.iter().all(|c| (0x20..=0x7e).contains(c)) {
        return Err(KeyError::Malformed(
            "only printable ASCII characters and spaces are allowed",
        ));
    }
    if value.len() > max_len {
        return Err(KeyError::TooLong { max: max_len });
    }
    Ok(value.iter().map(|&c| char::from(c)).collect())
}

/// Serialises a key as an sf-string (used for the generated key and tests).
pub fn to_sf_string(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 2);
    out.push('"');
    for c in key.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &str) -> Result<String, KeyError> {
        parse_key(v.as_bytes(), 255)
    }

    #[test]
    fn accepts_sf_strings_and_bare_tokens_as_the_same_key() {
        assert_eq!(p("\"abc\"").unwrap(), "abc");
        assert_eq!(p("abc").unwrap(), "abc");
        assert_eq!(p("  \"abc\"  ").unwrap(), "abc");
        assert_eq!(
            p("8e03978e-40d5-43e8-bc93-6894a57f9324").unwrap(),
            "8e03978e-40d5-43e8-bc93-6894a57f9324"
        );
        assert_eq!(
            p(r#""a \"quoted\" key with \\ and spaces""#).unwrap(),
            r#"a "quoted" key with \ and spaces"#
        );
        assert_eq!(p("\"a,b;c\"").unwrap(), "a,b;c");
    }

    #[test]
    fn rejects_what_is_not_a_key() {
        let cases: &[(&[u8], KeyError)] = &[
            (b"", KeyError::Empty),
            (b"   ", KeyError::Empty),
            (b"\"\"", KeyError::Empty),
            (b"\"abc", KeyError::Malformed("missing closing quote")),
            (
                b"\"a\\nb\"",
                KeyError::Malformed("only \\\" and \\\\ escapes are allowed"),
            ),
            (
                b"\"a\\",
                KeyError::Malformed("only \\\" and \\\\ escapes are allowed"),
            ),
            (
                b"\"abc\";p=1",
                KeyError::Malformed(
                    "nothing may follow the closing quote (parameters and lists are not accepted)",
                ),
            ),
            (
                b"\"abc\", \"def\"",
                KeyError::Malformed(
                    "nothing may follow the closing quote (parameters and lists are not accepted)",
                ),
            ),
            (
                b"abc,def",
                KeyError::Malformed("commas and semicolons are only allowed inside a quoted key"),
            ),
            (
                b"abc def",
                KeyError::Malformed("spaces are only allowed inside a quoted key"),
            ),
            (
                b"ab\"c",
                KeyError::Malformed("quotes and backslashes are only allowed inside a quoted key"),
            ),
            (
                b"ab\x01c",
                KeyError::Malformed("only printable ASCII characters are allowed"),
            ),
            (
                b"\"ab\x7fc\"",
                KeyError::Malformed("only printable ASCII characters are allowed"),
            ),
            (
                "caf\u{e9}".as_bytes(),
                KeyError::Malformed("only printable ASCII characters are allowed"),
            ),
            (
                "\"caf\u{e9}\"".as_bytes(),
                KeyError::Malformed("only printable ASCII characters are allowed"),
            ),
        ];
        for (raw, expected) in cases {
            assert_eq!(
                parse_key(raw, 255).as_ref(),
                Err(expected),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn length_is_counted_on_the_decoded_key() {
        let k = "k".repeat(10);
        assert!(parse_key(k.as_bytes(), 10).is_ok());
        assert!(parse_key(format!("\"{k}\"").as_bytes(), 10).is_ok());
        assert_eq!(
            parse_key(format!("{k}x").as_bytes(), 10),
            Err(KeyError::TooLong { max: 10 })
        );
    }

    #[test]
    fn repeated_headers_are_refused() {
        assert_eq!(parse_key_headers(&[], 255), Ok(None));
        assert_eq!(parse_key_headers(&[b"a"], 255), Ok(Some("a".into())));
        assert_eq!(
            parse_key_headers(&[b"a", b"a"], 255),
            Err(KeyError::Repeated)
        );
    }

    #[test]
    fn opaque_keys_are_the_value_as_sent() {
        let o = |v: &str| KeySyntax::Opaque.parse_headers(&[v.as_bytes()], 255);
        assert_eq!(o("order 1001"), Ok(Some("order 1001".into())));
        assert_eq!(o("  a,b;c \\ \"q\"  "), Ok(Some("a,b;c \\ \"q\"".into())));
        // Quotes are part of an opaque key: "a" and a are two keys.
        assert_eq!(o("\"a\""), Ok(Some("\"a\"".into())));
        assert_eq!(o(" \t "), Err(KeyError::Empty));
        assert_eq!(
            o("tab\tinside"),
            Err(KeyError::Malformed(
                "only printable ASCII characters and spaces are allowed"
            ))
        );
        assert_eq!(
            o("caf\u{e9}"),
            Err(KeyError::Malformed(
                "only printable ASCII characters and spaces are allowed"
            ))
        );
        assert_eq!(
            KeySyntax::Opaque.parse_headers(&["k".repeat(11).as_bytes()], 10),
            Err(KeyError::TooLong { max: 10 })
        );
        assert_eq!(
            KeySyntax::Opaque.parse_headers(&[b"a", b"b"], 255),
            Err(KeyError::Repeated)
        );
        assert_eq!(KeySyntax::Opaque.parse_headers(&[], 255), Ok(None));
    }

    #[test]
    fn the_structured_syntax_is_the_default_and_refuses_spaces() {
        assert_eq!(KeySyntax::default(), KeySyntax::Structured);
        assert_eq!(
            KeySyntax::Structured.parse_headers(&[b"order 1001"], 255),
            Err(KeyError::Malformed(
                "spaces are only allowed inside a quoted key"
            ))
        );
    }

    #[test]
    fn sf_string_round_trip() {
        for k in ["abc", "a\"b", "a\\b", "with space", "\\\"", "x,y;z"] {
            assert_eq!(p(&to_sf_string(k)).unwrap(), k);
        }
    }
}
