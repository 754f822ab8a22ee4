//! The bodies a call's bytes flow through: the caller's request on its way to the runtime, the
//! runtime's response on its way back, and the whole answers the proxy makes itself.
//!
//! Notes:
//! - Passthrough bodies are the peers' own HTTP/2 streams, polled frame by frame: a frame is read
//!   from one side only when the other side's flow control took the previous one, so neither
//!   direction is buffered beyond the HTTP/2 windows. Trailers (the status) pass as they came.
//! - Both directions enforce the message size limit through `Framer`: a message announcing more
//!   than the limit ends the call with RESOURCE_EXHAUSTED before any byte of it is passed on.
//! - A response body owns its call's `Tracker`: the call is counted when the body ends or is
//!   dropped (the caller went away), whatever happened first.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::frame::Framer;
use crate::status::{self, Status};
use crate::track::Tracker;
use crate::upstream::{RecvBody, Upstream};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Set by the request body when the caller sends a message over the limit: its length + 1.
pub type Tripped = Arc<AtomicU64>;

#[derive(Debug)]
pub struct RequestTooLarge(pub u64);

impl std::fmt::Display for RequestTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the caller's request message of {} bytes is over the limit",
            self.0
        )
    }
}

impl std::error::Error for RequestTooLarge {}

/// The caller's request, on its way to the runtime.
pub struct Outgoing {
    inner: Incoming,
    framer: Framer,
    tripped: Tripped,
}

impl Outgoing {
    pub fn new(inner: Incoming, limit: usize, tripped: Tripped) -> Self {
        Outgoing {
            inner,
            framer: Framer::new(limit),
            tripped,
        }
    }
}

impl Body for Outgoing {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let passed = this.framer.feed(data);
                    if let Some(len) = passed.oversize {
                        this.tripped.store(len + 1, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(RequestTooLarge(len)))));
                    }
                    Poll::Ready(Some(Ok(Frame::data(passed.forward))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            Some(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a failed stream to the runtime means for the caller.
pub fn failure_status(
    err: &(dyn std::error::Error + 'static),
    upstream: &Upstream,
    tripped: &Tripped,
    limit: usize,
) -> Status {
    let over = tripped.load(Ordering::Relaxed);
    if over > 0 {
        return Status::new(
            status::RESOURCE_EXHAUSTED,
            format!(
                "criproxy: the request message of {} bytes is larger than the proxy's limit of {limit} bytes (--max-message-bytes)",
                over - 1
            ),
        );
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            match h2.reason() {
                Some(h2::Reason::CANCEL) => {
                    return Status::new(
                        status::CANCELLED,
                        "criproxy: the runtime cancelled the call",
                    );
                }
                Some(h2::Reason::REFUSED_STREAM) => {
                    return Status::new(
                        status::UNAVAILABLE,
                        "criproxy: the runtime refused the call (try again)",
                    );
                }
                Some(h2::Reason::ENHANCE_YOUR_CALM) => {
                    return Status::new(
                        status::RESOURCE_EXHAUSTED,
                        "criproxy: the runtime asked to slow down",
                    );
                }
                _ => {}
            }
        }
        source = e.source();
    }
    if !upstream.is_connected() {
        return Status::new(status::UNAVAILABLE, upstream.unreachable(&err.to_string()));
    }
    Status::new(
        status::UNAVAILABLE,
        format!(
            "criproxy: the call to {} endpoint {} failed: {err}",
            upstream.role, upstream.endpoint
        ),
    )
}

/// The runtime's response, on its way to the caller.
pub struct Relayed {
    inner: Option<RecvBody>,
    framer: Framer,
    trailers: Option<HeaderMap>,
    tracker: Tracker,
    upstream: Arc<Upstream>,
    tripped: Tripped,
    limit: usize,
}

impl Relayed {
    pub fn new(
        inner: RecvBody,
        limit: usize,
        tracker: Tracker,
        upstream: Arc<Upstream>,
        tripped: Tripped,
    ) -> Self {
        Relayed {
            inner: Some(inner),
            framer: Framer::new(limit),
            trailers: None,
            tracker,
            upstream,
            tripped,
            limit,
        }
    }

    fn end_with(&mut self, st: Status) -> Frame<Bytes> {
        self.inner = None;
        self.tracker.runtime_done();
        self.tracker.code = Some(st.code);
        Frame::trailers(status::status_headers(st.code, &st.message))
    }
}

impl Body for Relayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let passed = this.framer.feed(data);
                    this.tracker.messages(passed.started);
                    if let Some(len) = passed.oversize {
                        let st = Status::new(
                            status::RESOURCE_EXHAUSTED,
                            format!("criproxy: the runtime's response message of {len} bytes is larger than the proxy's limit of {} bytes (--max-message-bytes)", this.limit),
                        );
                        let trailers = this.end_with(st);
                        if passed.forward.is_empty() {
                            return Poll::Ready(Some(Ok(trailers)));
                        }
                        this.trailers = trailers.into_trailers().ok();
                    }
                    Poll::Ready(Some(Ok(Frame::data(passed.forward))))
                }
                Err(frame) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        this.tracker.code =
                            Some(status::code_of(trailers).unwrap_or(status::UNKNOWN));
                    }
                    this.inner = None;
                    this.tracker.runtime_done();
                    Poll::Ready(Some(Ok(frame)))
                }
            },
            Some(Err(e)) => {
                let st = failure_status(&e, &this.upstream, &this.tripped, this.limit);
                Poll::Ready(Some(Ok(this.end_with(st))))
            }
            None => {
                this.inner = None;
                this.tracker.runtime_done();
                if this.tracker.code.is_none() {
                    // The runtime ended the stream without a status: the caller's gRPC says UNKNOWN too.
                    this.tracker.code = Some(status::UNKNOWN);
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.trailers.is_none() && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }
}

/// A whole answer: optional data, then optional trailers (intercepted calls, the proxy's own).
pub struct Whole {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
    _tracker: Option<Tracker>,
}

impl Whole {
    pub fn new(data: Option<Bytes>, trailers: Option<HeaderMap>, tracker: Option<Tracker>) -> Self {
        Whole {
            data: data.filter(|d| !d.is_empty()),
            trailers,
            _tracker: tracker,
        }
    }

    pub fn empty(tracker: Option<Tracker>) -> Self {
        Whole::new(None, None, tracker)
    }
}

impl Body for Whole {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}
