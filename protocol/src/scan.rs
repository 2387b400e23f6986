//! Walking a relayed byte stream message by message without copying it.
//!
//! The relay reads whatever the socket has into a buffer and asks the [`Scanner`] what the
//! bytes at the current position are: opaque bytes to forward as they are (the middle of
//! a DataRow or CopyData, however large), or a whole message the proxy wants to inspect
//! (ReadyForQuery, ErrorResponse…). Only inspected messages must be buffered whole, and
//! only up to a limit, so memory per connection stays bounded whatever a peer sends.

use crate::framing::{peek_header, FrameError};

/// What the bytes at the front of the buffer are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Forward the next `len` bytes untouched. When `tag` is set they begin a message of
    /// that type (one the caller did not ask to inspect, or too large to inspect).
    Pass { len: usize, tag: Option<u8> },
    /// The next `len` bytes are one whole message of type `tag`, header included.
    Message { tag: u8, len: usize },
    /// Nothing can be decided until more bytes arrive; keep the front of the buffer.
    NeedMore,
}

/// Tracks where the stream is between calls: inside a passed-through message's body, or
/// at a message boundary.
#[derive(Debug, Clone)]
pub struct Scanner {
    /// Body bytes of the current passed-through message not yet seen.
    remaining: usize,
    /// Largest message (tag and length included) that is buffered whole for inspection.
    max_inspect: usize,
    /// Largest message accepted at all; anything longer is a protocol error.
    max_message: usize,
}

impl Scanner {
    pub fn new(max_inspect: usize, max_message: usize) -> Self {
        Self {
            remaining: 0,
            max_inspect,
            max_message,
        }
    }

    /// True when the stream is at a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Decides what the front of `buf` is. `inspect(tag)` says whether messages of that
    /// type should be delivered whole.
    pub fn step(&mut self, buf: &[u8], inspect: impl Fn(u8) -> bool) -> Result<Step, FrameError> {
        if self.remaining > 0 {
            if buf.is_empty() {
                return Ok(Step::NeedMore);
            }
            let len = self.remaining.min(buf.len());
            self.remaining -= len;
            return Ok(Step::Pass { len, tag: None });
        }
        let Some((tag, total)) = peek_header(buf, self.max_message)? else {
            return Ok(Step::NeedMore);
        };
        if inspect(tag) && total <= self.max_inspect {
            if buf.len() >= total {
                return Ok(Step::Message { tag, len: total });
            }
            return Ok(Step::NeedMore);
        }
        let len = total.min(buf.len());
        self.remaining = total - len;
        Ok(Step::Pass {
            len,
            tag: Some(tag),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// Feeds `stream` in chunks of `chunk` bytes; returns the inspected messages and the
    /// total bytes passed, as a relay would see them.
    fn run(stream: &[u8], chunk: usize) -> (Vec<Vec<u8>>, usize) {
        let mut sc = Scanner::new(64, 1 << 20);
        let mut pending: Vec<u8> = Vec::new();
        let mut seen = Vec::new();
        let mut passed = 0;
        for part in stream.chunks(chunk) {
            pending.extend_from_slice(part);
            let mut pos = 0;
            loop {
                match sc.step(&pending[pos..], |t| t == b'Z').unwrap() {
                    Step::Pass { len, .. } => {
                        passed += len;
                        pos += len;
                    }
                    Step::Message { len, .. } => {
                        seen.push(pending[pos..pos + len].to_vec());
                        pos += len;
                    }
                    Step::NeedMore => break,
                }
            }
            pending.drain(..pos);
        }
        assert!(pending.is_empty());
        (seen, passed)
    }

    #[test]
    fn inspected_messages_survive_every_chunking() {
        let mut stream = msg(b'D', &[7; 300]);
        stream.extend(msg(b'Z', b"I"));
        stream.extend(msg(b'C', b"SELECT 1\0"));
        stream.extend(msg(b'Z', b"T"));
        for chunk in 1..stream.len() + 1 {
            let (seen, passed) = run(&stream, chunk);
            assert_eq!(
                seen,
                vec![msg(b'Z', b"I"), msg(b'Z', b"T")],
                "chunk {chunk}"
            );
            assert_eq!(passed, stream.len() - 12);
        }
    }

    #[test]
    fn oversized_inspectable_message_is_passed_through() {
        let mut sc = Scanner::new(16, 1 << 20);
        let big = msg(b'Z', &[b'I'; 100]);
        assert_eq!(
            sc.step(&big[..20], |_| true).unwrap(),
            Step::Pass {
                len: 20,
                tag: Some(b'Z')
            }
        );
        assert!(!sc.at_boundary());
    }

    #[test]
    fn bad_and_huge_lengths_are_errors() {
        let mut sc = Scanner::new(16, 1000);
        assert_eq!(
            sc.step(&[b'D', 0, 0, 0, 3], |_| false),
            Err(FrameError::BadLength(3))
        );
        assert!(matches!(
            sc.step(&[b'D', 0x7f, 0xff, 0xff, 0xff], |_| false),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(
            sc.step(&[b'D', 0xff, 0xff, 0xff, 0xff], |_| false),
            Err(FrameError::BadLength(-1))
        );
    }
}
