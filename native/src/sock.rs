//! A unix stream socket that wakes the data plane only when there is something to read.
//!
//! Why: tokio registers a `UnixStream` for readable and writable readiness, edge-triggered, so
//! every time a peer reads what the proxy wrote, the kernel reports the socket writable and the
//! data-plane thread wakes up for nothing. Per passthrough call that is two of its four wake-ups
//! (strace: one EPOLLOUT-only `epoll_wait` return after the write to the runtime and one after the
//! write to the caller), and each wake-up costs a context switch.
//!
//! How, with tokio's safe API only:
//! - Reads go through a registration for readable readiness only (`pipe::Receiver`, which reads
//!   with read(2) and registers nothing else; on a socket read(2) is recv(2) without flags).
//! - Writes go straight to a duplicate of the descriptor, unregistered. The descriptors share one
//!   open file description, so the socket stays non-blocking. Only when a write would block is a
//!   registration for writable readiness made (`pipe::Sender` on one more duplicate); writes go
//!   through it until one is taken whole, and then it is dropped again. A CRI call's answer
//!   rarely fills the socket buffer; a 1 MB ListContainers does, a few times.
//! - Shutdown shuts the socket's write side down, for every descriptor.

use std::io::{self, IoSlice, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::unix::pipe;

/// What the kernel may hold of the bytes the proxy wrote to a caller and the caller has not read
/// yet (SO_SNDBUF on the caller's socket; unix stream sockets count only the sender's buffer).
/// With the default (net.core.wmem_default, 208 KiB) a 1 MB answer fills the socket several times
/// over: a write taken in part, a wake-up for room, the rest. The kernel caps the setting at
/// net.core.wmem_max (208 KiB on a stock Debian, where the socket still gets twice the default:
/// the kernel doubles what it is given, for its own bookkeeping). It is kernel memory charged to
/// the proxy's cgroup only while a caller lags behind. Measured (bench/forwarding.py --quick,
/// three runs, 1 MiB against the default side by side, wmem_max 4 MiB): ListContainers p50 1.55x
/// / 1.69x, 1.52x / 1.54x, 1.56x / 1.61x direct; proxy CPU per call 582 / 608, 529 / 686, 621 /
/// 660 us.
pub const CALLER_SEND_BUFFER: usize = 1 << 20;

/// Ask the kernel to hold up to `bytes` written to `stream` and not read yet (see
/// CALLER_SEND_BUFFER); it may grant less.
pub fn widen_send_buffer(stream: &impl std::os::fd::AsFd, bytes: usize) -> io::Result<()> {
    socket2::SockRef::from(stream).set_send_buffer_size(bytes)
}

pub struct Sock {
    rx: pipe::Receiver,
    tx: StdUnixStream,
    /// While a write would block: the registration that says when it can go on.
    congested: Option<pipe::Sender>,
}

impl Sock {
    /// Take over a connected stream from tokio (its registration is dropped).
    pub fn new(stream: tokio::net::UnixStream) -> io::Result<Self> {
        Sock::from_std(stream.into_std()?)
    }

    /// Wrap a connected, non-blocking std stream. Must be called on a tokio runtime.
    pub fn from_std(stream: StdUnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        let tx = stream.try_clone()?;
        let rx = pipe::Receiver::from_owned_fd_unchecked(OwnedFd::from(stream))?;
        Ok(Sock {
            rx,
            tx,
            congested: None,
        })
    }

    /// Write `len` bytes with `write`; once a write is taken whole, the congestion is over.
    fn write_with<F>(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        mut write: F,
    ) -> Poll<io::Result<usize>>
    where
        F: FnMut(&mut StdUnixStream) -> io::Result<usize>,
    {
        loop {
            let result = if let Some(waiter) = self.congested.as_ref() {
                ready!(waiter.poll_write_ready(cx))?;
                match waiter.try_io(|| write(&mut self.tx)) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    result => result,
                }
            } else {
                match write(&mut self.tx) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let fd = OwnedFd::from(self.tx.try_clone()?);
                        self.congested = Some(pipe::Sender::from_owned_fd_unchecked(fd)?);
                        continue;
                    }
                    result => result,
                }
            };
            if matches!(result, Ok(n) if n == len) {
                self.congested = None;
            }
            return Poll::Ready(result);
        }
    }
}

impl AsyncRead for Sock {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.rx).poll_read(cx, buf)
    }
}

impl AsyncWrite for Sock {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write_with(cx, buf.len(), |tx| tx.write(buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        self.write_with(cx, len, |tx| tx.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(())) // writes are never buffered here
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(match self.tx.shutdown(Shutdown::Write) {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            result => result,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_widened_send_buffer_holds_more_than_the_default() {
        let (plain, widened) = StdUnixStream::pair().unwrap();
        widen_send_buffer(&widened, CALLER_SEND_BUFFER).unwrap();
        let size = |s: &StdUnixStream| socket2::SockRef::from(s).send_buffer_size().unwrap();
        // Even where net.core.wmem_max caps the request at the default, the kernel doubles it.
        assert!(
            size(&widened) > size(&plain),
            "{} {}",
            size(&widened),
            size(&plain)
        );
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    fn pair() -> (StdUnixStream, StdUnixStream) {
        StdUnixStream::pair().expect("socketpair")
    }

    #[test]
    fn a_write_larger_than_the_socket_buffer_waits_for_a_slow_reader_and_arrives_whole() {
        let (ours, mut theirs) = pair();
        let data: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
        let expected = data.clone();
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50)); // let the writer block first
            let mut got = Vec::new();
            theirs.read_to_end(&mut got).expect("read");
            got
        });
        runtime().block_on(async move {
            let mut sock = Sock::from_std(ours).expect("sock");
            sock.write_all(&data).await.expect("write");
            assert!(
                sock.congested.is_none(),
                "the writable registration outlived the congestion"
            );
            sock.shutdown().await.expect("shutdown");
        });
        let got = reader.join().expect("reader");
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes arrived changed or out of order");
    }

    #[test]
    fn reads_what_the_peer_wrote_then_end_of_file() {
        let (ours, mut theirs) = pair();
        theirs.write_all(b"hello").expect("write");
        drop(theirs);
        let got = runtime().block_on(async move {
            let mut sock = Sock::from_std(ours).expect("sock");
            let mut got = Vec::new();
            sock.read_to_end(&mut got).await.expect("read");
            got
        });
        assert_eq!(got, b"hello");
    }

    #[test]
    fn vectored_writes_keep_their_order() {
        let (ours, mut theirs) = pair();
        runtime().block_on(async move {
            let mut sock = Sock::from_std(ours).expect("sock");
            let bufs = [IoSlice::new(b"ab"), IoSlice::new(b""), IoSlice::new(b"cde")];
            let n = std::future::poll_fn(|cx| Pin::new(&mut sock).poll_write_vectored(cx, &bufs))
                .await
                .expect("writev");
            assert_eq!(n, 5);
            sock.shutdown().await.expect("shutdown");
        });
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).expect("read");
        assert_eq!(got, b"abcde");
    }

    /// The voluntary context switches of the calling thread so far.
    fn switches() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("voluntary_ctxt_switches")
    }

    /// Ping-pong with a peer that waits, reads each byte, waits, then answers: how many times
    /// the runtime's thread went to sleep and was woken, per round. The first wait makes the
    /// peer's read come while the runtime's thread sleeps, as a runtime's or a kubelet's does.
    fn wakeups_per_round<S, F>(wrap: F) -> f64
    where
        S: AsyncRead + AsyncWrite + Unpin,
        F: FnOnce(StdUnixStream) -> S,
    {
        const ROUNDS: u32 = 40;
        let (ours, mut theirs) = pair();
        let peer = std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            for _ in 0..ROUNDS {
                std::thread::sleep(Duration::from_millis(3));
                theirs.read_exact(&mut byte).expect("peer read");
                std::thread::sleep(Duration::from_millis(3));
                theirs.write_all(&byte).expect("peer write");
            }
        });
        let rt = runtime();
        let per_round = rt.block_on(async move {
            let mut sock = wrap(ours);
            let mut byte = [7u8; 1];
            let before = switches();
            for _ in 0..ROUNDS {
                sock.write_all(&byte).await.expect("write");
                sock.read_exact(&mut byte).await.expect("read");
            }
            f64::from(u32::try_from(switches() - before).expect("count")) / f64::from(ROUNDS)
        });
        peer.join().expect("peer");
        per_round
    }

    #[test]
    fn the_peer_reading_what_was_written_wakes_nothing() {
        let sock = wakeups_per_round(|s| Sock::from_std(s).expect("sock"));
        // The control: tokio's own stream, registered for writable readiness as well, is woken
        // when the peer reads (the test can tell the difference).
        let tokio_stream = wakeups_per_round(|s| {
            s.set_nonblocking(true).expect("nonblocking");
            tokio::net::UnixStream::from_std(s).expect("tokio stream")
        });
        eprintln!("wake-ups per round: Sock {sock:.2}, tokio UnixStream {tokio_stream:.2}");
        assert!(
            sock < 1.3,
            "Sock: {sock:.2} wake-ups per round, want 1 (the answer)"
        );
        assert!(
            tokio_stream > 1.7,
            "control: tokio's UnixStream woke {tokio_stream:.2} times per round, want 2"
        );
    }
}
