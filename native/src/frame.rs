//! gRPC message framing: every message on the wire is a 5-byte prefix (a compressed flag, then the
//! payload's length as a big-endian u32) followed by the payload. HTTP/2 DATA frames cut this
//! stream anywhere: one frame may hold several messages, a message may span many frames, and even
//! the 5-byte prefix may be split between two frames.
//!
//! Notes:
//! - Passthrough never buffers payloads: `Framer` only follows the message boundaries, so it can
//!   count messages and refuse one whose prefix announces more than the limit, before any byte of
//!   that message is passed on. The receiver then gets the status instead of a truncated message.
//! - A prefix split across frames is held back (at most 4 bytes) until it is complete, for the
//!   same reason; every other byte passes as it came, in the same `Bytes` (no copy).
//! - Intercepted calls collect their one request message whole (`split_messages`).

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const PREFIX_LEN: usize = 5;

/// What `Framer::feed` lets through of one chunk.
#[derive(Debug, PartialEq, Eq)]
pub struct Passed {
    /// The bytes to forward now (possibly empty).
    pub forward: Bytes,
    /// Set when a message longer than the limit begins: its announced length. Nothing of that
    /// message is in `forward`, and the stream must end here.
    pub oversize: Option<u64>,
    /// Messages whose prefix completed in this chunk.
    pub started: u64,
}

#[derive(Debug)]
enum State {
    /// Inside a prefix: how many of its bytes were seen (held in `carry`).
    Prefix,
    /// Inside a payload: bytes of it still to come.
    Payload(u64),
}

/// Follows message boundaries through a stream of chunks (see the module notes).
#[derive(Debug)]
pub struct Framer {
    limit: u64,
    state: State,
    carry: BytesMut,
    tripped: bool,
}

impl Framer {
    pub fn new(limit: usize) -> Self {
        Framer {
            limit: limit as u64,
            state: State::Prefix,
            carry: BytesMut::new(),
            tripped: false,
        }
    }

    /// True between messages (no partial prefix or payload pending).
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Prefix) && self.carry.is_empty()
    }

    pub fn feed(&mut self, chunk: Bytes) -> Passed {
        if self.tripped {
            return Passed {
                forward: Bytes::new(),
                oversize: None,
                started: 0,
            };
        }
        // A held-back partial prefix goes first: join it with this chunk (a copy of a few bytes
        // plus the chunk, only in this rare case).
        let data = if self.carry.is_empty() {
            chunk
        } else {
            let mut joined = BytesMut::with_capacity(self.carry.len() + chunk.len());
            joined.put_slice(&self.carry);
            joined.put_slice(&chunk);
            self.carry.clear();
            joined.freeze()
        };
        let mut pos = 0usize;
        let mut started = 0u64;
        while pos < data.len() {
            match self.state {
                State::Payload(remaining) => {
                    let take = remaining.min((data.len() - pos) as u64);
                    pos += take as usize;
                    self.state = if take == remaining {
                        State::Prefix
                    } else {
                        State::Payload(remaining - take)
                    };
                }
                State::Prefix => {
                    if data.len() - pos < PREFIX_LEN {
                        // Hold the partial prefix back until the rest arrives.
                        self.carry.put_slice(&data[pos..]);
                        return Passed {
                            forward: data.slice(..pos),
                            oversize: None,
                            started,
                        };
                    }
                    let len = u64::from(u32::from_be_bytes([
                        data[pos + 1],
                        data[pos + 2],
                        data[pos + 3],
                        data[pos + 4],
                    ]));
                    if len > self.limit {
                        self.tripped = true;
                        return Passed {
                            forward: data.slice(..pos),
                            oversize: Some(len),
                            started,
                        };
                    }
                    started += 1;
                    pos += PREFIX_LEN;
                    self.state = if len == 0 {
                        State::Prefix
                    } else {
                        State::Payload(len)
                    };
                }
            }
        }
        Passed {
            forward: data,
            oversize: None,
            started,
        }
    }
}

/// One whole message of a collected body.
#[derive(Debug, PartialEq, Eq)]
pub struct Message {
    pub compressed: bool,
    pub payload: Bytes,
}

#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The body ends inside a message: `have` of the `want` bytes of prefix + payload arrived.
    Truncated { have: usize, want: usize },
    /// A message announces more than the limit.
    TooLarge { len: u64, limit: usize },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Truncated { have, want } => {
                write!(
                    f,
                    "the request ends inside a gRPC message ({have} of {want} bytes)"
                )
            }
            FrameError::TooLarge { len, limit } => {
                write!(
                    f,
                    "a gRPC message of {len} bytes is larger than the limit of {limit} bytes"
                )
            }
        }
    }
}

/// Split a whole body into its messages.
pub fn split_messages(mut body: Bytes, limit: usize) -> Result<Vec<Message>, FrameError> {
    let mut out = Vec::new();
    while !body.is_empty() {
        if body.len() < PREFIX_LEN {
            return Err(FrameError::Truncated {
                have: body.len(),
                want: PREFIX_LEN,
            });
        }
        let compressed = body[0] & 1 == 1;
        let len = u64::from(u32::from_be_bytes([body[1], body[2], body[3], body[4]]));
        if len > limit as u64 {
            return Err(FrameError::TooLarge { len, limit });
        }
        let len = len as usize;
        if body.len() - PREFIX_LEN < len {
            return Err(FrameError::Truncated {
                have: body.len(),
                want: PREFIX_LEN + len,
            });
        }
        body.advance(PREFIX_LEN);
        out.push(Message {
            compressed,
            payload: body.split_to(len),
        });
    }
    Ok(out)
}

/// One uncompressed message, framed.
pub fn encode(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(PREFIX_LEN + payload.len());
    out.put_u8(0);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(len: usize, fill: u8) -> Vec<u8> {
        encode(&vec![fill; len]).to_vec()
    }

    fn feed_all(framer: &mut Framer, chunks: Vec<Vec<u8>>) -> (Vec<u8>, Option<u64>, u64) {
        let (mut out, mut over, mut started) = (Vec::new(), None, 0);
        for c in chunks {
            let p = framer.feed(Bytes::from(c));
            out.extend_from_slice(&p.forward);
            started += p.started;
            if p.oversize.is_some() {
                over = p.oversize;
            }
        }
        (out, over, started)
    }

    #[test]
    fn a_message_split_across_frames_passes_whole() {
        let m = msg(100, 7);
        let mut f = Framer::new(1000);
        let chunks = vec![m[..3].to_vec(), m[3..50].to_vec(), m[50..].to_vec()];
        let (out, over, started) = feed_all(&mut f, chunks);
        assert_eq!(out, m);
        assert_eq!((over, started), (None, 1));
        assert!(f.at_boundary());
    }

    #[test]
    fn several_messages_in_one_frame_are_counted() {
        let mut all = msg(10, 1);
        all.extend(msg(0, 0));
        all.extend(msg(20, 2));
        let mut f = Framer::new(1000);
        let p = f.feed(Bytes::from(all.clone()));
        assert_eq!(p.forward, Bytes::from(all));
        assert_eq!((p.oversize, p.started), (None, 3));
    }

    #[test]
    fn a_split_prefix_is_held_back_until_complete() {
        let mut f = Framer::new(1000);
        let mut first = msg(4, 1);
        let second = msg(6, 2);
        first.extend_from_slice(&second[..2]);
        let p = f.feed(Bytes::from(first));
        assert_eq!(
            p.forward.len(),
            9,
            "the partial prefix of the second message is held"
        );
        let p = f.feed(Bytes::from(second[2..].to_vec()));
        assert_eq!(p.forward.to_vec(), second);
        assert_eq!(p.started, 1);
    }

    #[test]
    fn a_length_prefix_beyond_the_limit_stops_before_the_message() {
        let mut all = msg(10, 1);
        all.extend(msg(2000, 9));
        let mut f = Framer::new(1000);
        let p = f.feed(Bytes::from(all));
        assert_eq!(
            p.forward.len(),
            15,
            "only the message before the oversized one"
        );
        assert_eq!(p.oversize, Some(2000));
        assert_eq!(
            f.feed(Bytes::from_static(b"more")).forward.len(),
            0,
            "nothing after a refusal"
        );
    }

    #[test]
    fn an_oversized_prefix_split_across_frames_is_caught() {
        let big = msg(5000, 3);
        let mut f = Framer::new(4096);
        let (out, over, _) = feed_all(&mut f, vec![big[..2].to_vec(), big[2..4000].to_vec()]);
        assert!(out.is_empty());
        assert_eq!(over, Some(5000));
    }

    #[test]
    fn exactly_the_limit_passes() {
        let m = msg(4096, 5);
        let mut f = Framer::new(4096);
        let (out, over, started) = feed_all(&mut f, vec![m.clone()]);
        assert_eq!((out, over, started), (m, None, 1));
    }

    #[test]
    fn split_messages_reads_each_and_its_flag() {
        let mut body = msg(3, 1);
        let mut compressed = msg(2, 2);
        compressed[0] = 1;
        body.extend(compressed);
        let got = split_messages(Bytes::from(body), 100).unwrap();
        assert_eq!(got.len(), 2);
        assert!(!got[0].compressed && got[1].compressed);
        assert_eq!(got[1].payload, Bytes::from_static(&[2, 2]));
    }

    #[test]
    fn a_truncated_message_is_an_error_naming_the_sizes() {
        let m = msg(10, 1);
        let err = split_messages(Bytes::from(m[..8].to_vec()), 100).unwrap_err();
        assert_eq!(err, FrameError::Truncated { have: 8, want: 15 });
        assert_eq!(
            err.to_string(),
            "the request ends inside a gRPC message (8 of 15 bytes)"
        );
        let err = split_messages(Bytes::from(m[..3].to_vec()), 100).unwrap_err();
        assert_eq!(err, FrameError::Truncated { have: 3, want: 5 });
    }

    #[test]
    fn split_messages_refuses_a_message_over_the_limit() {
        let err = split_messages(Bytes::from(msg(200, 1)), 100).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                len: 200,
                limit: 100
            }
        );
    }

    #[test]
    fn an_empty_body_has_no_messages() {
        assert_eq!(split_messages(Bytes::new(), 10).unwrap(), vec![]);
    }
}
