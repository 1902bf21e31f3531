//! The muxer against a scripted guest driver (queues in test memory) and
//! real Unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::test_util::desc as d;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{Guest, Muxer, VsockStats};
use super::packet::{Header, Op, HDR_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::virtio::Interrupt;
use memory::GuestMemoryMmap;

const CID: u64 = 3;
const RX_BUFS: u64 = 0x100000;
const TX_BUFS: u64 = 0x200000;
const BUF: u32 = 4096 + HDR_LEN as u32;

struct FakeDriver<'a> {
    mem: &'a GuestMemoryMmap,
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    rx_posted: u16,
    rx_seen: u16,
    tx_sent: u16,
}

impl<'a> FakeDriver<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        FakeDriver {
            mem,
            rx: MockSplitQueue::create(mem, GuestAddress(0x10000), 256),
            tx: MockSplitQueue::create(mem, GuestAddress(0x20000), 256),
            rx_posted: 0,
            rx_seen: 0,
            tx_sent: 0,
        }
    }

    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let i = self.rx_posted;
            let addr = RX_BUFS + u64::from(i) * 0x2000;
            self.rx
                .add_desc_chains(&[d(addr, BUF, crate::test_util::F_WRITE, 0)], i)
                .unwrap();
            self.rx_posted += 1;
        }
    }

    /// Packets the device has put in receive buffers since the last call.
    /// The payload bytes of the data packets received since the last look.
    fn received_data(&mut self) -> Vec<u8> {
        self.received()
            .into_iter()
            .filter(|(h, _)| h.op == Op::Rw)
            .flat_map(|(_, p)| p)
            .collect()
    }

    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.rx.used().idx().load();
        let mut out = Vec::new();
        while self.rx_seen != used {
            let elem = self
                .rx
                .used()
                .ring()
                .ref_at(self.rx_seen.into())
                .unwrap()
                .load();
            self.rx_seen += 1;
            let addr = RX_BUFS + u64::from(elem.id()) * 0x2000;
            let mut bytes = vec![0u8; elem.len() as usize];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            let h = parse_to_guest(&bytes);
            out.push((h, bytes[HDR_LEN..].to_vec()));
        }
        out
    }

    fn send(&mut self, h: Header, payload: &[u8]) {
        self.send_raw(&h.to_bytes(), payload);
    }

    /// A two-descriptor chain: header, payload.
    fn send_raw(&mut self, header: &[u8], payload: &[u8]) {
        let i = self.tx_sent;
        let addr = TX_BUFS + u64::from(i) * 0x12000;
        self.mem.write_slice(header, GuestAddress(addr)).unwrap();
        let data = addr + 0x100;
        self.mem.write_slice(payload, GuestAddress(data)).unwrap();
        self.tx
            .add_desc_chains(
                &[
                    d(
                        addr,
                        header.len() as u32,
                        crate::test_util::F_NEXT,
                        i * 2 + 1,
                    ),
                    d(data, payload.len() as u32, 0, 0),
                ],
                i * 2,
            )
            .unwrap();
        self.tx_sent += 1;
    }
}

/// Headers the device wrote: the same layout, parsed without the checks
/// meant for the guest's packets.
fn parse_to_guest(b: &[u8]) -> Header {
    let mut swapped = b[..HDR_LEN].to_vec();
    // Present it as if the guest sent it, to reuse the parser.
    swapped[..8].copy_from_slice(&CID.to_le_bytes());
    swapped[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
    let mut h = Header::parse_from_guest(&swapped, usize::MAX, CID).unwrap();
    h.src_cid = u64::from_le_bytes(b[..8].try_into().unwrap());
    h.dst_cid = u64::from_le_bytes(b[8..16].try_into().unwrap());
    h
}

fn guest_packet(op: Op, src_port: u32, dst_port: u32, len: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        op,
        flags: 0,
        buf_alloc: 64 << 10,
        fwd_cnt: 0,
    }
}

struct Fixture {
    dir: PathBuf,
    path: PathBuf,
    stats: Arc<VsockStats>,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("hv-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        Fixture {
            dir,
            path,
            stats: Arc::default(),
        }
    }

    fn muxer(&self, mem: &GuestMemoryMmap, drv: &FakeDriver) -> Muxer {
        let listener = UnixListener::bind(&self.path).unwrap();
        let guest = Guest {
            mem: mem.clone(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            rx: drv.rx.create_queue().unwrap(),
            tx: drv.tx.create_queue().unwrap(),
            events: virtio_queue::Queue::default(),
        };
        Muxer::new(CID, &self.path, listener, guest, self.stats.clone()).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Polls the muxer until the fake guest has received something.
fn poll_until_received(m: &mut Muxer, drv: &mut FakeDriver) -> Vec<(Header, Vec<u8>)> {
    for _ in 0..50 {
        m.poll_host(100).unwrap();
        let got = drv.received();
        if !got.is_empty() {
            return got;
        }
    }
    panic!("the guest received nothing");
}

#[test]
fn host_connection_handshake_data_and_close() {
    let fx = Fixture::new("host");
    let mem = memory();
    let mut drv = FakeDriver::new(&mem);
    drv.post_rx(20);
    let mut m = fx.muxer(&mem, &drv);

    let mut host = UnixStream::connect(&fx.path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Data sent right after the line must not be lost.
    host.write_all(b"CONNECT 52\nearly").unwrap();
    let got = poll_until_received(&mut m, &mut drv);
    let req = got[0].0;
    assert_eq!((req.op, req.dst_cid, req.dst_port), (Op::Request, CID, 52));
    assert!(req.src_port >= 1 << 30);

    // The guest accepts: the host hears OK, and the early bytes flow.
    drv.send(guest_packet(Op::Response, 52, req.src_port, 0), &[]);
    m.process_tx();
    assert_eq!(read_line(&mut host), format!("OK {}", req.src_port));
    m.fill_rx();
    let got = drv.received();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, &got[0].1[..]), (Op::Rw, &b"early"[..]));

    host.write_all(b"ping").unwrap();
    let got = poll_until_received(&mut m, &mut drv);
    assert_eq!(&got[0].1, b"ping");

    drv.send(guest_packet(Op::Rw, 52, req.src_port, 4), b"pong");
    m.process_tx();
    let mut pong = [0u8; 4];
    host.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"pong");

    // The host closes: the guest is told; its reset ends the connection.
    drop(host);
    let got = poll_until_received(&mut m, &mut drv);
    assert_eq!(got[0].0.op, Op::Shutdown);
    assert_eq!(got[0].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    assert_eq!(m.connections(), 1);
    drv.send(guest_packet(Op::Rst, 52, req.src_port, 0), &[]);
    m.process_tx();
    m.poll_host(0).unwrap();
    assert_eq!(m.connections(), 0);
    assert_eq!(fx.stats.dropped_packets.load(Ordering::Relaxed), 0);
}

#[test]
fn guest_connections_reach_host_listeners_or_are_reset() {
    let fx = Fixture::new("guest");
    let mem = memory();
    let mut drv = FakeDriver::new(&mem);
    drv.post_rx(20);
    let mut m = fx.muxer(&mem, &drv);
    let mut port_path = fx.path.clone().into_os_string();
    port_path.push("_1234");
    let service = UnixListener::bind(&port_path).unwrap();

    drv.send(guest_packet(Op::Request, 5000, 1234, 0), &[]);
    drv.send(guest_packet(Op::Request, 5001, 999, 0), &[]);
    m.process_tx();
    m.fill_rx();
    let got = drv.received();
    let ops: Vec<_> = got.iter().map(|(h, _)| (h.op, h.dst_port)).collect();
    assert!(
        ops.contains(&(Op::Rst, 5001)),
        "no listener: reset ({ops:?})"
    );
    assert!(ops.contains(&(Op::Response, 5000)), "{ops:?}");

    let (mut accepted, _) = service.accept().unwrap();
    accepted
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    drv.send(guest_packet(Op::Rw, 5000, 1234, 5), b"hello");
    // The guest shuts down both ways right after sending: the data still
    // reaches the host before its end of file.
    let mut shut = guest_packet(Op::Shutdown, 5000, 1234, 0);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    drv.send(shut, &[]);
    m.process_tx();
    let mut all = Vec::new();
    accepted.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"hello");
    m.fill_rx();
    assert_eq!(drv.received()[0].0.op, Op::Rst);
    m.poll_host(0).unwrap();
    assert_eq!(m.connections(), 0);
}

#[test]
fn host_data_waits_for_guest_credit() {
    let fx = Fixture::new("credit");
    let mem = memory();
    let mut drv = FakeDriver::new(&mem);
    drv.post_rx(40);
    let mut m = fx.muxer(&mem, &drv);
    let mut port_path = fx.path.clone().into_os_string();
    port_path.push("_7");
    let service = UnixListener::bind(&port_path).unwrap();
    let mut req = guest_packet(Op::Request, 6000, 7, 0);
    req.buf_alloc = 10;
    drv.send(req, &[]);
    m.process_tx();
    let (mut accepted, _) = service.accept().unwrap();
    accepted.write_all(b"0123456789abcdefghij").unwrap();
    credit_limits_hold(&mut m, &mut drv, 6000, 7);
}

/// The host end of a connection (guest port `guest`, host port `host`)
/// has written 20 bytes and the guest gave 10 bytes of credit: the guest
/// gets 10, and the rest only once it says it consumed them — without a
/// new host event (the socket stayed readable).
fn credit_limits_hold(m: &mut Muxer, drv: &mut FakeDriver, guest: u32, host: u32) {
    let mut data = Vec::new();
    for _ in 0..5 {
        m.poll_host(50).unwrap();
        data.extend(drv.received_data());
    }
    assert_eq!(data, b"0123456789", "no more than the guest's buffer");
    let mut update = guest_packet(Op::CreditUpdate, guest, host, 0);
    update.buf_alloc = 10;
    update.fwd_cnt = 10;
    drv.send(update, &[]);
    m.process_tx();
    m.fill_rx();
    assert_eq!(drv.received_data(), b"abcdefghij");
}

#[test]
fn hostile_packets_are_dropped_or_reset_and_counted() {
    let fx = Fixture::new("hostile");
    let mem = memory();
    let mut drv = FakeDriver::new(&mem);
    drv.post_rx(40);
    let mut m = fx.muxer(&mem, &drv);
    let good = guest_packet(Op::Rw, 1, 2, 0);
    // A short header, an unknown op, a length beyond the chain, a forged
    // source, a payload on a control packet.
    drv.send_raw(&good.to_bytes()[..20], &[]);
    let mut b = good.to_bytes();
    b[30] = 42;
    drv.send_raw(&b, &[]);
    drv.send(Header { len: 100, ..good }, b"short");
    drv.send(Header { src_cid: 9, ..good }, &[]);
    drv.send(
        Header {
            op: Op::Request,
            len: 3,
            ..good
        },
        b"abc",
    );
    m.process_tx();
    assert_eq!(fx.stats.dropped_packets.load(Ordering::Relaxed), 5);
    // Data for no connection: reset.
    drv.send(Header { len: 1, ..good }, b"x");
    m.process_tx();
    m.fill_rx();
    let got = drv.received();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, got[0].0.dst_port), (Op::Rst, 1));

    // Credit abuse on a real connection: reset, counted.
    let mut port_path = fx.path.clone().into_os_string();
    port_path.push("_8");
    let service = UnixListener::bind(&port_path).unwrap();
    drv.send(guest_packet(Op::Request, 7000, 8, 0), &[]);
    m.process_tx();
    let (_accepted, _) = service.accept().unwrap();
    // The host never reads: the socket buffer fills, then our 256 KiB of
    // credit, and a packet beyond it is abuse.
    let chunk = vec![7u8; 60 << 10];
    for _ in 0..25 {
        drv.send(guest_packet(Op::Rw, 7000, 8, chunk.len() as u32), &chunk);
    }
    m.process_tx();
    assert!(fx.stats.protocol_resets.load(Ordering::Relaxed) >= 1);
    m.fill_rx();
    assert!(drv.received().iter().any(|(h, _)| h.op == Op::Rst));
}

#[test]
fn connections_are_limited() {
    let fx = Fixture::new("limit");
    let mem = memory();
    let mut drv = FakeDriver::new(&mem);
    drv.post_rx(20);
    let mut m = fx.muxer(&mem, &drv);
    m.set_max_connections(1);
    let mut port_path = fx.path.clone().into_os_string();
    port_path.push("_9");
    let _service = UnixListener::bind(&port_path).unwrap();
    drv.send(guest_packet(Op::Request, 100, 9, 0), &[]);
    drv.send(guest_packet(Op::Request, 101, 9, 0), &[]);
    m.process_tx();
    m.fill_rx();
    let ops: Vec<_> = drv
        .received()
        .iter()
        .map(|(h, _)| (h.op, h.dst_port))
        .collect();
    assert!(ops.contains(&(Op::Response, 100)), "{ops:?}");
    assert!(ops.contains(&(Op::Rst, 101)), "over the limit: {ops:?}");
    // A host program over the limit is told so.
    let mut host = UnixStream::connect(&fx.path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    m.poll_host(1000).unwrap();
    assert_eq!(read_line(&mut host), "ERROR too many connections");
    assert_eq!(m.connections(), 1);
}

/// Waits (the device's own thread runs) until the guest received
/// something.
fn wait_received(drv: &mut FakeDriver) -> Vec<(Header, Vec<u8>)> {
    let mut got = Vec::new();
    assert!(crate::test_util::wait_for(|| {
        got = drv.received();
        !got.is_empty()
    }));
    got
}

/// Pausing the device (sleep, wake) keeps an open connection: bytes flow
/// both ways after it, as the agent's connection must across a
/// `snapshot take` of a running VM.
#[test]
fn a_connection_survives_a_pause_of_the_device() {
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::VirtioDevice;
    let fx = Fixture::new("pause");
    let mem = memory();
    let mut drv = FakeDriver::new(&mem);
    let ev = MockSplitQueue::create(&mem, GuestAddress(0x30000), 16);
    let dev: Box<dyn VirtioDevice> = Box::new(super::Vsock::new(CID, &fx.path).unwrap());
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let mut t = MmioTransport::new(dev, mem.clone(), irq).unwrap();
    crate::test_util::set_up_driver(&mut t, &[&drv.rx, &drv.tx, &ev], &[256, 256, 16], 0);
    drv.post_rx(20);
    t.queue_events()[0].write(1).unwrap();

    let mut host = UnixStream::connect(&fx.path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let req = wait_received(&mut drv)[0].0;
    assert_eq!((req.op, req.dst_port), (Op::Request, 52));
    drv.send(guest_packet(Op::Response, 52, req.src_port, 0), &[]);
    t.queue_events()[1].write(1).unwrap();
    assert_eq!(read_line(&mut host), format!("OK {}", req.src_port));

    t.sleep().unwrap();
    host.write_all(b"ping").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        drv.received().is_empty(),
        "nothing reaches the guest asleep"
    );
    t.wake().unwrap();
    let got = wait_received(&mut drv);
    assert_eq!((got[0].0.op, &got[0].1[..]), (Op::Rw, &b"ping"[..]));
    drv.send(guest_packet(Op::Rw, 52, req.src_port, 4), b"pong");
    t.queue_events()[1].write(1).unwrap();
    let mut pong = [0u8; 4];
    host.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"pong");
}

mod pool;
