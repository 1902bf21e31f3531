//! The host side of virtio-vsock: guest streams become Unix-socket
//! connections, in Firecracker's style.
//!
//! - A host program connects to the device's socket (`PATH`) and writes
//!   `CONNECT <port>\n`; once the guest accepts, it reads `OK <local>\n` and
//!   the connection is a byte stream to the guest's port.
//! - A guest connection to host port `P` is connected to the Unix socket
//!   `PATH_P`, if something listens there; otherwise the guest gets a reset.
//! - Guest ports given to [`Muxer::set_pool`] (the agent's) get a
//!   connection opened ahead of time, lent to the next `CONNECT` there
//!   (the `pool` module).
//!
//! One thread runs it all on one epoll: the queues' notifications, the
//! listening socket and every connection's socket. Host sockets are
//! registered edge-triggered; a connection remembers that its socket is
//! readable until a read would block, so a connection without guest credit
//! neither spins nor loses its wake-up. Every host socket is non-blocking:
//! a slow host reader leaves bytes in the connection's buffer (bounded by
//! the credit hostvisor gives the guest), never stalls the device.
//!
//! No crate offers this (Firecracker's muxer lives inside its VMM), so it
//! is written here; the protocol state per stream is the pure
//! [`Connection`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::connection::{Connection, Reply, State};
use super::packet::{Header, Op, HDR_LEN, MAX_PAYLOAD, SHUTDOWN_SEND};
use super::persist::TransportReset;
use crate::virtio::Interrupt;

mod host_conn;
mod pool;
use host_conn::HostConn;
pub use pool::MAX_PORTS as MAX_POOL_PORTS;

// Epoll tokens below FIRST_STREAM are fixed; host sockets get the rest.
const RX: u64 = 0;
const TX: u64 = 1;
const EVENTS: u64 = 2;
const KILL: u64 = 3;
const LISTENER: u64 = 4;
const FIRST_STREAM: u64 = 16;

/// Host ports for host-initiated connections start here (as the guest sees
/// them), clear of the ports guest programs listen on.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// The longest `CONNECT <port>\n` line accepted.
const MAX_HELLO: usize = 32;

/// Resets waiting for receive buffers, at most: a guest that sends bogus
/// packets without posting buffers cannot grow the queue (further resets
/// are dropped; they are courtesies).
const MAX_PENDING_RESETS: usize = 1024;

/// Open connections allowed at once (each holds a host socket): a guest
/// opening more gets resets, a host program an `ERROR` line.
pub const MAX_CONNECTIONS: usize = 1024;

/// Counters for the VM's status and tests.
#[derive(Debug, Default)]
pub struct VsockStats {
    /// Malformed packets from the guest, dropped.
    pub dropped_packets: AtomicU64,
    /// Connections reset because the guest broke the protocol.
    pub protocol_resets: AtomicU64,
    /// Connections opened, either way.
    pub connections: AtomicU64,
}

/// A host program that connected and has not finished its `CONNECT` line.
struct Hello {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The device side a muxer serves: guest memory, the interrupt and the
/// receive, transmit and event queues.
pub struct Guest {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<Interrupt>,
    pub rx: Queue,
    pub tx: Queue,
    pub events: Queue,
}

impl std::fmt::Debug for Muxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Muxer")
            .field("guest_cid", &self.guest_cid)
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    guest: Guest,
    conns: BTreeMap<(u32, u32), HostConn>,
    by_token: HashMap<u64, (u32, u32)>,
    hellos: HashMap<u64, Hello>,
    next_token: u64,
    next_port: u32,
    /// Resets for packets that belong to no connection.
    resets: VecDeque<Header>,
    /// Where the next round of sending to the guest starts, for fairness.
    cursor: (u32, u32),
    stats: Arc<VsockStats>,
    buf: Vec<u8>,
    max_connections: usize,
    /// A transport reset to send, and host connections waiting for the
    /// guest to handle it.
    reset: TransportReset,
    pool: pool::Pool,
}

impl Muxer {
    /// Lowers the connection limit (tests).
    pub fn set_max_connections(&mut self, max: usize) {
        self.max_connections = max;
    }

    /// A muxer for the guest `guest_cid`, accepting host connections on
    /// `listener` (bound at `path`).
    pub fn new(
        guest_cid: u64,
        path: &Path,
        listener: UnixListener,
        guest: Guest,
        stats: Arc<VsockStats>,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        Ok(Muxer {
            guest_cid,
            path: path.to_path_buf(),
            listener,
            epoll,
            guest,
            conns: BTreeMap::new(),
            by_token: HashMap::new(),
            hellos: HashMap::new(),
            next_token: FIRST_STREAM,
            next_port: FIRST_LOCAL_PORT,
            resets: VecDeque::new(),
            cursor: (0, 0),
            stats,
            buf: vec![0u8; MAX_PAYLOAD as usize],
            max_connections: MAX_CONNECTIONS,
            reset: TransportReset::default(),
            pool: pool::Pool::default(),
        })
    }

    /// Tells the guest, as soon as its event queue has a buffer, that the
    /// transport was reset: it drops every socket (a restored device,
    /// whose connections stayed with the snapshot's process).
    pub fn request_transport_reset(&mut self) {
        self.reset.request();
    }

    /// Whether a transport reset still waits for an event buffer.
    pub fn transport_reset_pending(&self) -> bool {
        self.reset.pending()
    }

    /// Sends a pending transport reset if the guest gave an event buffer;
    /// once the guest has handled one, sends the connection requests that
    /// waited for that.
    pub fn deliver_events(&mut self) {
        let g = &mut self.guest;
        let released = self.reset.deliver(&mut g.events, &g.mem, &g.interrupt);
        for (token, stream, port) in released {
            self.connect_host(token, stream, port);
        }
    }

    /// Takes the queues (rx, tx, event) out, for a sleeping device; the
    /// connections stay. [`attach`](Self::attach) gives it queues again.
    pub fn detach(&mut self) -> Vec<Queue> {
        let g = &mut self.guest;
        [&mut g.rx, &mut g.tx, &mut g.events]
            .into_iter()
            .map(std::mem::take)
            .collect()
    }

    /// Serves `guest` from now on (a woken device).
    pub fn attach(&mut self, guest: Guest) {
        self.guest = guest;
    }

    /// Runs until `kill` fires. `queue_events` are the rx, tx and event
    /// queues' notifications; they and `kill` are watched only while this
    /// runs, so the muxer can run again (after a sleep) on new ones.
    pub fn run(&mut self, queue_events: &[EventFd; 3], kill: &EventFd) -> std::io::Result<()> {
        let result = self.serve(queue_events, kill);
        for fd in queue_events.iter().map(AsRawFd::as_raw_fd) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            kill.as_raw_fd(),
            EpollEvent::default(),
        );
        result
    }

    fn serve(&mut self, queue_events: &[EventFd; 3], kill: &EventFd) -> std::io::Result<()> {
        for (i, evt) in queue_events.iter().enumerate() {
            self.epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        self.epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL),
        )?;
        // Packets the guest queued before activation finished (or while
        // the device slept).
        self.process_tx();
        self.refill_pool();
        self.fill_rx();
        self.deliver_events();
        let mut ready = vec![EpollEvent::default(); 64];
        loop {
            // While the guest handles a transport reset, look again now
            // and then (its re-posted event buffer may come without a
            // notification).
            let timeout = if self.reset.resetting() {
                20
            } else {
                self.pool_timeout_ms()
            };
            let n = match self.epoll.wait(timeout, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for event in &ready[..n] {
                match event.data() {
                    KILL => return Ok(()),
                    i @ (RX | TX | EVENTS) => {
                        if let Some(e) = usize::try_from(i).ok().and_then(|i| queue_events.get(i)) {
                            let _ = e.read();
                        }
                        if i == TX {
                            self.process_tx();
                        } else if i == EVENTS {
                            self.deliver_events();
                        }
                    }
                    token => self.host_event(token, event.event_set()),
                }
            }
            if self.reset.resetting() {
                self.deliver_events();
            }
            self.refill_pool();
            self.fill_rx();
            self.reap();
        }
    }

    /// Handles what epoll reported for a host socket (or the listener).
    /// Public for tests, which drive the muxer without its thread.
    pub fn host_event(&mut self, token: u64, events: EventSet) {
        if token == LISTENER {
            self.accept();
        } else if self.hellos.contains_key(&token) {
            self.read_hello(token);
        } else if let Some(key) = self.by_token.get(&token).copied() {
            let Some(c) = self.conns.get_mut(&key) else {
                return;
            };
            if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                c.readable = true;
            }
            if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
                c.pump_to_host();
            }
        }
    }

    /// Waits up to `timeout_ms` for host sockets and handles what is ready
    /// (tests; the thread uses [`run`](Self::run)).
    pub fn poll_host(&mut self, timeout_ms: i32) -> std::io::Result<()> {
        let mut ready = vec![EpollEvent::default(); 64];
        let n = self.epoll.wait(timeout_ms, &mut ready)?;
        for event in &ready[..n] {
            self.host_event(event.data(), event.event_set());
        }
        self.refill_pool();
        self.fill_rx();
        self.reap();
        Ok(())
    }

    fn register(&mut self, fd: i32, events: EventSet) -> Option<u64> {
        let token = self.next_token;
        self.next_token += 1;
        match self
            .epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
        {
            Ok(()) => Some(token),
            Err(e) => {
                tracing::warn!("vsock: cannot watch a host socket: {e}");
                None
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if let Some(token) = self.register(fd, EventSet::IN | EventSet::EDGE_TRIGGERED)
                    {
                        self.hellos.insert(
                            token,
                            Hello {
                                stream,
                                line: Vec::new(),
                            },
                        );
                        // Bytes may have arrived before registration.
                        self.read_hello(token);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != ErrorKind::WouldBlock {
                        tracing::warn!("vsock: cannot accept: {e}");
                    }
                    return;
                }
            }
        }
    }

    /// Reads a host program's `CONNECT <port>\n`, a byte at a time so that
    /// nothing after the line is consumed.
    fn read_hello(&mut self, token: u64) {
        let Some(hello) = self.hellos.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match hello.stream.read(&mut byte) {
                Ok(0) => break Err("closed before CONNECT"),
                Ok(_) if byte[0] == b'\n' => break parse_connect(&hello.line),
                Ok(_) if hello.line.len() >= MAX_HELLO => break Err("CONNECT line too long"),
                Ok(_) => hello.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => break Err("read error"),
            }
        };
        let Some(hello) = self.hellos.remove(&token) else {
            return;
        };
        let port = match port {
            Ok(_) if self.conns.len() >= self.max_connections => Err("too many connections"),
            other => other,
        };
        let port = match port {
            Ok(port) => port,
            Err(why) => {
                tracing::debug!("vsock: host connection dropped: {why}");
                let mut stream = hello.stream;
                let _ = stream.write_all(format!("ERROR {why}\n").as_bytes());
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    stream.as_raw_fd(),
                    EpollEvent::default(),
                );
                return;
            }
        };
        if self.reset.resetting() {
            self.reset.defer(token, hello.stream, port);
            return;
        }
        if let Some(stream) = self.take_pooled(token, hello.stream, port) {
            self.connect_host(token, stream, port);
        }
    }

    /// Asks the guest for a connection to `port` on a host program's
    /// behalf.
    fn connect_host(&mut self, token: u64, stream: UnixStream, port: u32) {
        let local = self.free_local_port(port);
        let conn = Connection::host_initiated(self.guest_cid, local, port);
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            stream.as_raw_fd(),
            EpollEvent::new(
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
                token,
            ),
        );
        self.add(conn, stream, token, true);
    }

    fn free_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let port = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer)) {
                return port;
            }
        }
    }

    fn add(&mut self, conn: Connection, stream: UnixStream, token: u64, readable: bool) {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let key = (conn.local_port, conn.peer_port);
        self.by_token.insert(token, key);
        self.conns.insert(
            key,
            HostConn {
                conn,
                stream,
                token,
                readable,
                to_host: VecDeque::new(),
                shut_write: false,
                host_done: false,
                line_bytes: 0,
                pooled: false,
            },
        );
    }

    /// Takes every packet the guest queued for sending.
    pub fn process_tx(&mut self) {
        let mut used = false;
        let mut header = [0u8; HDR_LEN];
        let mut payload = std::mem::take(&mut self.buf);
        while let Some(chain) = self.guest.tx.pop_descriptor_chain(&self.guest.mem) {
            let head = chain.head_index();
            let packet = chain
                .reader(&self.guest.mem)
                .map_err(|_| "bad descriptor chain")
                .and_then(|mut reader| {
                    reader
                        .read_exact(&mut header)
                        .map_err(|_| "header beyond the chain")?;
                    let h =
                        Header::parse_from_guest(&header, reader.available_bytes(), self.guest_cid)
                            .map_err(|e| {
                                tracing::debug!("vsock: dropped a packet: {e}");
                                "malformed header"
                            })?;
                    let len = h.len as usize;
                    reader
                        .read_exact(&mut payload[..len])
                        .map_err(|_| "payload unreadable")?;
                    Ok(h)
                });
            if let Err(e) = self.guest.tx.add_used(&self.guest.mem, head, 0) {
                tracing::warn!("vsock: cannot return a transmit buffer: {e}");
                break;
            }
            used = true;
            match packet {
                Ok(h) => self.guest_packet(&h, &payload[..h.len as usize]),
                Err(why) => {
                    tracing::debug!("vsock: dropped a guest packet: {why}");
                    self.stats.dropped_packets.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.buf = payload;
        if used {
            self.notify(false);
        }
    }

    fn notify(&mut self, rx: bool) {
        let q = if rx {
            &mut self.guest.rx
        } else {
            &mut self.guest.tx
        };
        if q.needs_notification(&self.guest.mem).unwrap_or(true) {
            // Receive is queue 0, transmit queue 1.
            self.guest.interrupt.signal_queue(usize::from(!rx));
        }
    }

    fn guest_packet(&mut self, h: &Header, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        let Some(c) = self.conns.get_mut(&key) else {
            match h.op {
                Op::Request => self.guest_connect(h),
                Op::Rst => {}
                _ => self.reset_guest(h),
            }
            return;
        };
        if c.pooled {
            self.pooled_packet(key, h, payload);
            return;
        }
        let errors = c.conn.protocol_errors;
        match c.conn.from_guest(h, payload) {
            Reply::Nothing => {}
            Reply::Connected => {
                let line = format!("OK {}\n", c.conn.local_port);
                c.to_host.extend(line.as_bytes());
                c.line_bytes = c
                    .line_bytes
                    .saturating_add(crate::virtio::len_u32(line.len()));
                c.readable = true;
                c.pump_to_host();
            }
            Reply::Closed => {
                // Whatever the guest sent before still goes to the host.
                c.shut_write = true;
                c.host_done = true;
                c.pump_to_host();
            }
            Reply::Data(bytes) => {
                c.to_host.extend(bytes);
                c.pump_to_host();
            }
            Reply::PeerShutdown(flags) => {
                if flags & SHUTDOWN_SEND != 0 {
                    c.shut_write = true;
                    c.pump_to_host();
                }
            }
        }
        if c.conn.protocol_errors > errors {
            self.stats.protocol_resets.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues the reset answering guest packet `h`.
    fn reset_guest(&mut self, h: &Header) {
        if self.resets.len() < MAX_PENDING_RESETS {
            self.resets
                .push_back(Connection::reset_for(self.guest_cid, h));
        }
    }

    /// A guest connection to host port P goes to the socket `PATH_P`.
    fn guest_connect(&mut self, h: &Header) {
        if self.conns.len() >= self.max_connections {
            tracing::debug!("vsock: guest connection refused: too many connections");
            self.reset_guest(h);
            return;
        }
        let mut target = self.path.clone().into_os_string();
        target.push(format!("_{}", h.dst_port));
        let stream = UnixStream::connect(&target).and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        });
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(
                    "vsock: guest connection to port {} refused: {e}",
                    h.dst_port
                );
                self.reset_guest(h);
                return;
            }
        };
        let Some(token) = self.register(
            stream.as_raw_fd(),
            EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
        ) else {
            self.reset_guest(h);
            return;
        };
        let conn = Connection::guest_initiated(self.guest_cid, h);
        self.add(conn, stream, token, true);
    }

    /// Fills the guest's receive buffers: resets first, then each
    /// connection's control packets and data, round-robin.
    pub fn fill_rx(&mut self) {
        let mut used = false;
        // The writer borrows the memory while `next_packet` needs `self`.
        let mem = self.guest.mem.clone();
        while let Some(chain) = self.guest.rx.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let written = match chain.writer(&mem) {
                Ok(mut w) if w.available_bytes() >= HDR_LEN => match self.next_packet(&mut w) {
                    Some(n) => n,
                    None => {
                        self.guest.rx.go_to_previous_position();
                        break;
                    }
                },
                _ => {
                    tracing::debug!("vsock: receive buffer too small or invalid");
                    self.stats.dropped_packets.fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            if let Err(e) = self.guest.rx.add_used(&self.guest.mem, head, written) {
                tracing::warn!("vsock: cannot return a receive buffer: {e}");
                break;
            }
            used = true;
        }
        if used {
            self.notify(true);
        }
    }

    /// Writes the next packet for the guest into `w`; its length, or
    /// `None` when nothing is ready.
    fn next_packet<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        w: &mut virtio_queue::Writer<'_, B>,
    ) -> Option<u32> {
        if let Some(h) = self.resets.pop_front() {
            return write_packet(w, &h, &[]);
        }
        let keys: Vec<(u32, u32)> = self
            .conns
            .range(self.cursor..)
            .chain(self.conns.range(..self.cursor))
            .map(|(k, _)| *k)
            .collect();
        let room = (w.available_bytes() - HDR_LEN).min(MAX_PAYLOAD as usize);
        for key in keys {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            if let Some(h) = c.conn.next_control() {
                self.cursor = key;
                return write_packet(w, &h, &[]);
            }
            while c.readable && !c.host_done {
                let credit = c.conn.send_credit() as usize;
                if credit == 0 || room == 0 {
                    break;
                }
                let want = credit.min(room);
                match c.stream.read(&mut self.buf[..want]) {
                    Ok(0) => {
                        c.readable = false;
                        c.host_done = true;
                        c.conn.host_closed();
                        if let Some(h) = c.conn.next_control() {
                            self.cursor = key;
                            return write_packet(w, &h, &[]);
                        }
                    }
                    Ok(n) => {
                        let h = c.conn.data_to_guest(crate::virtio::len_u32(n))?;
                        // Next round starts after this connection.
                        self.cursor = (key.0, key.1.wrapping_add(1));
                        return write_packet(w, &h, &self.buf[..n]);
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => c.readable = false,
                    Err(_) => {
                        c.readable = false;
                        c.host_done = true;
                        c.conn.host_closed();
                    }
                }
            }
        }
        None
    }

    /// Drops connections that are finished on both sides.
    fn reap(&mut self) {
        let done: Vec<(u32, u32)> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.conn.state() == State::Closed && !c.conn.has_control() && c.to_host.is_empty()
            })
            .map(|(k, _)| *k)
            .collect();
        for key in done {
            if let Some(c) = self.conns.remove(&key) {
                self.by_token.remove(&c.token);
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
    }

    /// Open connections (tests).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }
}

fn write_packet<B: vm_memory::bitmap::BitmapSlice>(
    w: &mut virtio_queue::Writer<'_, B>,
    h: &Header,
    payload: &[u8],
) -> Option<u32> {
    // A buffer outside guest RAM loses the packet, not the device.
    if w.write_all(&h.to_bytes()).is_err() || w.write_all(payload).is_err() {
        tracing::debug!("vsock: receive buffer outside guest memory");
    }
    u32::try_from(HDR_LEN + payload.len()).ok()
}

fn parse_connect(line: &[u8]) -> Result<u32, &'static str> {
    let line = std::str::from_utf8(line).map_err(|_| "CONNECT line is not text")?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line
        .strip_prefix("CONNECT ")
        .ok_or("expected CONNECT <port>")?;
    port.trim().parse().map_err(|_| "bad port in CONNECT")
}
