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
}

impl MemDisk {
    fn new(size: usize, read_only: bool) -> Self {
        MemDisk {
            data: Mutex::new(vec![0; size]),
            read_only,
            flushes: Mutex::new(0),
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
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_at(&vec![0; len as usize], offset)
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
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;

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
        let mock = MockSplitQueue::new(&self.mem, 16);
        mock.build_desc_chain(descs).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Interrupt::new(line);
        process_queue(&mut queue, &self.mem, &self.disk, &irq);
        let used = mock.used().ring().ref_at(0).unwrap().load().len();
        (used, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
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

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

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
    // 0 -> 1 -> 0 -> ...: virtio-queue stops after the queue size.
    let (used, _) = r.run(&[d(HDR, 16, N, 1), d(DATA, 512, W | N, 0)]);
    assert!(used <= 16 * 512 + 1);
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
