//! Each virtio device through its transport: sleep quiesces it (nothing
//! it does afterwards reaches guest memory), its state survives save →
//! restore → save unchanged, and the restored device carries on where the
//! saved one stopped.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use memory::GuestMemoryMmap;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::persist::{MmioStateError, MmioTransportState};
use super::mmio::MmioTransport;
use super::*;
use crate::test_util::{desc as d, json, set_up_driver, wait_for, F_NEXT, F_WRITE};

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

fn transport(device: Box<dyn VirtioDevice>, mem: &GuestMemoryMmap) -> MmioTransport {
    let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    MmioTransport::new(device, mem.clone(), Arc::new(Interrupt::new(line))).unwrap()
}

fn kick(t: &MmioTransport, queue: usize) {
    t.queue_events()[queue].write(1).unwrap();
}

/// Sleeps, saves, and checks the state survives JSON.
fn sleep_and_save(t: &mut MmioTransport) -> MmioTransportState {
    t.sleep().unwrap();
    let saved = t.save_state().unwrap();
    let back: MmioTransportState = serde_json::from_str(&json(&saved)).unwrap();
    assert_eq!(back, saved);
    saved
}

/// Restores `saved` into a transport around `device`, and checks that
/// saving it again (asleep at once) gives the same state.
fn restore_round_trip(
    device: Box<dyn VirtioDevice>,
    mem: &GuestMemoryMmap,
    saved: &MmioTransportState,
) -> MmioTransport {
    let mut t = transport(device, mem);
    t.restore(saved).unwrap();
    let again = sleep_and_save(&mut t);
    assert_eq!(json(&again), json(saved), "save → restore → save");
    t.wake().unwrap();
    t
}

#[test]
fn rng_continues_at_the_saved_index() {
    let m = mem();
    let q = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    let mut t = transport(Box::new(rng::Rng::new()), &m);
    set_up_driver(&mut t, &[&q], &[16], 0);
    q.add_desc_chains(&[d(0x100000, 16, F_WRITE, 0)], 0)
        .unwrap();
    kick(&t, 0);
    assert!(wait_for(|| q.used().idx().load() == 1));
    let saved = sleep_and_save(&mut t);
    assert_eq!(
        (saved.queues[0].next_avail, saved.queues[0].next_used),
        (1, 1)
    );
    assert_eq!(saved.device, VirtioDeviceState::Rng(persist::RngState {}));

    let t2 = restore_round_trip(Box::new(rng::Rng::new()), &m, &saved);
    q.add_desc_chains(&[d(0x101000, 32, F_WRITE, 0)], 1)
        .unwrap();
    kick(&t2, 0);
    assert!(wait_for(|| q.used().idx().load() == 2));
    let entry = q.used().ring().ref_at(1).unwrap().load();
    assert_eq!(
        (entry.id(), entry.len()),
        (1, 32),
        "the second chain, in slot 1"
    );
    // Another device type's state is refused.
    let mut wrong = transport(Box::new(rng::Rng::new()), &m);
    let mut other = saved.clone();
    other.device = VirtioDeviceState::Console(console::persist::ConsoleState::default());
    assert!(matches!(
        wrong.restore(&other),
        Err(MmioStateError::Device(..))
    ));
}

#[derive(Debug)]
struct MemDisk(Mutex<Vec<u8>>);

impl ::block::DiskImage for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let at = usize::try_from(offset).unwrap();
        buf.copy_from_slice(&self.0.lock().unwrap()[at..at + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let at = usize::try_from(offset).unwrap();
        self.0.lock().unwrap()[at..at + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> std::io::Result<()> {
        self.write_at(&vec![0; usize::try_from(len).unwrap()], offset)
    }
    fn id(&self) -> Vec<u8> {
        b"mem".to_vec()
    }
}

/// A block request chain placed at descriptor `first`: the header at
/// `at`, 512 bytes of data at `data` (device-writable for a read, kind
/// 0), the status byte after the header.
fn block_request(kind: u32, data: u64, at: u64, first: u16) -> [RawDescriptor; 3] {
    let flags = if kind == 0 { F_WRITE } else { 0 };
    [
        d(at, 16, F_NEXT, first + 1),
        d(data, 512, flags | F_NEXT, first + 2),
        d(at + 16, 1, F_WRITE, 0),
    ]
}

use virtio_queue::desc::RawDescriptor;

fn block_header(m: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(at)).unwrap();
}

#[test]
fn block_continues_at_the_saved_index_on_the_same_disk() {
    let m = mem();
    let disk = Arc::new(MemDisk(Mutex::new(vec![0; 1 << 20])));
    let q = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    let mut t = transport(Box::new(block::Block::new(disk.clone())), &m);
    set_up_driver(&mut t, &[&q], &[16], 0);
    // Write sector 3.
    block_header(&m, 0x200000, 1, 3);
    m.write_slice(&[0x5a; 512], GuestAddress(0x100000)).unwrap();
    q.add_desc_chains(&block_request(1, 0x100000, 0x200000, 0), 0)
        .unwrap();
    kick(&t, 0);
    assert!(wait_for(|| q.used().idx().load() == 1));
    assert_eq!(m.read_obj::<u8>(GuestAddress(0x200010)).unwrap(), 0, "OK");
    let saved = sleep_and_save(&mut t);
    assert!(matches!(saved.device, VirtioDeviceState::Block(_)));

    let t2 = restore_round_trip(Box::new(block::Block::new(disk.clone())), &m, &saved);
    // Read it back through the restored device.
    block_header(&m, 0x201000, 0, 3);
    q.add_desc_chains(&block_request(0, 0x110000, 0x201000, 3), 3)
        .unwrap();
    kick(&t2, 0);
    assert!(wait_for(|| q.used().idx().load() == 2));
    let mut back = [0u8; 512];
    m.read_slice(&mut back, GuestAddress(0x110000)).unwrap();
    assert_eq!(back, [0x5a; 512]);
    assert_eq!(m.read_obj::<u8>(GuestAddress(0x201010)).unwrap(), 0, "OK");

    // A disk of another size is not the snapshot's disk.
    let other = Arc::new(MemDisk(Mutex::new(vec![0; 2 << 20])));
    let mut t3 = transport(Box::new(block::Block::new(other)), &m);
    let err = t3.restore(&saved).unwrap_err();
    assert!(matches!(err, MmioStateError::Device(..)), "{err}");
}

#[test]
fn console_keeps_pending_input_across_sleep_and_snapshot() {
    let m = mem();
    let rx = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    let tx = MockSplitQueue::create(&m, GuestAddress(0x20000), 16);
    let input = Arc::new(console::ConsoleInput::new().unwrap());
    let dev = console::Console::new(Box::new(std::io::sink()), input.clone());
    let mut t = transport(Box::new(dev), &m);
    set_up_driver(&mut t, &[&rx, &tx], &[16, 16], 0);
    t.sleep().unwrap();
    // Typed while asleep, with a buffer posted: nothing reaches the guest.
    rx.add_desc_chains(&[d(0x100000, 64, F_WRITE, 0)], 0)
        .unwrap();
    kick(&t, 0);
    input.push(b"hello");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(rx.used().idx().load(), 0);
    let saved = t.save_state().unwrap();
    assert_eq!(
        saved.device,
        VirtioDeviceState::Console(console::persist::ConsoleState {
            pending_input: b"hello".to_vec()
        })
    );

    // The device's state round-trips.
    let mut idle = console::Console::new(
        Box::new(std::io::sink()),
        Arc::new(console::ConsoleInput::new().unwrap()),
    );
    idle.restore_state(&saved.device).unwrap();
    assert_eq!(json(&idle.save_state()), json(&saved.device));

    // Restored: the input is delivered into the buffer posted before
    // (the restored device runs at once).
    let input2 = Arc::new(console::ConsoleInput::new().unwrap());
    let dev2 = console::Console::new(Box::new(std::io::sink()), input2);
    let mut t2 = transport(Box::new(dev2), &m);
    t2.restore(&saved).unwrap();
    assert!(wait_for(|| rx.used().idx().load() == 1));
    let after = sleep_and_save(&mut t2);
    assert_eq!(
        (after.queues[0].next_avail, after.queues[0].next_used),
        (1, 1)
    );
    assert_eq!(
        after.device,
        VirtioDeviceState::Console(console::persist::ConsoleState::default())
    );
    let mut got = [0u8; 5];
    m.read_slice(&mut got, GuestAddress(0x100000)).unwrap();
    assert_eq!(&got, b"hello");

    // More pending input than a console holds is refused.
    let mut huge = saved.clone();
    huge.device = VirtioDeviceState::Console(console::persist::ConsoleState {
        pending_input: vec![0; console::INPUT_LIMIT + 1],
    });
    let dev3 = console::Console::new(
        Box::new(std::io::sink()),
        Arc::new(console::ConsoleInput::new().unwrap()),
    );
    assert!(transport(Box::new(dev3), &m).restore(&huge).is_err());
}

/// A backend fed by the test: frames pushed to `incoming` become readable
/// (the event is the backend's descriptor).
#[derive(Debug)]
struct FeedBackend {
    ready: EventFd,
    incoming: Arc<Mutex<VecDeque<Vec<u8>>>>,
}

impl FeedBackend {
    fn new() -> (Self, Arc<Mutex<VecDeque<Vec<u8>>>>, EventFd) {
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let incoming = Arc::new(Mutex::new(VecDeque::new()));
        let feed = ready.try_clone().unwrap();
        (
            FeedBackend {
                ready,
                incoming: incoming.clone(),
            },
            incoming,
            feed,
        )
    }
}

impl ::net::Backend for FeedBackend {
    fn fd(&self) -> std::os::fd::RawFd {
        self.ready.as_raw_fd()
    }
    fn send(&mut self, _frame: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut q = self.incoming.lock().unwrap();
        if q.is_empty() {
            let _ = self.ready.read();
        }
        let f = q.pop_front().ok_or(std::io::ErrorKind::WouldBlock)?;
        buf[..f.len()].copy_from_slice(&f);
        Ok(f.len())
    }
}

fn feed(incoming: &Mutex<VecDeque<Vec<u8>>>, ready: &EventFd, byte: u8) {
    incoming.lock().unwrap().push_back(vec![byte; 60]);
    ready.write(1).unwrap();
}

#[test]
fn a_sleeping_nic_writes_nothing_and_a_restored_one_goes_on() {
    let m = mem();
    let rx = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    let tx = MockSplitQueue::create(&m, GuestAddress(0x20000), 16);
    let mac = net::MacAddr::for_vm("snap", 0);
    let (backend, incoming, ready) = FeedBackend::new();
    let mut t = transport(Box::new(net::Net::new(mac, Box::new(backend))), &m);
    set_up_driver(&mut t, &[&rx, &tx], &[16, 16], 0);
    rx.add_desc_chains(
        &[d(0x100000, 2048, F_WRITE, 0), d(0x101000, 2048, F_WRITE, 0)],
        0,
    )
    .unwrap();
    kick(&t, 0);
    feed(&incoming, &ready, 0xaa);
    assert!(wait_for(|| rx.used().idx().load() == 1));

    // Asleep: a frame arrives from the backend and a buffer is waiting,
    // yet guest memory does not change.
    t.sleep().unwrap();
    feed(&incoming, &ready, 0xbb);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(rx.used().idx().load(), 1);
    let mut second = vec![0u8; 2048];
    m.read_slice(&mut second, GuestAddress(0x101000)).unwrap();
    assert!(
        second.iter().all(|&b| b == 0),
        "nothing written while asleep"
    );
    t.wake().unwrap();
    assert!(wait_for(|| rx.used().idx().load() == 2));
    m.read_slice(
        &mut second[..60],
        GuestAddress(0x101000 + net::HDR_LEN as u64),
    )
    .unwrap();
    assert_eq!(&second[..60], &[0xbb; 60][..]);

    let saved = sleep_and_save(&mut t);
    let VirtioDeviceState::Net(ns) = &saved.device else {
        panic!("not a net state: {:?}", saved.device)
    };
    assert_eq!((ns.mac, ns.link_up), (mac.0, true));
    assert_eq!(
        (saved.queues[0].next_avail, saved.queues[0].next_used),
        (2, 2)
    );

    let (backend2, incoming2, ready2) = FeedBackend::new();
    let _t2 = restore_round_trip(Box::new(net::Net::new(mac, Box::new(backend2))), &m, &saved);
    rx.add_desc_chains(&[d(0x102000, 2048, F_WRITE, 0)], 2)
        .unwrap();
    feed(&incoming2, &ready2, 0xcc);
    assert!(wait_for(|| rx.used().idx().load() == 3));
    let entry = rx.used().ring().ref_at(2).unwrap().load();
    assert_eq!(entry.id(), 2, "the restored NIC fills the next buffer");
}

fn vsock_path(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("hv-snap-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("v.sock")
}

#[test]
fn a_sleeping_vsock_writes_nothing_and_a_restored_one_resets_the_transport() {
    let m = mem();
    let rx = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    let tx = MockSplitQueue::create(&m, GuestAddress(0x20000), 16);
    let ev = MockSplitQueue::create(&m, GuestAddress(0x30000), 16);
    let path = vsock_path("a");
    let dev = vsock::Vsock::new(3, &path).unwrap();
    let mut t = transport(Box::new(dev), &m);
    set_up_driver(&mut t, &[&rx, &tx, &ev], &[16, 16, 16], 0);
    rx.add_desc_chains(&[d(0x100000, 4096, F_WRITE, 0)], 0)
        .unwrap();
    kick(&t, 0);
    t.sleep().unwrap();
    // A host program connects and asks for a guest port: the request
    // would go to the guest's receive buffer, but the device sleeps.
    let mut host = std::os::unix::net::UnixStream::connect(&path).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(rx.used().idx().load(), 0, "nothing written while asleep");
    let mut buf = [0u8; 64];
    m.read_slice(&mut buf, GuestAddress(0x100000)).unwrap();
    assert_eq!(buf, [0u8; 64]);
    // Awake, the connection request reaches the guest.
    t.wake().unwrap();
    assert!(wait_for(|| rx.used().idx().load() == 1));

    let saved = sleep_and_save(&mut t);
    assert_eq!(
        saved.device,
        VirtioDeviceState::Vsock(vsock::persist::VsockState { guest_cid: 3 })
    );
    // The guest has an event buffer posted (as Linux does at probe).
    m.write_slice(&[0xff; 8], GuestAddress(0x180000)).unwrap();
    ev.add_desc_chains(&[d(0x180000, 8, F_WRITE, 0)], 0)
        .unwrap();

    let path2 = vsock_path("b");
    let mut t2 = transport(Box::new(vsock::Vsock::new(3, &path2).unwrap()), &m);
    t2.restore(&saved).unwrap();
    assert!(wait_for(|| ev.used().idx().load() == 1));
    let event: u32 = m.read_obj(GuestAddress(0x180000)).unwrap();
    assert_eq!(event, vsock::persist::EVENT_TRANSPORT_RESET);
    assert_eq!(ev.used().ring().ref_at(0).unwrap().load().len(), 4);
    let again = sleep_and_save(&mut t2);
    // Only the event queue moved on (by the reset event).
    let mut expected = saved.clone();
    expected.queues[2].next_avail = 1;
    expected.queues[2].next_used = 1;
    assert_eq!(json(&again), json(&expected));
    // The new device's listener works, but a host program's request
    // waits until the guest has handled the reset (it posts the event
    // buffer again): one sent before would be dropped by the reset it
    // raced.
    t2.wake().unwrap();
    rx.add_desc_chains(&[d(0x110000, 4096, F_WRITE, 0)], 1)
        .unwrap();
    kick(&t2, 0);
    let mut host2 = std::os::unix::net::UnixStream::connect(&path2).unwrap();
    host2.write_all(b"CONNECT 52\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rx.used().idx().load(), 1, "the request waits for the reset");
    ev.add_desc_chains(&[d(0x190000, 8, F_WRITE, 0)], 1)
        .unwrap();
    kick(&t2, 2);
    assert!(wait_for(|| rx.used().idx().load() == 2), "then it is sent");
    drop(t);
    drop(t2);
    for p in [path, path2] {
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }
}

#[test]
fn a_vsock_state_with_a_reserved_cid_is_refused() {
    let path = vsock_path("c");
    let mut dev = vsock::Vsock::new(3, &path).unwrap();
    let bad = VirtioDeviceState::Vsock(vsock::persist::VsockState { guest_cid: 2 });
    assert!(dev.restore_state(&bad).is_err());
    assert!(!dev.transport_reset_armed());
    let good = dev.save_state();
    dev.restore_state(&good).unwrap();
    assert!(dev.transport_reset_armed());
    drop(dev);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// A frame the NIC read from its backend while the guest had no receive
/// buffers survives a pause (sleep, wake): it is the device's, not lost.
#[test]
fn a_frame_waiting_for_buffers_survives_a_pause() {
    let m = mem();
    let rx = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    let tx = MockSplitQueue::create(&m, GuestAddress(0x20000), 16);
    let (backend, incoming, ready) = FeedBackend::new();
    let dev = net::Net::new(net::MacAddr::for_vm("pause", 0), Box::new(backend));
    let mut t = transport(Box::new(dev), &m);
    set_up_driver(&mut t, &[&rx, &tx], &[16, 16], 0);
    feed(&incoming, &ready, 0xdd);
    assert!(wait_for(|| incoming.lock().unwrap().is_empty()), "read");
    t.sleep().unwrap();
    t.wake().unwrap();
    rx.add_desc_chains(&[d(0x100000, 2048, F_WRITE, 0)], 0)
        .unwrap();
    kick(&t, 0);
    assert!(wait_for(|| rx.used().idx().load() == 1));
    let mut got = [0u8; 60];
    m.read_slice(&mut got, GuestAddress(0x100000 + net::HDR_LEN as u64))
        .unwrap();
    assert_eq!(got, [0xdd; 60]);
}

/// A FUSE GETATTR of the share's root: header (40 bytes) and body (16).
fn fuse_getattr(m: &GuestMemoryMmap, at: u64, unique: u64) {
    let mut h = [0u8; 56];
    h[..4].copy_from_slice(&56u32.to_le_bytes());
    h[4..8].copy_from_slice(&3u32.to_le_bytes()); // FUSE_GETATTR
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h[16..24].copy_from_slice(&1u64.to_le_bytes()); // the root
    m.write_slice(&h, GuestAddress(at)).unwrap();
}

#[test]
fn fs_keeps_its_tag_and_queue_positions_and_serves_the_root_after_restore() {
    let m = mem();
    let dir = std::env::temp_dir().join(format!("hv-snap-fs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dev = |tag: &str| -> Box<dyn VirtioDevice> {
        Box::new(fs::VirtioFs::new(tag, &dir, fs::ShareOptions::default()).unwrap())
    };
    let hi = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    let rq = MockSplitQueue::create(&m, GuestAddress(0x20000), 16);
    let mut t = transport(dev("share"), &m);
    set_up_driver(&mut t, &[&hi, &rq], &[16, 16], 0);
    fuse_getattr(&m, 0x100000, 1);
    rq.add_desc_chains(
        &[d(0x100000, 56, F_NEXT, 1), d(0x110000, 4096, F_WRITE, 0)],
        0,
    )
    .unwrap();
    kick(&t, 1);
    assert!(wait_for(|| rq.used().idx().load() == 1));
    let saved = sleep_and_save(&mut t);
    assert_eq!(
        saved.device,
        VirtioDeviceState::Fs(fs::FsState {
            tag: "share".to_string()
        })
    );
    assert_eq!(
        (saved.queues[1].next_avail, saved.queues[1].next_used),
        (1, 1)
    );

    let t2 = restore_round_trip(dev("share"), &m, &saved);
    fuse_getattr(&m, 0x120000, 2);
    rq.add_desc_chains(
        &[d(0x120000, 56, F_NEXT, 3), d(0x130000, 4096, F_WRITE, 0)],
        2,
    )
    .unwrap();
    kick(&t2, 1);
    assert!(wait_for(|| rq.used().idx().load() == 2));
    let entry = rq.used().ring().ref_at(1).unwrap().load();
    assert_eq!(entry.id(), 2, "the second request, in slot 1");
    // The reply: a full attr reply (16 + 104 bytes), error 0, unique 2.
    let mut out = [0u8; 16];
    m.read_slice(&mut out, GuestAddress(0x130000)).unwrap();
    assert_eq!(
        entry.len(),
        u32::from_le_bytes(out[..4].try_into().unwrap())
    );
    assert_eq!(i32::from_le_bytes(out[4..8].try_into().unwrap()), 0);
    assert_eq!(u64::from_le_bytes(out[8..].try_into().unwrap()), 2);

    // A share under another tag is not the one the guest mounted.
    let mut other = transport(dev("other"), &m);
    assert!(matches!(
        other.restore(&saved),
        Err(MmioStateError::Device(..))
    ));
    drop(t);
    drop(t2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rate-limited disk saves its limits (and bucket levels) and comes
/// back with them; a snapshot from before rate limits reads as none.
#[test]
fn block_rate_limits_survive_save_and_restore() {
    use crate::virtio::rate_limit::RateLimitConfig;
    let m = mem();
    let disk = Arc::new(MemDisk(Mutex::new(vec![0; 1 << 20])));
    // Fast enough that the buckets are full again by the save.
    let limits = RateLimitConfig::per_second(Some(1 << 30), Some(1_000_000));
    let q = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    let dev = block::Block::new(disk.clone()).with_rate_limit(limits);
    let mut t = transport(Box::new(dev), &m);
    set_up_driver(&mut t, &[&q], &[16], 0);
    block_header(&m, 0x200000, 1, 3);
    q.add_desc_chains(&block_request(1, 0x100000, 0x200000, 0), 0)
        .unwrap();
    kick(&t, 0);
    assert!(wait_for(|| q.used().idx().load() == 1));
    std::thread::sleep(std::time::Duration::from_millis(2));
    let saved = sleep_and_save(&mut t);
    let VirtioDeviceState::Block(state) = &saved.device else {
        panic!("{:?}", saved.device)
    };
    let limiter = state.rate_limiter.expect("the limits are saved");
    assert_eq!(limiter.config, limits);
    let full = limits.bytes.unwrap().size;
    assert_eq!(limiter.bytes_budget, Some(full as i64), "full again");
    let dev = block::Block::new(disk.clone()).with_rate_limit(limits);
    let t2 = restore_round_trip(Box::new(dev), &m, &saved);
    block_header(&m, 0x201000, 0, 3);
    q.add_desc_chains(&block_request(0, 0x110000, 0x201000, 3), 3)
        .unwrap();
    kick(&t2, 0);
    assert!(wait_for(|| q.used().idx().load() == 2));
    // Old snapshots: no rate_limiter field.
    let mut old = serde_json::to_value(state).unwrap();
    old.as_object_mut().unwrap().remove("rate_limiter");
    let old: block::persist::BlockState = serde_json::from_value(old).unwrap();
    assert_eq!(old.rate_limiter, None);
}

/// A rate-limited NIC saves its buckets' levels, not only its limits:
/// after a 60-byte frame against a 100-byte transmit bucket that refills
/// once in 1000 s, the restored NIC still holds the next 60-byte frame
/// back (with full buckets it would send it at once). The state survives
/// save → restore → save; a snapshot from before the levels reads as
/// none (full buckets).
#[test]
fn net_rate_limit_levels_survive_save_and_restore() {
    use crate::virtio::rate_limit::{BucketConfig, RateLimitConfig};
    let limits = RateLimitConfig {
        bytes: Some(BucketConfig {
            size: 100,
            refill_ms: 100_000_000,
            one_time_burst: 0,
        }),
        ops: None,
    };
    let m = mem();
    let rx = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    let tx = MockSplitQueue::create(&m, GuestAddress(0x20000), 16);
    let mac = net::MacAddr::for_vm("limits", 0);
    let nic = |backend| net::Net::new(mac, Box::new(backend)).with_rate_limit(limits);
    let (backend, _, _) = FeedBackend::new();
    let mut t = transport(Box::new(nic(backend)), &m);
    set_up_driver(&mut t, &[&rx, &tx], &[16, 16], 0);
    m.write_slice(&[0u8; net::HDR_LEN + 60], GuestAddress(0x100000))
        .unwrap();
    let frame = |i| d(0x100000, (net::HDR_LEN + 60) as u32, 0, i);
    tx.add_desc_chains(&[frame(0)], 0).unwrap();
    kick(&t, 1);
    assert!(wait_for(|| tx.used().idx().load() == 1));

    let saved = sleep_and_save(&mut t);
    let VirtioDeviceState::Net(ns) = &saved.device else {
        panic!("not a net state: {:?}", saved.device)
    };
    assert_eq!(ns.rate_limit, Some(limits));
    let level = |l: Option<crate::virtio::rate_limit::RateLimiterState>| {
        let l = l.expect("the levels are saved");
        assert_eq!(l.config, limits);
        l.bytes_budget
    };
    assert_eq!(level(ns.tx_limiter), Some(40), "60 of 100 bytes spent");
    assert_eq!(level(ns.rx_limiter), Some(100), "nothing received");

    let (backend2, _, _) = FeedBackend::new();
    let t2 = restore_round_trip(Box::new(nic(backend2)), &m, &saved);
    tx.add_desc_chains(&[frame(1)], 1).unwrap();
    kick(&t2, 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        tx.used().idx().load(),
        1,
        "the restored NIC has 40 bytes left, not a full bucket"
    );

    // Old snapshots: no levels.
    let mut old = serde_json::to_value(ns).unwrap();
    let fields = old.as_object_mut().unwrap();
    fields.remove("rx_limiter");
    fields.remove("tx_limiter");
    let old: net::persist::NetState = serde_json::from_value(old).unwrap();
    assert_eq!((old.rx_limiter, old.tx_limiter), (None, None));
}

/// The activated worker of a rate-limited disk: three requests behind
/// one kick, one bucket's worth each, are all served — the later ones
/// when the limiter's timer wakes the worker (no second kick) — spaced by
/// the limit; a sleep while throttled and a wake lose none.
#[test]
fn a_rate_limited_block_worker_wakes_on_its_timer() {
    use crate::virtio::rate_limit::{BucketConfig, RateLimitConfig};
    let m = mem();
    let disk = Arc::new(MemDisk(Mutex::new(vec![0; 1 << 20])));
    // 512 bytes (one request) per 50 ms.
    let limits = RateLimitConfig {
        bytes: None,
        ops: Some(BucketConfig {
            size: 1,
            refill_ms: 50,
            one_time_burst: 0,
        }),
    };
    let q = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    let dev = block::Block::new(disk).with_rate_limit(limits);
    let mut t = transport(Box::new(dev), &m);
    set_up_driver(&mut t, &[&q], &[16], 0);
    let mut chains = Vec::new();
    for k in 0..4u16 {
        let at = 0x200000 + u64::from(k) * 0x1000;
        block_header(&m, at, 0, u64::from(k));
        chains.extend(block_request(
            0,
            0x100000 + u64::from(k) * 0x1000,
            at,
            k * 3,
        ));
    }
    q.add_desc_chains(&chains[..9], 0).unwrap();
    let started = std::time::Instant::now();
    kick(&t, 0);
    assert!(wait_for(|| q.used().idx().load() == 3));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(90),
        "{took:?}: the limit held"
    );
    // Throttled again by a fourth request; asleep and awake, it is served.
    q.add_desc_chains(&chains[9..], 9).unwrap();
    kick(&t, 0);
    t.sleep().unwrap();
    t.wake().unwrap();
    assert!(wait_for(|| q.used().idx().load() == 4));
}
