//! gRPC status on HTTP/2: codes, the `grpc-message` encoding, `grpc-timeout`, and the responses
//! the proxy makes itself (trailers-only: one HEADERS frame that ends the stream).
//!
//! Notes:
//! - `grpc-message` is percent-encoded: every byte outside printable ASCII (0x20-0x7E), and `%`
//!   itself, becomes `%XX`. Callers decode it back to the text the proxy wrote.
//! - `grpc-timeout` is at most 8 ASCII digits and a unit: H, M, S, m (milli), u (micro), n (nano).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};

pub const OK: u8 = 0;
pub const CANCELLED: u8 = 1;
pub const UNKNOWN: u8 = 2;
pub const INVALID_ARGUMENT: u8 = 3;
pub const DEADLINE_EXCEEDED: u8 = 4;
pub const RESOURCE_EXHAUSTED: u8 = 8;
pub const UNIMPLEMENTED: u8 = 12;
pub const INTERNAL: u8 = 13;
pub const UNAVAILABLE: u8 = 14;
/// Codes 0..=16 are gRPC's; anything else a peer sends counts as UNKNOWN.
pub const CODES: usize = 17;

pub const NAMES: [&str; CODES] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The status a peer wrote in `grpc-status`, if any (an unparsable one is UNKNOWN).
pub fn code_of(headers: &HeaderMap) -> Option<u8> {
    let value = headers.get("grpc-status")?;
    Some(
        match value.to_str().ok().and_then(|s| s.parse::<u8>().ok()) {
            Some(code) if (code as usize) < CODES => code,
            _ => UNKNOWN,
        },
    )
}

pub fn encode_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The headers of a status the proxy itself ends a call with.
pub fn status_headers(code: u8, message: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("grpc-status", HeaderValue::from(u16::from(code)));
    if !message.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&encode_message(message)) {
            headers.insert("grpc-message", value);
        }
    }
    headers
}

/// A trailers-only response: HTTP 200, content-type, and the status, ending the stream.
pub fn trailers_only<B>(code: u8, message: &str, empty: B) -> Response<B> {
    let mut response = Response::new(empty);
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    headers.extend(status_headers(code, message));
    response
}

pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A status code and message, as the proxy reports one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: u8,
    pub message: String,
}

impl Status {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
        }
    }
}

/// The bytes a status' message becomes in a header, for tests.
pub fn header_text(headers: &HeaderMap, name: &str) -> Option<Bytes> {
    headers
        .get(name)
        .map(|v| Bytes::copy_from_slice(v.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("plain text: ok"), "plain text: ok");
        assert_eq!(
            encode_message("100% ünïcode\n"),
            "100%25 %C3%BCn%C3%AFcode%0A"
        );
    }

    #[test]
    fn timeouts_parse_in_every_unit() {
        assert_eq!(parse_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout(b"3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_timeout(b"100S"), Some(Duration::from_secs(100)));
        assert_eq!(parse_timeout(b"1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(
            parse_timeout(b"99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_timeout(b"7n"), Some(Duration::from_nanos(7)));
    }

    #[test]
    fn bad_timeouts_are_none() {
        for bad in [&b""[..], b"S", b"123456789S", b"10x", b"-1S", b"1.5S"] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn status_codes_are_read_and_bounded() {
        let mut h = HeaderMap::new();
        assert_eq!(code_of(&h), None);
        h.insert("grpc-status", HeaderValue::from_static("5"));
        assert_eq!(code_of(&h), Some(5));
        h.insert("grpc-status", HeaderValue::from_static("99"));
        assert_eq!(code_of(&h), Some(UNKNOWN));
        h.insert("grpc-status", HeaderValue::from_static("x"));
        assert_eq!(code_of(&h), Some(UNKNOWN));
    }

    #[test]
    fn a_trailers_only_response_carries_code_and_message() {
        let r = trailers_only(UNAVAILABLE, "runtime down", ());
        assert_eq!(code_of(r.headers()), Some(UNAVAILABLE));
        assert_eq!(
            header_text(r.headers(), "grpc-message").unwrap(),
            Bytes::from_static(b"runtime down")
        );
        assert_eq!(r.headers()["content-type"], "application/grpc");
    }
}
