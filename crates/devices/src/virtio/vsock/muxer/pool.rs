//! Connections to chosen guest ports (the agent's) opened ahead of time,
//! so that a host program's `CONNECT` to such a port is answered at once
//! instead of after a round trip through the guest kernel (on nested
//! hosts its half of a handshake costs ~50 ms).
//!
//! To the guest a pooled connection is an ordinary host connection that
//! its listener accepted and on which the host has sent nothing yet. The
//! next host program asking for that port gets it (`OK` at once if the
//! guest has accepted it, otherwise as soon as it does); a new one is
//! opened once the lent connection is done, or after [`REFILL_DELAY`]
//! (so the refill's guest work does not compete with the request it
//! follows). When none is open, a host program connects afresh, as
//! without a pool.
//!
//! - Refused (nothing listens yet) or closed by the guest while idle: the
//!   connection is dropped and the next attempt waits, 50 ms doubling up
//!   to [`MAX_BACKOFF`]; lending one resets the wait. A host program is
//!   never given a connection the muxer knows is gone: the guest's queued
//!   packets are taken first.
//! - A guest that sends data on, or shuts down, a connection nobody was
//!   lent is reset (the listeners pooled for speak only after the host).
//! - Nothing is opened while a restored device's transport reset is in
//!   progress, nor while the device sleeps (its worker does not run).
//! - Bounded: at most [`MAX_PORTS`] ports, one connection each.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::Muxer;
use crate::virtio::vsock::connection::{Connection, Reply, State};
use crate::virtio::vsock::packet::Header;

/// Ports pooled at most.
pub const MAX_PORTS: usize = 4;
/// The first wait after a pooled connection failed.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between attempts (a guest without the listener gets
/// a connection request this often).
pub const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// How long a lent connection may hold up the next one.
pub const REFILL_DELAY: Duration = Duration::from_secs(1);

type Key = (u32, u32);

#[derive(Debug, Default)]
pub(super) struct Pool {
    ports: Vec<PortPool>,
}

#[derive(Debug)]
struct PortPool {
    port: u32,
    /// The pooled connection (handshaking or established).
    member: Option<Key>,
    /// The connection last lent, and when, while it may hold up the next.
    lent: Option<(Key, Instant)>,
    /// The current wait after failures (zero: none).
    backoff: Duration,
    /// No attempt before this.
    not_before: Option<Instant>,
}

impl PortPool {
    fn failed(&mut self, now: Instant) {
        self.backoff = if self.backoff.is_zero() {
            FIRST_BACKOFF
        } else {
            (self.backoff * 2).min(MAX_BACKOFF)
        };
        self.not_before = Some(now + self.backoff);
    }

    /// When this port needs attention next, if it waits for a time.
    fn deadline(&self) -> Option<Instant> {
        if self.member.is_some() {
            return None;
        }
        match self.lent {
            Some((_, since)) => Some(since + REFILL_DELAY),
            None => self.not_before,
        }
    }
}

impl Muxer {
    /// Keeps a connection to each of `ports` open ahead of time (the first
    /// [`MAX_PORTS`] distinct ones).
    pub fn set_pool(&mut self, ports: &[u32]) {
        let mut list: Vec<PortPool> = Vec::new();
        for &port in ports {
            if list.len() < MAX_PORTS && !list.iter().any(|p| p.port == port) {
                list.push(PortPool {
                    port,
                    member: None,
                    lent: None,
                    backoff: Duration::ZERO,
                    not_before: None,
                });
            }
        }
        self.pool.ports = list;
    }

    /// Pooled connections ready or handshaking (tests).
    pub fn pooled(&self) -> usize {
        self.pool
            .ports
            .iter()
            .filter(|p| p.member.is_some())
            .count()
    }

    /// The event loop's wait (ms, -1: none) before the pool needs
    /// attention (public for tests).
    pub fn pool_timeout_ms(&self) -> i32 {
        let Some(at) = self.pool.ports.iter().filter_map(PortPool::deadline).min() else {
            return -1;
        };
        let ms = at.saturating_duration_since(Instant::now()).as_millis() + 1;
        i32::try_from(ms).unwrap_or(i32::MAX)
    }

    /// Notes pooled connections that are gone and opens those missing
    /// (after every round of events).
    pub(super) fn refill_pool(&mut self) {
        if self.pool.ports.is_empty() || self.reset.resetting() {
            return;
        }
        let now = Instant::now();
        for i in 0..self.pool.ports.len() {
            let conns = &self.conns;
            let p = &mut self.pool.ports[i];
            if let Some(key) = p.member {
                let alive = conns
                    .get(&key)
                    .is_some_and(|c| c.pooled && c.conn.state() != State::Closed);
                if !alive {
                    p.member = None;
                    p.failed(now);
                }
            }
            if let Some((key, since)) = p.lent {
                let busy = conns.get(&key).is_some_and(|c| {
                    matches!(c.conn.state(), State::Connecting | State::Established)
                });
                if !busy || now >= since + REFILL_DELAY {
                    p.lent = None;
                }
            }
            let due =
                p.member.is_none() && p.lent.is_none() && p.not_before.is_none_or(|t| now >= t);
            if !due {
                continue;
            }
            if self.conns.len() >= self.max_connections {
                // No room: try again later, not on every round.
                p.failed(now);
                continue;
            }
            let port = p.port;
            match self.open_pooled(port) {
                Some(key) => self.pool.ports[i].member = Some(key),
                None => self.pool.ports[i].failed(now),
            }
        }
    }

    /// Asks the guest for a connection to `port` that no host program has
    /// yet. Its host socket is a placeholder (never read or written, not
    /// watched) until one is lent it.
    fn open_pooled(&mut self, port: u32) -> Option<Key> {
        let (placeholder, _) = UnixStream::pair()
            .map_err(|e| tracing::warn!("vsock: cannot pool a connection: {e}"))
            .ok()?;
        let local = self.free_local_port(port);
        let conn = Connection::host_initiated(self.guest_cid, local, port);
        let token = self.next_token;
        self.next_token += 1;
        self.add(conn, placeholder, token, false);
        let key = (local, port);
        if let Some(c) = self.conns.get_mut(&key) {
            c.pooled = true;
        }
        Some(key)
    }

    /// Lends `port`'s pooled connection to the host program on `stream`
    /// (`token` is its epoll registration); gives the stream back when
    /// there is none.
    pub(super) fn take_pooled(
        &mut self,
        token: u64,
        stream: UnixStream,
        port: u32,
    ) -> Option<UnixStream> {
        let Some(i) = self.pool.ports.iter().position(|p| p.port == port) else {
            return Some(stream);
        };
        if self.pool.ports[i].member.is_none() {
            return Some(stream);
        }
        // A reset of the pooled connection may be queued: take it first.
        self.process_tx();
        let usable = |c: &super::HostConn| {
            c.pooled && matches!(c.conn.state(), State::Connecting | State::Established)
        };
        let Some(key) = self.pool.ports[i]
            .member
            .filter(|k| self.conns.get(k).is_some_and(usable))
        else {
            return Some(stream);
        };
        let p = &mut self.pool.ports[i];
        p.member = None;
        p.lent = Some((key, Instant::now()));
        p.backoff = Duration::ZERO;
        p.not_before = None;
        let Some(c) = self.conns.get_mut(&key) else {
            return Some(stream);
        };
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            stream.as_raw_fd(),
            EpollEvent::new(
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
                token,
            ),
        );
        self.by_token.remove(&c.token);
        self.by_token.insert(token, key);
        c.token = token;
        c.stream = stream;
        c.pooled = false;
        c.readable = true;
        if c.conn.state() == State::Established {
            let line = format!("OK {}\n", key.0);
            c.to_host.extend(line.as_bytes());
            c.line_bytes = c
                .line_bytes
                .saturating_add(crate::virtio::len_u32(line.len()));
            c.pump_to_host();
        }
        // Handshaking: the guest's answer sends the line, as for any.
        None
    }

    /// A guest packet on a pooled connection nobody was lent yet.
    pub(super) fn pooled_packet(&mut self, key: Key, h: &Header, payload: &[u8]) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let errors = c.conn.protocol_errors;
        match c.conn.from_guest(h, payload) {
            Reply::Nothing | Reply::Connected | Reply::Closed => {}
            // Nobody to hand it to: the guest spoke first.
            Reply::Data(_) | Reply::PeerShutdown(_) => c.conn.abort(),
        }
        if c.conn.protocol_errors > errors {
            self.stats.protocol_resets.fetch_add(1, Ordering::Relaxed);
        }
    }
}
