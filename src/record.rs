//! The recorded response and its byte format.
//!
//! Layout (little endian), version 1:
//! ```text
//! u8  version = 1
//! u64 epoch            which claim of the slot wrote it (see store::local)
//! [16] key digest      which key it belongs to
//! u16 status
//! u8  flags            bit 0: body omitted (larger than max_response_body_bytes,
//!                      or than the local store's byte budget allows)
//! u16 header count, then per header: u16 name len, name, u32 value len, value
//! u32 body len, body
//! ```
//! A data slot whose epoch is 0 and that has no response is a tombstone: the
//! bytes of an expired record were reclaimed.

use crate::fingerprint::Digest16;

pub const RECORD_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub body_omitted: bool,
}

/// What a data slot holds: the response recorded by claim `epoch` of `digest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRecord {
    pub epoch: u64,
    pub digest: Digest16,
    pub response: StoredResponse,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Truncated,
    Version(u8),
    BadHeaderName,
    TrailingBytes,
}

/// Headers that describe one connection, not the message (RFC 9110 7.6.1),
/// plus content-length, which the proxy recomputes for the body it sends.
/// Never recorded, never relayed, never forwarded.
pub const CONNECTION_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// Further response headers a record leaves out.
const NOT_RECORDED: &[&str] = &[
    "proxy-authenticate",
    "proxy-authorization",
    // Envoy's timing of the original exchange; a replay has its own.
    "x-envoy-upstream-service-time",
];

/// Pseudo-headers and connection-level headers: what no message carries on.
pub fn is_connection_header(name: &str) -> bool {
    name.starts_with(':') || CONNECTION_HEADERS.contains(&name)
}

/// Headers the filter adds on replay; an upstream's own copy is dropped so a
/// first response can never pose as a replay.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
pub const REPLAY_BODY_HEADER: &str = "idempotent-replay-body";

/// Whether a response header is kept in the record.
pub fn is_recorded_header(name: &str) -> bool {
    !is_connection_header(name)
        && !NOT_RECORDED.contains(&name)
        && name != REPLAYED_HEADER
        && name != REPLAY_BODY_HEADER
}

impl StoredResponse {
    /// Headers for a replay: the recorded ones, merged by name because a local
    /// reply sets each name once (values joined with ", " as RFC 9110 5.3
    /// allows), then the replay markers. Takes the headers: they move into
    /// the answer, none is copied.
    pub fn take_replay_headers(&mut self) -> Vec<(String, Vec<u8>)> {
        let mut out = std::mem::take(&mut self.headers);
        // Merged in place: a name seen before takes the later values.
        let mut i = 0;
        while i < out.len() {
            let earlier = out
                .get(i)
                .and_then(|(name, _)| out.get(..i)?.iter().position(|(n, _)| n == name));
            match earlier {
                Some(j) => {
                    let (_, value) = out.remove(i);
                    if let Some((_, existing)) = out.get_mut(j) {
                        existing.extend_from_slice(b", ");
                        existing.extend_from_slice(&value);
                    }
                }
                None => i += 1,
            }
        }
        out.push((REPLAYED_HEADER.to_string(), b"true".to_vec()));
        if self.body_omitted {
            out.push((REPLAY_BODY_HEADER.to_string(), b"omitted".to_vec()));
        }
        out
    }
}

impl DataRecord {
    pub fn encode(&self) -> Vec<u8> {
        let r = &self.response;
        let headers_len: usize = r.headers.iter().map(|(n, v)| 6 + n.len() + v.len()).sum();
        let mut out = Vec::with_capacity(1 + 8 + 16 + 2 + 1 + 2 + headers_len + 4 + r.body.len());
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&r.status.to_le_bytes());
        out.push(u8::from(r.body_omitted));
        // Counts and lengths are clamped: the filter never records more than
        // u16::MAX headers or 64 MiB bodies (config limit), but the encoder
        // must not rely on that to stay well-formed.
        let headers: Vec<&(String, Vec<u8>)> = r
            .headers
            .iter()
            .filter(|(n, v)| n.len() <= usize::from(u16::MAX) && v.len() <= u32::MAX as usize)
            .take(usize::from(u16::MAX))
            .collect();
        out.extend_from_slice(&(headers.len() as u16).to_le_bytes());
        for (name, value) in headers {
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value);
        }
        let body = r
            .body
            .get(..r.body.len().min(u32::MAX as usize))
            .unwrap_or(&[]);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    /// The version byte, epoch and digest that open every record.
    fn read_owner(r: &mut Reader) -> Result<(u64, Digest16), DecodeError> {
        let version = r.u8()?;
        if version != RECORD_VERSION {
            return Err(DecodeError::Version(version));
        }
        Ok((r.u64()?, r.digest()?))
    }

    /// Reads only the slot's owner (epoch and digest), without copying the body.
    pub fn peek_owner(bytes: &[u8]) -> Result<(u64, Digest16), DecodeError> {
        Self::read_owner(&mut Reader { bytes, pos: 0 })
    }

    pub fn decode(bytes: &[u8]) -> Result<DataRecord, DecodeError> {
        let (mut record, body_start) = Self::decode_head(bytes)?;
        record.response.body = bytes.get(body_start..).unwrap_or_default().to_vec();
        Ok(record)
    }

    /// Decodes a record the caller owns: its body stays in `bytes`' buffer
    /// (moved to the front), so a replay copies the body once, not twice.
    pub fn decode_owned(mut bytes: Vec<u8>) -> Result<DataRecord, DecodeError> {
        let (mut record, body_start) = Self::decode_head(&bytes)?;
        bytes.drain(..body_start);
        record.response.body = bytes;
        Ok(record)
    }

    /// Everything but the body, and where the body starts (it runs to the
    /// end of `bytes`: checked here).
    fn decode_head(bytes: &[u8]) -> Result<(DataRecord, usize), DecodeError> {
        let mut r = Reader { bytes, pos: 0 };
        let (epoch, digest) = Self::read_owner(&mut r)?;
        let status = r.u16()?;
        let flags = r.u8()?;
        let count = r.u16()?;
        // Room for the two markers a replay adds (take_replay_headers).
        let mut headers = Vec::with_capacity(usize::from(count).min(256) + 2);
        for _ in 0..count {
            let name_len = usize::from(r.u16()?);
            let name = std::str::from_utf8(r.take(name_len)?)
                .map_err(|_| DecodeError::BadHeaderName)?
                .to_string();
            let value_len = r.u32()? as usize;
            let value = r.take(value_len)?.to_vec();
            headers.push((name, value));
        }
        let body_len = r.u32()? as usize;
        let body_start = r.pos;
        r.take(body_len)?;
        if r.pos != bytes.len() {
            return Err(DecodeError::TrailingBytes);
        }
        let record = DataRecord {
            epoch,
            digest,
            response: StoredResponse {
                status,
                headers,
                body: Vec::new(),
                body_omitted: flags & 1 == 1,
            },
        };
        Ok((record, body_start))
    }

    /// The bytes that reclaim a slot: an empty record owned by nobody.
    pub fn tombstone() -> Vec<u8> {
        DataRecord {
            epoch: 0,
            digest: [0; 16],
            response: StoredResponse::default(),
        }
        .encode()
    }
}

pub(crate) struct Reader<'a> {
    pub bytes: &'a [u8],
    pub pos: usize,
}

impl<'a> Reader<'a> {
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self
            .bytes
            .get(self.pos..end)
            .ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_le_bytes(self.array()?))
    }
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn digest(&mut self) -> Result<Digest16, DecodeError> {
        self.array()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DataRecord {
        DataRecord {
            epoch: 42,
            digest: [7; 16],
            response: StoredResponse {
                status: 201,
                headers: vec![
                    ("content-type".into(), b"application/json".to_vec()),
                    ("x-bin".into(), vec![0, 255, 10, 13]),
                ],
                body: (0..=255u8).collect(),
                body_omitted: false,
            },
        }
    }

    #[test]
    fn round_trips_binary_data() {
        let r = sample();
        let bytes = r.encode();
        assert_eq!(DataRecord::decode(&bytes).unwrap(), r);
        assert_eq!(DataRecord::peek_owner(&bytes).unwrap(), (42, [7; 16]));
        let t = DataRecord::decode(&DataRecord::tombstone()).unwrap();
        assert_eq!(t.epoch, 0);
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(DataRecord::decode(&bytes[..n]).is_err(), "prefix {n}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(DataRecord::decode(&extra), Err(DecodeError::TrailingBytes));
        let mut v = bytes.clone();
        v[0] = 9;
        assert_eq!(DataRecord::decode(&v), Err(DecodeError::Version(9)));
        // A huge declared length must fail cleanly, not allocate or overflow.
        let mut huge = bytes[..30].to_vec();
        huge.extend_from_slice(&[1, 0, 4, 0]);
        huge.extend_from_slice(b"name");
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(DataRecord::decode(&huge), Err(DecodeError::Truncated));
    }

    #[test]
    fn replay_headers_merge_duplicates_and_mark_the_replay() {
        let mut r = StoredResponse {
            status: 200,
            headers: vec![
                ("link".into(), b"<a>".to_vec()),
                ("content-type".into(), b"text/plain".to_vec()),
                ("link".into(), b"<b>".to_vec()),
            ],
            body: vec![],
            body_omitted: true,
        };
        assert_eq!(
            r.take_replay_headers(),
            vec![
                ("link".to_string(), b"<a>, <b>".to_vec()),
                ("content-type".to_string(), b"text/plain".to_vec()),
                ("idempotent-replayed".to_string(), b"true".to_vec()),
                ("idempotent-replay-body".to_string(), b"omitted".to_vec()),
            ]
        );
    }

    #[test]
    fn connection_headers_are_not_recorded() {
        for h in [
            ":status",
            "connection",
            "transfer-encoding",
            "content-length",
            "idempotent-replayed",
        ] {
            assert!(!is_recorded_header(h), "{h}");
        }
        for h in ["content-type", "location", "x-request-id", "etag"] {
            assert!(is_recorded_header(h), "{h}");
        }
    }
}
