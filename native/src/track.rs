//! One call's bookkeeping: its slot under --max-concurrent-calls, and its metrics, counted once
//! when the call ends (or is dropped: the caller went away, CANCELLED).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::{Finished, Metrics};
use crate::status;
use crate::trace::{Span, Tracer};

/// A slot of the concurrency limit, given back on drop.
pub struct Permit(Arc<AtomicUsize>);

impl Permit {
    /// A slot, unless `limit` calls hold one already.
    pub fn acquire(in_flight: &Arc<AtomicUsize>, limit: usize) -> Option<Permit> {
        let mut now = in_flight.load(Ordering::Relaxed);
        loop {
            if now >= limit {
                return None;
            }
            match in_flight.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(Permit(in_flight.clone())),
                Err(actual) => now = actual,
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct Tracker {
    metrics: Arc<Metrics>,
    method: usize,
    started: Instant,
    upstream_started: Option<Instant>,
    runtime: Option<Duration>,
    stream: bool,
    pub code: Option<u8>,
    permit: Option<Permit>,
    span: Option<(Arc<Tracer>, Span, String)>,
}

impl Tracker {
    pub fn new(metrics: Arc<Metrics>, method: usize) -> Self {
        metrics.started(method);
        Tracker {
            metrics,
            method,
            started: Instant::now(),
            upstream_started: None,
            runtime: None,
            stream: false,
            code: None,
            permit: None,
            span: None,
        }
    }

    pub fn hold(&mut self, permit: Permit) {
        self.permit = Some(permit);
    }

    /// The call is sampled: its span is recorded when it ends.
    pub fn trace(&mut self, tracer: Arc<Tracer>, span: Span, path: String) {
        self.span = Some((tracer, span, path));
    }

    /// The call's (trace id, span id), when sampled.
    pub fn span_ids(&self) -> Option<([u8; 16], [u8; 8])> {
        self.span.as_ref().map(|(_, s, _)| (s.trace_id, s.span_id))
    }

    /// The call was sent to the runtime now.
    pub fn runtime_started(&mut self) {
        self.upstream_started = Some(Instant::now());
    }

    /// The runtime's part of the call ended now.
    pub fn runtime_done(&mut self) {
        if self.runtime.is_none() {
            self.runtime = self.upstream_started.map(|t| t.elapsed());
        }
    }

    pub fn streaming(&mut self) {
        if !self.stream {
            self.stream = true;
            self.metrics.stream_started(self.method);
        }
    }

    pub fn messages(&self, n: u64) {
        if self.stream {
            self.metrics.stream_messages(self.method, n);
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.runtime_done();
        if self.stream {
            self.metrics.stream_finished(self.method);
        }
        self.metrics.finished(&Finished {
            method: self.method,
            code: self.code.unwrap_or(status::CANCELLED),
            total: self.started.elapsed(),
            runtime: self.runtime.unwrap_or_default(),
        });
        if let Some((tracer, span, path)) = self.span.take() {
            tracer.finish(span, path, self.code.unwrap_or(status::CANCELLED));
        }
        drop(self.permit.take());
    }
}
