use std::io;
use std::sync::Mutex;

use crate::test_util::desc as d;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vmm_sys_util::eventfd::EventFd;

use super::*;

#[derive(Debug)]
struct MemDisk {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    flushes: Mutex<u32>,
    /// The length of every host read and write, in order.
    reads: Mutex<Vec<usize>>,
    writes: Mutex<Vec<usize>>,
}

impl MemDisk {
    fn new(size: usize, read_only: bool) -> Self {
        MemDisk {
            data: Mutex::new(vec![0; size]),
            read_only,
            flushes: Mutex::new(0),
            reads: Mutex::new(Vec::new()),
            writes: Mutex::new(Vec::new()),
        }
    }
}

impl DiskImage for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads.lock().unwrap().push(buf.len());
        let d = self.data.lock().unwrap();
        let at = usize::try_from(offset).unwrap();
        buf.copy_from_slice(&d[at..at + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writes.lock().unwrap().push(buf.len());
        let mut d = self.data.lock().unwrap();
        let at = usize::try_from(offset).unwrap();
        d[at..at + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_at(&vec![0; usize::try_from(len).unwrap()], offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.discard(offset, len)
    }
    fn id(&self) -> Vec<u8> {
        b"memdisk".to_vec()
    }
}

const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0x3000;
const W: u16 = flag(VRING_DESC_F_WRITE);
const N: u16 = flag(VRING_DESC_F_NEXT);

/// A descriptor flag as the u16 the ring holds (checked at compile time).
const fn flag(bit: u32) -> u16 {
    let [a, b, 0, 0] = bit.to_le_bytes() else {
        panic!("not a descriptor flag");
    };
    u16::from_le_bytes([a, b])
}

struct Rig {
    mem: GuestMemoryMmap,
    disk: MemDisk,
}

fn rig(read_only: bool) -> Rig {
    Rig {
        mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap(),
        disk: MemDisk::new(64 * 1024, read_only),
    }
}

impl Rig {
    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Runs one chain; returns (used length, status byte).
    fn run(&self, descs: &[RawDescriptor]) -> (u32, u8) {
        self.run_at(descs, GuestAddress(STATUS))
    }

    /// Runs one chain in a 16-entry queue; returns (used length, the byte
    /// at `status`).
    fn run_at(&self, descs: &[RawDescriptor], status: GuestAddress) -> (u32, u8) {
        self.run_in(16, descs, status)
    }

    /// Runs one chain in a queue of `size` entries (its rings take the
    /// first `size * 32` bytes of memory or so).
    fn run_in(&self, size: u16, descs: &[RawDescriptor], status: GuestAddress) -> (u32, u8) {
        let mock = MockSplitQueue::new(&self.mem, size);
        mock.build_desc_chain(descs).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Interrupt::new(line);
        process_queue(&mut queue, &self.mem, &self.disk, &irq);
        let used = mock.used().ring().ref_at(0).unwrap().load().len();
        (used, self.mem.read_obj(status).unwrap())
    }

    /// header, one data buffer, status.
    fn request(&self, kind: u32, sector: u64, len: u32, data_flags: u16) -> (u32, u8) {
        self.header(kind, sector);
        self.run(&[
            d(HDR, 16, N, 1),
            d(DATA, len, data_flags | N, 2),
            d(STATUS, 1, W, 0),
        ])
    }
}

const OK: u8 = Status::Ok.byte();
const IOERR: u8 = Status::IoError.byte();
const UNSUPP: u8 = Status::Unsupported.byte();

#[test]
fn write_then_read_round_trips() {
    let r = rig(false);
    r.mem
        .write_slice(&[0xabu8; 1024], GuestAddress(DATA))
        .unwrap();
    assert_eq!(r.request(VIRTIO_BLK_T_OUT, 2, 1024, 0), (1, OK));
    assert_eq!(&r.disk.data.lock().unwrap()[1024..2048], &[0xab; 1024][..]);
    r.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 2, 1024, W), (1025, OK));
    let mut back = [0u8; 1024];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, [0xab; 1024]);
}

#[test]
fn many_segments_are_grouped_in_order() {
    let r = rig(false);
    // Three segments: 512 + 1 MiB-512 + 512 bytes, i.e. two host chunks.
    let big = SIZE_MAX - 512;
    r.mem
        .write_slice(&[1u8; 512], GuestAddress(0x10000))
        .unwrap();
    r.mem
        .write_slice(&vec![2u8; big as usize], GuestAddress(0x20000))
        .unwrap();
    r.mem
        .write_slice(&[3u8; 512], GuestAddress(0x8000))
        .unwrap();
    r.header(VIRTIO_BLK_T_OUT, 0);
    let rig_disk = MemDisk::new(2 << 20, false);
    let r2 = Rig {
        mem: r.mem.clone(),
        disk: rig_disk,
    };
    r2.header(VIRTIO_BLK_T_OUT, 0);
    let descs = [
        d(HDR, 16, N, 1),
        d(0x10000, 512, N, 2),
        d(0x20000, big, N, 3),
        d(0x8000, 512, N, 4),
        d(STATUS, 1, W, 0),
    ];
    assert_eq!(r2.run(&descs), (1, OK));
    let data = r2.disk.data.lock().unwrap().clone();
    assert!(data[..512].iter().all(|&b| b == 1));
    assert!(data[512..SIZE_MAX as usize].iter().all(|&b| b == 2));
    assert!(data[SIZE_MAX as usize..SIZE_MAX as usize + 512]
        .iter()
        .all(|&b| b == 3));
    // And back, into fresh buffers.
    r2.mem
        .write_slice(&vec![0u8; big as usize], GuestAddress(0x20000))
        .unwrap();
    r2.header(VIRTIO_BLK_T_IN, 0);
    let descs = [
        d(HDR, 16, N, 1),
        d(0x10000, 512, W | N, 2),
        d(0x20000, big, W | N, 3),
        d(0x8000, 512, W | N, 4),
        d(STATUS, 1, W, 0),
    ];
    assert_eq!(r2.run(&descs), (SIZE_MAX + 512 + 1, OK));
    let mut mid = vec![0u8; big as usize];
    r2.mem.read_slice(&mut mid, GuestAddress(0x20000)).unwrap();
    assert!(mid.iter().all(|&b| b == 2));
}

#[test]
fn flush_get_id_discard_and_write_zeroes() {
    let r = rig(false);
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(r.run(&[d(HDR, 16, N, 1), d(STATUS, 1, W, 0)]), (1, OK));
    assert_eq!(*r.disk.flushes.lock().unwrap(), 1);

    assert_eq!(r.request(VIRTIO_BLK_T_GET_ID, 0, 20, W), (21, OK));
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..7], b"memdisk");

    r.disk.write_at(&[1u8; 4096], 0).unwrap();
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&1u64.to_le_bytes());
    seg[8..12].copy_from_slice(&2u32.to_le_bytes());
    r.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(VIRTIO_BLK_T_DISCARD, 0, 16, 0), (1, OK));
    let data = r.disk.data.lock().unwrap().clone();
    assert!(data[512..1536].iter().all(|&b| b == 0));
    assert!(data[1536..4096].iter().all(|&b| b == 1));
    seg[0..8].copy_from_slice(&4u64.to_le_bytes());
    r.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, 0), (1, OK));
    assert!(r.disk.data.lock().unwrap()[2048..3072]
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn requests_beyond_the_disk_fail() {
    let r = rig(false);
    let sectors = r.disk.size() / SECTOR_SIZE;
    assert_eq!(r.request(VIRTIO_BLK_T_IN, sectors, 512, W), (1, IOERR));
    assert_eq!(r.request(VIRTIO_BLK_T_IN, sectors - 1, 1024, W), (1, IOERR));
    assert_eq!(r.request(VIRTIO_BLK_T_OUT, u64::MAX, 512, 0), (1, IOERR));
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    r.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(VIRTIO_BLK_T_DISCARD, 0, 16, 0), (1, IOERR));
}

#[test]
fn read_only_disks_refuse_writes() {
    let r = rig(true);
    assert_eq!(r.request(VIRTIO_BLK_T_OUT, 0, 512, 0), (1, IOERR));
    assert_eq!(r.request(VIRTIO_BLK_T_DISCARD, 0, 16, 0), (1, IOERR));
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 0, 512, W), (513, OK));
    let dev = Block::new(Arc::new(MemDisk::new(4096, true)));
    assert_ne!(dev.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(dev.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
}

#[test]
fn wrong_directions_and_unknown_types_get_error_statuses() {
    let r = rig(false);
    // Reading into a device-readable buffer, writing from a writable one.
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 0, 512, 0), (1, IOERR));
    assert_eq!(r.request(VIRTIO_BLK_T_OUT, 0, 512, W), (1, IOERR));
    assert_eq!(r.request(0x77, 0, 512, 0), (1, UNSUPP));
    // Discard with a malformed segment.
    assert_eq!(r.request(VIRTIO_BLK_T_DISCARD, 0, 8, 0), (1, UNSUPP));
    // Oversized buffer.
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 0, SIZE_MAX + 512, W), (1, IOERR));
    // Zero-length data buffers move nothing and succeed.
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 0, 0, W), (1, OK));
    assert_eq!(r.request(VIRTIO_BLK_T_OUT, 0, 0, 0), (1, OK));
}

#[test]
fn buffers_outside_ram_fail_without_harm() {
    let r = rig(false);
    r.header(VIRTIO_BLK_T_IN, 0);
    let far = 0xffff_0000_0000;
    assert_eq!(
        r.run(&[d(HDR, 16, N, 1), d(far, 512, W | N, 2), d(STATUS, 1, W, 0)]),
        (1, IOERR)
    );
    r.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        r.run(&[d(HDR, 16, N, 1), d(far, 512, N, 2), d(STATUS, 1, W, 0)]),
        (1, IOERR)
    );
}

#[test]
fn malformed_chains_are_returned_unused() {
    let r = rig(false);
    r.header(VIRTIO_BLK_T_IN, 0);
    // Only a header: no status byte to report in.
    assert_eq!(r.run(&[d(HDR, 16, 0, 0)]).0, 0);
    // Writable header.
    assert_eq!(r.run(&[d(HDR, 16, W | N, 1), d(STATUS, 1, W, 0)]).0, 0);
    // Short header.
    assert_eq!(r.run(&[d(HDR, 8, N, 1), d(STATUS, 1, W, 0)]).0, 0);
    // Read-only status, zero-length status, status outside RAM.
    assert_eq!(r.run(&[d(HDR, 16, N, 1), d(STATUS, 1, 0, 0)]).0, 0);
    assert_eq!(r.run(&[d(HDR, 16, N, 1), d(STATUS, 0, W, 0)]).0, 0);
    assert_eq!(
        r.run(&[d(HDR, 16, N, 1), d(0xffff_0000_0000, 1, W, 0)]).0,
        0
    );
    // A status buffer whose end overflows the address space.
    assert_eq!(r.run(&[d(HDR, 16, N, 1), d(u64::MAX - 1, 8, W, 0)]).0, 0);
    // Header outside RAM: reported through the status byte.
    assert_eq!(
        r.run(&[d(0xffff_0000_0000, 16, N, 1), d(STATUS, 1, W, 0)]),
        (1, IOERR)
    );
}

#[test]
fn a_bogus_available_index_does_not_hang_the_worker() {
    let r = rig(false);
    let mock = MockSplitQueue::new(&r.mem, 16);
    let mut queue: Queue = mock.create_queue().unwrap();
    queue.set_event_idx(true);
    // The driver claims 40000 new requests in a 16-entry ring.
    mock.avail().idx().store(40000);
    let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    process_queue(&mut queue, &r.mem, &r.disk, &irq); // returns
}

#[test]
fn descriptor_loops_end() {
    let r = rig(false);
    r.header(VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 0 -> ... (written raw: build_desc_chain would straighten
    // the loop): virtio-queue stops after the queue size, and the chain
    // read so far has a readable buffer after a writable one.
    let mock = MockSplitQueue::new(&r.mem, 16);
    mock.add_desc_chains(&[d(HDR, 16, N, 1), d(DATA, 512, W | N, 0)], 0)
        .unwrap();
    let mut queue: Queue = mock.create_queue().unwrap();
    let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    process_queue(&mut queue, &r.mem, &r.disk, &irq);
    let used = mock.used().ring().ref_at(0).unwrap().load().len();
    let status: u8 = r.mem.read_obj(GuestAddress(DATA + 511)).unwrap();
    assert_eq!((used, status), (1, IOERR));
}

#[test]
fn config_space_reports_capacity_and_limits() {
    let dev = Block::new(Arc::new(MemDisk::new(1 << 20, false)));
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (1 << 20) / 512);
    let mut seg_max = [0u8; 4];
    dev.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
}

// ---- any layout (virtio 1.x: a device must not assume the framing) ----

/// A request header's bytes.
fn header_bytes(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Test data whose every byte depends on its position.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            u8::try_from(i % 251)
                .unwrap()
                .wrapping_mul(31)
                .wrapping_add(seed)
        })
        .collect()
}

#[test]
fn a_header_split_across_descriptors_is_read_whole() {
    let r = rig(false);
    let h = header_bytes(VIRTIO_BLK_T_OUT, 3);
    // 16 header bytes as 3 + 5 + 8, at unrelated addresses.
    r.mem.write_slice(&h[..3], GuestAddress(0x1000)).unwrap();
    r.mem.write_slice(&h[3..8], GuestAddress(0x1800)).unwrap();
    r.mem.write_slice(&h[8..], GuestAddress(0x1c00)).unwrap();
    let data = pattern(1024, 1);
    r.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let descs = [
        d(0x1000, 3, N, 1),
        d(0x1800, 5, N, 2),
        d(0x1c00, 8, N, 3),
        d(DATA, 1024, N, 4),
        d(STATUS, 1, W, 0),
    ];
    assert_eq!(r.run(&descs), (1, OK));
    assert_eq!(
        &r.disk.data.lock().unwrap()[3 * 512..3 * 512 + 1024],
        &data[..]
    );
}

#[test]
fn header_and_data_may_share_a_descriptor() {
    let r = rig(false);
    // One device-readable buffer: header, then 1024 data bytes; one
    // device-writable buffer: the status byte.
    let data = pattern(1024, 2);
    r.mem
        .write_slice(&header_bytes(VIRTIO_BLK_T_OUT, 1), GuestAddress(HDR))
        .unwrap();
    r.mem.write_slice(&data, GuestAddress(HDR + 16)).unwrap();
    assert_eq!(
        r.run(&[d(HDR, 16 + 1024, N, 1), d(STATUS, 1, W, 0)]),
        (1, OK)
    );
    assert_eq!(&r.disk.data.lock().unwrap()[512..1536], &data[..]);
}

#[test]
fn data_and_status_may_share_a_descriptor() {
    let r = rig(false);
    let data = pattern(2048, 3);
    r.disk.write_at(&data, 4096).unwrap();
    r.header(VIRTIO_BLK_T_IN, 8);
    // One device-writable buffer: 2048 data bytes, then the status byte.
    let status = GuestAddress(DATA + 2048);
    assert_eq!(
        r.run_at(&[d(HDR, 16, N, 1), d(DATA, 2049, W, 0)], status),
        (2049, OK)
    );
    let mut back = vec![0u8; 2048];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, data);
}

#[test]
fn a_request_in_two_descriptors_with_odd_splits() {
    let r = rig(false);
    // Written with the header and all data in one readable buffer and
    // the status alone; read back with the header as 10 + 6 bytes and the
    // data as 100 + 600 + 324 bytes, the last piece sharing its buffer
    // with the status byte.
    let data = pattern(1024, 4);
    r.mem
        .write_slice(&header_bytes(VIRTIO_BLK_T_OUT, 0), GuestAddress(HDR))
        .unwrap();
    r.mem.write_slice(&data, GuestAddress(HDR + 16)).unwrap();
    assert_eq!(r.run(&[d(HDR, 1040, N, 1), d(STATUS, 1, W, 0)]), (1, OK));
    assert_eq!(&r.disk.data.lock().unwrap()[..1024], &data[..]);

    let h = header_bytes(VIRTIO_BLK_T_IN, 0);
    r.mem.write_slice(&h[..10], GuestAddress(0x1000)).unwrap();
    r.mem.write_slice(&h[10..], GuestAddress(0x1400)).unwrap();
    r.mem.write_slice(&[0u8; 1100], GuestAddress(DATA)).unwrap();
    let descs = [
        d(0x1000, 10, N, 1),
        d(0x1400, 6, N, 2),
        d(DATA, 100, W | N, 3),
        d(DATA + 0x200, 600, W | N, 4),
        d(DATA + 0x800, 325, W, 0),
    ];
    assert_eq!(
        r.run_at(&descs, GuestAddress(DATA + 0x800 + 324)),
        (1025, OK)
    );
    let mut back = vec![0u8; 1024];
    r.mem
        .read_slice(&mut back[..100], GuestAddress(DATA))
        .unwrap();
    r.mem
        .read_slice(&mut back[100..700], GuestAddress(DATA + 0x200))
        .unwrap();
    r.mem
        .read_slice(&mut back[700..], GuestAddress(DATA + 0x800))
        .unwrap();
    assert_eq!(back, data);
}

#[test]
fn get_id_flush_and_discard_in_any_layout() {
    let r = rig(false);
    // GET_ID: the 20 id bytes and the status in one buffer.
    r.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        r.run_at(
            &[d(HDR, 16, N, 1), d(DATA, 21, W, 0)],
            GuestAddress(DATA + 20)
        ),
        (21, OK)
    );
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..8], b"memdisk\0");
    // FLUSH: the header in two pieces.
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        r.run(&[d(HDR, 7, N, 1), d(HDR + 7, 9, N, 2), d(STATUS, 1, W, 0)]),
        (1, OK)
    );
    assert_eq!(*r.disk.flushes.lock().unwrap(), 1);
    // DISCARD: header and half the segment in one buffer, the other half
    // in another.
    r.disk.write_at(&[9u8; 4096], 0).unwrap();
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&2u64.to_le_bytes());
    seg[8..12].copy_from_slice(&3u32.to_le_bytes());
    r.mem
        .write_slice(&header_bytes(VIRTIO_BLK_T_DISCARD, 0), GuestAddress(HDR))
        .unwrap();
    r.mem
        .write_slice(&seg[..8], GuestAddress(HDR + 16))
        .unwrap();
    r.mem.write_slice(&seg[8..], GuestAddress(DATA)).unwrap();
    assert_eq!(
        r.run(&[d(HDR, 24, N, 1), d(DATA, 8, N, 2), d(STATUS, 1, W, 0)]),
        (1, OK)
    );
    let disk = r.disk.data.lock().unwrap().clone();
    assert!(disk[..1024].iter().all(|&b| b == 9));
    assert!(disk[1024..2560].iter().all(|&b| b == 0));
    assert!(disk[2560..4096].iter().all(|&b| b == 9));
}

#[test]
fn any_layout_keeps_the_validation() {
    let r = rig(false);
    // A device-readable buffer after a device-writable one.
    r.header(VIRTIO_BLK_T_IN, 0);
    let descs = [
        d(HDR, 16, N, 1),
        d(DATA, 512, W | N, 2),
        d(DATA + 0x1000, 16, N, 3),
        d(STATUS, 1, W, 0),
    ];
    assert_eq!(r.run(&descs), (1, IOERR));
    // A read whose header shares a buffer with more readable bytes: those
    // would be data the device cannot write into.
    r.mem
        .write_slice(&header_bytes(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
        .unwrap();
    assert_eq!(
        r.run(&[d(HDR, 16 + 512, N, 1), d(STATUS, 1, W, 0)]),
        (1, IOERR)
    );
    // A write whose status buffer has room before the status byte.
    r.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        r.run_at(
            &[d(HDR, 16, N, 1), d(DATA, 513, W, 0)],
            GuestAddress(DATA + 512)
        ),
        (1, IOERR)
    );
    // A header of 15 readable bytes, whatever the split.
    assert_eq!(
        r.run(&[d(HDR, 7, N, 1), d(HDR + 7, 8, N, 2), d(STATUS, 1, W, 0)])
            .0,
        0
    );
    // Header bytes outside RAM in the second piece.
    assert_eq!(
        r.run(&[
            d(HDR, 8, N, 1),
            d(0xffff_0000_0000, 8, N, 2),
            d(STATUS, 1, W, 0)
        ]),
        (1, IOERR)
    );
    // Data and status sharing a buffer that runs out of RAM: no status.
    let end = 4u64 << 20;
    assert_eq!(r.run(&[d(HDR, 16, N, 1), d(end - 512, 1024, W, 0)]).0, 0);
    // A data descriptor whose end overflows the address space.
    r.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        r.run(&[
            d(HDR, 16, N, 1),
            d(u64::MAX - 100, 512, W | N, 2),
            d(STATUS, 1, W, 0)
        ]),
        (1, IOERR)
    );
    // A data segment larger than size_max, even when it holds the status.
    assert_eq!(
        r.run_at(
            &[d(HDR, 16, N, 1), d(DATA, SIZE_MAX + 513, W, 0)],
            GuestAddress(DATA + u64::from(SIZE_MAX) + 512)
        ),
        (1, IOERR)
    );
}

#[test]
fn segments_are_grouped_into_host_ios_of_at_most_1_mib() {
    let r = Rig {
        mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap(),
        disk: MemDisk::new(4 << 20, false),
    };
    let base = 0x10_0000u64;
    let hdr = GuestAddress(0x8000);
    let status = GuestAddress(0x9000);
    let put_header = |kind| {
        r.mem.write_slice(&header_bytes(kind, 0), hdr).unwrap();
        r.mem.write_obj(0xffu8, status).unwrap();
    };
    // seg_max (254) segments of 4 KiB: one host read.
    put_header(VIRTIO_BLK_T_IN);
    let mut descs = vec![d(hdr.0, 16, N, 1)];
    for i in 0..SEG_MAX {
        descs.push(d(base + u64::from(i) * 4096, 4096, W | N, 0));
    }
    descs.push(d(status.0, 1, W, 0));
    assert_eq!(r.run_in(256, &descs, status), (SEG_MAX * 4096 + 1, OK));
    assert_eq!(*r.disk.reads.lock().unwrap(), vec![254 * 4096]);
    // One segment more than seg_max: refused before any I/O.
    put_header(VIRTIO_BLK_T_IN);
    let mut descs255 = vec![d(hdr.0, 16, N, 1)];
    for i in 0..=SEG_MAX {
        descs255.push(d(base + u64::from(i) * 4096, 4096, W | N, 0));
    }
    descs255.push(d(status.0, 1, W, 0));
    assert_eq!(r.run_in(512, &descs255, status), (1, IOERR));
    assert_eq!(r.disk.reads.lock().unwrap().len(), 1);
    // 512 + 1 MiB + 512 bytes, with the first piece behind the header and
    // the last in front of the status byte: 1 MiB, then 1 KiB.
    let data = pattern(SIZE_MAX as usize + 1024, 5);
    r.mem
        .write_slice(&header_bytes(VIRTIO_BLK_T_OUT, 0), hdr)
        .unwrap();
    r.mem
        .write_slice(&data[..512], GuestAddress(hdr.0 + 16))
        .unwrap();
    r.mem
        .write_slice(&data[512..512 + SIZE_MAX as usize], GuestAddress(base))
        .unwrap();
    r.mem
        .write_slice(&data[512 + SIZE_MAX as usize..], GuestAddress(0xa000))
        .unwrap();
    let descs = [
        d(hdr.0, 16 + 512, N, 1),
        d(base, SIZE_MAX, N, 2),
        d(0xa000, 512, N, 3),
        d(status.0, 1, W, 0),
    ];
    assert_eq!(r.run_in(16, &descs, status), (1, OK));
    assert_eq!(
        *r.disk.writes.lock().unwrap(),
        vec![SIZE_MAX as usize, 1024]
    );
    assert_eq!(&r.disk.data.lock().unwrap()[..data.len()], &data[..]);
}

/// xorshift64: a small deterministic generator for the random chains.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Splits `len` bytes from `addr` into 1-4 contiguous descriptors.
fn split_randomly(rng: &mut Rng, addr: u64, len: u32, flags: u16, out: &mut Vec<RawDescriptor>) {
    let pieces = rng.below(4) + 1;
    let mut at = 0u32;
    for i in 0..pieces {
        let left = len - at;
        let n = if i + 1 == pieces {
            left
        } else {
            u32::try_from(rng.below(u64::from(left) + 1)).unwrap()
        };
        out.push(d(addr + u64::from(at), n, flags, 0));
        at += n;
    }
}

#[test]
fn random_chains_in_any_layout_never_panic_or_overreport() {
    // As the fuzz target does, in miniature: well-formed requests of every
    // type split into descriptors at random places (header and data, data
    // and status sharing buffers or not), and one in three of them broken
    // (a descriptor turned around, moved outside RAM or to the end of the
    // address space, made huge or empty). Every chain must be answered,
    // the well-formed ones with OK, and the used length may never exceed
    // the device-writable bytes the chain offered.
    let r = rig(false);
    let mut rng = Rng(0x5eed_b10c);
    let kinds = [
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ];
    let mut ok = 0;
    for _ in 0..20000 {
        let kind = kinds[usize::try_from(rng.below(kinds.len() as u64)).unwrap()];
        let data_len = u32::try_from(rng.below(9) * 512).unwrap();
        let sector = rng.below(r.disk.size() / SECTOR_SIZE - 8);
        let mut readable = header_bytes(kind, sector).to_vec();
        let mut writable_len = 1;
        match kind {
            VIRTIO_BLK_T_IN => writable_len += data_len,
            VIRTIO_BLK_T_OUT => readable.extend(pattern(data_len as usize, 7)),
            VIRTIO_BLK_T_GET_ID => writable_len += 20,
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                readable.extend_from_slice(&rng.below(56).to_le_bytes());
                readable.extend_from_slice(&8u32.to_le_bytes());
                readable.extend_from_slice(&[0u8; 4]);
            }
            _ => {}
        }
        r.mem.write_slice(&readable, GuestAddress(HDR)).unwrap();
        let mut descs = Vec::new();
        let readable_len = u32::try_from(readable.len()).unwrap();
        split_randomly(&mut rng, HDR, readable_len, 0, &mut descs);
        split_randomly(&mut rng, 0x8000, writable_len, W, &mut descs);
        let broken = rng.below(3) == 0;
        if broken {
            let i = usize::try_from(rng.below(descs.len() as u64)).unwrap();
            let mut desc = virtio_queue::desc::split::Descriptor::from(descs[i]);
            desc = match rng.below(5) {
                0 => virtio_queue::desc::split::Descriptor::new(
                    desc.addr().0,
                    desc.len(),
                    desc.flags() ^ W,
                    0,
                ),
                1 => virtio_queue::desc::split::Descriptor::new(
                    0xffff_0000_0000,
                    desc.len(),
                    desc.flags(),
                    0,
                ),
                2 => virtio_queue::desc::split::Descriptor::new(
                    u64::MAX - rng.below(64),
                    desc.len(),
                    desc.flags(),
                    0,
                ),
                3 => virtio_queue::desc::split::Descriptor::new(
                    desc.addr().0,
                    SIZE_MAX + 1,
                    desc.flags(),
                    0,
                ),
                _ => virtio_queue::desc::split::Descriptor::new(desc.addr().0, 0, desc.flags(), 0),
            };
            descs[i] = RawDescriptor::from(desc);
        }
        let writable: u64 = descs
            .iter()
            .map(|&raw| virtio_queue::desc::split::Descriptor::from(raw))
            .filter(|desc| desc.flags() & W != 0)
            .map(|desc| u64::from(desc.len()))
            .sum();
        let status = GuestAddress(0x8000 + u64::from(writable_len) - 1);
        r.mem.write_obj(0xffu8, status).unwrap();
        let mock = MockSplitQueue::new(&r.mem, 16);
        mock.build_desc_chain(&descs).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        process_queue(&mut queue, &r.mem, &r.disk, &irq);
        assert_eq!(mock.used().idx().load(), 1, "{descs:?}");
        let used = mock.used().ring().ref_at(0).unwrap().load().len();
        assert!(
            u64::from(used) <= writable,
            "{used} > {writable}: {descs:?}"
        );
        let answer: u8 = r.mem.read_obj(status).unwrap();
        if !broken {
            assert_eq!((used, answer), (writable_len, OK), "{descs:?}");
            ok += 1;
        }
    }
    assert!(ok > 10000, "only {ok} well-formed requests");
    assert!(r.disk.reads.lock().unwrap().len() > 1000);
    assert!(r.disk.writes.lock().unwrap().len() > 1000);
}

/// Waits (at most 5 s) until the limiter's timer fires, and tells it.
fn wait_for_timer(l: &mut RateLimiter) -> std::time::Duration {
    let mut pfd = libc::pollfd {
        fd: l.timer_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let started = std::time::Instant::now();
    // SAFETY: one pollfd, valid for the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(n, 1, "the limiter's timer fires");
    l.timer_fired();
    started.elapsed()
}

/// A throttled queue: the limiter admits one 4 KiB read per bucket; the
/// others stay in the queue, a kick while throttled serves nothing and
/// loses nothing, and the timer brings each next one.
#[test]
fn a_rate_limited_queue_waits_for_its_timer_and_loses_nothing() {
    use crate::virtio::rate_limit::{BucketConfig, RateLimitConfig};
    let r = rig(false);
    let mock = MockSplitQueue::new(&r.mem, 16);
    let chain = |k: u16| {
        let base = u64::from(k) * 3;
        let i = u16::try_from(base).unwrap();
        [
            d(HDR, 16, N, i + 1),
            d(DATA + u64::from(k) * 0x1000, 4096, W | N, i + 2),
            d(STATUS + u64::from(k), 1, W, 0),
        ]
    };
    r.header(VIRTIO_BLK_T_IN, 0);
    let descs: Vec<_> = (0..3).flat_map(chain).collect();
    mock.add_desc_chains(&descs, 0).unwrap();
    let mut queue: Queue = mock.create_queue().unwrap();
    let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    // 4 KiB a 20 ms: a bucket that holds exactly one request.
    let mut limiter = RateLimiter::new(RateLimitConfig {
        bytes: Some(BucketConfig {
            size: 4096,
            refill_ms: 20,
            one_time_burst: 0,
        }),
        ops: None,
    })
    .unwrap();
    let used = |mock: &MockSplitQueue<'_, GuestMemoryMmap>| mock.used().idx().load();
    process_queue_limited(&mut queue, &r.mem, &r.disk, &irq, Some(&mut limiter));
    assert_eq!(used(&mock), 1);
    assert!(limiter.is_blocked());
    // A kick while throttled (a fourth request queued meanwhile): nothing
    // is served before the timer, nothing is lost.
    mock.add_desc_chains(&chain(3), 9).unwrap();
    process_queue_limited(&mut queue, &r.mem, &r.disk, &irq, Some(&mut limiter));
    assert_eq!(used(&mock), 1);
    for served in 2..=4 {
        let waited = wait_for_timer(&mut limiter);
        assert!(waited < std::time::Duration::from_secs(1), "{waited:?}");
        process_queue_limited(&mut queue, &r.mem, &r.disk, &irq, Some(&mut limiter));
        assert_eq!(used(&mock), served);
    }
    assert_eq!(r.disk.reads.lock().unwrap().len(), 4);
    for k in 0..4 {
        assert_eq!(r.mem.read_obj::<u8>(GuestAddress(STATUS + k)).unwrap(), OK);
    }
}

/// A request larger than the whole bucket still goes (when the bucket
/// is full), and the next waits for the debt: no deadlock.
#[test]
fn a_request_larger_than_the_bucket_is_served() {
    use crate::virtio::rate_limit::{BucketConfig, RateLimitConfig};
    let r = rig(false);
    let mock = MockSplitQueue::new(&r.mem, 16);
    r.header(VIRTIO_BLK_T_IN, 0);
    mock.add_desc_chains(
        &[
            d(HDR, 16, N, 1),
            d(DATA, 32 * 1024, W | N, 2),
            d(STATUS, 1, W, 0),
            d(HDR, 16, N, 4),
            d(DATA, 512, W | N, 5),
            d(STATUS + 1, 1, W, 0),
        ],
        0,
    )
    .unwrap();
    let mut queue: Queue = mock.create_queue().unwrap();
    let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    // 1 KiB a 1 ms: the first request is 32 buckets' worth.
    let mut limiter = RateLimiter::new(RateLimitConfig {
        bytes: Some(BucketConfig {
            size: 1024,
            refill_ms: 1,
            one_time_burst: 0,
        }),
        ops: None,
    })
    .unwrap();
    process_queue_limited(&mut queue, &r.mem, &r.disk, &irq, Some(&mut limiter));
    assert_eq!(mock.used().idx().load(), 1);
    let waited = wait_for_timer(&mut limiter);
    // ~31 ms of debt plus the 512 bytes.
    assert!(waited >= std::time::Duration::from_millis(25), "{waited:?}");
    process_queue_limited(&mut queue, &r.mem, &r.disk, &irq, Some(&mut limiter));
    assert_eq!(mock.used().idx().load(), 2);
}
