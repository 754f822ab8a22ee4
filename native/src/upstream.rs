//! The connection to one runtime endpoint (a unix socket): one HTTP/2 connection that every
//! call is multiplexed on, redialled in the background whenever it ends.
//!
//! Notes:
//! - The client side speaks h2 directly, not through hyper's client: a call's head and its
//!   (usually only) DATA frame are queued together and leave in one write, where hyper's client
//!   flushes the head alone and sends the body from a task of its own (strace: two writes and one
//!   more wake-up per call, and the runtime reads the call in two parts).
//! - A body is sent as the runtime's flow control allows: a chunk is taken from the caller only
//!   once the previous one has send capacity, so nothing is buffered beyond the HTTP/2 windows.
//! - While the runtime is down a call fails at once with UNAVAILABLE naming the endpoint (the
//!   kubelet retries), instead of waiting for its deadline.
//! - Redialling waits RECONNECT_INITIAL, doubling to RECONNECT_MAX at most, so the proxy serves
//!   again within a second of the runtime answering (gRPC's own backoff grows to two minutes).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::{Request, Response};
use http_body::{Body, Frame};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, watch};

use crate::body::ProxyBody;

pub const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
pub const RECONNECT_MAX: Duration = Duration::from_millis(500);
/// HTTP/2 windows toward the runtime. They bound every answer byte the proxy holds: what it
/// received and has not yet written to its callers (see RecvBody). One connection carries every
/// call, and a caller that stops reading mid-answer keeps at most one stream window of it against
/// the connection window, so that one is 8 stream windows: 8 callers that stop reading a large
/// answer, all at once and before their deadlines, are needed to hold up the others.
/// Measured (--quick, the same run), 512 KiB / 8 MiB against 1 MiB / 16 MiB: peak RSS after 64
/// clients each reading two ListContainers 61.1 / 64.4 MiB; ListContainers CPU per call 558 / 544
/// us, p50 1.66x / 1.62x. With windows given back on dropping, 512 KiB / 4 MiB against 512 KiB /
/// 8 MiB (five rounds of that burst, one proxy after the other): peak RSS 54.8-55.4 against
/// 58.7-59.6 MiB, the bursts as fast; ListContainers p50 1.75x / 1.74x (bench, one run). 256 KiB
/// streams: p50 1.92x (the runtime waits for each frame to reach the caller before the next).
const STREAM_WINDOW: u32 = 512 << 10;
const CONNECTION_WINDOW: u32 = 8 * STREAM_WINDOW;
/// The largest DATA frame the runtime may send (h2's default is 16 KiB): a 1 MB answer
/// (ListContainers on a busy node) then crosses in a few frames and reads instead of 64 and 120.
/// Measured (bench/forwarding.py, 1,000 containers): with 1 MiB, proxy CPU per call 1,622 -> 464
/// us; reads per call 122 -> 8, writes 64 -> 9 (strace -c). 256 KiB keeps most of that and holds
/// far less memory while many answers are in flight (a frame's buffer lives until the whole frame
/// went on to the caller). Measured (--quick, the same runs): 256 KiB against 1 MiB, ListContainers
/// CPU per call 492 / 469 and 606 / 557 us, p50 within noise; peak RSS after 64 clients 62.7 / 80.9
/// and 62.0 / 76.9 MiB; 64 KiB: 1,505 us per call.
pub const MAX_FRAME: u32 = 256 << 10;

pub struct Upstream {
    /// As the operator wrote it (unix:///run/containerd/containerd.sock), for messages.
    pub endpoint: String,
    /// "runtime" or "image".
    pub role: &'static str,
    path: PathBuf,
    sender: RwLock<Option<SendRequest<Bytes>>>,
    last_error: Mutex<String>,
    connected: AtomicBool,
    pub reconnects: AtomicU64,
}

impl Upstream {
    pub fn new(endpoint: String, path: PathBuf, role: &'static str) -> Arc<Self> {
        Arc::new(Upstream {
            endpoint,
            role,
            path,
            sender: RwLock::new(None),
            last_error: Mutex::new("not connected yet".into()),
            connected: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
        })
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The connection to send a call on, or why there is none.
    pub fn sender(&self) -> Result<SendRequest<Bytes>, String> {
        match self.sender.read().expect("upstream lock").as_ref() {
            Some(s) => Ok(s.clone()),
            None => Err(self.last_error.lock().expect("upstream lock").clone()),
        }
    }

    /// The message of a call that could not reach the runtime.
    pub fn unreachable(&self, why: &str) -> String {
        format!(
            "criproxy: {} endpoint {} is not answering (is the runtime running?): {why}",
            self.role, self.endpoint
        )
    }

    /// Keep a connection up until `stop` says otherwise.
    /// `first` is told when the first dial ended, either way.
    pub async fn maintain(
        self: Arc<Self>,
        mut stop: watch::Receiver<bool>,
        first: oneshot::Sender<()>,
    ) {
        let mut backoff = RECONNECT_INITIAL;
        let mut ever = false;
        let mut first = Some(first);
        loop {
            if *stop.borrow() {
                return;
            }
            let attempt = self.connect_once().await;
            if let Some(first) = first.take() {
                let _ = first.send(());
            }
            match attempt {
                Ok(done) => {
                    if ever {
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    ever = true;
                    backoff = RECONNECT_INITIAL;
                    tokio::select! {
                        why = done => {
                            self.lost(why.unwrap_or_else(|_| "connection task ended".into()));
                        }
                        _ = stop.changed() => return,
                    }
                }
                Err(why) => {
                    *self.last_error.lock().expect("upstream lock") = why;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                }
            }
        }
    }

    fn lost(&self, why: String) {
        self.connected.store(false, Ordering::Relaxed);
        *self.sender.write().expect("upstream lock") = None;
        *self.last_error.lock().expect("upstream lock") = why;
    }

    /// Dial once; on success, a receiver that resolves (with why) when the connection ends.
    async fn connect_once(&self) -> Result<oneshot::Receiver<String>, String> {
        let stream = UnixStream::connect(&self.path)
            .await
            .map_err(|e| format!("connect {}: {e}", self.path.display()))?;
        let stream = crate::sock::Sock::new(stream)
            .map_err(|e| format!("connect {}: {e}", self.path.display()))?;
        // PING acknowledgements go out after the answers read with them (acks.rs).
        let stream = crate::acks::AcksLast::new(stream);
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_header_list_size(1 << 20)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        let (done_tx, done_rx) = oneshot::channel::<String>();
        tokio::spawn(async move {
            let why = match conn.await {
                Ok(()) => "the runtime closed the connection".to_string(),
                Err(e) => format!("connection lost: {e}"),
            };
            let _ = done_tx.send(why);
        });
        *self.sender.write().expect("upstream lock") = Some(sender);
        self.connected.store(true, Ordering::Relaxed);
        Ok(done_rx)
    }
}

/// Send one call on `sender`: its head and, in the same write when it is at hand, its first body
/// chunk; the rest of the body follows from a task of its own as the runtime's windows allow.
pub async fn call(
    sender: SendRequest<Bytes>,
    head: Request<()>,
    body: ProxyBody,
) -> Result<Response<RecvBody>, h2::Error> {
    let mut sender = sender.ready().await?;
    let eos = body.is_end_stream();
    let (response, send) = sender.send_request(head, eos)?;
    if !eos {
        let mut pump = Pump {
            body,
            send,
            waiting: false,
        };
        // Most calls' one message is already here: queue it now, beside the head.
        let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut pump).poll(cx))).await;
        if first.is_pending() {
            tokio::spawn(pump);
        }
    }
    Ok(response.await?.map(RecvBody::new))
}

/// A caller's body on its way into an h2 stream.
struct Pump {
    body: ProxyBody,
    send: SendStream<Bytes>,
    /// A chunk was sent beyond the stream's capacity: wait until the window covers it before
    /// taking another from the caller.
    waiting: bool,
}

impl Future for Pump {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            // The runtime reset the stream: nothing more to send (the response says why).
            if this.send.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            if this.waiting {
                while this.send.capacity() == 0 {
                    match ready!(this.send.poll_capacity(cx)) {
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => return Poll::Ready(()),
                    }
                }
                // Give back what is not needed yet, so an idle caller pins no window.
                this.send.reserve_capacity(0);
                this.waiting = false;
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = this.body.is_end_stream();
                        // h2 queues the chunk even without capacity (a new stream has none
                        // until its head is written) and sends it as the windows allow.
                        if this.send.send_data(data, eos).is_err() || eos {
                            return Poll::Ready(());
                        }
                        this.send.reserve_capacity(1);
                        this.waiting = true;
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let _ = this.send.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                // The caller's body failed (it cancelled, or sent more than the limit).
                Some(Err(_)) => {
                    this.send.send_reset(Reason::CANCEL);
                    return Poll::Ready(());
                }
                None => {
                    let _ = this.send.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// The runtime's response body: DATA frames, then the trailers. A chunk's bytes are given back to
/// the runtime's window when the chunk is dropped, that is once it has been written to the caller
/// (or the call ended), not when it is taken: the server side queues what it takes until the
/// caller's window lets it go, so a window given back on taking let the runtime send more while
/// the proxy still held the earlier bytes. This way the windows toward the runtime bound all the
/// answer bytes the proxy holds. Measured (64 clients each reading two ListContainers of ~1 MB,
/// six rounds, one proxy after the other): peak RSS 56.5-70.2 MiB given back on taking,
/// 54.1-60.2 MiB given back on dropping.
pub struct RecvBody {
    recv: RecvStream,
    data_done: bool,
}

impl RecvBody {
    fn new(recv: RecvStream) -> Self {
        RecvBody {
            recv,
            data_done: false,
        }
    }
}

/// A chunk of the runtime's answer that gives its bytes back to the runtime's window when dropped.
struct Held {
    data: Bytes,
    window: h2::FlowControl,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // The chunk holds a reference to its stream, so this counts until the connection is gone
        // (Err then: the window went with it).
        let _ = self.window.release_capacity(self.data.len());
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let held = Held {
                        data,
                        window: this.recv.flow_control().clone(),
                    };
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_owner(held)))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    const WINDOW: u32 = 64 << 10;

    async fn next_chunk(body: &mut RecvBody) -> Option<Bytes> {
        let frame = poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await?;
        frame.unwrap().into_data().ok()
    }

    /// A runtime whose answer is twice the proxy's window toward it, and the proxy's side of it.
    async fn an_answer_twice_the_window() -> (RecvBody, tokio::task::JoinHandle<()>) {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let runtime = tokio::spawn(async move {
            let mut conn = h2::server::handshake(theirs).await.unwrap();
            let (_, mut respond) = conn.accept().await.unwrap().unwrap();
            let mut send = respond.send_response(Response::new(()), false).unwrap();
            send.send_data(Bytes::from(vec![7u8; 2 * WINDOW as usize]), true)
                .unwrap();
            while conn.accept().await.is_some() {}
        });
        let (mut client, conn) = h2::client::Builder::new()
            .initial_window_size(WINDOW)
            .initial_connection_window_size(WINDOW)
            .handshake::<_, Bytes>(ours)
            .await
            .unwrap();
        tokio::spawn(conn);
        let (response, _) = client.send_request(Request::new(()), true).unwrap();
        let recv = response.await.unwrap().into_body();
        (RecvBody::new(recv), runtime)
    }

    #[tokio::test]
    async fn a_chunk_gives_its_window_back_when_dropped_not_when_taken() {
        let (mut body, runtime) = an_answer_twice_the_window().await;
        let mut held = Vec::new();
        let mut taken = 0;
        while taken < WINDOW as usize {
            let chunk = next_chunk(&mut body).await.unwrap();
            taken += chunk.len();
            held.push(chunk);
        }
        assert_eq!(taken, WINDOW as usize);
        // Taken but still held (queued for a slow caller): the runtime may send no more.
        let more = tokio::time::timeout(Duration::from_millis(200), next_chunk(&mut body)).await;
        assert!(
            more.is_err(),
            "the runtime sent past the window while the proxy held its bytes"
        );
        drop(held); // written to the caller: the window comes back, the rest follows
        let rest = tokio::time::timeout(Duration::from_secs(5), async {
            let mut rest = Vec::new();
            while let Some(chunk) = next_chunk(&mut body).await {
                rest.extend_from_slice(&chunk);
            }
            rest
        })
        .await
        .expect("the rest of the answer did not come once the window was back");
        assert_eq!(rest, vec![7u8; WINDOW as usize]);
        runtime.abort();
    }
}
