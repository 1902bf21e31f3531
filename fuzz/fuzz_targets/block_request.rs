//! Feeds virtio-blk arbitrary descriptor chains and guest memory: request
//! headers, directions, lengths, addresses inside and outside RAM, loops,
//! and any framing (virtio 1.x: headers split across descriptors or
//! sharing one with data, data sharing the status byte's descriptor).
//! The device must answer every request without panicking.
//!
//! Input: one byte (low 4 bits: descriptors - 1; bit 7: read-only disk),
//! then 12 bytes per descriptor, then the guest memory the descriptors
//! mostly point into. A descriptor is `addr: u64 LE, len: u16 LE, flags,
//! next`; flags bit 0 NEXT, bit 1 WRITE, bit 2 `addr` is an offset into
//! the fuzzed memory (so requests are laid out at arbitrary byte splits),
//! bit 3 `next` is the following descriptor (straight chains), bit 4 the
//! length is multiplied by 32 (past size_max).

#![no_main]

use std::io;
use std::sync::Mutex;

use block::DiskImage;
use devices::virtio::block::process_queue;
use devices::virtio::Interrupt;
use libfuzzer_sys::fuzz_target;
use memory::GuestMemoryMmap;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// A 64 KiB disk in memory.
#[derive(Debug)]
struct MemDisk(Mutex<Vec<u8>>, bool);

impl DiskImage for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.1
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.0.lock().unwrap();
        let start = offset as usize;
        buf.copy_from_slice(&d[start..start + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        let start = offset as usize;
        d[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_at(&vec![0; len as usize], offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.discard(offset, len)
    }
    fn id(&self) -> Vec<u8> {
        b"fuzz".to_vec()
    }
}

const MEM_SIZE: usize = 0x40000;
/// Where the fuzzed memory starts (above the queue's own structures).
const CONTENTS: u64 = 0x10000;
const DESC_BYTES: usize = 12;
const QUEUE_SIZE: u16 = 16;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let count = usize::from(first & 0xf) + 1;
    let read_only = first & 0x80 != 0;
    if rest.len() < count * DESC_BYTES {
        return;
    }
    let (table, contents) = rest.split_at(count * DESC_BYTES);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let room = MEM_SIZE - CONTENTS as usize;
    let n = contents.len().min(room);
    mem.write_slice(&contents[..n], GuestAddress(CONTENTS)).unwrap();
    let descs: Vec<RawDescriptor> = table
        .chunks(DESC_BYTES)
        .enumerate()
        .map(|(i, c)| {
            let raw = u64::from_le_bytes(c[0..8].try_into().unwrap());
            let flags = c[10];
            let addr = if flags & 4 != 0 {
                CONTENTS + raw % room as u64
            } else {
                raw
            };
            let mut len = u32::from(u16::from_le_bytes([c[8], c[9]]));
            if flags & 16 != 0 {
                len *= 32;
            }
            let next = if flags & 8 != 0 {
                (i as u16 + 1) % QUEUE_SIZE
            } else {
                u16::from(c[11]) % QUEUE_SIZE
            };
            // NEXT and WRITE as the guest set them.
            RawDescriptor::from(Descriptor::new(addr, len, u16::from(flags & 3), next))
        })
        .collect();
    let mock = MockSplitQueue::new(&mem, QUEUE_SIZE);
    // Written as they are (loops included): each descriptor that does not
    // follow a NEXT one heads a chain in the available ring.
    if mock.add_desc_chains(&descs, 0).is_err() {
        return;
    }
    let Ok(mut queue) = mock.create_queue::<Queue>() else { return };
    let disk = MemDisk(Mutex::new(vec![0; 64 * 1024]), read_only);
    let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    process_queue(&mut queue, &mem, &disk, &interrupt);
});
