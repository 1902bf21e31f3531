//! virtio-net's data path (issue 4, in progress): frames out of the
//! guest's transmit queue and into its receive queue, with mergeable
//! receive buffers, and the device's config space (MAC, link status).
//! The device around it (queues' worker, backends: NAT, TAP, internal
//! switch) is built on these next.
//!
//! The guest is untrusted: a transmit chain that is not a plausible
//! Ethernet frame (shorter than the virtio-net header plus an Ethernet
//! header, or longer than the largest frame with TSO) is dropped and
//! counted, never handed on.

use std::sync::atomic::{AtomicU64, Ordering};

use memory::GuestMemoryMmap;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::Interrupt;

/// The virtio-net header before every frame (virtio 1.x: with
/// `num_buffers`).
pub const HDR_LEN: usize = 12;
/// An Ethernet header: the shortest frame handed on.
pub const ETH_HLEN: usize = 14;
/// The largest frame: 64 KiB of TSO payload plus the Ethernet header.
pub const MAX_FRAME: usize = 65_550;

/// The features the data path supports (offloads come with backends).
pub const FEATURES: u64 =
    1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_MRG_RXBUF;

/// A MAC address, `52:54:00:xx:xx:xx` by default (QEMU's locally
/// administered prefix, so both tools' VMs look familiar on a bridge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A stable address for NIC `index` of the VM named `name`.
    pub fn for_vm(name: &str, index: u32) -> MacAddr {
        // FNV-1a: stable across runs and builds (std's hasher is not).
        let mut h: u32 = 0x811c_9dc5;
        for b in name.bytes().chain(index.to_le_bytes()) {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        let [a, b, c, _] = h.to_be_bytes();
        MacAddr([0x52, 0x54, 0x00, a, b, c])
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a MAC address like 52:54:00:12:34:56");
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if mac[0] & 1 != 0 {
            return Err(format!(
                "{s} is a multicast address; a NIC needs a unicast one"
            ));
        }
        Ok(MacAddr(mac))
    }
}

/// The config space: MAC, then the status word.
pub fn config_space(mac: MacAddr, link_up: bool) -> [u8; 8] {
    let mut c = [0u8; 8];
    c[..6].copy_from_slice(&mac.0);
    let status = if link_up {
        VIRTIO_NET_S_LINK_UP as u16
    } else {
        0
    };
    c[6..8].copy_from_slice(&status.to_le_bytes());
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
}

/// Takes every frame the guest queued: `sink` gets each valid frame's
/// virtio-net header and the Ethernet frame after it. Returns whether
/// buffers were used (the caller then interrupts the guest if asked).
pub fn take_tx_frames(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    stats: &NetStats,
    buf: &mut Vec<u8>,
    sink: &mut dyn FnMut(&[u8; HDR_LEN], &[u8]),
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
            let mut hdr = [0u8; HDR_LEN];
            hdr.copy_from_slice(&buf[..HDR_LEN]);
            stats.tx_frames.fetch_add(1, Ordering::Relaxed);
            sink(&hdr, &buf[HDR_LEN..]);
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

/// Puts one frame (after a virtio-net header `hdr`, whose `num_buffers`
/// is filled in here) into the guest's receive buffers: with mergeable
/// buffers across as many chains as it needs, otherwise into one.
pub fn deliver_rx_frame(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mergeable: bool,
    stats: &NetStats,
    hdr: &[u8; HDR_LEN],
    frame: &[u8],
) -> Result<(), RxError> {
    if frame.len() > MAX_FRAME {
        stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
        return Err(RxError::Dropped);
    }
    let mut packet = Vec::with_capacity(HDR_LEN + frame.len());
    packet.extend_from_slice(hdr);
    packet.extend_from_slice(frame);
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
    if room < packet.len() || chains.iter().any(|(_, w)| w.is_none()) {
        // Too small a buffer without merging, or an unusable chain: the
        // buffers go back empty and the frame is dropped.
        for (head, _) in &chains {
            let _ = queue.add_used(mem, *head, 0);
        }
        stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
        return Err(RxError::Dropped);
    }
    let count = chains.len() as u16;
    packet[10..12].copy_from_slice(&count.to_le_bytes());
    let mut at = 0usize;
    for (head, writer) in chains {
        let Some(mut w) = writer else { continue };
        let n = w.available_bytes().min(packet.len() - at);
        let written = std::io::Write::write_all(&mut w, &packet[at..at + n]).map_or(0, |()| n);
        at += n;
        if let Err(e) = queue.add_used(mem, head, written as u32) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::desc as d;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn macs_parse_print_and_are_stable_per_vm() {
        let m: MacAddr = "52:54:00:ab:cd:ef".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:00",
            "52-54-00-ab-cd-ef",
            "zz:54:00:ab:cd:ef",
            "01:00:5e:00:00:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let a = MacAddr::for_vm("web", 0);
        assert_eq!(a, MacAddr::for_vm("web", 0));
        assert_ne!(a, MacAddr::for_vm("web", 1));
        assert_ne!(a, MacAddr::for_vm("db", 0));
        assert_eq!(&a.0[..3], &[0x52, 0x54, 0x00]);
        let c = config_space(a, true);
        assert_eq!(&c[..6], &a.0);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1);
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
                d(0x10000, HDR_LEN as u32, VRING_DESC_F_NEXT as u16, 1),
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
        assert!(take_tx_frames(&mut q, &m, &stats, &mut buf, &mut |_, f| {
            got.push(f.to_vec())
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
        let w = VRING_DESC_F_WRITE as u16;
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
        let hdr = [0u8; HDR_LEN];
        assert_eq!(
            deliver_rx_frame(&mut q, &m, true, &stats, &hdr, &frame),
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
            deliver_rx_frame(&mut q, &m, true, &stats, &hdr, &frame),
            Err(RxError::NoBuffers)
        );
        assert_eq!(mock.used().idx().load(), 3);
        // Oversized: dropped.
        let huge = vec![0u8; MAX_FRAME + 1];
        assert_eq!(
            deliver_rx_frame(&mut q, &m, true, &stats, &hdr, &huge),
            Err(RxError::Dropped)
        );
        assert_eq!(stats.rx_dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn without_merging_a_small_buffer_drops_the_frame() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        let w = VRING_DESC_F_WRITE as u16;
        mock.build_multiple_desc_chains(&[d(0x10000, 100, w, 0), d(0x20000, 4096, w, 0)])
            .unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let stats = NetStats::default();
        let frame = vec![7u8; 500];
        let hdr = [0u8; HDR_LEN];
        assert_eq!(
            deliver_rx_frame(&mut q, &m, false, &stats, &hdr, &frame),
            Err(RxError::Dropped)
        );
        assert_eq!(
            deliver_rx_frame(&mut q, &m, false, &stats, &hdr, &frame),
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
        let _ = deliver_rx_frame(&mut q, &m, true, &stats, &hdr, &frame);
    }
}
