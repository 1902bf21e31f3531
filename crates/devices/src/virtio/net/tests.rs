//! virtio-net against mock queues and an in-memory backend.
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
    assert!(take_tx_frames(
        &mut q,
        &m,
        &stats,
        &mut buf,
        true,
        &mut |p| {
            got.push(p[HDR_LEN..].to_vec());
            true
        }
    ));
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
    valid: bool,
}

impl Backend for FakeBackend {
    fn fd(&self) -> std::os::fd::RawFd {
        -1
    }
    fn vnet_hdr(&self) -> bool {
        self.vnet
    }
    fn checksums_valid(&self) -> bool {
        self.valid
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
        rx_limiter: None,
        tx_limiter: None,
        rx_charged: false,
        rx_data_valid: false,
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
        // A zero header (no offloads asked), then the frame.
        m.write_slice(&[0; HDR_LEN], GuestAddress(addr)).unwrap();
        m.write_slice(&[i as u8 + 1; 60], GuestAddress(addr + HDR_LEN as u64))
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

/// Waits (at most 5 s) for a limiter's timer and tells it.
fn wait_for_timer(l: &mut RateLimiter) {
    let mut pfd = libc::pollfd {
        fd: l.timer_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, valid for the call.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
    l.timer_fired();
}

/// Both directions obey their limiter: one frame a bucket; the others
/// wait (in the transmit queue, or held from the backend) for the timer.
#[test]
fn rate_limited_frames_wait_for_the_timer_both_ways() {
    use crate::virtio::rate_limit::{BucketConfig, RateLimitConfig};
    let limits = RateLimitConfig {
        bytes: None,
        ops: Some(BucketConfig {
            size: 1,
            refill_ms: 10,
            one_time_burst: 0,
        }),
    };
    let m = mem();
    let rxq = MockSplitQueue::new(&m, 16);
    let txq = MockSplitQueue::create(&m, GuestAddress(0x200000), 16);
    m.write_slice(&[7u8; HDR_LEN + 60], GuestAddress(0x10000))
        .unwrap();
    m.write_slice(&[0; HDR_LEN], GuestAddress(0x10000)).unwrap();
    for i in 0..3u16 {
        txq.add_desc_chains(&[d(0x10000, (HDR_LEN + 60) as u32, 0, 0)], i)
            .unwrap();
    }
    for i in 0..3u16 {
        let at = 0x80000 + u64::from(i) * 0x1000;
        rxq.add_desc_chains(&[d(at, 2048, crate::test_util::F_WRITE, 0)], i)
            .unwrap();
    }
    let mut nw = worker(
        &m,
        rxq.create_queue().unwrap(),
        txq.create_queue().unwrap(),
        false,
    );
    nw.tx_limiter = Some(RateLimiter::new(limits).unwrap());
    nw.rx_limiter = Some(RateLimiter::new(limits).unwrap());
    let mut be = FakeBackend::default();
    for _ in 0..3 {
        be.incoming.push_back(vec![0xcc; 100]);
    }
    for n in 1..=3 {
        // Throttled: no "more to do" (the timer will say when).
        assert!(!nw.process_tx(&mut be));
        nw.process_rx(&mut be);
        assert_eq!(be.sent.len(), n);
        assert_eq!(txq.used().idx().load(), n as u16);
        assert_eq!(nw.stats.rx_frames.load(Ordering::Relaxed), n as u64);
        if n < 3 {
            assert!(nw.tx_limiter.as_ref().unwrap().is_blocked());
            // The next frame is held, not lost, and the backend not read.
            assert_eq!(nw.rx_pending, Some(HDR_LEN + 100));
            assert_eq!(be.incoming.len(), 3 - n - 1);
            // A kick while throttled moves nothing.
            nw.process_tx(&mut be);
            assert_eq!(be.sent.len(), n);
            wait_for_timer(nw.tx_limiter.as_mut().unwrap());
            wait_for_timer(nw.rx_limiter.as_mut().unwrap());
        }
    }
    assert_eq!(nw.stats.rx_dropped.load(Ordering::Relaxed), 0);
}

/// Transmitted bytes obey the byte limit over many frames: 20 frames of
/// 1000 bytes at 20 000 bytes a second (a bucket of 2000 that starts
/// full) take 0.9 s, driven by the limiter's timer.
#[test]
fn transmitted_bytes_keep_to_the_byte_rate() {
    use crate::virtio::rate_limit::{BucketConfig, RateLimitConfig};
    let m = mem();
    let rxq = MockSplitQueue::new(&m, 16);
    let txq = MockSplitQueue::create(&m, GuestAddress(0x200000), 32);
    m.write_slice(&[7u8; HDR_LEN + 1000], GuestAddress(0x10000))
        .unwrap();
    m.write_slice(&[0; HDR_LEN], GuestAddress(0x10000)).unwrap();
    for i in 0..20u16 {
        txq.add_desc_chains(&[d(0x10000, (HDR_LEN + 1000) as u32, 0, 0)], i)
            .unwrap();
    }
    let mut nw = worker(
        &m,
        rxq.create_queue().unwrap(),
        txq.create_queue().unwrap(),
        false,
    );
    nw.tx_limiter = Some(
        RateLimiter::new(RateLimitConfig {
            bytes: Some(BucketConfig {
                size: 2000,
                refill_ms: 100,
                one_time_burst: 0,
            }),
            ops: None,
        })
        .unwrap(),
    );
    let mut be = FakeBackend::default();
    let started = std::time::Instant::now();
    nw.process_tx(&mut be);
    while be.sent.len() < 20 {
        wait_for_timer(nw.tx_limiter.as_mut().unwrap());
        nw.process_tx(&mut be);
    }
    let took = started.elapsed().as_secs_f64();
    assert!((0.85..1.0).contains(&took), "{took:.3} s");
}

/// What a NIC offers depends on its backend: TAP-style headers get the
/// backend's offloads; bare frames get the device's checksum offloads,
/// the same whether the backend vouches for its checksums or not (a
/// snapshot moves between NAT and internal networks), and a subset of
/// the TAP's (so it moves to a TAP too).
#[test]
fn offered_offloads_follow_the_backend() {
    let mac = MacAddr::for_vm("offloads", 0);
    let features = |be: FakeBackend| Net::new(mac, Box::new(be)).features();
    let tap = features(FakeBackend {
        vnet: true,
        ..FakeBackend::default()
    });
    assert_eq!(tap & OFFLOAD_FEATURES, OFFLOAD_FEATURES);
    let nat = features(FakeBackend {
        valid: true,
        ..FakeBackend::default()
    });
    assert_eq!(nat & OFFLOAD_FEATURES, CSUM_FEATURES);
    let internal = features(FakeBackend::default());
    assert_eq!(internal, nat);
    assert_eq!(nat & !tap, 0);
}

/// Bare-frame backend: a frame whose checksum the guest left partial
/// reaches the backend complete (without header); one asking for
/// segmentation is dropped and counted; received frames are marked
/// DATA_VALID only when asked.
#[test]
fn the_device_completes_checksums_and_marks_trusted_frames_valid() {
    let m = mem();
    let rxq = MockSplitQueue::new(&m, 16);
    let txq = MockSplitQueue::create(&m, GuestAddress(0x200000), 16);
    // A 64-byte frame: checksum over bytes 20.. stored at 20+4.
    let mut packet = vec![0u8; HDR_LEN + 64];
    packet[0] = 1; // NEEDS_CSUM
    packet[6..8].copy_from_slice(&20u16.to_le_bytes());
    packet[8..10].copy_from_slice(&4u16.to_le_bytes());
    for (i, b) in packet[HDR_LEN + 20..].iter_mut().enumerate() {
        *b = i as u8;
    }
    // The field holds the pseudo-header's sum; zero here, so the covered
    // bytes alone must verify.
    packet[HDR_LEN + 24..HDR_LEN + 26].fill(0);
    m.write_slice(&packet, GuestAddress(0x10000)).unwrap();
    let mut tso = packet.clone();
    tso[1] = 1; // GSO_TCPV4, not offered
    m.write_slice(&tso, GuestAddress(0x11000)).unwrap();
    for (i, at) in [0x10000u64, 0x11000].into_iter().enumerate() {
        txq.add_desc_chains(&[d(at, packet.len() as u32, 0, 0)], i as u16)
            .unwrap();
    }
    for i in 0..2u16 {
        let at = 0x80000 + u64::from(i) * 0x1000;
        rxq.add_desc_chains(&[d(at, 2048, crate::test_util::F_WRITE, 0)], i)
            .unwrap();
    }
    let mut nw = worker(
        &m,
        rxq.create_queue().unwrap(),
        txq.create_queue().unwrap(),
        false,
    );
    let mut be = FakeBackend::default();
    nw.process_tx(&mut be);
    assert_eq!(be.sent.len(), 1, "the segmentation request is dropped");
    assert_eq!(nw.stats.tx_dropped.load(Ordering::Relaxed), 1);
    assert_eq!(txq.used().idx().load(), 2);
    let sent = &be.sent[0];
    assert_eq!(sent.len(), 64);
    // The ones'-complement sum over the covered bytes, the stored
    // checksum included, is all ones.
    let covered = &sent[20..];
    let mut sum: u32 = covered
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    assert_eq!(sum, 0xffff);
    assert_eq!(&sent[..20], &packet[HDR_LEN..HDR_LEN + 20]);

    be.incoming.push_back(vec![0xaa; 100]);
    nw.process_rx(&mut be);
    nw.rx_data_valid = true;
    be.incoming.push_back(vec![0xbb; 100]);
    nw.process_rx(&mut be);
    let mut hdr = [0u8; HDR_LEN];
    m.read_slice(&mut hdr, GuestAddress(0x80000)).unwrap();
    assert_eq!(hdr[0], 0, "not asked: no flag");
    m.read_slice(&mut hdr, GuestAddress(0x81000)).unwrap();
    assert_eq!(hdr[0], checksum::DATA_VALID);
}
