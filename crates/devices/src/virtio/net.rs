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
//! offloads both ways.
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

use super::worker::WorkerThread;
use super::{read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice};

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
/// the queue and ends the call. Returns whether buffers were used (the
/// caller then interrupts the guest if asked).
pub fn take_tx_frames(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    stats: &NetStats,
    buf: &mut Vec<u8>,
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

/// Interrupts the guest for `queue` if it asked to be.
pub fn notify(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
    if queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used();
    }
}

/// A virtio-net NIC in front of a backend.
#[derive(Debug)]
pub struct Net {
    mac: MacAddr,
    backend: Arc<Mutex<Box<dyn Backend>>>,
    vnet_hdr: bool,
    mtu: Option<u16>,
    stats: Arc<NetStats>,
    worker: Option<WorkerThread>,
}

impl Net {
    pub fn new(mac: MacAddr, backend: Box<dyn Backend>) -> Net {
        Net {
            mac,
            vnet_hdr: backend.vnet_hdr(),
            mtu: backend.mtu(),
            backend: Arc::new(Mutex::new(backend)),
            stats: Arc::default(),
            worker: None,
        }
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
        }
        if self.mtu.is_some() {
            f |= 1 << VIRTIO_NET_F_MTU;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = config_space(self.mac, true, self.mtu.unwrap_or(1500));
        read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let acked = a.acked_features;
        let (mem, interrupt, [(rx, rx_evt), (tx, tx_evt)]) = a.take_queues::<2>()?;
        let has = |bit: u32| acked & (1u64 << bit) != 0;
        let offloads = Offloads {
            csum: has(VIRTIO_NET_F_GUEST_CSUM),
            tso4: has(VIRTIO_NET_F_GUEST_TSO4),
            tso6: has(VIRTIO_NET_F_GUEST_TSO6),
            ecn: has(VIRTIO_NET_F_GUEST_ECN),
        };
        let worker = NetWorker {
            mem,
            interrupt,
            rx,
            tx,
            mergeable: has(VIRTIO_NET_F_MRG_RXBUF),
            vnet_hdr: self.vnet_hdr,
            stats: self.stats.clone(),
            rx_buf: vec![0; net::MAX_PACKET],
            rx_pending: None,
            tx_buf: Vec::new(),
            tx_blocked: false,
        };
        let backend = self.backend.clone();
        let thread = WorkerThread::spawn("virtio-net", move |kill| {
            let mut backend = backend
                .lock()
                .map_err(|_| std::io::Error::other("the backend's last worker panicked"))?;
            if let Err(e) = backend.set_offloads(offloads) {
                tracing::warn!("virtio-net: the backend refused offloads {offloads:?}: {e}");
            }
            worker.run(&mut **backend, [rx_evt, tx_evt], kill)
        })
        .map_err(ActivateError::Thread)?;
        self.worker = Some(thread);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

const RX_EVT: u64 = 0;
const TX_EVT: u64 = 1;
const BACKEND: u64 = 2;
const KILL: u64 = 3;

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
}

impl NetWorker {
    fn run(
        mut self,
        backend: &mut dyn Backend,
        [rx_evt, tx_evt]: [EventFd; 2],
        kill: EventFd,
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
        let mut interest = EventSet::IN;
        let mut ready = [EpollEvent::default(); 4];
        // Whether the transmit queue still held frames after a turn: then
        // the next turn comes at once (the guest will not kick again).
        let mut tx_more = false;
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
        let mut taken = 0usize;
        let used = take_tx_frames(
            &mut self.tx,
            &self.mem,
            &self.stats,
            &mut self.tx_buf,
            &mut |packet| {
                if taken >= BUDGET {
                    return false;
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
            notify(&mut self.tx, &self.mem, &self.interrupt);
        }
        taken >= BUDGET && !blocked
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
            match deliver_rx_frame(
                &mut self.rx,
                &self.mem,
                self.mergeable,
                &self.stats,
                &mut self.rx_buf[..len],
            ) {
                Ok(()) => {
                    self.rx_pending = None;
                    delivered = true;
                }
                Err(RxError::NoBuffers) => {
                    self.rx_pending = Some(len);
                    break;
                }
                Err(RxError::Dropped) => self.rx_pending = None,
            }
        }
        if delivered {
            notify(&mut self.rx, &self.mem, &self.interrupt);
        }
    }
}

#[cfg(test)]
// Test lengths, indices and byte patterns are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::test_util::desc as d;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn config_space_has_the_mac_and_link_status() {
        let a = MacAddr::for_vm("web", 0);
        let c = config_space(a, true, 65_520);
        assert_eq!(&c[..6], &a.0);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 65_520);
        let down = config_space(a, false, 1500);
        assert_eq!(u16::from_le_bytes([down[6], down[7]]), 0);
    }

    #[test]
    fn transmitted_frames_lose_their_header_and_bad_ones_are_counted() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        // A frame split over two descriptors, one too short, one too long.
        let frame: Vec<u8> = (0..60u8).collect();
        m.write_slice(&[0u8; HDR_LEN], GuestAddress(0x10000))
            .unwrap();
        m.write_slice(&frame, GuestAddress(0x20000)).unwrap();
        mock.add_desc_chains(
            &[
                d(0x10000, HDR_LEN as u32, crate::test_util::F_NEXT, 1),
                d(0x20000, 60, 0, 0),
                d(0x30000, (HDR_LEN + 10) as u32, 0, 0),
                d(0x40000, (HDR_LEN + MAX_FRAME + 1) as u32, 0, 0),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let stats = NetStats::default();
        let mut got = Vec::new();
        let mut buf = Vec::new();
        assert!(take_tx_frames(&mut q, &m, &stats, &mut buf, &mut |p| {
            got.push(p[HDR_LEN..].to_vec());
            true
        }));
        assert_eq!(got, vec![frame]);
        assert_eq!(stats.tx_frames.load(Ordering::Relaxed), 1);
        assert_eq!(stats.tx_dropped.load(Ordering::Relaxed), 2);
        assert_eq!(mock.used().idx().load(), 3, "every chain is returned");
    }

    #[test]
    fn received_frames_merge_buffers_or_wait_for_them() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        let w = crate::test_util::F_WRITE;
        // Three 1 KiB buffers: a 2500-byte frame needs all three.
        mock.build_multiple_desc_chains(&[
            d(0x10000, 1024, w, 0),
            d(0x20000, 1024, w, 0),
            d(0x30000, 1024, w, 0),
        ])
        .unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let stats = NetStats::default();
        let frame: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let mut packet = [&[0u8; HDR_LEN][..], &frame].concat();
        assert_eq!(
            deliver_rx_frame(&mut q, &m, true, &stats, &mut packet),
            Ok(())
        );
        let mut first = [0u8; 1024];
        m.read_slice(&mut first, GuestAddress(0x10000)).unwrap();
        assert_eq!(u16::from_le_bytes([first[10], first[11]]), 3, "num_buffers");
        assert_eq!(&first[HDR_LEN..], &frame[..1024 - HDR_LEN]);
        let mut third = vec![0u8; 2500 + HDR_LEN - 2048];
        m.read_slice(&mut third, GuestAddress(0x30000)).unwrap();
        assert_eq!(&third[..], &frame[2048 - HDR_LEN..]);
        let lens: Vec<u32> = (0..3)
            .map(|i| mock.used().ring().ref_at(i).unwrap().load().len())
            .collect();
        assert_eq!(lens, [1024, 1024, (2500 + HDR_LEN - 2048) as u32]);
        // No buffers left: the frame waits, nothing is consumed.
        assert_eq!(
            deliver_rx_frame(&mut q, &m, true, &stats, &mut packet),
            Err(RxError::NoBuffers)
        );
        assert_eq!(mock.used().idx().load(), 3);
        // Oversized: dropped.
        let mut huge = vec![0u8; HDR_LEN + MAX_FRAME + 1];
        assert_eq!(
            deliver_rx_frame(&mut q, &m, true, &stats, &mut huge),
            Err(RxError::Dropped)
        );
        assert_eq!(stats.rx_dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn without_merging_a_small_buffer_drops_the_frame() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        let w = crate::test_util::F_WRITE;
        mock.build_multiple_desc_chains(&[d(0x10000, 100, w, 0), d(0x20000, 4096, w, 0)])
            .unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let stats = NetStats::default();
        let mut packet = [&[0u8; HDR_LEN][..], &[7u8; 500]].concat();
        assert_eq!(
            deliver_rx_frame(&mut q, &m, false, &stats, &mut packet),
            Err(RxError::Dropped)
        );
        assert_eq!(
            deliver_rx_frame(&mut q, &m, false, &stats, &mut packet),
            Ok(())
        );
        assert_eq!(
            mock.used().ring().ref_at(1).unwrap().load().len(),
            (500 + HDR_LEN) as u32
        );
        // A buffer outside guest RAM is not a panic.
        let mock = MockSplitQueue::new(&m, 16);
        mock.build_desc_chain(&[d(0xffff_0000_0000, 4096, w, 0)])
            .unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let _ = deliver_rx_frame(&mut q, &m, true, &stats, &mut packet);
    }

    /// A backend in memory: frames to hand the guest, frames the guest
    /// sent, and a switch that makes it refuse frames for now.
    #[derive(Debug, Default)]
    struct FakeBackend {
        incoming: std::collections::VecDeque<Vec<u8>>,
        sent: Vec<Vec<u8>>,
        full: bool,
        vnet: bool,
    }

    impl Backend for FakeBackend {
        fn fd(&self) -> std::os::fd::RawFd {
            -1
        }
        fn vnet_hdr(&self) -> bool {
            self.vnet
        }
        fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
            if self.full {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            self.sent.push(frame.to_vec());
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let f = self
                .incoming
                .pop_front()
                .ok_or(std::io::ErrorKind::WouldBlock)?;
            buf[..f.len()].copy_from_slice(&f);
            Ok(f.len())
        }
    }

    fn worker(m: &GuestMemoryMmap, rx: Queue, tx: Queue, vnet: bool) -> NetWorker {
        NetWorker {
            mem: m.clone(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            rx,
            tx,
            mergeable: false,
            vnet_hdr: vnet,
            stats: Arc::default(),
            rx_buf: vec![0; net::MAX_PACKET],
            rx_pending: None,
            tx_buf: Vec::new(),
            tx_blocked: false,
        }
    }

    #[test]
    fn a_busy_backend_leaves_frames_queued_and_frames_wait_for_buffers() {
        let m = mem();
        let rxq = MockSplitQueue::new(&m, 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(0x200000), 16);
        let w = crate::test_util::F_WRITE;
        for i in 0..3u16 {
            let addr = 0x10000 + u64::from(i) * 0x1000;
            m.write_slice(&[i as u8 + 1; HDR_LEN + 60], GuestAddress(addr))
                .unwrap();
            txq.add_desc_chains(&[d(addr, (HDR_LEN + 60) as u32, 0, 0)], i)
                .unwrap();
        }
        rxq.add_desc_chains(&[d(0x80000, 2048, w, 0)], 0).unwrap();
        let mut nw = worker(
            &m,
            rxq.create_queue().unwrap(),
            txq.create_queue().unwrap(),
            false,
        );
        let mut be = FakeBackend {
            full: true,
            ..FakeBackend::default()
        };
        // Refused: the frame stays in the queue, the device waits.
        nw.process_tx(&mut be);
        assert!(nw.tx_blocked && be.sent.is_empty());
        assert_eq!(txq.used().idx().load(), 0);
        be.full = false;
        nw.process_tx(&mut be);
        assert!(!nw.tx_blocked);
        assert_eq!(be.sent.len(), 3, "all three, in order, without header");
        assert!(be
            .sent
            .iter()
            .enumerate()
            .all(|(i, f)| f == &vec![i as u8 + 1; 60]));

        // Two frames and a runt from the backend, one buffer: the first
        // goes in, the second waits for the next buffer, the runt is
        // skipped.
        be.incoming.push_back(vec![0xaa; 100]);
        be.incoming.push_back(vec![1, 2, 3]);
        be.incoming.push_back(vec![0xbb; 200]);
        nw.process_rx(&mut be);
        assert_eq!(nw.rx_pending, Some(HDR_LEN + 200));
        let mut got = vec![0u8; HDR_LEN + 100];
        m.read_slice(&mut got, GuestAddress(0x80000)).unwrap();
        assert_eq!(&got[..HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&got[HDR_LEN..], &[0xaa; 100][..]);
        rxq.add_desc_chains(&[d(0x90000, 2048, w, 0)], 1).unwrap();
        nw.process_rx(&mut be);
        assert_eq!(nw.rx_pending, None);
        let mut got = vec![0u8; 200];
        m.read_slice(&mut got, GuestAddress(0x90000 + HDR_LEN as u64))
            .unwrap();
        assert_eq!(got, vec![0xbb; 200]);
        assert_eq!(nw.stats.rx_frames.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_backend_with_headers_gets_and_gives_them_whole() {
        let m = mem();
        let rxq = MockSplitQueue::new(&m, 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(0x200000), 16);
        let mut packet = vec![0u8; HDR_LEN + 60];
        packet[0] = 1; // NEEDS_CSUM
        packet[HDR_LEN..].fill(9);
        m.write_slice(&packet, GuestAddress(0x10000)).unwrap();
        txq.add_desc_chains(&[d(0x10000, packet.len() as u32, 0, 0)], 0)
            .unwrap();
        rxq.add_desc_chains(&[d(0x80000, 4096, crate::test_util::F_WRITE, 0)], 0)
            .unwrap();
        let mut nw = worker(
            &m,
            rxq.create_queue().unwrap(),
            txq.create_queue().unwrap(),
            true,
        );
        let mut be = FakeBackend {
            vnet: true,
            ..FakeBackend::default()
        };
        nw.process_tx(&mut be);
        assert_eq!(be.sent, vec![packet.clone()]);
        let mut incoming = vec![0u8; HDR_LEN + 100];
        incoming[0] = 2; // DATA_VALID
        be.incoming.push_back(incoming.clone());
        nw.process_rx(&mut be);
        let mut got = vec![0u8; incoming.len()];
        m.read_slice(&mut got, GuestAddress(0x80000)).unwrap();
        incoming[10] = 1; // num_buffers
        assert_eq!(got, incoming);
    }

    #[test]
    fn a_long_transmit_queue_is_served_in_turns_without_a_new_kick() {
        let m = mem();
        let rxq = MockSplitQueue::new(&m, 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(0x200000), 512);
        m.write_slice(&[0u8; HDR_LEN + 60], GuestAddress(0x10000))
            .unwrap();
        for i in 0..300u16 {
            txq.add_desc_chains(&[d(0x10000, (HDR_LEN + 60) as u32, 0, 0)], i)
                .unwrap();
        }
        let mut nw = worker(
            &m,
            rxq.create_queue().unwrap(),
            txq.create_queue().unwrap(),
            false,
        );
        let mut be = FakeBackend::default();
        assert!(nw.process_tx(&mut be), "more to do after one turn");
        assert_eq!(be.sent.len(), BUDGET);
        assert!(!nw.process_tx(&mut be));
        assert_eq!(be.sent.len(), 300);
    }
}
