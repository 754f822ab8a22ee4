//! Per-call counters, kept without locks: every series is a fixed slot of atomics, indexed by
//! method (the CRI table's order, then "other") and status code, made once at start. The
//! Python side reads a snapshot at scrape time and serves it under the `criproxy_*` names.
//!
//! Notes:
//! - Relaxed ordering throughout: a scrape may see a call counted but its duration not yet
//!   added (or the reverse), which Prometheus tolerates; no count is ever lost.
//! - Durations are summed in nanoseconds (u64: 584 years of call time before it wraps).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::status::CODES;

/// Upper bounds of the histogram buckets, in seconds: from half a millisecond (a passthrough
/// call) to two minutes (a slow image pull or a hung runtime). The Python side uses the same.
pub const BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

#[derive(Default)]
struct Histogram {
    /// Non-cumulative: buckets[i] counts observations in (BUCKETS[i-1], BUCKETS[i]]; the last
    /// slot counts those above every bound.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.buckets[slot].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = Vec::with_capacity(BUCKETS.len() + 1);
        let mut total = 0;
        for b in &self.buckets {
            total += b.load(Relaxed);
            cumulative.push(total);
        }
        HistogramSnapshot {
            cumulative,
            sum_seconds: self.sum_ns.load(Relaxed) as f64 / 1e9,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Cumulative counts per bucket of BUCKETS, then the +Inf bucket (= the count).
    pub cumulative: Vec<u64>,
    pub sum_seconds: f64,
}

/// One finished call, as the counters need it.
pub struct Finished {
    pub method: usize,
    pub code: u8,
    pub total: Duration,
    pub runtime: Duration,
}

pub struct Metrics {
    methods: usize,
    calls: Vec<AtomicU64>,
    duration: Vec<Histogram>,
    in_flight: Vec<AtomicI64>,
    runtime: Vec<Histogram>,
    proxy: Vec<Histogram>,
    streams: Vec<AtomicI64>,
    stream_messages: Vec<AtomicU64>,
}

fn slots<T: Default>(n: usize) -> Vec<T> {
    (0..n).map(|_| T::default()).collect()
}

impl Metrics {
    /// Counters for `methods` labels (the last is "other").
    pub fn new(methods: usize) -> Self {
        Metrics {
            methods,
            calls: slots(methods * CODES),
            duration: slots(methods * CODES),
            in_flight: slots(methods),
            runtime: slots(methods),
            proxy: slots(methods),
            streams: slots(methods),
            stream_messages: slots(methods),
        }
    }

    pub fn started(&self, method: usize) {
        self.in_flight[method].fetch_add(1, Relaxed);
    }

    pub fn finished(&self, f: &Finished) {
        let slot = f.method * CODES + usize::from(f.code).min(CODES - 1);
        self.in_flight[f.method].fetch_sub(1, Relaxed);
        self.calls[slot].fetch_add(1, Relaxed);
        self.duration[slot].observe(f.total);
        if !f.runtime.is_zero() {
            self.runtime[f.method].observe(f.runtime);
        }
        self.proxy[f.method].observe(f.total.saturating_sub(f.runtime));
    }

    pub fn stream_started(&self, method: usize) {
        self.streams[method].fetch_add(1, Relaxed);
    }

    pub fn stream_finished(&self, method: usize) {
        self.streams[method].fetch_sub(1, Relaxed);
    }

    pub fn stream_messages(&self, method: usize, n: u64) {
        if n > 0 {
            self.stream_messages[method].fetch_add(n, Relaxed);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut calls = Vec::new();
        for m in 0..self.methods {
            for code in 0..CODES {
                let n = self.calls[m * CODES + code].load(Relaxed);
                if n > 0 {
                    calls.push((m, code as u8, n, self.duration[m * CODES + code].snapshot()));
                }
            }
        }
        let per_method = (0..self.methods)
            .map(|m| MethodSnapshot {
                in_flight: self.in_flight[m].load(Relaxed),
                runtime: self.runtime[m].snapshot(),
                proxy: self.proxy[m].snapshot(),
                streams: self.streams[m].load(Relaxed),
                stream_messages: self.stream_messages[m].load(Relaxed),
            })
            .collect();
        Snapshot { calls, per_method }
    }
}

pub struct MethodSnapshot {
    pub in_flight: i64,
    pub runtime: HistogramSnapshot,
    pub proxy: HistogramSnapshot,
    pub streams: i64,
    pub stream_messages: u64,
}

pub struct Snapshot {
    /// (method, code, calls, duration) for every pair that has calls.
    pub calls: Vec<(usize, u8, u64, HistogramSnapshot)>,
    pub per_method: Vec<MethodSnapshot>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_call_is_counted_once_with_its_durations() {
        let m = Metrics::new(3);
        m.started(1);
        assert_eq!(m.snapshot().per_method[1].in_flight, 1);
        m.finished(&Finished {
            method: 1,
            code: 5,
            total: Duration::from_millis(3),
            runtime: Duration::from_millis(2),
        });
        let s = m.snapshot();
        assert_eq!(s.per_method[1].in_flight, 0);
        assert_eq!(s.calls.len(), 1);
        let (method, code, n, duration) = &s.calls[0];
        assert_eq!((*method, *code, *n), (1, 5, 1));
        // 3 ms falls in the (2.5 ms, 5 ms] bucket: cumulative counts are 0 up to 2.5 ms, 1 from 5 ms.
        assert_eq!(&duration.cumulative[..5], &[0, 0, 0, 1, 1]);
        assert_eq!(*duration.cumulative.last().unwrap(), 1);
        assert!((duration.sum_seconds - 0.003).abs() < 1e-9);
        assert!((s.per_method[1].proxy.sum_seconds - 0.001).abs() < 1e-9);
        assert!((s.per_method[1].runtime.sum_seconds - 0.002).abs() < 1e-9);
    }

    #[test]
    fn a_duration_past_every_bucket_counts_in_inf_only() {
        let m = Metrics::new(1);
        m.started(0);
        m.finished(&Finished {
            method: 0,
            code: 0,
            total: Duration::from_secs(500),
            runtime: Duration::ZERO,
        });
        let s = m.snapshot();
        let d = &s.calls[0].3;
        assert_eq!(d.cumulative[BUCKETS.len() - 1], 0);
        assert_eq!(d.cumulative[BUCKETS.len()], 1);
        assert_eq!(
            s.per_method[0].runtime.cumulative[BUCKETS.len()],
            0,
            "no runtime time, no observation"
        );
    }

    #[test]
    fn stream_gauges_go_up_and_down() {
        let m = Metrics::new(2);
        m.stream_started(0);
        m.stream_messages(0, 3);
        m.stream_messages(0, 0);
        assert_eq!(m.snapshot().per_method[0].streams, 1);
        m.stream_finished(0);
        let s = m.snapshot();
        assert_eq!(
            (s.per_method[0].streams, s.per_method[0].stream_messages),
            (0, 3)
        );
    }
}
