//! virtio-net: the guest's NICs. Frames move between the guest's queues
//! and a [`net::Backend`] (NAT, TAP or an internal network) on one worker
//! thread that sleeps in epoll on the queues' kicks and the backend's
//! descriptor. A frame the guest has no buffers for waits in the device
//! (the backend is not read meanwhile, so the backend's own queue gives
//! back-pressure); a frame the backend cannot take yet stays in the
//! transmit queue until its descriptor is writable.
//!
//! Offered: MAC, link status, mergeable receive buffers, and — when the
//! backend passes virtio-net headers through (TAP) — checksum and TSO
//! offloads both ways. For backends of bare frames (the NAT, internal
//! networks) the device itself completes the checksums the guest leaves
//! partial, and tells the guest that the NAT's frames need no checking
//! ([`checksum`]): the per-byte work of a slow guest's stack halves.
//!
//! The guest is untrusted: a transmit chain that is not a plausible
//! Ethernet frame (shorter than the virtio-net header plus an Ethernet
//! header, or longer than the largest frame with TSO) is dropped and
//! counted, never handed on; receive buffers it made unusable drop the
//! frame, counted.

use std::sync::atomic::{AtomicU64, Ordering};

use memory::GuestMemoryMmap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use net::{Backend, Offloads};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::persist::OwnState;
use super::rate_limit::{RateLimitConfig, RateLimiter, RateLimiterState};
use super::worker::{stop_worker, WorkerError, WorkerThread};
use super::{
    read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice, VirtioDeviceState,
    VirtioStateError,
};

/// The virtio-net header before every frame (virtio 1.x: with
/// `num_buffers`).
pub const HDR_LEN: usize = 12;
/// An Ethernet header: the shortest frame handed on.
pub const ETH_HLEN: usize = 14;
/// The largest frame: 64 KiB of TSO payload plus the Ethernet header.
pub const MAX_FRAME: usize = 65_550;

/// The features every NIC offers.
pub const FEATURES: u64 =
    1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_MRG_RXBUF;

/// Offloads offered when the backend passes virtio-net headers through:
/// the guest may send partial checksums and TSO segments, and take them.
pub const OFFLOAD_FEATURES: u64 = 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_ECN
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN;

/// Offloads the device does itself for backends of bare frames: the
/// guest's partial checksums (completed before the backend sees a
/// frame), and received frames marked valid when the backend vouches for
/// their checksums. GUEST_CSUM is offered to every such backend, vouching
/// or not, so that all of them offer the same features: a snapshot taken
/// on the NAT restores onto an internal network (the transport refuses a
/// restore whose acked features are no longer offered); where the backend
/// does not vouch, frames simply never carry DATA_VALID.
pub const CSUM_FEATURES: u64 = 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_GUEST_CSUM;

/// rx, tx.
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// Frames moved per direction before the other gets a turn.
const BUDGET: usize = 256;

pub use ::net::MacAddr;

/// The config space: MAC, the status word, max_virtqueue_pairs (1), and
/// the MTU (read by the guest only with VIRTIO_NET_F_MTU).
pub fn config_space(mac: MacAddr, link_up: bool, mtu: u16) -> [u8; 12] {
    let mut c = [0u8; 12];
    c[..6].copy_from_slice(&mac.0);
    let status = if link_up {
        u16::try_from(VIRTIO_NET_S_LINK_UP).unwrap_or(1)
    } else {
        0
    };
    c[6..8].copy_from_slice(&status.to_le_bytes());
    c[8..10].copy_from_slice(&1u16.to_le_bytes());
    c[10..12].copy_from_slice(&mtu.to_le_bytes());
    c
}

/// Counters for the VM's status and tests.
#[derive(Debug, Default)]
pub struct NetStats {
    pub tx_frames: AtomicU64,
    /// Transmit chains dropped: too short, too long, or unreadable.
    pub tx_dropped: AtomicU64,
    pub rx_frames: AtomicU64,
    /// Frames dropped because the guest's buffers could not hold them.
    pub rx_dropped: AtomicU64,
    /// Frames the backend refused with an error (not back-pressure).
    pub backend_errors: AtomicU64,
}

/// Takes the frames the guest queued, in order: `sink` gets each valid
/// one as it sits in the chain (virtio-net header, then the Ethernet
/// frame) and returns whether it was taken; a frame not taken stays in
/// the queue and ends the call. With `complete_csum` (a backend of bare
/// frames) the device completes a checksum the guest left partial, and a
/// header it cannot honour makes the frame invalid. Returns whether
/// buffers were used (the caller then interrupts the guest if asked).
pub fn take_tx_frames(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    stats: &NetStats,
    buf: &mut Vec<u8>,
    complete_csum: bool,
    sink: &mut dyn FnMut(&[u8]) -> bool,
) -> bool {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let ok = chain.reader(mem).is_ok_and(|mut r| {
            let len = r.available_bytes();
            if !(HDR_LEN + ETH_HLEN..=HDR_LEN + MAX_FRAME).contains(&len) {
                return false;
            }
            buf.resize(len, 0);
            std::io::Read::read_exact(&mut r, buf).is_ok()
                && (!complete_csum || checksum::complete_tx_checksum(buf).is_ok())
        });
        if ok {
            if !sink(buf) {
                queue.go_to_previous_position();
                break;
            }
            stats.tx_frames.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = queue.add_used(mem, head, 0) {
            tracing::warn!("virtio-net: cannot return a transmit buffer: {e}");
            break;
        }
        used = true;
    }
    used
}

/// Why a frame was not delivered.
#[derive(Debug, PartialEq, Eq)]
pub enum RxError {
    /// The guest has not posted enough buffers: keep the frame, try again
    /// when it posts more.
    NoBuffers,
    /// The frame can never fit (oversized, or buffers the guest made
    /// unusable): dropped and counted.
    Dropped,
}

/// Puts one packet — a virtio-net header (whose `num_buffers` is filled
/// in here) and the frame after it — into the guest's receive buffers:
/// with mergeable buffers across as many chains as it needs, otherwise
/// into one.
pub fn deliver_rx_frame(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mergeable: bool,
    stats: &NetStats,
    packet: &mut [u8],
) -> Result<(), RxError> {
    if packet.len() > HDR_LEN + MAX_FRAME || packet.len() < HDR_LEN {
        stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
        return Err(RxError::Dropped);
    }
    // Claim chains until the packet fits, then write and publish them all
    // (so a frame is never half-delivered).
    let mut chains = Vec::new();
    let mut room = 0usize;
    while room < packet.len() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            for _ in 0..chains.len() {
                queue.go_to_previous_position();
            }
            return Err(RxError::NoBuffers);
        };
        let head = chain.head_index();
        let writer = chain.writer(mem).ok();
        room += writer.as_ref().map_or(0, |w| w.available_bytes());
        let unusable = writer.is_none();
        chains.push((head, writer));
        if !mergeable || unusable {
            break;
        }
    }
    // The header's num_buffers: the chains come from one queue (at most
    // 32768 entries), so the count fits.
    let count = u16::try_from(chains.len());
    if room < packet.len() || count.is_err() || chains.iter().any(|(_, w)| w.is_none()) {
        // Too small a buffer without merging, or an unusable chain: the
        // buffers go back empty and the frame is dropped.
        for (head, _) in &chains {
            let _ = queue.add_used(mem, *head, 0);
        }
        stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
        return Err(RxError::Dropped);
    }
    let count = count.unwrap_or(u16::MAX);
    packet[10..12].copy_from_slice(&count.to_le_bytes());
    let mut at = 0usize;
    for (head, writer) in chains {
        let Some(mut w) = writer else { continue };
        let n = w.available_bytes().min(packet.len() - at);
        let written = std::io::Write::write_all(&mut w, &packet[at..at + n]).map_or(0, |()| n);
        at += n;
        if let Err(e) = queue.add_used(mem, head, super::len_u32(written)) {
            tracing::warn!("virtio-net: cannot return a receive buffer: {e}");
        }
    }
    stats.rx_frames.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// The queues' indices: receive, transmit.
const RX: usize = 0;
const TX: usize = 1;

/// Interrupts the guest for queue `index` if it asked to be.
pub fn notify(queue: &mut Queue, index: usize, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
    if queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_queue(index);
    }
}

/// A virtio-net NIC in front of a backend.
#[derive(Debug)]
pub struct Net {
    mac: MacAddr,
    backend: Arc<Mutex<Box<dyn Backend>>>,
    vnet_hdr: bool,
    /// The backend's frames carry correct checksums (host-made).
    checksums_valid: bool,
    mtu: Option<u16>,
    link_up: bool,
    stats: Arc<NetStats>,
    /// Limits on each direction (bytes and frames a second).
    rate_limit: RateLimitConfig,
    worker: Option<WorkerThread<NetWorker>>,
    /// A sleeping device's worker (without its queues): what it held (a
    /// frame waiting for receive buffers, its buckets' levels) survives
    /// a pause.
    sleeping: Option<NetWorker>,
    /// Receive and transmit bucket levels from a restored snapshot, for
    /// the next activation.
    restored_limiters: (Option<RateLimiterState>, Option<RateLimiterState>),
}

impl Net {
    pub fn new(mac: MacAddr, backend: Box<dyn Backend>) -> Net {
        Net {
            mac,
            vnet_hdr: backend.vnet_hdr(),
            checksums_valid: backend.checksums_valid(),
            mtu: backend.mtu(),
            backend: Arc::new(Mutex::new(backend)),
            link_up: true,
            stats: Arc::default(),
            rate_limit: RateLimitConfig::default(),
            worker: None,
            sleeping: None,
            restored_limiters: (None, None),
        }
    }

    /// Limits each direction (transmit and receive apart) to these rates.
    pub fn with_rate_limit(mut self, rate_limit: RateLimitConfig) -> Self {
        self.rate_limit = rate_limit;
        self
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }
    fn name(&self) -> &'static str {
        "net"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let mut f = FEATURES;
        if self.vnet_hdr {
            f |= OFFLOAD_FEATURES;
        } else {
            f |= CSUM_FEATURES;
        }
        if self.mtu.is_some() {
            f |= 1 << VIRTIO_NET_F_MTU;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = config_space(self.mac, self.link_up, self.mtu.unwrap_or(1500));
        read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.sleeping = None;
        self.start(a)
    }

    fn reset(&mut self) {
        self.worker = None;
        self.sleeping = None;
        self.restored_limiters = (None, None);
    }

    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, WorkerError> {
        let Some(mut worker) = stop_worker(&mut self.worker)? else {
            return Ok(None);
        };
        let queues = vec![
            std::mem::take(&mut worker.rx),
            std::mem::take(&mut worker.tx),
        ];
        self.sleeping = Some(worker);
        Ok(Some(queues))
    }

    fn wake(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.start(a)
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Net(self.state())
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioStateError> {
        let s = persist::NetState::own(state, self.name(), self.worker.is_some())?;
        self.restore(s)
    }
}

impl Net {
    /// Starts the worker on `a`'s queues, with what a sleeping worker held
    /// if there is one.
    fn start(&mut self, a: Activation) -> Result<(), ActivateError> {
        let acked = a.acked_features;
        let (mem, interrupt, [(rx, rx_evt), (tx, tx_evt)]) = a.take_queues::<2>()?;
        let has = |bit: u32| acked & (1u64 << bit) != 0;
        let offloads = Offloads {
            csum: has(VIRTIO_NET_F_GUEST_CSUM),
            tso4: has(VIRTIO_NET_F_GUEST_TSO4),
            tso6: has(VIRTIO_NET_F_GUEST_TSO6),
            ecn: has(VIRTIO_NET_F_GUEST_ECN),
        };
        let rate_limit = self.rate_limit;
        let limiter =
            |saved: Option<RateLimiterState>| -> Result<Option<RateLimiter>, ActivateError> {
                if !rate_limit.is_limited() {
                    return Ok(None);
                }
                let mut l = RateLimiter::new(rate_limit).map_err(ActivateError::Thread)?;
                if let Some(saved) = saved {
                    l.restore(&saved);
                }
                Ok(Some(l))
            };
        let (rx_limiter, tx_limiter) = match &self.sleeping {
            Some(_) => (None, None),
            None => {
                let (rx, tx) = std::mem::take(&mut self.restored_limiters);
                (limiter(rx)?, limiter(tx)?)
            }
        };
        let mut worker = self.sleeping.take().unwrap_or_else(|| NetWorker {
            mem: mem.clone(),
            interrupt: interrupt.clone(),
            rx: Queue::default(),
            tx: Queue::default(),
            mergeable: false,
            vnet_hdr: self.vnet_hdr,
            stats: self.stats.clone(),
            rx_buf: vec![0; net::MAX_PACKET],
            rx_pending: None,
            tx_buf: Vec::new(),
            tx_blocked: false,
            rx_limiter,
            tx_limiter,
            rx_charged: false,
            rx_data_valid: false,
        });
        worker.mem = mem;
        worker.interrupt = interrupt;
        worker.rx = rx;
        worker.tx = tx;
        worker.mergeable = has(VIRTIO_NET_F_MRG_RXBUF);
        worker.rx_data_valid =
            !self.vnet_hdr && self.checksums_valid && has(VIRTIO_NET_F_GUEST_CSUM);
        worker.tx_blocked = false;
        let backend = self.backend.clone();
        let thread = WorkerThread::spawn("virtio-net", move |kill| {
            let mut worker = worker;
            match backend.lock() {
                Ok(mut backend) => {
                    if let Err(e) = backend.set_offloads(offloads) {
                        tracing::warn!(
                            "virtio-net: the backend refused offloads {offloads:?}: {e}"
                        );
                    }
                    if let Err(e) = worker.run(&mut **backend, &[rx_evt, tx_evt], &kill) {
                        tracing::error!("virtio-net worker stopped: {e}");
                    }
                }
                Err(_) => tracing::error!("virtio-net: the backend's last worker panicked"),
            }
            worker
        })
        .map_err(ActivateError::Thread)?;
        self.worker = Some(thread);
        Ok(())
    }
}

const RX_EVT: u64 = 0;
const TX_EVT: u64 = 1;
const BACKEND: u64 = 2;
const KILL: u64 = 3;
const RX_TIMER: u64 = 4;
const TX_TIMER: u64 = 5;

impl std::fmt::Debug for NetWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetWorker")
            .field("rx_pending", &self.rx_pending)
            .finish_non_exhaustive()
    }
}

/// The device's thread: both queues and the backend.
struct NetWorker {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    rx: Queue,
    tx: Queue,
    mergeable: bool,
    vnet_hdr: bool,
    stats: Arc<NetStats>,
    /// A packet read from the backend (virtio-net header first).
    rx_buf: Vec<u8>,
    /// The length of the packet in `rx_buf` still waiting for buffers.
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
    /// The backend refused a frame for now: wait until it is writable.
    tx_blocked: bool,
    /// Rate limits of each direction; a frame a limiter refuses waits
    /// (in the transmit queue, or as `rx_pending`) for its timer.
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    /// The pending receive frame has been counted by `rx_limiter`.
    rx_charged: bool,
    /// Mark received frames' checksums valid (a bare-frame backend that
    /// vouches for them, and a guest that acked GUEST_CSUM).
    rx_data_valid: bool,
}

impl NetWorker {
    /// Serves the queues and the backend until `kill` fires.
    fn run(
        &mut self,
        backend: &mut dyn Backend,
        [rx_evt, tx_evt]: &[EventFd; 2],
        kill: &EventFd,
    ) -> std::io::Result<()> {
        let epoll = Epoll::new()?;
        for (fd, key) in [
            (rx_evt.as_raw_fd(), RX_EVT),
            (tx_evt.as_raw_fd(), TX_EVT),
            (backend.fd(), BACKEND),
            (kill.as_raw_fd(), KILL),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, key),
            )?;
        }
        for (limiter, key) in [(&self.rx_limiter, RX_TIMER), (&self.tx_limiter, TX_TIMER)] {
            if let Some(l) = limiter {
                epoll.ctl(
                    ControlOperation::Add,
                    l.timer_fd(),
                    EpollEvent::new(EventSet::IN, key),
                )?;
            }
        }
        let mut interest = EventSet::IN;
        let mut ready = [EpollEvent::default(); 6];
        // Whether the transmit queue still held frames after a turn: then
        // the next turn comes at once (the guest will not kick again). The
        // first turn comes at once too: frames the guest queued while the
        // device slept, or whose kick went with a snapshot's old process.
        let mut tx_more = true;
        loop {
            let timeout = if tx_more { 0 } else { -1 };
            let n = match epoll.wait(timeout, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for event in &ready[..n] {
                match event.data() {
                    RX_EVT => {
                        let _ = rx_evt.read();
                    }
                    TX_EVT => {
                        let _ = tx_evt.read();
                    }
                    KILL => return Ok(()),
                    RX_TIMER => {
                        if let Some(l) = self.rx_limiter.as_mut() {
                            l.timer_fired();
                        }
                    }
                    TX_TIMER => {
                        if let Some(l) = self.tx_limiter.as_mut() {
                            l.timer_fired();
                        }
                    }
                    _ => {}
                }
            }
            tx_more = self.process_tx(backend);
            self.process_rx(backend);
            // Read the backend only while a frame can go somewhere; wait
            // for it to be writable only while a frame waits for it.
            let mut want = EventSet::empty();
            if self.rx_pending.is_none() {
                want |= EventSet::IN;
            }
            if self.tx_blocked {
                want |= EventSet::OUT;
            }
            if want != interest {
                epoll.ctl(
                    ControlOperation::Modify,
                    backend.fd(),
                    EpollEvent::new(want, BACKEND),
                )?;
                interest = want;
            }
        }
    }

    /// Moves the guest's frames to the backend; true when the turn's
    /// budget ran out with frames left.
    fn process_tx(&mut self, backend: &mut dyn Backend) -> bool {
        let vnet = self.vnet_hdr;
        let stats = self.stats.clone();
        let mut blocked = false;
        let mut throttled = false;
        let mut taken = 0usize;
        let limiter = &mut self.tx_limiter;
        let used = take_tx_frames(
            &mut self.tx,
            &self.mem,
            &self.stats,
            &mut self.tx_buf,
            !vnet,
            &mut |packet| {
                if taken >= BUDGET {
                    return false;
                }
                if let Some(l) = limiter.as_mut() {
                    let bytes = (packet.len() - HDR_LEN) as u64;
                    if !l.consume(bytes, 1) {
                        throttled = true;
                        return false;
                    }
                }
                let data = if vnet { packet } else { &packet[HDR_LEN..] };
                match backend.send(data) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        blocked = true;
                        return false;
                    }
                    Err(e) => {
                        stats.backend_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("virtio-net: the backend lost a frame: {e}");
                    }
                }
                taken += 1;
                true
            },
        );
        self.tx_blocked = blocked;
        if used {
            notify(&mut self.tx, TX, &self.mem, &self.interrupt);
        }
        taken >= BUDGET && !blocked && !throttled
    }

    fn process_rx(&mut self, backend: &mut dyn Backend) {
        let mut delivered = false;
        for _ in 0..BUDGET {
            let len = match self.rx_pending {
                Some(len) => len,
                None => {
                    let at = if self.vnet_hdr { 0 } else { HDR_LEN };
                    match backend.recv(&mut self.rx_buf[at..]) {
                        Ok(n) if at + n < HDR_LEN + ETH_HLEN => continue,
                        Ok(n) => {
                            if !self.vnet_hdr {
                                self.rx_buf[..HDR_LEN].fill(0);
                                if self.rx_data_valid {
                                    self.rx_buf[0] = checksum::DATA_VALID;
                                }
                            }
                            at + n
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            if e.kind() != std::io::ErrorKind::WouldBlock {
                                tracing::debug!("virtio-net: backend read failed: {e}");
                            }
                            break;
                        }
                    }
                }
            };
            if let (Some(l), false) = (self.rx_limiter.as_mut(), self.rx_charged) {
                if !l.consume((len - HDR_LEN) as u64, 1) {
                    // Held (and the backend not read) until the timer.
                    self.rx_pending = Some(len);
                    break;
                }
                self.rx_charged = true;
            }
            match deliver_rx_frame(
                &mut self.rx,
                &self.mem,
                self.mergeable,
                &self.stats,
                &mut self.rx_buf[..len],
            ) {
                Ok(()) => {
                    self.rx_pending = None;
                    self.rx_charged = false;
                    delivered = true;
                }
                Err(RxError::NoBuffers) => {
                    self.rx_pending = Some(len);
                    break;
                }
                Err(RxError::Dropped) => {
                    self.rx_pending = None;
                    self.rx_charged = false;
                }
            }
        }
        if delivered {
            notify(&mut self.rx, RX, &self.mem, &self.interrupt);
        }
    }
}

pub mod checksum;
pub mod persist;

#[cfg(test)]
// Test lengths, indices and byte patterns are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests;
