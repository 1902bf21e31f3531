//! One connection's frames, with as few system calls as the exchange
//! allows (each costs about a millisecond in a guest on a nested host):
//! a read takes whatever has arrived (into a buffer zeroed once, not per
//! read), so the host's `Hello` and request (sent in one write) cost one
//! read, and a file chunk as few as the guest's socket delivers it in; replies wait in a buffer until the
//! agent would block for input ([`Conn::recv`] flushes them first) or
//! sends them on purpose ([`Conn::flush`]), so `Hello` and a short
//! command's whole answer leave in one write.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use serde::{Deserialize, Serialize};

use crate::{decode, encode_append, FrameError, MAX_FRAME};

/// The least a read asks for: a whole file chunk and more.
const READ_SIZE: usize = 256 << 10;

thread_local! {
    /// Each thread's input and output buffers, handed to its connection
    /// and back: reused pages that stay mapped (see the agent's
    /// `keep_buffers_mapped`).
    static BUFFERS: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// A connection to the host, framed.
pub(crate) struct Conn<S: Read + Write> {
    stream: S,
    /// Holds what was read at `start..end`; its length is only capacity
    /// (zeroed once, never again per read).
    input: Vec<u8>,
    start: usize,
    end: usize,
    output: Vec<u8>,
}

impl<S: Read + Write> Conn<S> {
    pub(crate) fn new(stream: S) -> Self {
        let (input, output) = BUFFERS.with(|b| std::mem::take(&mut *b.borrow_mut()));
        Conn {
            stream,
            input,
            start: 0,
            end: 0,
            output,
        }
    }

    /// Queues a message; it leaves with the next flush.
    pub(crate) fn queue<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        encode_append(&mut self.output, msg)
    }

    /// Whether messages wait to be sent.
    pub(crate) fn pending(&self) -> bool {
        !self.output.is_empty()
    }

    /// Sends what is queued.
    pub(crate) fn flush(&mut self) -> Result<(), FrameError> {
        if !self.output.is_empty() {
            let result = self.stream.write_all(&self.output);
            self.output.clear();
            result?;
        }
        Ok(())
    }

    /// Queues a message and sends everything queued.
    pub(crate) fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        self.queue(msg)?;
        self.flush()
    }

    /// The length of the whole frame at the start of the unread input, if
    /// it has arrived.
    fn complete_frame(&self) -> Result<Option<usize>, FrameError> {
        let unread = &self.input[self.start..self.end];
        let Some(header) = unread.get(..4) else {
            return Ok(None);
        };
        let mut len = [0u8; 4];
        len.copy_from_slice(header);
        let len = u32::from_le_bytes(len);
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        let whole = 4 + len as usize;
        Ok((unread.len() >= whole).then_some(whole))
    }

    /// Whether a whole message has arrived and waits to be received.
    pub(crate) fn has_message(&self) -> bool {
        matches!(self.complete_frame(), Ok(Some(_)))
    }

    /// Receives one message; reads (after flushing the replies queued)
    /// only when no whole message has arrived yet.
    pub(crate) fn recv<T: for<'a> Deserialize<'a>>(&mut self) -> Result<T, FrameError> {
        loop {
            if let Some(whole) = self.complete_frame()? {
                let body = &self.input[self.start + 4..self.start + whole];
                let msg = decode(body);
                self.start += whole;
                if self.start == self.end {
                    (self.start, self.end) = (0, 0);
                }
                return msg;
            }
            self.flush()?;
            // Room for a whole read after what is there: move it to the
            // front, and grow (rarely: up to a largest frame and a read).
            if self.input.len() - self.end < READ_SIZE {
                self.input.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
                if self.input.len() - self.end < READ_SIZE {
                    self.input.resize(self.end + READ_SIZE, 0);
                }
            }
            let n = loop {
                match self.stream.read(&mut self.input[self.end..]) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    other => break other?,
                }
            };
            if n == 0 {
                return Err(if self.start == self.end {
                    FrameError::Closed
                } else {
                    std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()
                });
            }
            self.end += n;
        }
    }

    /// The stream, for what does not go through frames.
    pub(crate) fn stream(&mut self) -> &mut S {
        &mut self.stream
    }
}

impl<S: Read + Write + AsRawFd> Conn<S> {
    pub(crate) fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

impl<S: Read + Write> Drop for Conn<S> {
    fn drop(&mut self) {
        let input = std::mem::take(&mut self.input);
        let mut output = std::mem::take(&mut self.output);
        output.clear();
        BUFFERS.with(|b| *b.borrow_mut() = (input, output));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode, FromAgent, ToAgent};

    /// A stream that hands out its input in the given pieces and counts
    /// reads and writes.
    struct Script {
        pieces: Vec<Vec<u8>>,
        reads: usize,
        written: Vec<Vec<u8>>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.reads += 1;
            if self.pieces.is_empty() {
                return Ok(0);
            }
            let piece = &mut self.pieces[0];
            let n = piece.len().min(buf.len());
            buf[..n].copy_from_slice(&piece[..n]);
            piece.drain(..n);
            if piece.is_empty() {
                self.pieces.remove(0);
            }
            Ok(n)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.written.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn script(pieces: Vec<Vec<u8>>) -> Conn<Script> {
        Conn::new(Script {
            pieces,
            reads: 0,
            written: Vec::new(),
        })
    }

    #[test]
    fn frames_sent_together_cost_one_read_and_replies_one_write() {
        let hello = encode(&ToAgent::Hello { protocol: 1 }).unwrap();
        let ping = encode(&ToAgent::Ping).unwrap();
        let mut c = script(vec![[hello, ping].concat()]);
        assert_eq!(c.recv::<ToAgent>().unwrap(), ToAgent::Hello { protocol: 1 });
        c.queue(&FromAgent::Done).unwrap();
        assert!(c.has_message());
        assert_eq!(c.recv::<ToAgent>().unwrap(), ToAgent::Ping);
        c.send(&FromAgent::Pong { unix_ns: 3 }).unwrap();
        assert_eq!(c.stream().reads, 1);
        assert_eq!(c.stream().written.len(), 1);
        let mut w = &c.stream().written[0][..];
        assert_eq!(crate::recv::<FromAgent>(&mut w).unwrap(), FromAgent::Done);
        assert_eq!(
            crate::recv::<FromAgent>(&mut w).unwrap(),
            FromAgent::Pong { unix_ns: 3 }
        );
        // Replies go out before the agent waits for input.
        c.queue(&FromAgent::Done).unwrap();
        assert!(matches!(c.recv::<ToAgent>(), Err(FrameError::Closed)));
        assert_eq!(c.stream().written.len(), 2);
    }

    #[test]
    fn frames_split_anywhere_are_put_together() {
        let data = encode(&ToAgent::Data(vec![9; 300_000])).unwrap();
        let end = encode(&ToAgent::End).unwrap();
        let wire = [data, end].concat();
        let pieces = wire
            .chunks(3)
            .take(2)
            .map(<[u8]>::to_vec)
            .collect::<Vec<_>>();
        let mut rest = wire[6..].chunks(70_001).map(<[u8]>::to_vec).collect();
        let mut all = pieces;
        all.append(&mut rest);
        let mut c = script(all);
        assert_eq!(
            c.recv::<ToAgent>().unwrap(),
            ToAgent::Data(vec![9; 300_000])
        );
        assert_eq!(c.recv::<ToAgent>().unwrap(), ToAgent::End);
        assert!(matches!(c.recv::<ToAgent>(), Err(FrameError::Closed)));
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut c = script(vec![vec![0xff; 8]]);
        assert!(matches!(c.recv::<ToAgent>(), Err(FrameError::TooLarge(_))));
        let ping = encode(&ToAgent::Ping).unwrap();
        let mut c = script(vec![ping[..ping.len() - 1].to_vec()]);
        assert!(matches!(c.recv::<ToAgent>(), Err(FrameError::Io(_))));
        let mut c = script(vec![vec![1, 0, 0, 0, 250]]);
        assert!(matches!(c.recv::<ToAgent>(), Err(FrameError::Malformed(_))));
    }
}
