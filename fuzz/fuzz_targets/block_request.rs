//! Feeds virtio-blk arbitrary descriptor chains and guest memory: request
//! headers, directions, lengths, addresses inside and outside RAM, loops.
//! The device must answer every request without panicking.

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
struct MemDisk(Mutex<Vec<u8>>);

impl DiskImage for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        false
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
const DESC_BYTES: usize = 12;

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else { return };
    let count = usize::from(count % 8) + 1;
    if rest.len() < count * DESC_BYTES {
        return;
    }
    let (table, contents) = rest.split_at(count * DESC_BYTES);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    // Guest memory above the queue's own structures holds the fuzz bytes
    // (headers, data, discard segments).
    let n = contents.len().min(MEM_SIZE - 0x10000);
    mem.write_slice(&contents[..n], GuestAddress(0x10000)).unwrap();
    let descs: Vec<RawDescriptor> = table
        .chunks(DESC_BYTES)
        .map(|c| {
            let addr = u64::from_le_bytes(c[0..8].try_into().unwrap());
            let len = u32::from(u16::from_le_bytes([c[8], c[9]]));
            let flags = u16::from(c[10] & 0x3); // NEXT and WRITE
            let next = u16::from(c[11] % 16);
            RawDescriptor::from(Descriptor::new(addr, len, flags, next))
        })
        .collect();
    let mock = MockSplitQueue::new(&mem, 16);
    if mock.build_desc_chain(&descs).is_err() {
        return;
    }
    let Ok(mut queue) = mock.create_queue::<Queue>() else { return };
    let disk = MemDisk(Mutex::new(vec![0; 64 * 1024]));
    let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    process_queue(&mut queue, &mem, &disk, &interrupt);
});
