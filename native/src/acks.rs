//! PING acknowledgements to the runtime go out after the answers that came with them.
//!
//! Why: containerd (grpc-go) sends a PING with nearly every call (its BDP estimator samples
//! each request it receives), and the PING usually arrives in the same read as the call's answer.
//! h2's connection task reads every frame it can, wakes the streams, then flushes what it queued,
//! the PING's acknowledgement included, before the tasks it woke can run. So each answer waited
//! for a write to the runtime (and the runtime's wake-up on the shared cores) before it went on to
//! the caller: strace showed read(runtime), writev(runtime, 17 bytes), writev(caller) per Version.
//!
//! How: the upstream socket is wrapped. A write made of PING acknowledgements only (nothing a
//! call waits for) is held back with `tokio::task::yield_now`'s wake, which on the current-thread
//! runtime comes after every task runnable now has run and the sockets were polled once more: the
//! answer goes out first, then the acknowledgement. If the runtime sent more meanwhile (the PING
//! came a read ahead of its answer), it is held back once more, at most `MAX_HOLDS` times in all;
//! otherwise it goes on the next try, with whatever h2 queued behind it. Every other write goes
//! straight through. Nothing is buffered here; the acknowledgement is late by the time the woken
//! tasks take (microseconds), which grpc-go's estimator and keepalive accept: they measure round
//! trips in milliseconds.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// HTTP/2 frame header length, the PING frame type and its ACK flag (RFC 9113, 4.1 and 6.7).
const FRAME_HEADER: usize = 9;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;
const PING_PAYLOAD: usize = 8;

/// The most a write of acknowledgements only is looked at for; anything longer carries more.
const LOOK_AT_MOST: usize = 4 * (FRAME_HEADER + PING_PAYLOAD);

/// Is `bufs` one or more whole PING acknowledgements and nothing else?
pub fn only_ping_acks(bufs: &[IoSlice<'_>]) -> bool {
    let len: usize = bufs.iter().map(|b| b.len()).sum();
    if len == 0 || len > LOOK_AT_MOST || len % (FRAME_HEADER + PING_PAYLOAD) != 0 {
        return false;
    }
    let mut bytes = [0u8; LOOK_AT_MOST];
    let mut at = 0;
    for buf in bufs {
        bytes[at..at + buf.len()].copy_from_slice(buf);
        at += buf.len();
    }
    bytes[..len]
        .chunks_exact(FRAME_HEADER + PING_PAYLOAD)
        .all(|frame| {
            let length = u32::from_be_bytes([0, frame[0], frame[1], frame[2]]) as usize;
            let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            length == PING_PAYLOAD && frame[3] == PING && frame[4] & ACK != 0 && stream == 0
        })
}

type Yield = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How many rounds of the other tasks one write of acknowledgements waits for, at most.
pub const MAX_HOLDS: u8 = 4;

/// The upstream socket, with PING acknowledgements let go after the tasks they would delay.
pub struct AcksLast<T> {
    io: T,
    /// A held-back write's wait.
    waiting: Option<Yield>,
    /// Rounds the write now held back has waited for.
    holds: u8,
    /// The runtime sent something since the write was held back.
    read_since: bool,
}

impl<T> AcksLast<T> {
    pub fn new(io: T) -> Self {
        AcksLast {
            io,
            waiting: None,
            holds: 0,
            read_since: false,
        }
    }

    fn hold(&mut self) {
        self.waiting = Some(Box::pin(tokio::task::yield_now()));
        self.holds += 1;
        self.read_since = false;
    }

    /// Ready once this write may go: at once, or after the other tasks' rounds (see above).
    fn poll_turn(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<()> {
        loop {
            match self.waiting.as_mut() {
                None if only_ping_acks(bufs) => self.hold(),
                None => break,
                Some(waiting) => {
                    std::task::ready!(waiting.as_mut().poll(cx));
                    self.waiting = None;
                    if !(self.read_since && self.holds < MAX_HOLDS && only_ping_acks(bufs)) {
                        break;
                    }
                    self.hold();
                }
            }
        }
        self.holds = 0;
        Poll::Ready(())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AcksLast<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.read_since = true;
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AcksLast<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_turn(cx, &[IoSlice::new(buf)]));
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_turn(cx, bufs));
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncWriteExt;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend(payload);
        out
    }

    fn ping_ack() -> Vec<u8> {
        frame(PING, ACK, 0, &[1, 2, 3, 4, 5, 6, 7, 8])
    }

    fn one(bytes: &[u8]) -> bool {
        only_ping_acks(&[IoSlice::new(bytes)])
    }

    #[test]
    fn ping_acknowledgements_alone_are_recognised() {
        assert!(one(&ping_ack()));
        assert!(one(&[ping_ack(), ping_ack()].concat()));
        let two = ping_ack();
        // However the writer cut it into slices.
        assert!(only_ping_acks(&[
            IoSlice::new(&two[..3]),
            IoSlice::new(&two[3..])
        ]));
    }

    #[test]
    fn anything_else_is_not() {
        assert!(!one(&[]));
        assert!(
            !one(&frame(PING, 0, 0, &[0; 8])),
            "a PING (not an ACK) is answered by the runtime"
        );
        assert!(
            !one(&frame(0x8, 0, 0, &[0, 0, 1, 0, 0, 0, 0, 0])[..13]),
            "a WINDOW_UPDATE"
        );
        let headers = frame(0x1, 0x4, 1, &[0x82, 0x86, 0x84, 0x41, 0x1, 0x61, 0x0, 0x0]);
        assert_eq!(headers.len(), ping_ack().len());
        assert!(!one(&headers), "HEADERS of the same length");
        assert!(
            !one(&[ping_ack(), headers].concat()),
            "an ACK with a call's frame behind it"
        );
        assert!(!one(&ping_ack()[..16]), "a truncated ACK");
        assert!(
            !one(&frame(PING, ACK, 3, &[0; 8])),
            "a PING on a stream is not one"
        );
        assert!(
            !one(&vec![0u8; 100 * (FRAME_HEADER + PING_PAYLOAD)]),
            "too long to be only ACKs"
        );
    }

    /// A writer that logs what it was given, in order, beside the test's other tasks.
    struct Log(Arc<Mutex<Vec<String>>>);

    /// The runtime's side: every read gives one byte.
    impl AsyncRead for Log {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            buf.put_slice(b"x");
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Log {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let what = if one(buf) { "ack" } else { "frames" };
            self.0.lock().unwrap().push(what.to_string());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The writer's task and another woken beside it (the answer's) on one current-thread runtime,
    /// the writer's first: the order in which their effects land.
    fn order_of(bytes: Vec<u8>) -> Vec<String> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let writer_log = log.clone();
        let answer_log = log.clone();
        runtime.block_on(async move {
            let writer = tokio::spawn(async move {
                let mut io = AcksLast::new(Log(writer_log));
                io.write_all(&bytes).await.unwrap();
            });
            let answer =
                tokio::spawn(async move { answer_log.lock().unwrap().push("answer".into()) });
            writer.await.unwrap();
            answer.await.unwrap();
        });
        let order = log.lock().unwrap().clone();
        order
    }

    #[test]
    fn an_acknowledgement_waits_for_the_tasks_woken_with_it() {
        assert_eq!(order_of(ping_ack()), ["answer", "ack"]);
    }

    #[test]
    fn a_call_s_frames_do_not_wait() {
        let headers = frame(0x1, 0x4, 1, &[0x82, 0x86, 0x84]);
        assert_eq!(order_of(headers), ["frames", "answer"]);
        assert_eq!(
            order_of([ping_ack(), frame(0x0, 0x1, 1, b"x")].concat()),
            ["frames", "answer"]
        );
    }

    fn try_write<'a>(io: &'a mut AcksLast<Log>, bytes: &[u8]) -> impl Future<Output = bool> + 'a {
        let bytes = bytes.to_vec();
        std::future::poll_fn(move |cx| {
            Poll::Ready(Pin::new(&mut *io).poll_write(cx, &bytes).is_ready())
        })
    }

    fn read_one(io: &mut AcksLast<Log>) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            let mut byte = [0u8; 1];
            let mut buf = ReadBuf::new(&mut byte);
            Pin::new(&mut *io)
                .poll_read(cx, &mut buf)
                .map(|r| r.unwrap())
        })
    }

    #[test]
    fn an_acknowledgement_waits_again_while_the_runtime_sends_but_not_for_ever() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let log = Arc::new(Mutex::new(Vec::new()));
            let mut io = AcksLast::new(Log(log.clone()));
            assert!(!try_write(&mut io, &ping_ack()).await, "held back first");
            tokio::task::yield_now().await;
            assert!(
                try_write(&mut io, &ping_ack()).await,
                "nothing came meanwhile: it goes"
            );

            assert!(!try_write(&mut io, &ping_ack()).await);
            let mut rounds = 0;
            loop {
                tokio::task::yield_now().await;
                read_one(&mut io).await; // the runtime sent more meanwhile
                if try_write(&mut io, &ping_ack()).await {
                    break;
                }
                rounds += 1;
            }
            assert_eq!(
                rounds,
                MAX_HOLDS - 1,
                "held back once per round the runtime sent, up to the bound"
            );
            assert_eq!(log.lock().unwrap().as_slice(), ["ack", "ack"]);
        });
    }

    /// End to end through h2 on both sides, on a current-thread runtime as in the data plane: the
    /// runtime's PINGs are acknowledged.
    #[tokio::test]
    async fn the_runtime_s_pings_are_acknowledged_through_h2() {
        let (ours, theirs) = tokio::io::duplex(64 << 10);
        let runtime = tokio::spawn(async move {
            let mut conn = h2::server::handshake(theirs).await.unwrap();
            let mut ping_pong = conn.ping_pong().expect("taken once");
            let driver = tokio::spawn(async move { while conn.accept().await.is_some() {} });
            for _ in 0..5 {
                tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    ping_pong.ping(h2::Ping::opaque()),
                )
                .await
                .expect("the proxy did not acknowledge the runtime's PING")
                .unwrap();
            }
            driver.abort();
        });
        let (client, conn) = h2::client::Builder::new()
            .handshake::<_, bytes::Bytes>(AcksLast::new(ours))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        runtime.await.unwrap();
        drop(client);
        conn.abort();
    }
}
