//! One host connection of the muxer: the protocol state, the host
//! socket and what waits for it.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;

use crate::virtio::vsock::connection::Connection;

pub(super) struct HostConn {
    pub(super) conn: Connection,
    pub(super) stream: UnixStream,
    pub(super) token: u64,
    /// The socket may have bytes to read (edge-triggered epoll said so and
    /// no read has since returned `WouldBlock`).
    pub(super) readable: bool,
    /// Guest bytes the host socket has not taken yet.
    pub(super) to_host: VecDeque<u8>,
    /// The guest sends no more: shut the socket's write side once
    /// `to_host` is drained.
    pub(super) shut_write: bool,
    /// The host side is done; the connection goes once the guest knows.
    pub(super) host_done: bool,
    /// Leading bytes of `to_host` that are hostvisor's `OK` line, not the
    /// guest's data (no credit is given back for them).
    pub(super) line_bytes: u32,
    /// Opened ahead of time, not lent to a host program yet ([`pool`](super::pool)).
    pub(super) pooled: bool,
}

impl HostConn {
    /// Writes what the host socket takes and gives the guest credit for
    /// its bytes among them; a socket that is gone ends the host side.
    pub(super) fn pump_to_host(&mut self) {
        match self.flush() {
            Ok(n) => {
                let line = n.min(self.line_bytes);
                self.line_bytes -= line;
                self.conn.delivered(n - line);
            }
            Err(_) => {
                self.to_host.clear();
                self.line_bytes = 0;
                self.host_done = true;
                self.conn.host_closed();
            }
        }
    }

    /// Writes as much of `to_host` as the socket takes; returns the bytes
    /// written, or `Err` if the socket is gone.
    pub(super) fn flush(&mut self) -> std::io::Result<u32> {
        let mut written = 0u32;
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    written = written.saturating_add(crate::virtio::len_u32(n));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.to_host.is_empty() && self.shut_write {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.shut_write = false;
        }
        Ok(written)
    }
}
