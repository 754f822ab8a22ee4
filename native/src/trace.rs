//! Trace context for sampled calls: the proxy's span sits between the caller's (the kubelet's
//! W3C `traceparent`) and the runtime's. The data plane makes the span's ids and times it; the
//! Python side turns the finished records into OpenTelemetry spans and exports them, off the
//! call's path (a bounded queue: when the exporter falls behind, records are dropped and counted,
//! never waited for).
//!
//! Notes:
//! - traceparent is `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`; flag bit 0 is
//!   "sampled". An unparsable one counts as absent (a new trace starts), as the W3C spec says.
//! - Sampling follows OpenTelemetry's samplers as OTEL_TRACES_SAMPLER names them: `always_on`,
//!   `traceidratio` (sampled when the trace id's low 8 bytes, big-endian, are below ratio * 2^64),
//!   and their `parentbased_` forms (a caller's sampled flag decides; the root sampler only for
//!   calls without one). `always_off` never gets here: tracing is off then.
//! - An unsampled call's metadata passes unchanged; a sampled call's traceparent upstream names
//!   the proxy's span as the parent. tracestate and baggage pass unchanged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    pub root: Root,
    pub parent_based: bool,
}

impl Sampler {
    /// From OTEL_TRACES_SAMPLER's value and its argument; None for an unknown name.
    pub fn parse(name: &str, ratio: f64) -> Option<Sampler> {
        let ratio = ratio.clamp(0.0, 1.0);
        let (parent_based, root) = match name.strip_prefix("parentbased_") {
            Some(rest) => (true, rest),
            None => (false, name),
        };
        let root = match root {
            "always_on" => Root::AlwaysOn,
            "always_off" => Root::AlwaysOff,
            "traceidratio" => Root::Ratio(ratio),
            _ => return None,
        };
        Some(Sampler { root, parent_based })
    }

    fn sample(&self, trace_id: &[u8; 16], parent_sampled: Option<bool>) -> bool {
        if self.parent_based {
            if let Some(sampled) = parent_sampled {
                return sampled;
            }
        }
        match self.root {
            Root::AlwaysOn => true,
            Root::AlwaysOff => false,
            Root::Ratio(r) => {
                let low = u64::from_be_bytes(trace_id[8..].try_into().expect("8 bytes"));
                (low as f64) < r * (u64::MAX as f64 + 1.0)
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

fn hex_into(src: &str, dst: &mut [u8]) -> Option<()> {
    if src.len() != dst.len() * 2
        || !src
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    for (i, out) in dst.iter_mut().enumerate() {
        *out = u8::from_str_radix(&src[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(())
}

pub fn parse_traceparent(value: &str) -> Option<Parent> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() {
        return None;
    }
    let mut p = Parent {
        trace_id: [0; 16],
        span_id: [0; 8],
        sampled: false,
    };
    hex_into(trace, &mut p.trace_id)?;
    hex_into(span, &mut p.span_id)?;
    let mut f = [0u8; 1];
    hex_into(flags, &mut f)?;
    if p.trace_id == [0; 16] || p.span_id == [0; 8] {
        return None;
    }
    p.sampled = f[0] & 1 == 1;
    Some(p)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A sampled call's span, begun.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub start_ns: u64,
}

/// A finished span, for the Python side to export.
#[derive(Debug, Clone)]
pub struct Record {
    pub span: Span,
    pub path: String,
    pub end_ns: u64,
    pub code: u8,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

pub struct Tracer {
    sampler: Sampler,
    records: SyncSender<Record>,
    pub inbox: Mutex<Receiver<Record>>,
    pub dropped: AtomicU64,
    seed: AtomicU64,
}

impl Tracer {
    pub fn new(sampler: Sampler, queue: usize) -> Self {
        let (records, inbox) = std::sync::mpsc::sync_channel(queue);
        Tracer {
            sampler,
            records,
            inbox: Mutex::new(inbox),
            dropped: AtomicU64::new(0),
            seed: AtomicU64::new(now_ns()),
        }
    }

    fn random(&self) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(
            self.seed
                .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed),
        );
        h.finish().max(1)
    }

    /// Begin the call's span if it is sampled, and point the upstream traceparent at it.
    pub fn begin(&self, headers: &mut HeaderMap) -> Option<Span> {
        let parent = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        let trace_id = match &parent {
            Some(p) => p.trace_id,
            None => {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&self.random().to_be_bytes());
                id[8..].copy_from_slice(&self.random().to_be_bytes());
                id
            }
        };
        if !self
            .sampler
            .sample(&trace_id, parent.as_ref().map(|p| p.sampled))
        {
            return None;
        }
        let span = Span {
            trace_id,
            span_id: self.random().to_be_bytes(),
            parent: parent.map(|p| p.span_id),
            start_ns: now_ns(),
        };
        let value = format!("00-{}-{}-01", hex(&span.trace_id), hex(&span.span_id));
        headers.insert(
            "traceparent",
            HeaderValue::from_str(&value).expect("hex is a valid header value"),
        );
        Some(span)
    }

    pub fn finish(&self, span: Span, path: String, code: u8) {
        let record = Record {
            span,
            path,
            end_ns: now_ns(),
            code,
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.records.try_send(record)
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_parses_and_bad_ones_do_not() {
        let p = parse_traceparent(TP).unwrap();
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p.span_id), "00f067aa0ba902b7");
        assert!(p.sampled);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xx",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_sampled_call_hands_its_own_span_upstream() {
        let tracer = Tracer::new(Sampler::parse("parentbased_always_on", 1.0).unwrap(), 4);
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static(TP));
        let span = tracer.begin(&mut h).expect("sampled");
        assert_eq!(hex(&span.parent.unwrap()), "00f067aa0ba902b7");
        let sent = h["traceparent"].to_str().unwrap().to_string();
        assert_eq!(
            sent,
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
                hex(&span.span_id)
            )
        );
        assert_ne!(span.span_id, span.parent.unwrap());
    }

    #[test]
    fn an_unsampled_parent_passes_unchanged_under_a_parent_based_sampler() {
        let tracer = Tracer::new(Sampler::parse("parentbased_always_on", 1.0).unwrap(), 4);
        let mut h = HeaderMap::new();
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        h.insert("traceparent", HeaderValue::from_static(unsampled));
        assert!(tracer.begin(&mut h).is_none());
        assert_eq!(h["traceparent"], unsampled);
    }

    #[test]
    fn a_call_without_a_parent_starts_a_trace_when_the_root_samples() {
        let tracer = Tracer::new(Sampler::parse("parentbased_always_on", 1.0).unwrap(), 4);
        let mut h = HeaderMap::new();
        let span = tracer.begin(&mut h).expect("root sampled");
        assert!(span.parent.is_none());
        assert!(
            parse_traceparent(h["traceparent"].to_str().unwrap())
                .unwrap()
                .sampled
        );
        let off = Tracer::new(Sampler::parse("parentbased_always_off", 1.0).unwrap(), 4);
        assert!(off.begin(&mut HeaderMap::new()).is_none());
    }

    #[test]
    fn the_ratio_sampler_reads_the_trace_ids_low_bytes() {
        let s = Sampler::parse("traceidratio", 0.5).unwrap();
        let mut low = [0u8; 16];
        low[8] = 0x7f;
        let mut high = [0u8; 16];
        high[8] = 0x80;
        assert!(
            s.sample(&low, Some(false)),
            "not parent-based: the parent's flag is ignored"
        );
        assert!(!s.sample(&high, Some(true)));
        assert_eq!(Sampler::parse("sometimes", 1.0), None);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let tracer = Tracer::new(Sampler::parse("always_on", 1.0).unwrap(), 1);
        for _ in 0..3 {
            let span = tracer.begin(&mut HeaderMap::new()).unwrap();
            tracer.finish(span, "/p".into(), 0);
        }
        assert_eq!(tracer.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(tracer.inbox.lock().unwrap().try_iter().count(), 1);
    }
}
