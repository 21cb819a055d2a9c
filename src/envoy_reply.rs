//! What Envoy's own answer to a call says about whether the request left.
//!
//! When Envoy's router answers a call itself (no upstream answer came), it
//! names why: `upstream connect error or disconnect/reset before headers.
//! [retried and the latest ]reset reason: <reason>[, transport failure
//! reason: ...]`, or `no healthy upstream` (bodies as Envoy 1.40 writes
//! them). Both the filter's forwarded calls and the Redis store's calls to
//! Webdis read them here.

/// Reset reasons that mean the request never reached the upstream, as
/// suffixes (`remote connection failure`, `local refused stream reset`...).
const NEVER_SENT_RESETS: [&str; 4] = [
    "connection failure",
    "connection timeout",
    "overflow",
    "refused stream reset",
];

/// Whether Envoy's own answer `body` says the request never left: no
/// healthy upstream, a connection that could not be opened, a circuit
/// breaker, a refused stream. After retries, an earlier try may have
/// reached the upstream; any other reset, or a body of a form not known
/// here, may have come after the request left: the safe side.
pub fn never_left(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text == "no healthy upstream" {
        return true;
    }
    if text.contains("retried and the latest") {
        return false;
    }
    text.rsplit_once("reset reason: ")
        .map(|(_, r)| r.split(',').next().unwrap_or(r).trim())
        .is_some_and(|reason| NEVER_SENT_RESETS.iter().any(|r| reason.ends_with(r)))
}
