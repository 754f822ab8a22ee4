//! Leniency for HTTP/2 clients that send an invalid `:authority`.
//!
//! grpc C-core (Python grpcio) talking over a unix socket sends the
//! percent-encoded socket path as `:authority` (`unix:///tmp/x.sock` gives
//! `tmp%2Fx.sock`). h2's server (under hyper) parses `:authority` with
//! `http::uri::Authority`, fails, and resets every stream with
//! PROTOCOL_ERROR. containerd accepts such clients, so criproxy must too.
//!
//! [`accept`] wraps an accepted connection in an adapter that sits between
//! the socket and hyper's HTTP/2 server:
//!
//! * **Sniffing** (start of every connection): the client's bytes are parsed
//!   frame by frame. Everything before the first header block is handed to
//!   hyper unchanged as it arrives; the first header block is held back
//!   until it is complete (at most [`SNIFF_LIMIT`] bytes) and decoded.
//! * **Plain**: if that block has no `:authority`, or a valid one (grpc-go
//!   and kubelet send `localhost`), or anything about the client is not what
//!   we expect (no HTTP/2 preface, HPACK error, EOF, block too big), the held
//!   bytes are replayed verbatim and from then on reads go straight to the
//!   socket: no parsing, no copying, one branch per read call.
//! * **Rewriting**: if the first block's `:authority` is invalid, the
//!   client-to-server direction is parsed for the whole life of the
//!   connection. Every header block is decoded with the client's HPACK
//!   state and re-encoded with each invalid `:authority` value replaced by
//!   [`REPLACEMENT_AUTHORITY`]; every other frame (DATA, SETTINGS, PING,
//!   WINDOW_UPDATE, RST_STREAM, GOAWAY, PRIORITY, unknown types) is copied
//!   byte for byte. A protocol violation that breaks the rewriting (bad
//!   HPACK, a CONTINUATION out of place, truncated frames...) ends the
//!   connection with an `io::Error`.
//!
//! Writes (server to client) always go straight to the socket, unchanged.
//!
//! HPACK coding is done by the `loona-hpack` crate; the only protocol code
//! here is the 9-byte frame header and the HEADERS/CONTINUATION layout.
//! Re-encoded blocks use only the static table and plain literals (hyper's
//! dynamic table is shrunk to 0 by the first one), so hyper's HPACK state
//! never depends on the client's. What rewriting does not keep, none of it
//! visible through hyper: HEADERS padding, the client's table size updates,
//! Huffman coding and the "never indexed" marking of literals (h2 ignores
//! that marking when it decodes).
//!
//! Usage, per accepted connection:
//!
//! ```ignore
//! let (sock, _) = listener.accept().await?;
//! tokio::spawn(async move {
//!     let io = authority::accept(sock).await?;
//!     http2::Builder::new(TokioExecutor::new())
//!         .serve_connection(TokioIo::new(io), service)
//!         .await
//! });
//! ```

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use loona_hpack::encoder::encode_integer_into;
use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a connection must be to be wrapped (any tokio socket or stream).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + ?Sized> Io for T {}

/// The wrapped connection handed to hyper (`hyper_util::rt::TokioIo::new`).
///
/// A plain `Box`: the adapter is `Unpin`, so no `Pin<Box<..>>` is needed.
pub type BoxIo = Box<dyn Io>;

/// The value that replaces an invalid `:authority`.
pub const REPLACEMENT_AUTHORITY: &str = "localhost";

/// How many bytes of the first header block are held back while sniffing;
/// past it the connection is handed to hyper as it is.
pub const SNIFF_LIMIT: usize = 64 * 1024;

/// Largest encoded header block accepted in rewriting mode.
const MAX_BLOCK: usize = 2 << 20;

/// Largest decoded header list (RFC 7541 sizes: name + value + 32 per field)
/// accepted in rewriting mode; past it the connection ends. Keep it above
/// hyper's `max_header_list_size` (criproxy: 1 MiB), so that hyper itself
/// answers an oversized request (431) as it would without us.
const MAX_DECODED: usize = 4 << 20;

/// Buffers grown past this by a big header block are released afterwards.
const KEEP_BUFFER: usize = 64 * 1024;

/// Largest HPACK dynamic table a client may ask for with a size update.
///
/// Notes: a client may grow its table past 4096 only up to the
/// SETTINGS_HEADER_TABLE_SIZE the *server* advertised, which we do not
/// parse. This cap must be >= what hyper's
/// `http2::Builder::header_table_size` is set to (default 4096); it only
/// bounds memory.
const MAX_TABLE_SIZE: usize = 64 * 1024;

/// Size of the read buffer used while sniffing or rewriting.
const READ_CHUNK: usize = 16 * 1024;

/// Notes: the client connection preface (RFC 9113 §3.4), followed by the
/// client's SETTINGS frame.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Notes: every frame starts with 24-bit length, 8-bit type, 8-bit flags and
/// a reserved bit + 31-bit stream id (RFC 9113 §4.1).
const FRAME_HEAD: usize = 9;

/// Notes: SETTINGS_MAX_FRAME_SIZE starts at 16384 and can only be raised
/// (RFC 9113 §6.5.2), so frames of this size are always acceptable to hyper.
const MAX_OUT_FRAME: usize = 16_384;

const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Wraps an accepted connection; hand the result to hyper's HTTP/2 server.
///
/// This does not wait for the client: sniffing happens while hyper reads.
/// Notes: it must not wait, because grpc-go clients (kubelet) send no request
/// until they have received the server's SETTINGS frame, and hyper's server
/// sends its SETTINGS before it reads anything. The function is `async` and
/// returns `io::Result` so that the call site does not change if it ever
/// needs to do I/O; today it never fails.
pub async fn accept<T: Io + 'static>(io: T) -> io::Result<BoxIo> {
    Ok(Box::new(Conn::new(io)))
}

/// The adapter. `rewriter` is `None` once in plain mode.
///
/// `poll_read` never fills part of `buf` and then returns `Pending` or an
/// error: what it produced is returned first, the error on the next call.
struct Conn<T> {
    io: T,
    rewriter: Option<Box<Rewriter>>,
    /// Bytes read from the client and not yet processed: `inbuf[start..end]`.
    inbuf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Bytes ready for hyper: `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
    eof: bool,
    /// An error found while rewriting, returned once `out` is delivered.
    failed: Option<io::Error>,
    /// Plain mode with nothing left to replay: reads go to the socket.
    direct: bool,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Conn<T> {
    fn new(io: T) -> Self {
        Conn {
            io,
            rewriter: Some(Box::new(Rewriter::new())),
            inbuf: vec![0; READ_CHUNK].into_boxed_slice(),
            start: 0,
            end: 0,
            out: Vec::new(),
            out_pos: 0,
            eof: false,
            failed: None,
            direct: false,
        }
    }

    /// Switches to plain mode: the held-back `raw` bytes go out first, then
    /// whatever is left in `inbuf`, then the socket directly.
    fn go_plain(&mut self, raw: Vec<u8>) {
        self.out.extend_from_slice(&raw);
        self.rewriter = None;
    }

    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.inbuf.len() {
            self.inbuf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.inbuf.len() {
            // Unreachable: the rewriter consumes all but < 24 buffered bytes.
            return Poll::Ready(Err(rewrite_error("input buffer full")));
        }
        let mut rb = ReadBuf::new(&mut self.inbuf[self.end..]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        if n == 0 {
            self.eof = true;
        }
        self.end += n;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.direct {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let wanted = buf.remaining();
        loop {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // 1. Bytes already produced for hyper.
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                continue;
            }
            if let Some(e) = this.failed.take() {
                if buf.remaining() < wanted {
                    // poll_read must not fill `buf` and fail in one call.
                    this.failed = Some(e);
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(e));
            }
            let Some(rw) = this.rewriter.as_mut() else {
                // 2. Plain mode: leftover input, then the socket itself.
                if this.start < this.end {
                    let n = buf.remaining().min(this.end - this.start);
                    buf.put_slice(&this.inbuf[this.start..this.start + n]);
                    this.start += n;
                    continue;
                }
                // Sniffing is over for good: release its buffers.
                this.inbuf = Box::default();
                this.out = Vec::new();
                this.direct = true;
                if buf.remaining() < wanted {
                    return Poll::Ready(Ok(()));
                }
                return Pin::new(&mut this.io).poll_read(cx, buf);
            };
            // 3. Sniffing or rewriting.
            if this.start < this.end {
                if let State::Pass(n) = rw.state {
                    if n > 0 {
                        // Payload of a frame we do not touch: copy it through.
                        let k = n.min(this.end - this.start).min(buf.remaining());
                        buf.put_slice(&this.inbuf[this.start..this.start + k]);
                        this.start += k;
                        rw.state = State::Pass(n - k);
                        continue;
                    }
                }
                let (used, progress) =
                    match rw.process(&this.inbuf[this.start..this.end], &mut this.out) {
                        Ok(r) => r,
                        Err(e) => {
                            // Deliver what came before the error first.
                            this.failed = Some(e);
                            continue;
                        }
                    };
                this.start += used;
                if let Progress::Plain(raw) = progress {
                    this.go_plain(raw);
                    continue;
                }
                if used > 0 || !this.out.is_empty() {
                    continue;
                }
            }
            // 4. Need more input. Hand over what we have first.
            if buf.remaining() < wanted {
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                if rw.sniffing {
                    // Let hyper judge whatever the client managed to send.
                    let raw = std::mem::take(&mut rw.raw);
                    this.go_plain(raw);
                    continue;
                }
                if this.start == this.end && rw.at_frame_boundary() {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "authority rewrite: client closed the connection inside a frame",
                )));
            }
            ready!(this.fill(cx))?;
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

fn rewrite_error(why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("authority rewrite: {why}"),
    )
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    fn parse(b: &[u8]) -> Self {
        FrameHead {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

fn put_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    // `len` <= MAX_OUT_FRAME, so it fits in 24 bits.
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// Parser position in the client's byte stream.
#[derive(Clone, Copy, Debug)]
enum State {
    Preface,
    /// At a frame boundary.
    Head,
    /// Copying the rest (this many bytes) of a frame's payload verbatim.
    Pass(usize),
    /// Collecting the payload of a HEADERS or CONTINUATION frame.
    Collect(FrameHead, usize),
}

enum Progress {
    More,
    /// Switch to plain mode, replaying these bytes first.
    Plain(Vec<u8>),
}

/// The header block being assembled (HEADERS + CONTINUATION frames).
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
}

/// The client-to-server parser and header re-encoder, independent of I/O.
struct Rewriter {
    state: State,
    /// Still deciding: nothing rewritten yet, `raw` holds the first block.
    sniffing: bool,
    raw: Vec<u8>,
    block: Option<OpenBlock>,
    payload: Vec<u8>,
    fragment: Vec<u8>,
    encoded: Vec<u8>,
    /// Tracks the client's HPACK encoder (its dynamic table).
    decoder: Decoder<'static>,
    /// Re-encodes for hyper; its dynamic table has size 0.
    encoder: Encoder<'static>,
    /// Whether hyper's decoder has been told to shrink its table to 0.
    table_zeroed: bool,
}

impl Rewriter {
    fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(MAX_TABLE_SIZE);
        let mut encoder = Encoder::new();
        encoder.set_max_table_size(0);
        Rewriter {
            state: State::Preface,
            sniffing: true,
            raw: Vec::new(),
            block: None,
            payload: Vec::new(),
            fragment: Vec::new(),
            encoded: Vec::new(),
            decoder,
            encoder,
            table_zeroed: false,
        }
    }

    fn at_frame_boundary(&self) -> bool {
        matches!(self.state, State::Head | State::Pass(0)) && self.block.is_none()
    }

    /// Consumes a prefix of `input`, appending what hyper should read to
    /// `out`. Stops when it needs more input, or at a `Pass` state (the
    /// caller copies pass-through payload itself), or when it decides to go
    /// plain. Returns how many bytes it consumed.
    fn process(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<(usize, Progress)> {
        let mut pos = 0;
        loop {
            let avail = &input[pos..];
            match self.state {
                State::Pass(0) => self.state = State::Head,
                State::Pass(_) => return Ok((pos, Progress::More)),
                State::Preface => {
                    let n = avail.len().min(PREFACE.len());
                    if avail[..n] != PREFACE[..n] {
                        // Not HTTP/2 prior knowledge: hyper will say so.
                        return Ok((pos, Progress::Plain(Vec::new())));
                    }
                    if n < PREFACE.len() {
                        return Ok((pos, Progress::More));
                    }
                    out.extend_from_slice(PREFACE);
                    pos += PREFACE.len();
                    self.state = State::Head;
                }
                State::Head => {
                    if avail.len() < FRAME_HEAD {
                        return Ok((pos, Progress::More));
                    }
                    let head = FrameHead::parse(&avail[..FRAME_HEAD]);
                    if let Err(why) = self.check_head(&head) {
                        return self.reject(pos, why);
                    }
                    if head.kind == HEADERS || head.kind == CONTINUATION {
                        if self.sniffing {
                            self.raw.extend_from_slice(&avail[..FRAME_HEAD]);
                        }
                        self.payload.clear();
                        self.state = State::Collect(head, head.len);
                    } else {
                        out.extend_from_slice(&avail[..FRAME_HEAD]);
                        self.state = State::Pass(head.len);
                    }
                    pos += FRAME_HEAD;
                }
                State::Collect(head, remaining) => {
                    let k = remaining.min(avail.len());
                    self.payload.extend_from_slice(&avail[..k]);
                    if self.sniffing {
                        self.raw.extend_from_slice(&avail[..k]);
                    }
                    pos += k;
                    if k < remaining {
                        self.state = State::Collect(head, remaining - k);
                        return Ok((pos, Progress::More));
                    }
                    self.state = State::Head;
                    match self.header_frame(head, out) {
                        Ok(Progress::More) => {}
                        Ok(plain) => return Ok((pos, plain)),
                        Err(why) => return self.reject(pos, why),
                    }
                }
            }
        }
    }

    /// A problem with the client's stream: while sniffing, hand everything
    /// to hyper unchanged (the unconsumed input follows `raw`); once
    /// rewriting, end the connection.
    fn reject(&mut self, pos: usize, why: String) -> io::Result<(usize, Progress)> {
        if self.sniffing {
            Ok((pos, Progress::Plain(std::mem::take(&mut self.raw))))
        } else {
            Err(rewrite_error(why))
        }
    }

    fn check_head(&self, head: &FrameHead) -> Result<(), String> {
        // Notes: a header block is one HEADERS frame followed by
        // CONTINUATION frames on the same stream until END_HEADERS; no other
        // frame may come in between (RFC 9113 §6.10).
        match (&self.block, head.kind) {
            (Some(b), CONTINUATION) if head.stream == b.stream => {}
            (Some(b), _) => {
                return Err(format!(
                    "expected CONTINUATION for stream {}, got frame type {} on stream {}",
                    b.stream, head.kind, head.stream
                ))
            }
            (None, CONTINUATION) => {
                return Err(format!(
                    "CONTINUATION without HEADERS on stream {}",
                    head.stream
                ))
            }
            // Notes: only servers push; a client's PUSH_PROMISE would also
            // carry a header block we would have to track.
            (None, PUSH_PROMISE) => return Err("client sent PUSH_PROMISE".into()),
            _ => {}
        }
        if head.kind == HEADERS || head.kind == CONTINUATION {
            if self.sniffing && self.raw.len() + FRAME_HEAD + head.len > SNIFF_LIMIT {
                return Err("first header block larger than the sniffing limit".into());
            }
            let so_far = if head.kind == CONTINUATION {
                self.fragment.len()
            } else {
                0
            };
            if so_far + head.len > MAX_BLOCK {
                return Err(format!("header block larger than {MAX_BLOCK} bytes"));
            }
        }
        Ok(())
    }

    /// A complete HEADERS or CONTINUATION frame is in `self.payload`.
    fn header_frame(&mut self, head: FrameHead, out: &mut Vec<u8>) -> Result<Progress, String> {
        if head.kind == HEADERS {
            // Notes: HEADERS payload = [pad length: 1 if PADDED]
            // [stream dependency + weight: 5 if PRIORITY] fragment [padding].
            // Padding of HEADERS is not flow-controlled, so it is dropped.
            let mut body = &self.payload[..];
            let mut pad = 0;
            if head.flags & PADDED != 0 {
                let Some((&p, rest)) = body.split_first() else {
                    return Err("padded HEADERS frame without a pad length".into());
                };
                pad = usize::from(p);
                body = rest;
            }
            let mut priority = None;
            if head.flags & PRIORITY != 0 {
                if body.len() < 5 {
                    return Err("HEADERS frame too short for its priority fields".into());
                }
                let mut p = [0; 5];
                p.copy_from_slice(&body[..5]);
                priority = Some(p);
                body = &body[5..];
            }
            if pad > body.len() {
                return Err("HEADERS padding longer than the frame".into());
            }
            self.fragment.clear();
            self.fragment.extend_from_slice(&body[..body.len() - pad]);
            self.block = Some(OpenBlock {
                stream: head.stream,
                end_stream: head.flags & END_STREAM != 0,
                priority,
            });
        } else {
            self.fragment.extend_from_slice(&self.payload);
        }
        if head.flags & END_HEADERS == 0 {
            return Ok(Progress::More);
        }
        match self.block.take() {
            Some(block) => self.finish_block(&block, out),
            None => Err("CONTINUATION without HEADERS".into()),
        }
    }

    /// Decodes the complete block in `self.fragment` and re-encodes it.
    fn finish_block(&mut self, block: &OpenBlock, out: &mut Vec<u8>) -> Result<Progress, String> {
        let Rewriter {
            decoder,
            encoder,
            fragment,
            encoded,
            table_zeroed,
            ..
        } = self;
        encoded.clear();
        if !*table_zeroed {
            // Notes: a dynamic table size update (RFC 7541 §6.3) to 0 at the
            // start of the first block we send: hyper's decoder then keeps
            // no entries, and our encoder (table size 0) never refers to any.
            encode_integer_into(0, 5, 0x20, encoded).map_err(|e| e.to_string())?;
        }
        let mut rewrote = false;
        let mut size = 0usize;
        let mut failed: Option<io::Error> = None;
        let decoded = decoder.decode_with_cb(&fragment[..], |name, value| {
            size = size.saturating_add(name.len() + value.len() + 32);
            if size > MAX_DECODED || failed.is_some() {
                return;
            }
            let mut value: &[u8] = &value;
            if &name[..] == b":authority" && http::uri::Authority::try_from(value).is_err() {
                value = REPLACEMENT_AUTHORITY.as_bytes();
                rewrote = true;
            }
            if let Err(e) = encoder.encode_header_into((&name[..], value), encoded) {
                failed = Some(e);
            }
        });
        if let Err(e) = decoded {
            return Err(format!("HPACK decoding failed: {e}"));
        }
        if let Some(e) = failed {
            return Err(format!("HPACK encoding failed: {e}"));
        }
        if size > MAX_DECODED {
            return Err(format!(
                "decoded header list larger than {MAX_DECODED} bytes"
            ));
        }
        if self.sniffing {
            if !rewrote {
                return Ok(Progress::Plain(std::mem::take(&mut self.raw)));
            }
            self.sniffing = false;
            self.raw = Vec::new();
        }
        self.table_zeroed = true;
        emit_block(out, block, &self.encoded);
        for buf in [&mut self.encoded, &mut self.fragment, &mut self.payload] {
            if buf.capacity() > KEEP_BUFFER {
                *buf = Vec::new();
            }
        }
        Ok(Progress::More)
    }
}

/// Frames `fragment` as HEADERS + CONTINUATION frames of at most
/// [`MAX_OUT_FRAME`] bytes each.
fn emit_block(out: &mut Vec<u8>, block: &OpenBlock, fragment: &[u8]) {
    let prio_len = if block.priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = fragment.split_at(fragment.len().min(MAX_OUT_FRAME - prio_len));
    let mut flags = 0;
    if block.end_stream {
        flags |= END_STREAM;
    }
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    put_head(out, prio_len + first.len(), HEADERS, flags, block.stream);
    if let Some(p) = &block.priority {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_OUT_FRAME));
        rest = tail;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        put_head(out, chunk.len(), CONTINUATION, flags, block.stream);
        out.extend_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::future::Future;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::{Request, Response};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use loona_hpack::encoder::encode_integer;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    const DATA: u8 = 0x0;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const WINDOW_UPDATE: u8 = 0x8;
    const ACK: u8 = 0x1;

    /// grpc C-core 1.85's first header block begins like this (captured).
    const CAPTURED: &str = "40053a70617468222f72756e74696d652e76312e52756e74696d6553657276\
        6963652f56657273696f6e400a3a617574686f7269747910746d70253246736e6966662e736f636b8386";

    /// The rest of a C-core request, in the order C-core sends it.
    const COMMON: [(&str, &str); 4] = [
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-accept-encoding", "identity, deflate, gzip"),
        (
            "user-agent",
            "grpc-python/1.85.0 grpc-c/51.0.0 (linux; chttp2)",
        ),
    ];

    async fn within<F: Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(2), f)
            .await
            .expect("test timed out")
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        v.extend_from_slice(&[kind, flags]);
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn client_start() -> Vec<u8> {
        [
            &PREFACE[..],
            &frame(SETTINGS, 0, 0, &[]),
            &frame(WINDOW_UPDATE, 0, 0, &(1u32 << 20).to_be_bytes()),
        ]
        .concat()
    }

    // HPACK representations C-core uses, built with the crate's integer coder:
    // a string literal without Huffman coding, "literal with incremental
    // indexing, new name" (0x40), and "indexed" (0x80).
    fn hstr(s: &[u8]) -> Vec<u8> {
        let mut v = encode_integer(s.len(), 7);
        v.extend_from_slice(s);
        v
    }

    fn lit(name: &str, value: &str) -> Vec<u8> {
        [&[0x40][..], &hstr(name.as_bytes()), &hstr(value.as_bytes())].concat()
    }

    fn idx(i: usize) -> Vec<u8> {
        let mut v = Vec::new();
        encode_integer_into(i, 7, 0x80, &mut v).unwrap();
        v
    }

    /// The first block of a C-core connection (Version call): after it the
    /// client's dynamic table holds, newest first, grpc-timeout 62,
    /// user-agent 63, grpc-accept-encoding 64, te 65, content-type 66,
    /// :authority 67, :path 68.
    fn first_block() -> Vec<u8> {
        let mut b = hex(CAPTURED);
        for (n, v) in COMMON {
            b.extend(lit(n, v));
        }
        b.extend(lit("grpc-timeout", "999m"));
        b
    }

    async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
        let mut text = format!(
            "method={}\npath={}\nauthority={}\n",
            req.method(),
            req.uri().path(),
            req.uri().authority().map_or("-", |a| a.as_str())
        );
        for (name, value) in req.headers() {
            text.push_str(&format!(
                "h:{}={}\n",
                name,
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        let body = req.into_body().collect().await?.to_bytes();
        let mut out = format!("{text}body=").into_bytes();
        out.extend_from_slice(&body);
        Ok(Response::new(Full::new(Bytes::from(out))))
    }

    async fn serve(io: BoxIo) -> Result<(), hyper::Error> {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .max_header_list_size(256 * 1024)
            .serve_connection(TokioIo::new(io), hyper::service::service_fn(echo))
            .await
    }

    fn spawn_server(io: DuplexStream) -> tokio::task::JoinHandle<Result<(), hyper::Error>> {
        tokio::spawn(async move { serve(accept(io).await.unwrap()).await })
    }

    #[derive(Default, Debug)]
    struct Resp {
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Resp {
        fn status(&self) -> &str {
            &self
                .headers
                .iter()
                .find(|(n, _)| n == ":status")
                .expect("no :status")
                .1
        }
        fn line(&self, key: &str) -> String {
            let text = String::from_utf8_lossy(&self.body).into_owned();
            let prefix = format!("{key}=");
            match text.lines().find(|l| l.starts_with(&prefix)) {
                Some(l) => l[prefix.len()..].to_string(),
                None => panic!("no {key} in {text}"),
            }
        }
        fn header_lines(&self) -> Vec<String> {
            String::from_utf8_lossy(&self.body)
                .lines()
                .filter(|l| l.starts_with("h:"))
                .map(String::from)
                .collect()
        }
        fn echoed_body(&self) -> &[u8] {
            let at = self
                .body
                .windows(5)
                .position(|w| w == b"body=")
                .expect("no body=");
            &self.body[at + 5..]
        }
    }

    /// A hand-driven HTTP/2 client: writes whatever bytes a test gives it,
    /// decodes hyper's responses.
    struct RawClient {
        io: DuplexStream,
        dec: Decoder<'static>,
        block: Vec<u8>,
        block_end_stream: bool,
        partial: HashMap<u32, Resp>,
        done: HashMap<u32, Resp>,
    }

    impl RawClient {
        fn new(io: DuplexStream) -> Self {
            RawClient {
                io,
                dec: Decoder::new(),
                block: Vec::new(),
                block_end_stream: false,
                partial: HashMap::new(),
                done: HashMap::new(),
            }
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.io.write_all(bytes).await.unwrap();
        }

        async fn frame(&mut self) -> Option<(FrameHead, Vec<u8>)> {
            let mut h = [0; FRAME_HEAD];
            self.io.read_exact(&mut h).await.ok()?;
            let head = FrameHead::parse(&h);
            let mut payload = vec![0; head.len];
            self.io.read_exact(&mut payload).await.ok()?;
            Some((head, payload))
        }

        async fn response(&mut self, stream: u32) -> Resp {
            loop {
                if let Some(r) = self.done.remove(&stream) {
                    return r;
                }
                let (head, payload) = self.frame().await.expect("server closed the connection");
                let finished = head.flags & END_STREAM != 0;
                match head.kind {
                    SETTINGS if head.flags & ACK == 0 => {
                        self.send(&frame(SETTINGS, ACK, 0, &[])).await
                    }
                    HEADERS | CONTINUATION => {
                        assert_eq!(head.flags & (PADDED | PRIORITY), 0);
                        if head.kind == HEADERS {
                            self.block.clear();
                            self.block_end_stream = finished;
                        }
                        self.block.extend_from_slice(&payload);
                        if head.flags & END_HEADERS != 0 {
                            let fields = self.dec.decode(&self.block).unwrap();
                            let r = self.partial.entry(head.stream).or_default();
                            for (n, v) in fields {
                                r.headers.push((
                                    String::from_utf8(n).unwrap(),
                                    String::from_utf8(v).unwrap(),
                                ));
                            }
                            if self.block_end_stream {
                                let r = self.partial.remove(&head.stream).unwrap();
                                self.done.insert(head.stream, r);
                            }
                        }
                    }
                    DATA => {
                        assert_eq!(head.flags & PADDED, 0);
                        self.partial
                            .entry(head.stream)
                            .or_default()
                            .body
                            .extend_from_slice(&payload);
                        if finished {
                            let r = self.partial.remove(&head.stream).unwrap();
                            self.done.insert(head.stream, r);
                        }
                    }
                    GOAWAY | RST_STREAM => {
                        panic!("server sent frame type {}: {:?}", head.kind, payload)
                    }
                    _ => {}
                }
            }
        }

        /// Reads frames until the server closes the connection.
        async fn drain(&mut self) -> Vec<(FrameHead, Vec<u8>)> {
            let mut frames = Vec::new();
            while let Some(f) = self.frame().await {
                frames.push(f);
            }
            frames
        }
    }

    fn expected_headers(extra: &[(&str, &str)]) -> Vec<String> {
        COMMON
            .iter()
            .chain(extra)
            .map(|(n, v)| format!("h:{n}={v}"))
            .collect()
    }

    #[tokio::test]
    async fn grpc_core_requests_get_localhost() {
        within(async {
            let (client, server) = duplex(1 << 20);
            let srv = spawn_server(server);
            let mut c = RawClient::new(client);
            c.send(&client_start()).await;
            // Like grpc-go, wait for the server's SETTINGS before any request:
            // the adapter must not hold hyper back until the first HEADERS.
            let (head, _) = c.frame().await.unwrap();
            assert_eq!(head.kind, SETTINGS);
            c.send(&frame(SETTINGS, ACK, 0, &[])).await;

            // Stream 1: the captured block, a body in three DATA frames (the
            // second one padded).
            let mut bytes = frame(HEADERS, END_HEADERS, 1, &first_block());
            bytes.extend(frame(DATA, 0, 1, b"hello "));
            bytes.extend(frame(
                DATA,
                PADDED,
                1,
                &[&[3][..], b"grpc ", &[0, 0, 0]].concat(),
            ));
            bytes.extend(frame(DATA, END_STREAM, 1, b"world"));
            // Stream 3: everything from the dynamic table, a new grpc-timeout.
            let b3 = [
                idx(68),
                idx(67),
                vec![0x83, 0x86],
                idx(66),
                idx(65),
                idx(64),
                idx(63),
                lit("grpc-timeout", "998m"),
            ]
            .concat();
            bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &b3));
            // Table now: grpc-timeout 998m 62, 999m 63, user-agent 64,
            // grpc-accept-encoding 65, te 66, content-type 67, :authority 68,
            // :path 69. Stream 5: a new :path first (shifting every index by
            // one), split over HEADERS (padded, with priority) + 2 CONTINUATION.
            let b5 = [
                lit(":path", "/runtime.v1.RuntimeService/Status"),
                idx(69),
                vec![0x83, 0x86],
                idx(68),
                idx(67),
                idx(66),
                idx(65),
                idx(63), // grpc-timeout: 998m
                lit("x-trace", "abc"),
            ]
            .concat();
            let (p1, rest) = b5.split_at(10);
            let (p2, p3) = rest.split_at(30);
            let mut h5 = vec![4];
            h5.extend_from_slice(&[0x80, 0, 0, 3, 15]);
            h5.extend_from_slice(p1);
            h5.extend_from_slice(&[0; 4]);
            bytes.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &h5));
            bytes.extend(frame(CONTINUATION, 0, 5, p2));
            bytes.extend(frame(CONTINUATION, END_HEADERS, 5, p3));
            // Stream 7: a valid authority is left alone.
            let b7 = [
                vec![0x83, 0x86],
                lit(":authority", "example.com:8443"),
                lit(":path", "/a/b"),
            ]
            .concat();
            bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 7, &b7));
            // Stream 9: a 40 kB header (evicts the whole table; the rewritten
            // block needs CONTINUATION frames), stream 11 right after.
            let big = "x".repeat(40_000);
            let b9 = [
                vec![0x83, 0x86],
                lit(":path", "/big"),
                lit(":authority", "tmp%2Fsniff.sock"),
                lit("x-big", &big),
            ]
            .concat();
            let (p1, p2) = b9.split_at(16_000);
            let (p2, p3) = p2.split_at(16_000);
            bytes.extend(frame(HEADERS, END_STREAM, 9, p1));
            bytes.extend(frame(CONTINUATION, 0, 9, p2));
            bytes.extend(frame(CONTINUATION, END_HEADERS, 9, p3));
            let b11 = [
                vec![0x83, 0x86],
                lit(":path", "/after"),
                lit(":authority", "tmp%2Fsniff.sock"),
            ]
            .concat();
            bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 11, &b11));
            c.send(&bytes).await;

            let r = c.response(1).await;
            assert_eq!(r.status(), "200");
            assert_eq!(r.line("method"), "POST");
            assert_eq!(r.line("path"), "/runtime.v1.RuntimeService/Version");
            assert_eq!(r.line("authority"), "localhost");
            assert_eq!(
                r.header_lines(),
                expected_headers(&[("grpc-timeout", "999m")])
            );
            assert_eq!(r.echoed_body(), b"hello grpc world");

            let r = c.response(3).await;
            assert_eq!(r.status(), "200");
            assert_eq!(r.line("path"), "/runtime.v1.RuntimeService/Version");
            assert_eq!(r.line("authority"), "localhost");
            assert_eq!(
                r.header_lines(),
                expected_headers(&[("grpc-timeout", "998m")])
            );

            let r = c.response(5).await;
            assert_eq!(r.line("path"), "/runtime.v1.RuntimeService/Status");
            assert_eq!(r.line("authority"), "localhost");
            assert_eq!(
                r.header_lines(),
                expected_headers(&[("grpc-timeout", "998m"), ("x-trace", "abc")])
            );

            let r = c.response(7).await;
            assert_eq!(r.line("path"), "/a/b");
            assert_eq!(r.line("authority"), "example.com:8443");

            let r = c.response(9).await;
            assert_eq!(r.line("path"), "/big");
            assert_eq!(r.line("authority"), "localhost");
            assert_eq!(r.line("h:x-big"), big);

            let r = c.response(11).await;
            assert_eq!(r.line("path"), "/after");
            assert_eq!(r.line("authority"), "localhost");

            drop(c);
            srv.await.unwrap().unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn first_block_split_padded_with_priority() {
        within(async {
            let (client, server) = duplex(1 << 20);
            let srv = spawn_server(server);
            let mut c = RawClient::new(client);
            let block = first_block();
            let (p1, rest) = block.split_at(7);
            let (p2, p3) = rest.split_at(50);
            let mut h = vec![2];
            h.extend_from_slice(&[0, 0, 0, 0, 200]);
            h.extend_from_slice(p1);
            h.extend_from_slice(&[0, 0]);
            let mut bytes = client_start();
            bytes.extend(frame(HEADERS, PADDED | PRIORITY, 1, &h));
            bytes.extend(frame(CONTINUATION, 0, 1, p2));
            bytes.extend(frame(CONTINUATION, END_HEADERS, 1, p3));
            bytes.extend(frame(DATA, END_STREAM, 1, b"body"));
            c.send(&bytes).await;
            let r = c.response(1).await;
            assert_eq!(r.status(), "200");
            assert_eq!(r.line("authority"), "localhost");
            assert_eq!(r.line("path"), "/runtime.v1.RuntimeService/Version");
            assert_eq!(
                r.header_lines(),
                expected_headers(&[("grpc-timeout", "999m")])
            );
            assert_eq!(r.echoed_body(), b"body");
            drop(c);
            srv.await.unwrap().unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn hyper_client_keeps_its_authority() {
        within(async {
            let (client, server) = duplex(1 << 20);
            let srv = spawn_server(server);
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
                    .await
                    .unwrap();
            let conn = tokio::spawn(conn);
            for path in ["/x/y", "/z"] {
                let req = Request::post(format!("http://localhost:1234{path}"))
                    .body(Full::new(Bytes::from_static(b"ping")))
                    .unwrap();
                let resp = sender.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                let r = Resp {
                    headers: Vec::new(),
                    body: body.to_vec(),
                };
                assert_eq!(r.line("path"), path);
                assert_eq!(r.line("authority"), "localhost:1234");
                assert_eq!(r.echoed_body(), b"ping");
            }
            drop(sender);
            conn.await.unwrap().unwrap();
            srv.await.unwrap().unwrap();
        })
        .await;
    }

    /// Reads everything a `Conn` yields for `input` (written, then EOF).
    async fn through_conn(input: &[u8]) -> (io::Result<Vec<u8>>, Conn<DuplexStream>) {
        let (mut client, server) = duplex(1 << 20);
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let mut conn = Conn::new(server);
        let mut out = Vec::new();
        let res = conn.read_to_end(&mut out).await.map(|_| out);
        (res, conn)
    }

    #[tokio::test]
    async fn valid_authority_goes_plain_byte_for_byte() {
        within(async {
            // What a hyper (h2) client sends: preface, SETTINGS,
            // WINDOW_UPDATE, HEADERS with `:authority: localhost`, DATA.
            let (client, mut wire) = duplex(1 << 20);
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = Request::post("http://localhost/a/b")
                .body(Full::new(Bytes::from_static(b"ping")))
                .unwrap();
            tokio::spawn(async move { sender.send_request(req).await });
            let mut sent = vec![0; PREFACE.len()];
            wire.read_exact(&mut sent).await.unwrap();
            loop {
                let mut h = [0; FRAME_HEAD];
                wire.read_exact(&mut h).await.unwrap();
                let head = FrameHead::parse(&h);
                let mut payload = vec![0; head.len];
                wire.read_exact(&mut payload).await.unwrap();
                sent.extend_from_slice(&h);
                sent.extend_from_slice(&payload);
                if head.kind == DATA && head.flags & END_STREAM != 0 {
                    break;
                }
            }
            let (out, conn) = through_conn(&sent).await;
            assert_eq!(out.unwrap(), sent);
            assert!(
                conn.rewriter.is_none(),
                "still parsing after a valid authority"
            );
            assert!(
                conn.inbuf.is_empty() && conn.direct,
                "sniffing buffers not released"
            );

            // No :authority at all (HTTP/1-style request): plain as well.
            let block = [vec![0x83, 0x86], lit(":path", "/p")].concat();
            let input = [
                client_start(),
                frame(HEADERS, END_HEADERS | END_STREAM, 1, &block),
            ]
            .concat();
            let (out, conn) = through_conn(&input).await;
            assert_eq!(out.unwrap(), input);
            assert!(conn.rewriter.is_none());
        })
        .await;
    }

    #[tokio::test]
    async fn early_eof_and_garbage_are_handed_over() {
        within(async {
            let headers = frame(HEADERS, END_HEADERS, 1, &first_block());
            let cases: Vec<Vec<u8>> = vec![
                Vec::new(),
                b"PRI * HTTP/2.0\r\n".to_vec(),
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
                client_start(),
                [client_start(), headers[..20].to_vec()].concat(),
                [client_start(), frame(HEADERS, 0, 1, &first_block())].concat(),
                // Not a header block continuation: hyper's problem, not ours.
                [
                    client_start(),
                    frame(CONTINUATION, END_HEADERS, 1, &first_block()),
                ]
                .concat(),
            ];
            for input in cases {
                // The adapter replays exactly what it got, then EOF...
                let (out, conn) = through_conn(&input).await;
                assert_eq!(out.unwrap(), input);
                assert!(conn.rewriter.is_none());
                // ...and hyper finishes (with or without an error).
                let (mut client, server) = duplex(1 << 20);
                client.write_all(&input).await.unwrap();
                client.shutdown().await.unwrap();
                let _ = serve(accept(server).await.unwrap()).await;
            }
        })
        .await;
    }

    #[tokio::test]
    async fn malformed_stream_while_rewriting_ends_the_connection() {
        within(async {
            let start = [
                client_start(),
                frame(HEADERS, END_HEADERS | END_STREAM, 1, &first_block()),
            ]
            .concat();
            let cases: Vec<(Vec<u8>, &str)> = vec![
                (
                    frame(CONTINUATION, END_HEADERS, 3, &[0x83]),
                    "CONTINUATION without HEADERS",
                ),
                (
                    frame(HEADERS, END_HEADERS, 3, &idx(300)),
                    "HPACK decoding failed",
                ),
                (
                    [frame(HEADERS, 0, 3, &[0x83]), frame(DATA, 0, 3, b"x")].concat(),
                    "expected CONTINUATION for stream 3",
                ),
                (
                    frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2, 0x83]),
                    "PUSH_PROMISE",
                ),
                (
                    frame(HEADERS, PADDED | END_HEADERS, 3, &[9, 0x83]),
                    "padding",
                ),
                (frame(DATA, 0, 1, b"abc")[..10].to_vec(), "inside a frame"),
            ];
            for (tail, why) in cases {
                let (out, _) = through_conn(&[start.clone(), tail].concat()).await;
                let err = out.expect_err(why);
                assert!(err.to_string().contains(why), "{err} does not say {why}");
            }
            // hyper's connection ends with that error, promptly.
            let (client, server) = duplex(1 << 20);
            let srv = spawn_server(server);
            let mut c = RawClient::new(client);
            c.send(&start).await;
            assert_eq!(c.response(1).await.line("authority"), "localhost");
            c.send(&frame(CONTINUATION, END_HEADERS, 3, &[0x83])).await;
            let err = srv.await.unwrap().expect_err("hyper should fail");
            assert!(format!("{err:?}").contains("CONTINUATION"), "{err:?}");
            c.drain().await;
        })
        .await;
    }

    /// Feeds `input` to a rewriter the way `Conn` does; returns hyper's bytes.
    fn run(rw: &mut Rewriter, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let mut pos = 0;
        loop {
            if let State::Pass(n) = rw.state {
                if n > 0 && pos < input.len() {
                    let k = n.min(input.len() - pos);
                    out.extend_from_slice(&input[pos..pos + k]);
                    pos += k;
                    rw.state = State::Pass(n - k);
                    continue;
                }
            }
            let (used, progress) = rw.process(&input[pos..], out)?;
            pos += used;
            if let Progress::Plain(_) = progress {
                return Err(io::Error::other("went plain"));
            }
            if used == 0 && !matches!(rw.state, State::Pass(n) if n > 0 && pos < input.len()) {
                return Ok(());
            }
        }
    }

    fn frames_of(mut bytes: &[u8]) -> Vec<(FrameHead, &[u8])> {
        let mut v = Vec::new();
        while !bytes.is_empty() {
            let head = FrameHead::parse(&bytes[..FRAME_HEAD]);
            v.push((head, &bytes[FRAME_HEAD..FRAME_HEAD + head.len]));
            bytes = &bytes[FRAME_HEAD + head.len..];
        }
        v
    }

    #[test]
    fn output_needs_no_dynamic_table() {
        let big = "y".repeat(30_000);
        let b3 = [
            idx(68),
            idx(67),
            vec![0x83, 0x86],
            idx(66),
            lit("x-big", &big),
        ]
        .concat();
        let input = [
            client_start(),
            frame(HEADERS, END_HEADERS, 1, &first_block()),
            frame(HEADERS, END_HEADERS | END_STREAM, 3, &b3),
        ]
        .concat();
        let mut rw = Rewriter::new();
        let mut out = Vec::new();
        run(&mut rw, &input, &mut out).unwrap();
        assert!(out.starts_with(&client_start()));
        let frames = frames_of(&out[PREFACE.len()..]);
        // The first block starts by shrinking hyper's table to 0.
        assert_eq!(frames[2].0.kind, HEADERS);
        assert_eq!(frames[2].1[0], 0x20);
        // Decodable with a table that may hold nothing (a dynamic reference
        // would fail), and every frame fits the default max frame size.
        let mut dec = Decoder::new();
        let mut blocks = Vec::new();
        let mut block = Vec::new();
        for (head, payload) in &frames[2..] {
            assert!(head.len <= MAX_OUT_FRAME);
            assert!(head.kind == HEADERS || head.kind == CONTINUATION);
            block.extend_from_slice(payload);
            if head.flags & END_HEADERS != 0 {
                let fields = dec.decode(&block).unwrap();
                blocks.push(fields);
                dec.set_max_table_size(0);
                block.clear();
            }
        }
        assert_eq!(
            frames.len(),
            2 + 1 + 2,
            "second block should span HEADERS + CONTINUATION"
        );
        let field = |b: &Vec<(Vec<u8>, Vec<u8>)>, n: &str| {
            b.iter().find(|(k, _)| k == n.as_bytes()).unwrap().1.clone()
        };
        assert_eq!(field(&blocks[0], ":authority"), b"localhost");
        assert_eq!(field(&blocks[1], ":authority"), b"localhost");
        assert_eq!(
            field(&blocks[1], ":path"),
            b"/runtime.v1.RuntimeService/Version"
        );
        assert_eq!(field(&blocks[1], "x-big"), big.as_bytes());
        assert_eq!(frames[3].0.flags & END_STREAM, END_STREAM);
    }

    #[test]
    fn random_input_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let start = [
            client_start(),
            frame(HEADERS, END_HEADERS, 1, &first_block()),
        ]
        .concat();
        for _ in 0..3000 {
            let mut rw = Rewriter::new();
            let mut out = Vec::new();
            run(&mut rw, &start, &mut out).unwrap();
            let mut tail = Vec::new();
            for _ in 0..(next() % 4 + 1) {
                let kinds = [HEADERS, CONTINUATION, DATA, SETTINGS, PUSH_PROMISE];
                let kind = kinds[(next() % kinds.len() as u64) as usize];
                let len = (next() % 40) as usize;
                let payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                tail.extend(frame(kind, next() as u8, (next() % 4) as u32, &payload));
            }
            let _ = run(&mut rw, &tail, &mut out);
        }
    }

    /// Per-request cost of rewriting: `cargo test --release --lib authority -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn rewrite_cost() {
        let mut rw = Rewriter::new();
        let mut out = Vec::new();
        run(
            &mut rw,
            &[
                client_start(),
                frame(HEADERS, END_HEADERS, 1, &first_block()),
            ]
            .concat(),
            &mut out,
        )
        .unwrap();
        // A steady-state C-core request: all fields from the dynamic table,
        // plus a 100-byte message.
        let block = [
            idx(68),
            idx(67),
            vec![0x83, 0x86],
            idx(66),
            idx(65),
            idx(64),
            idx(63),
            idx(62),
        ]
        .concat();
        let mut req = frame(HEADERS, END_HEADERS, 3, &block);
        req.extend(frame(DATA, END_STREAM, 3, &[7; 100]));
        let n = 200_000;
        let t = Instant::now();
        for _ in 0..n {
            out.clear();
            run(&mut rw, &req, &mut out).unwrap();
        }
        let per = t.elapsed() / n;
        println!(
            "rewriting: {per:?} per request ({} bytes in, {} bytes out)",
            req.len(),
            out.len()
        );
        let t = Instant::now();
        for _ in 0..n {
            out.clear();
            run(
                &mut rw,
                &[
                    frame(HEADERS, END_HEADERS, 3, &first_block()),
                    frame(DATA, END_STREAM, 3, &[7; 100]),
                ]
                .concat(),
                &mut out,
            )
            .unwrap();
        }
        println!(
            "rewriting (all literals): {:?} per request",
            t.elapsed() / n
        );
    }
}
