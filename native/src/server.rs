//! The listening side: accepting the kubelet's connections, serving each call by its route
//! (passthrough or intercepted), ageing connections out, and draining on stop.
//!
//! Notes:
//! - Every connection is asked to reconnect (a graceful HTTP/2 GOAWAY: calls in flight finish,
//!   long streams go on) after `connection_age`, with 10% jitter either way. Reconnecting to the
//!   socket path is how callers move to a successor after an upgrade (serve --takeover) without
//!   a call failing.
//! - The caller's metadata goes upstream as it came (traceparent, grpc-timeout, user-agent
//!   included), and the runtime's headers and trailers come back as it sent them; the proxy adds
//!   none (no `date`).
//! - --max-concurrent-calls counts calls across connections, streams included; one over it fails
//!   at once with RESOURCE_EXHAUSTED instead of queueing behind a hung runtime.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixListener;
use tokio::sync::{watch, Notify};

use crate::body::{self, Outgoing, ProxyBody, Relayed, Tripped, Whole};
use crate::frame::{self, PREFIX_LEN};
use crate::metrics::Metrics;
use crate::routes::{self, Methods, Role, Route, Table};
use crate::seam::{Control, Verdict};
use crate::status::{self, Status};
use crate::trace::Tracer;
use crate::track::{Permit, Tracker};
use crate::upstream::{RecvBody, Upstream};

const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 4 << 20;

pub struct Shared {
    pub methods: Methods,
    pub table: RwLock<Arc<Table>>,
    pub runtime: Arc<Upstream>,
    pub image: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
    pub max_message_bytes: usize,
    pub max_calls: usize,
    pub in_flight: Arc<AtomicUsize>,
    pub control: RwLock<Option<Arc<Control>>>,
    pub connection_age: Duration,
    pub live: Live,
    pub tracer: RwLock<Option<Arc<Tracer>>>,
    pub stopped: std::sync::atomic::AtomicBool,
}

/// Connections being served, so stop can wait for them to drain.
#[derive(Default)]
pub struct Live {
    count: AtomicUsize,
    idle: Notify,
    seed: AtomicU64,
}

struct Entered<'a>(&'a Live);

impl Live {
    fn enter(&self) -> Entered<'_> {
        self.count.fetch_add(1, Ordering::AcqRel);
        Entered(self)
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Wait until no connection is left.
    pub async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            idle.await;
        }
    }

    /// A factor in [0.9, 1.1], different for each connection.
    fn jitter(&self) -> f64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(self.seed.fetch_add(1, Ordering::Relaxed));
        0.9 + 0.2 * ((h.finish() % 10_000) as f64 / 10_000.0)
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Shared {
    fn upstream(&self, role: Role) -> &Arc<Upstream> {
        match role {
            Role::Runtime => &self.runtime,
            Role::Image => &self.image,
        }
    }
}

/// End a call with the proxy's own status.
fn refuse(mut tracker: Tracker, st: Status) -> Response<ProxyBody> {
    tracker.code = Some(st.code);
    status::trailers_only(st.code, &st.message, Whole::empty(Some(tracker)).boxed())
}

/// The caller's URI as the runtime gets it: scheme http, the caller's authority and path (each
/// reused as parsed, not parsed again), or `path` when the route rewrites it (v1alpha2 bridging).
fn upstream_uri(caller: Uri, path: Option<&str>) -> Result<Uri, http::Error> {
    let mut parts = caller.into_parts();
    parts.scheme = Some(Scheme::HTTP);
    if parts.authority.is_none() {
        parts.authority = Some(Authority::from_static("localhost"));
    }
    if let Some(path) = path {
        parts.path_and_query = Some(PathAndQuery::try_from(path)?);
    } else if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    Ok(Uri::from_parts(parts)?)
}

pub async fn handle(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let table = shared.table.read().expect("route table lock").clone();
    let route = routes::route(&shared.methods, &table, req.uri().path());
    let mut tracker = Tracker::new(shared.metrics.clone(), route.method);
    let tracer = shared.tracer.read().expect("tracer lock").clone();
    if let Some(tracer) = tracer {
        if let Some(span) = tracer.begin(req.headers_mut()) {
            tracker.trace(tracer, span, req.uri().path().to_string());
        }
    }
    let Some(permit) = Permit::acquire(&shared.in_flight, shared.max_calls) else {
        let st = Status::new(
            status::RESOURCE_EXHAUSTED,
            format!(
                "criproxy: {} calls are in flight, the proxy's limit (--max-concurrent-calls); is the runtime hung?",
                shared.max_calls
            ),
        );
        return Ok(refuse(tracker, st));
    };
    tracker.hold(permit);
    Ok(if route.intercepted {
        intercept(&shared, route, req, tracker).await
    } else {
        passthrough(&shared, route, req, tracker).await
    })
}

/// Send a caller's call upstream: its method, its path as routed, its headers, and `body`.
/// Err: the status to answer the caller with (the runtime is down, or the call failed on the way).
async fn send_upstream(
    shared: &Shared,
    route: &Route,
    parts: http::request::Parts,
    body: ProxyBody,
    tracker: &mut Tracker,
    tripped: &Tripped,
) -> Result<(Arc<Upstream>, Response<RecvBody>), Status> {
    let upstream = shared.upstream(route.role).clone();
    let sender = upstream
        .sender()
        .map_err(|why| Status::new(status::UNAVAILABLE, upstream.unreachable(&why)))?;
    let uri = upstream_uri(parts.uri, route.path.as_deref()).map_err(|e| {
        Status::new(
            status::INTERNAL,
            format!("criproxy: cannot address the runtime: {e}"),
        )
    })?;
    let mut head = Request::new(());
    *head.uri_mut() = uri;
    *head.method_mut() = parts.method;
    *head.headers_mut() = parts.headers;
    tracker.runtime_started();
    match crate::upstream::call(sender, head, body).await {
        Ok(response) => Ok((upstream, response)),
        Err(e) => Err(body::failure_status(
            &e,
            &upstream,
            tripped,
            shared.max_message_bytes,
        )),
    }
}

async fn passthrough(
    shared: &Shared,
    route: Route,
    req: Request<Incoming>,
    mut tracker: Tracker,
) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    let tripped: Tripped = Arc::default();
    let outgoing = Outgoing::new(body, shared.max_message_bytes, tripped.clone()).boxed();
    let (upstream, response) =
        match send_upstream(shared, &route, parts, outgoing, &mut tracker, &tripped).await {
            Ok(sent) => sent,
            Err(st) => return refuse(tracker, st),
        };
    let (parts, incoming) = response.into_parts();
    if let Some(code) = status::code_of(&parts.headers) {
        tracker.code = Some(code); // trailers-only: the status is in the headers
    }
    if shared.methods.is_server_streaming(route.method) || route.method == shared.methods.other() {
        tracker.streaming();
    }
    let relayed = Relayed::new(
        incoming,
        shared.max_message_bytes,
        tracker,
        upstream,
        tripped,
    );
    Response::from_parts(parts, relayed.boxed())
}

fn metadata_of(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter_map(|(k, v)| {
            v.to_str()
                .ok()
                .map(|v| (k.as_str().to_string(), v.to_string()))
        })
        .collect()
}

/// The one request message of an intercepted call, uncompressed.
async fn request_message(
    shared: &Shared,
    headers: &HeaderMap,
    body: Incoming,
    key: &str,
) -> Result<(Bytes, Bytes), Status> {
    let limit = shared.max_message_bytes;
    let collected = Limited::new(body, limit + PREFIX_LEN).collect().await.map_err(|e| {
        if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
            Status::new(status::RESOURCE_EXHAUSTED, format!("criproxy: the {key} request is larger than the proxy's limit of {limit} bytes (--max-message-bytes)"))
        } else {
            Status::new(status::CANCELLED, format!("criproxy: the caller's {key} request did not arrive whole: {e}"))
        }
    })?;
    let raw = collected.to_bytes();
    let messages = frame::split_messages(raw.clone(), limit).map_err(|e| match e {
        frame::FrameError::TooLarge { .. } => Status::new(
            status::RESOURCE_EXHAUSTED,
            format!("criproxy: {key}: {e} (--max-message-bytes)"),
        ),
        frame::FrameError::Truncated { .. } => {
            Status::new(status::INTERNAL, format!("criproxy: {key}: {e}"))
        }
    })?;
    let [message] = <[frame::Message; 1]>::try_from(messages).map_err(|m| {
        Status::new(
            status::INTERNAL,
            format!(
                "criproxy: {key} takes exactly one request message, the caller sent {}",
                m.len()
            ),
        )
    })?;
    let payload = if message.compressed {
        decompress(headers, message.payload, limit, key)?
    } else {
        message.payload
    };
    Ok((raw, payload))
}

fn decompress(
    headers: &HeaderMap,
    payload: Bytes,
    limit: usize,
    key: &str,
) -> Result<Bytes, Status> {
    use std::io::Read;
    let encoding = headers
        .get("grpc-encoding")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity");
    let mut out = Vec::new();
    let read = match encoding {
        "gzip" => flate2::read::GzDecoder::new(&payload[..]).take(limit as u64 + 1).read_to_end(&mut out),
        "deflate" => flate2::read::ZlibDecoder::new(&payload[..]).take(limit as u64 + 1).read_to_end(&mut out),
        other => {
            return Err(Status::new(
                status::UNIMPLEMENTED,
                format!("criproxy: {key} arrived compressed with grpc-encoding {other:?}; the proxy can judge only gzip and deflate"),
            ))
        }
    };
    read.map_err(|e| {
        Status::new(
            status::INTERNAL,
            format!("criproxy: {key}: cannot decompress the {encoding} request: {e}"),
        )
    })?;
    if out.len() > limit {
        return Err(Status::new(
            status::RESOURCE_EXHAUSTED,
            format!("criproxy: {key}: the request is larger than {limit} bytes once decompressed"),
        ));
    }
    Ok(Bytes::from(out))
}

async fn intercept(
    shared: &Shared,
    route: Route,
    req: Request<Incoming>,
    mut tracker: Tracker,
) -> Response<ProxyBody> {
    let key = shared.methods.key(route.method).to_string();
    let Some(control) = shared.control.read().expect("control lock").clone() else {
        let st = Status::new(
            status::UNAVAILABLE,
            "criproxy: the policy pipeline is not running; intercepted calls fail closed",
        );
        return refuse(tracker, st);
    };
    let (mut parts, body) = req.into_parts();
    let (raw, payload) = match request_message(shared, &parts.headers, body, &key).await {
        Ok(m) => m,
        Err(st) => return refuse(tracker, st),
    };
    let deadline = parts
        .headers
        .get("grpc-timeout")
        .and_then(|v| status::parse_timeout(v.as_bytes()));
    let path = parts.uri.path().to_string();
    let span = tracker.span_ids();
    let (verdict, handed) = control
        .ask(
            key,
            path,
            metadata_of(&parts.headers),
            payload,
            deadline,
            span,
        )
        .await;
    let send = match verdict {
        Verdict::Fail(st) => return refuse(tracker, st),
        Verdict::Forward(None) => raw,
        Verdict::Forward(Some(changed)) => {
            parts.headers.remove("grpc-encoding"); // the changed message goes uncompressed
            frame::encode(&changed)
        }
    };
    let body = Whole::new(Some(send), None, None).boxed();
    let (upstream, response) = match send_upstream(
        shared,
        &route,
        parts,
        body,
        &mut tracker,
        &Tripped::default(),
    )
    .await
    {
        Ok(sent) => sent,
        Err(st) => return refuse(tracker, st),
    };
    let (parts, incoming) = response.into_parts();
    let limit = shared.max_message_bytes;
    let collected = match Limited::new(incoming, limit + PREFIX_LEN).collect().await {
        Ok(c) => c,
        Err(e) => {
            let st = if e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Status::new(status::RESOURCE_EXHAUSTED, format!("criproxy: the runtime's response is larger than the proxy's limit of {limit} bytes (--max-message-bytes)"))
            } else {
                body::failure_status(e.as_ref(), &upstream, &Tripped::default(), limit)
            };
            return refuse(tracker, st);
        }
    };
    tracker.runtime_done();
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes();
    let code = status::code_of(&parts.headers)
        .or_else(|| trailers.as_ref().and_then(status::code_of))
        .unwrap_or(status::UNKNOWN);
    tracker.code = Some(code);
    let observed = if code == status::OK {
        frame::split_messages(data.clone(), limit)
            .ok()
            .and_then(|m| m.into_iter().next())
            // A copy: the runtime's chunk gives its window back only when dropped (RecvBody), and
            // the pipeline may take its time over `after`. Intercepted answers are small.
            .map(|m| Bytes::copy_from_slice(&m.payload))
    } else {
        None
    };
    handed.done(code, observed);
    Response::from_parts(
        parts,
        Whole::new(Some(data), trailers, Some(tracker)).boxed(),
    )
}

/// Accept connections until `stop` turns true.
pub async fn serve(listener: UnixListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(connection(stream, shared.clone(), stop.clone()));
                }
                Err(_) => {
                    // Out of file descriptors or a transient error: let it pass, don't spin.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

async fn connection(
    stream: tokio::net::UnixStream,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let live = &shared.live;
    let _entered = live.enter();
    // Best effort: setsockopt(SO_SNDBUF) on a connected socket fails only for a bad descriptor.
    let _ = crate::sock::widen_send_buffer(&stream, crate::sock::CALLER_SEND_BUFFER);
    // grpcio clients send a percent-encoded socket path as :authority, which h2 refuses; the
    // adapter rewrites it for those connections only (see authority.rs).
    let Ok(sock) = crate::sock::Sock::new(stream) else {
        return;
    };
    let Ok(io) = crate::authority::accept(sock).await else {
        return;
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .auto_date_header(false)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(crate::upstream::MAX_FRAME)
        .max_header_list_size(1 << 20)
        .max_concurrent_streams(u32::try_from(shared.max_calls + 64).unwrap_or(u32::MAX));
    let service_shared = shared.clone();
    let service = service_fn(move |req| handle(service_shared.clone(), req));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let age = tokio::time::sleep(shared.connection_age.mul_f64(live.jitter()));
    tokio::pin!(age);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = &mut age => {}
        _ = stop.changed() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

pub fn new_shared(
    methods: Methods,
    runtime: Arc<Upstream>,
    image: Arc<Upstream>,
    max_message_bytes: usize,
    max_calls: usize,
    connection_age: Duration,
) -> Arc<Shared> {
    let metrics = Arc::new(Metrics::new(methods.slots()));
    Arc::new(Shared {
        methods,
        table: RwLock::new(Arc::new(Table::default())),
        runtime,
        image,
        metrics,
        max_message_bytes,
        max_calls,
        in_flight: Arc::default(),
        control: RwLock::new(None),
        connection_age,
        live: Live::default(),
        tracer: RwLock::new(None),
        stopped: std::sync::atomic::AtomicBool::new(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_gets_the_callers_authority_and_path_or_the_routes() {
        let caller: Uri = "http://localhost/runtime.v1.RuntimeService/Version"
            .parse()
            .expect("uri");
        let same = upstream_uri(caller.clone(), None).expect("uri");
        assert_eq!(same, caller);
        let bridged =
            upstream_uri(caller, Some("/runtime.v1alpha2.RuntimeService/Version")).expect("uri");
        assert_eq!(
            bridged.to_string(),
            "http://localhost/runtime.v1alpha2.RuntimeService/Version"
        );
        // h2 hands over a request without an authority when the caller sent none.
        let bare = Uri::from_static("/runtime.v1.RuntimeService/Status");
        assert_eq!(
            upstream_uri(bare, None).expect("uri").to_string(),
            "http://localhost/runtime.v1.RuntimeService/Status"
        );
        assert!(upstream_uri(Uri::from_static("/x"), Some("not a path")).is_err());
    }
}
