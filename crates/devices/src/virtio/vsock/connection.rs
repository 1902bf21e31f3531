//! One vsock stream connection between a guest port and a host socket, as
//! a pure state machine: packets from the guest and host-side events go in,
//! packets for the guest and instructions for the host side come out. The
//! I/O (queues, Unix sockets, epoll) lives in the muxer around it.
//!
//! Flow control is virtio-vsock's credit scheme: each side advertises its
//! receive buffer (`buf_alloc`) and how much of what it received it has
//! consumed (`fwd_cnt`); a sender may have at most `buf_alloc` bytes in
//! flight. A guest that sends past the credit hostvisor gave it, or breaks
//! the protocol, gets its connection reset.

use std::collections::VecDeque;

use super::packet::{Header, Op, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// The receive buffer hostvisor advertises per connection.
pub const BUF_ALLOC: u32 = 256 << 10;

/// A credit update is sent once this much buffer has been freed since the
/// guest last heard about it (so a sender blocked on credit resumes).
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The host asked for the connection; waiting for the guest's answer.
    Connecting,
    Established,
    /// One or both directions are shut down.
    Closing,
    /// Reset or fully shut down: the muxer drops it.
    Closed,
}

/// What the host side must do after a guest packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    Nothing,
    /// The guest accepted a host-initiated connection.
    Connected,
    /// The guest refused or reset the connection; close the host socket.
    Closed,
    /// Write these bytes to the host socket, then call `delivered`.
    Data(&'a [u8]),
    /// The guest will send no more (`SHUTDOWN_SEND`) or receive no more
    /// (`SHUTDOWN_RCV`).
    PeerShutdown(u32),
}

#[derive(Debug)]
pub struct Connection {
    guest_cid: u64,
    /// The host end's port, as the guest sees it.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    state: State,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes received from the guest, and of those handed to the host.
    rx_cnt: u32,
    fwd_cnt: u32,
    /// `fwd_cnt` as the guest last heard it.
    fwd_cnt_told: u32,
    peer_shutdown: u32,
    /// Control packets waiting for room in the guest's receive queue.
    pending: VecDeque<Header>,
    /// Protocol errors the guest made on this connection.
    pub protocol_errors: u32,
}

impl Connection {
    fn new(guest_cid: u64, local_port: u32, peer_port: u32, state: State) -> Self {
        Connection {
            guest_cid,
            local_port,
            peer_port,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            peer_shutdown: 0,
            pending: VecDeque::new(),
            protocol_errors: 0,
        }
    }

    /// A connection the host starts: queues the REQUEST for the guest.
    pub fn host_initiated(guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(guest_cid, local_port, peer_port, State::Connecting);
        c.queue(Op::Request, 0);
        c
    }

    /// A connection the guest asked for (`REQUEST`), once the host socket
    /// is connected: queues the RESPONSE.
    pub fn guest_initiated(guest_cid: u64, request: &Header) -> Self {
        let mut c = Self::new(
            guest_cid,
            request.dst_port,
            request.src_port,
            State::Established,
        );
        c.peer_buf_alloc = request.buf_alloc;
        c.peer_fwd_cnt = request.fwd_cnt;
        c.queue(Op::Response, 0);
        c
    }

    /// The RST answering a guest packet that belongs to no connection (or
    /// a REQUEST the host side refused).
    pub fn reset_for(guest_cid: u64, packet: &Header) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: packet.dst_port,
            dst_port: packet.src_port,
            len: 0,
            op: Op::Rst,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// A header from the host end, telling the guest our credit.
    fn header(&mut self, op: Op, len: u32, flags: u32) -> Header {
        self.fwd_cnt_told = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    fn queue(&mut self, op: Op, flags: u32) {
        let h = self.header(op, 0, flags);
        self.pending.push_back(h);
    }

    /// Whether a control packet waits for the guest.
    pub fn has_control(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The next control packet for the guest, if any.
    pub fn next_control(&mut self) -> Option<Header> {
        let mut h = self.pending.pop_front()?;
        // Tell the newest credit, whenever the packet was queued.
        h.fwd_cnt = self.fwd_cnt;
        self.fwd_cnt_told = self.fwd_cnt;
        Some(h)
    }

    fn reset(&mut self) -> Reply<'static> {
        self.protocol_errors += 1;
        self.pending.clear();
        self.queue(Op::Rst, 0);
        self.state = State::Closed;
        Reply::Closed
    }

    /// Takes a packet the guest sent on this connection.
    pub fn from_guest<'a>(&mut self, h: &Header, payload: &'a [u8]) -> Reply<'a> {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
        match (self.state, h.op) {
            (State::Closed, _) => Reply::Nothing,
            (_, Op::Rst) => {
                self.pending.clear();
                self.state = State::Closed;
                Reply::Closed
            }
            (State::Connecting, Op::Response) => {
                self.state = State::Established;
                Reply::Connected
            }
            (State::Connecting, _) => self.reset(),
            (_, Op::Request | Op::Response) => self.reset(),
            (_, Op::CreditUpdate) => Reply::Nothing,
            (_, Op::CreditRequest) => {
                // One pending update answers any number of requests (a
                // guest asking without reading cannot grow the queue).
                if !self.pending.iter().any(|h| h.op == Op::CreditUpdate) {
                    self.queue(Op::CreditUpdate, 0);
                }
                Reply::Nothing
            }
            (_, Op::Shutdown) => {
                self.peer_shutdown |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    // Both directions are done: finish with a reset, as
                    // the specification asks of the other side.
                    self.pending.clear();
                    self.queue(Op::Rst, 0);
                    self.state = State::Closed;
                    return Reply::Closed;
                }
                self.state = State::Closing;
                Reply::PeerShutdown(self.peer_shutdown)
            }
            (_, Op::Rw) => {
                if self.peer_shutdown & SHUTDOWN_SEND != 0 {
                    return self.reset();
                }
                // Packets are validated to at most 64 KiB; anything
                // larger is abuse.
                let Ok(len) = u32::try_from(payload.len()) else {
                    return self.reset();
                };
                let buffered = self.rx_cnt.wrapping_sub(self.fwd_cnt);
                if buffered.saturating_add(len) > BUF_ALLOC {
                    // More than the credit we gave: credit abuse.
                    return self.reset();
                }
                self.rx_cnt = self.rx_cnt.wrapping_add(len);
                Reply::Data(payload)
            }
        }
    }

    /// Bytes received from the guest and not yet consumed by the host side
    /// (never more than [`BUF_ALLOC`]).
    pub fn rx_buffered(&self) -> u32 {
        self.rx_cnt.wrapping_sub(self.fwd_cnt)
    }

    /// The host side consumed `n` bytes the guest sent.
    pub fn delivered(&mut self, n: u32) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
        if self.state != State::Closed
            && self.fwd_cnt.wrapping_sub(self.fwd_cnt_told) >= CREDIT_UPDATE_THRESHOLD
            && !self.pending.iter().any(|h| h.op == Op::CreditUpdate)
        {
            self.queue(Op::CreditUpdate, 0);
        }
    }

    /// How many bytes the guest can take now.
    pub fn send_credit(&self) -> u32 {
        if self.state != State::Established && self.state != State::Closing {
            return 0;
        }
        if self.peer_shutdown & SHUTDOWN_RCV != 0 {
            return 0;
        }
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The header for `len` bytes of host data to the guest (at most
    /// `send_credit`); `None` when there is no credit for it.
    pub fn data_to_guest(&mut self, len: u32) -> Option<Header> {
        if len == 0 || len > self.send_credit() {
            return None;
        }
        self.tx_cnt = self.tx_cnt.wrapping_add(len);
        Some(self.header(Op::Rw, len, 0))
    }

    /// Ends the connection at once with a reset (the host side gives it
    /// up; not counted as the guest's protocol error).
    pub fn abort(&mut self) {
        if self.state != State::Closed {
            self.pending.clear();
            self.queue(Op::Rst, 0);
            self.state = State::Closed;
        }
    }

    /// The host socket closed: tell the guest nothing more will come.
    pub fn host_closed(&mut self) {
        if matches!(self.state, State::Established | State::Closing) {
            self.queue(Op::Shutdown, SHUTDOWN_RCV | SHUTDOWN_SEND);
            self.state = State::Closing;
        } else if self.state == State::Connecting {
            self.pending.clear();
            self.queue(Op::Rst, 0);
            self.state = State::Closed;
        }
    }
}

#[cfg(test)]
// Test lengths, indices and byte patterns are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    const GUEST: u64 = 3;

    fn from_guest(op: Op, c: &Connection, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: c.peer_port,
            dst_port: c.local_port,
            len,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn established() -> Connection {
        let request = Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len: 0,
            op: Op::Request,
            flags: 0,
            buf_alloc: 8192,
            fwd_cnt: 0,
        };
        let mut c = Connection::guest_initiated(GUEST, &request);
        let response = c.next_control().unwrap();
        assert_eq!(response.op, Op::Response);
        assert_eq!((response.src_port, response.dst_port), (52, 1000));
        assert_eq!(response.buf_alloc, BUF_ALLOC);
        c
    }

    #[test]
    fn host_initiated_connections_wait_for_the_guest() {
        let mut c = Connection::host_initiated(GUEST, 1_000_000, 52);
        let req = c.next_control().unwrap();
        assert_eq!(
            (req.op, req.dst_cid, req.dst_port),
            (Op::Request, GUEST, 52)
        );
        assert_eq!(c.send_credit(), 0, "no data before the guest answers");
        let resp = from_guest(Op::Response, &c, 0, 4096, 0);
        assert_eq!(c.from_guest(&resp, &[]), Reply::Connected);
        assert_eq!(c.state(), State::Established);
        assert_eq!(c.send_credit(), 4096);
        // A refusal closes it.
        let mut c = Connection::host_initiated(GUEST, 1_000_001, 53);
        c.next_control();
        let rst = from_guest(Op::Rst, &c, 0, 0, 0);
        assert_eq!(c.from_guest(&rst, &[]), Reply::Closed);
        assert_eq!(c.state(), State::Closed);
        assert!(c.next_control().is_none(), "no reset answers a reset");
    }

    #[test]
    fn data_flows_within_the_credit_both_ways() {
        let mut c = established();
        // To the guest: at most its buffer, until it reports consumption.
        assert_eq!(c.send_credit(), 8192);
        let h = c.data_to_guest(5000).unwrap();
        assert_eq!((h.op, h.len), (Op::Rw, 5000));
        assert_eq!(c.send_credit(), 3192);
        assert!(c.data_to_guest(4000).is_none());
        let update = from_guest(Op::CreditUpdate, &c, 0, 8192, 5000);
        assert_eq!(c.from_guest(&update, &[]), Reply::Nothing);
        assert_eq!(c.send_credit(), 8192);
        // From the guest: data is handed on, and consumption is reported
        // once a quarter of the buffer has been freed.
        let rw = from_guest(Op::Rw, &c, 3, 8192, 5000);
        assert_eq!(c.from_guest(&rw, b"abc"), Reply::Data(b"abc"));
        c.delivered(3);
        assert!(c.next_control().is_none());
        let chunk = vec![0u8; (CREDIT_UPDATE_THRESHOLD) as usize];
        let rw = from_guest(Op::Rw, &c, chunk.len() as u32, 8192, 5000);
        assert!(matches!(c.from_guest(&rw, &chunk), Reply::Data(_)));
        c.delivered(chunk.len() as u32);
        let update = c.next_control().unwrap();
        assert_eq!(update.op, Op::CreditUpdate);
        assert_eq!(update.fwd_cnt, 3 + CREDIT_UPDATE_THRESHOLD);
        // An explicit request is answered, once however often it is made.
        let ask = from_guest(Op::CreditRequest, &c, 0, 8192, 5000);
        for _ in 0..100 {
            c.from_guest(&ask, &[]);
        }
        assert_eq!(c.next_control().unwrap().op, Op::CreditUpdate);
        assert!(c.next_control().is_none());
    }

    #[test]
    fn credit_abuse_resets_the_connection() {
        let mut c = established();
        let big = vec![1u8; BUF_ALLOC as usize];
        let rw = from_guest(Op::Rw, &c, BUF_ALLOC, 8192, 0);
        assert!(matches!(c.from_guest(&rw, &big), Reply::Data(_)));
        // Nothing consumed yet: one more byte is over the credit.
        let rw = from_guest(Op::Rw, &c, 1, 8192, 0);
        assert_eq!(c.from_guest(&rw, b"x"), Reply::Closed);
        assert_eq!(c.next_control().unwrap().op, Op::Rst);
        assert_eq!(c.state(), State::Closed);
        assert_eq!(c.protocol_errors, 1);
        // Later packets are ignored.
        assert_eq!(c.from_guest(&rw, b"x"), Reply::Nothing);
    }

    #[test]
    fn protocol_errors_reset_the_connection() {
        for op in [Op::Request, Op::Response] {
            let mut c = established();
            let bad = from_guest(op, &c, 0, 8192, 0);
            assert_eq!(c.from_guest(&bad, &[]), Reply::Closed);
            assert_eq!(c.next_control().unwrap().op, Op::Rst);
        }
        // Data after the guest said it would send no more.
        let mut c = established();
        let mut shut = from_guest(Op::Shutdown, &c, 0, 8192, 0);
        shut.flags = SHUTDOWN_SEND;
        assert_eq!(c.from_guest(&shut, &[]), Reply::PeerShutdown(SHUTDOWN_SEND));
        let rw = from_guest(Op::Rw, &c, 1, 8192, 0);
        assert_eq!(c.from_guest(&rw, b"x"), Reply::Closed);
        // Data before the guest accepted a host connection.
        let mut c = Connection::host_initiated(GUEST, 1_000_002, 52);
        c.next_control();
        let rw = from_guest(Op::Rw, &c, 1, 8192, 0);
        assert_eq!(c.from_guest(&rw, b"x"), Reply::Closed);
    }

    #[test]
    fn shutdowns_close_in_order() {
        // The guest shuts both directions: the host finishes with RST.
        let mut c = established();
        let mut shut = from_guest(Op::Shutdown, &c, 0, 8192, 0);
        shut.flags = SHUTDOWN_RCV;
        assert_eq!(c.from_guest(&shut, &[]), Reply::PeerShutdown(SHUTDOWN_RCV));
        assert_eq!(c.send_credit(), 0, "the guest receives no more");
        shut.flags = SHUTDOWN_SEND;
        assert_eq!(c.from_guest(&shut, &[]), Reply::Closed);
        assert_eq!(c.next_control().unwrap().op, Op::Rst);
        // The host socket closes: the guest is told, and its RST ends it.
        let mut c = established();
        c.host_closed();
        let shut = c.next_control().unwrap();
        assert_eq!(
            (shut.op, shut.flags),
            (Op::Shutdown, SHUTDOWN_RCV | SHUTDOWN_SEND)
        );
        let rst = from_guest(Op::Rst, &c, 0, 0, 0);
        assert_eq!(c.from_guest(&rst, &[]), Reply::Closed);
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn counters_wrap_around() {
        let mut c = established();
        c.tx_cnt = u32::MAX - 10;
        c.peer_fwd_cnt = u32::MAX - 10;
        assert_eq!(c.send_credit(), 8192);
        c.data_to_guest(100).unwrap();
        assert_eq!(c.send_credit(), 8092);
        c.rx_cnt = u32::MAX - 1;
        c.fwd_cnt = u32::MAX - 1;
        let rw = from_guest(Op::Rw, &c, 4, 8192, 0);
        assert!(matches!(c.from_guest(&rw, b"abcd"), Reply::Data(_)));
        c.delivered(4);
        assert_eq!(c.rx_cnt, c.fwd_cnt);
    }
}
