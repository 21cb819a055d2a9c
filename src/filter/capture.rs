//! What of a response becomes the key's record: which responses are
//! recorded at all ([`should_record`]), and the capture of the recorded ones,
//! shared by the streaming path (chunk by chunk, as the response goes to the
//! client) and forwarding mode (the upstream's whole answer at once).

use super::{admit, Filter, Phase, Verdict};
use crate::config::Config;
use crate::host::{HeaderList, HeaderMap, Host, HostError, Level};
use crate::metrics::Metric;
use crate::record::StoredResponse;

/// A response on its way into the record.
pub(super) struct Capture {
    status: u16,
    headers: HeaderList,
    body: Vec<u8>,
    omitted: bool,
    /// Body bytes seen so far, captured or not.
    seen: u64,
    /// The response's Content-Length, when it has one.
    expected: Option<u64>,
}

/// What a body chunk did to a capture's bytes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Took {
    /// The VM's count had no room for the chunk, just now.
    pub(super) no_room: bool,
    /// Bytes captured before, given up now that the record keeps no body.
    pub(super) freed: usize,
}

/// What becomes of a streamed response's key.
pub(super) enum Fate {
    /// Captured as it streams, then recorded.
    Record(Capture),
    /// Not the outcome of the request: the key is freed, a retry runs.
    Release,
    /// Nobody can know whether the upstream acted: as `unknown_outcome` says.
    Unknown,
}

/// A header holding a number (`:status`, `content-length`).
pub(super) fn header_number<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> Option<T> {
    headers
        .get(name)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<T>().ok())
}

impl Capture {
    /// Starts capturing a response the upstream sent (`status`, `headers`),
    /// or `None` when it is not to be recorded: its key is then released.
    pub(super) fn start<'a, N: AsRef<str>>(
        cfg: &Config,
        status: u16,
        code_details: Option<&str>,
        headers: impl Iterator<Item = (N, &'a [u8])>,
        expected: Option<u64>,
    ) -> Option<Capture> {
        if !should_record(status, code_details, cfg.record_server_errors) {
            return None;
        }
        Some(Capture {
            status,
            headers: headers
                .filter(|(n, _)| cfg.records_header(n.as_ref()))
                .map(|(n, v)| (n.as_ref().to_string(), v.to_vec()))
                .collect(),
            body: Vec::new(),
            omitted: false,
            seen: 0,
            expected,
        })
    }

    /// What becomes of the key of the streamed response whose headers the
    /// host has just given.
    pub(super) fn of_response(cfg: &Config, host: &impl Host, headers: &HeaderMap) -> Fate {
        let status: u16 = header_number(headers, ":status").unwrap_or(0);
        // Who answered matters only for errors (a rate limiter's 429, Envoy's
        // 503): a property lookup saved on every successful response.
        let details = if status >= 400 {
            host.response_code_details()
        } else {
            None
        };
        match Capture::start(
            cfg,
            status,
            details.as_deref(),
            headers.iter(),
            header_number(headers, "content-length"),
        ) {
            Some(capture) => Fate::Record(capture),
            None if outcome_unknowable(details.as_deref()) => Fate::Unknown,
            None => Fate::Release,
        }
    }

    /// Takes `len` more body bytes, read with `read` only while the body
    /// still fits in `limit` and `admit` finds room for them in the VM's
    /// count; past either the record keeps no body at all.
    pub(super) fn take(
        &mut self,
        len: usize,
        limit: u64,
        admit: impl FnOnce(usize) -> bool,
        read: impl FnOnce() -> Result<Vec<u8>, HostError>,
    ) -> Result<Took, HostError> {
        self.seen += len as u64;
        if self.omitted || len == 0 {
            return Ok(Took::default());
        }
        if (self.body.len() + len) as u64 > limit {
            return Ok(Took {
                no_room: false,
                freed: self.omit(),
            });
        }
        if !admit(len) {
            return Ok(Took {
                no_room: true,
                freed: self.omit(),
            });
        }
        self.body.extend_from_slice(&read()?);
        Ok(Took::default())
    }

    /// No body from now on: returns the bytes given up.
    fn omit(&mut self) -> usize {
        self.omitted = true;
        std::mem::take(&mut self.body).len()
    }

    /// The last byte its Content-Length announced is here.
    pub(super) fn complete(&self) -> bool {
        self.expected.is_some_and(|n| self.seen >= n)
    }

    pub(super) fn into_record(self) -> StoredResponse {
        StoredResponse {
            status: self.status,
            headers: self.headers,
            body: self.body,
            body_omitted: self.omitted,
        }
    }
}

impl Filter {
    /// The response's headers: capture it, or release the key when it is
    /// not to be recorded.
    pub(super) fn response_started(&mut self, host: &impl Host, end_of_stream: bool) -> Verdict {
        let Phase::Forwarded { held, .. } = &self.phase else {
            return Verdict::Continue;
        };
        let held = *held;
        if let Some(k) = &self.generated_key {
            if let Err(e) = host.add_response_header(&self.ctx.config.header, k) {
                host.log(
                    Level::Warn,
                    &format!("could not return the generated key: {e}"),
                );
            }
        }
        let headers = match host.response_headers() {
            Ok(h) => h,
            Err(e) => return self.capture_failed(host, e),
        };
        match Capture::of_response(&self.ctx.config, host, &headers) {
            Fate::Release => {
                self.phase = Phase::Done;
                self.release(host, held)
            }
            Fate::Unknown => self.outcome_unknown(host, held, false),
            Fate::Record(capture) => {
                self.phase = Phase::Forwarded {
                    held,
                    capture: Some(capture),
                };
                if end_of_stream {
                    return self.complete(host);
                }
                Verdict::Continue
            }
        }
    }

    /// A response body chunk, copied as it streams to the client.
    pub(super) fn response_chunk(
        &mut self,
        host: &impl Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Verdict {
        // Envoy calls again with what it buffered (and the end of stream)
        // while a write is pending: keep holding until the store answers.
        if self.writing() {
            return Verdict::Pause;
        }
        let ctx = self.ctx.clone();
        let (record_limit, in_flight_limit) = (
            ctx.config.recorded_body_limit(),
            ctx.config.max_in_flight_bytes,
        );
        let Phase::Forwarded {
            capture: Some(capture),
            ..
        } = &mut self.phase
        else {
            return Verdict::Continue;
        };
        let held = &mut self.held_bytes;
        let took = match capture.take(
            body_size,
            record_limit,
            |n| admit(&ctx.in_flight, in_flight_limit, held, n),
            || host.response_body(0, body_size),
        ) {
            Ok(took) => took,
            Err(e) => return self.capture_failed(host, e),
        };
        // The response is complete when its last byte is here. With a
        // Content-Length that is before Envoy's (separate, empty) end-of-stream
        // frame, and only holding this chunk keeps the client waiting until
        // the record is written.
        let complete = end_of_stream || capture.complete();
        if took.no_room {
            host.metric_add(Metric::InFlightFull, 1);
        }
        self.let_go(took.freed);
        if complete {
            return self.complete(host);
        }
        Verdict::Continue
    }

    /// The response could not be read: it goes out anyway, unrecorded. The
    /// claim stays until its lock times out, so a retry gets 409 rather
    /// than a rerun.
    pub(super) fn capture_failed(&mut self, host: &impl Host, e: HostError) -> Verdict {
        host.log(Level::Error, &format!("{e}; response not recorded"));
        host.metric_add(Metric::StoreErrors, 1);
        self.let_go_all();
        self.stop_renewing();
        self.phase = Phase::Done;
        Verdict::Continue
    }
}

/// Envoy's own answer for an upstream that may have acted but never answered:
/// a reset after the request was sent, or the route's timeout. Not a
/// connection that never opened, nor a request a circuit breaker held back:
/// those never reached the upstream.
pub fn outcome_unknowable(code_details: Option<&str>) -> bool {
    let Some(d) = code_details else {
        return false;
    };
    let reset = d.starts_with("upstream_reset_before_response_started")
        && !d.contains("connection_failure")
        && !d.contains("overflow");
    reset || envoy_timed_out(d)
}

/// Envoy stopped waiting for the upstream's answer (the route's, a try's or
/// the stream's timeout): the request was sent, so the upstream may have
/// acted or may still act. Envoy 1.40 says `response_timeout` for the route
/// timeout (checked on 1.40); older versions said `upstream_response_timeout`.
/// The connection manager's own timeouts (a route's `idle_timeout` or
/// `max_stream_duration`, the stream idle timeout when a route sets no
/// timeout) end a stream whose request our filter had let through, so the
/// same holds for them.
fn envoy_timed_out(code_details: &str) -> bool {
    matches!(
        code_details,
        "response_timeout"
            | "upstream_response_timeout"
            | "upstream_per_try_timeout"
            | "upstream_per_try_idle_timeout"
            | "upstream_max_stream_duration_reached"
            | "stream_idle_timeout"
            | "max_duration_timeout"
    )
}

/// Which responses become the key's record; every other one releases the key
/// so that a retry runs again.
///
/// * Only what the upstream answered is the outcome of the request. A reply
///   the proxy made itself (another filter's 429 or 403, Envoy's 503 for an
///   unreachable upstream) says nothing about the operation and must not be
///   replayed for a whole TTL. The one exception, with `record_server_errors`,
///   is Envoy's upstream timeout: the upstream may well have acted.
/// * 408 and 429 mean "try again later" by definition, wherever they came from.
/// * 5xx only with `record_server_errors` (Stripe's choice).
/// * Hosts that do not say where a response came from: it is taken as the
///   upstream's.
pub fn should_record(status: u16, code_details: Option<&str>, record_server_errors: bool) -> bool {
    if status == 0 || status == 408 || status == 429 {
        return false;
    }
    let from_upstream = code_details.is_none_or(|d| d == "via_upstream");
    if !from_upstream {
        return record_server_errors && status >= 500 && code_details.is_some_and(envoy_timed_out);
    }
    status < 500 || record_server_errors
}
