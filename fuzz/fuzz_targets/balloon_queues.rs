//! Feeds virtio-balloon's queues arbitrary descriptor chains over guest
//! memory with a hole in it: page-number buffers (inflate, deflate), free
//! page reports and statistics buffers, with addresses and page numbers
//! inside RAM, in the hole and past its end, duplicated and misaligned.
//! The device must complete every buffer without panicking and give back
//! nothing but guest RAM; the pure decoders must keep their promises
//! (sorted, disjoint, page-aligned runs; bounded statistics).
//!
//! Input: one byte (low 4 bits: descriptors - 1; bits 4-5: the queue —
//! inflate, deflate, reporting, statistics), then 12 bytes per descriptor
//! (`addr: u64 LE, len: u16 LE, flags, next`; flags bit 0 NEXT, bit 1
//! WRITE, bit 2 `addr` is an offset into the fuzzed memory, bit 3 `next`
//! is the following descriptor, bit 4 the length is multiplied by 4096),
//! then the guest memory the descriptors mostly point into.

#![no_main]

use devices::virtio::balloon::queues::{
    parse_stats, pfn_ranges, process_pfns, process_reports, process_stats, request_stats, MAX_PFNS,
};
use devices::virtio::balloon::BalloonCounters;
use devices::virtio::Interrupt;
use libfuzzer_sys::fuzz_target;
use memory::GuestMemoryMmap;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// RAM: [0, 256 KiB) and [512 KiB, 640 KiB); a hole between.
const LOW: usize = 0x40000;
const HIGH_START: u64 = 0x80000;
const HIGH: usize = 0x20000;
/// Where the fuzzed memory starts (above the queue's own structures).
const CONTENTS: u64 = 0x10000;
const DESC_BYTES: usize = 12;
const QUEUE_SIZE: u16 = 16;

fuzz_target!(|data: &[u8]| {
    // The decoders on the raw input.
    let runs = pfn_ranges(data);
    let mut end = 0u64;
    for (i, &(addr, len)) in runs.iter().enumerate() {
        assert!(addr % 4096 == 0 && len % 4096 == 0 && len > 0);
        assert!(i == 0 || addr > end, "runs are sorted and apart");
        end = addr + len;
    }
    assert!(runs.iter().map(|r| r.1 / 4096).sum::<u64>() <= MAX_PFNS as u64);
    let _ = parse_stats(data);

    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(first & 0xf) + 1;
    let which = (first >> 4) & 3;
    if rest.len() < count * DESC_BYTES {
        return;
    }
    let (table, contents) = rest.split_at(count * DESC_BYTES);
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), LOW), (GuestAddress(HIGH_START), HIGH)])
            .unwrap();
    let room = LOW - CONTENTS as usize;
    let n = contents.len().min(room);
    mem.write_slice(&contents[..n], GuestAddress(CONTENTS))
        .unwrap();
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
                len = len.saturating_mul(4096);
            }
            let next = if flags & 8 != 0 {
                (i as u16 + 1) % QUEUE_SIZE
            } else {
                u16::from(c[11]) % QUEUE_SIZE
            };
            RawDescriptor::from(Descriptor::new(addr, len, u16::from(flags & 3), next))
        })
        .collect();
    let mock = MockSplitQueue::new(&mem, QUEUE_SIZE);
    if mock.add_desc_chains(&descs, 0).is_err() {
        return;
    }
    let Ok(mut queue) = mock.create_queue::<Queue>() else {
        return;
    };
    let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut counters = BalloonCounters::default();
    match which {
        0 | 1 => process_pfns(&mut queue, &mem, &interrupt, which == 0, &mut counters),
        2 => process_reports(&mut queue, &mem, &interrupt, &mut counters),
        _ => {
            let mut held = None;
            process_stats(&mut queue, &mem, &interrupt, &mut held, &mut |_| {});
            let _ = request_stats(&mut queue, &mem, &interrupt, &mut held);
        }
    }
    // Only guest RAM is ever given back: at most all of it per buffer.
    let ram = (LOW + HIGH) as u64;
    assert!(counters.released_bytes <= ram * u64::from(QUEUE_SIZE));
});
