//! Feeds the virtio-gpu device a stream of guest requests on its control
//! and cursor queues: whatever bytes the fuzzer makes (command headers,
//! resource ids, formats, sizes, rectangles, offsets, backing lists),
//! split over descriptors or not, with response buffers of the right
//! size, too small or missing, and request buffers outside RAM. Guest
//! memory is 2 MiB of RAM, a hole, and 64 KiB more: backing entries land
//! in RAM, in the hole or past the end. Nothing may panic, the host
//! memory the device holds stays within its cap, a response never
//! exceeds its buffer, and every frame the sink is handed is whole.
//!
//! Input: records of `flags: u8, len: u16 LE`, then `len` request bytes
//! (at most 32 records). flags bits 0-1: 0 one request descriptor and a
//! 2 KiB response buffer, 1 the request split in two descriptors, 2 an
//! 8-byte response buffer, 3 no response buffer; bit 2: the cursor queue;
//! bit 3: the request descriptor points 8 bytes before the end of RAM.
//! Seeds: `fuzz/seeds/gpu_commands` (a guest's boot-time sequence).

#![no_main]

use std::sync::{Arc, Mutex};

use devices::virtio::gpu::backend::{GpuBackend, MAX_HOST_BYTES};
use devices::virtio::gpu::protocol::decode;
use devices::virtio::gpu::queue::{process_queue, GpuQueue};
use devices::virtio::gpu::{edid, Cursor, DisplaySink, Frame, Rect};
use devices::virtio::{Interrupt, Queue};
use libfuzzer_sys::fuzz_target;
use memory::GuestMemoryMmap;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const LOW: usize = 2 << 20;
const HIGH_START: u64 = 4 << 20;
const HIGH: usize = 64 << 10;
const REQ: u64 = 0x10_0000;
const RESP: u64 = 0x18_0000;
const QUEUE_SIZE: u16 = 256;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// A sink that checks what it is handed.
struct Checker;

impl DisplaySink for Checker {
    fn resize(&self, _scanout: u32, width: u32, height: u32) {
        assert!(width <= 16384 && height <= 16384);
    }
    fn update(&self, _scanout: u32, rect: Rect, frame: &Frame) {
        assert!(!rect.is_empty());
        assert!(
            rect.fits_in(frame.width, frame.height),
            "{rect:?} in {frame:?}"
        );
        assert_eq!(
            frame.pixels.len(),
            frame.stride as usize * frame.height as usize
        );
    }
    fn cursor(&self, cursor: &Cursor, _changed: bool) {
        if let Some(f) = &cursor.image {
            assert!(f.width <= 256 && f.height <= 256);
            assert_eq!(f.pixels.len(), (f.width * f.height) as usize);
        }
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

fuzz_target!(|data: &[u8]| {
    // The pure parts on the raw input.
    let _ = decode(data);
    if data.len() >= 4 {
        let w = u32::from(u16::from_le_bytes([data[0], data[1]]));
        let h = u32::from(u16::from_le_bytes([data[2], data[3]]));
        let e = edid::edid(w, h);
        assert_eq!(e.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
    }

    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), LOW), (GuestAddress(HIGH_START), HIGH)])
            .unwrap();
    let backend = Mutex::new(GpuBackend::new(
        &[(1280, 800), (640, 480)],
        Arc::new(Checker),
    ));
    let control = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), QUEUE_SIZE);
    let cursor = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), QUEUE_SIZE);
    let mut queues: [Queue; 2] = [
        control.create_queue().unwrap(),
        cursor.create_queue().unwrap(),
    ];
    let mocks = [&control, &cursor];
    let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut next_desc = [0u16; 2];
    let mut used = [0u16; 2];

    let mut rest = data;
    for _ in 0..32 {
        let [flags, l0, l1, tail @ ..] = rest else {
            break;
        };
        let len = usize::from(u16::from_le_bytes([*l0, *l1])).min(tail.len());
        let (req, after) = tail.split_at(len);
        rest = after;
        let q = usize::from(flags & 4 != 0);
        mem.write_slice(req, GuestAddress(REQ)).unwrap();
        let req_addr = if flags & 8 != 0 { LOW as u64 - 8 } else { REQ };
        let base = next_desc[q];
        let req_len = len as u32;
        let mut descs = Vec::new();
        let resp_len = match flags & 3 {
            0 | 1 => 2048,
            2 => 8,
            _ => 0,
        };
        if flags & 3 == 1 && len >= 2 {
            let half = req_len / 2;
            descs.push(desc(req_addr, half, F_NEXT, base + 1));
            descs.push(desc(
                req_addr + u64::from(half),
                req_len - half,
                F_NEXT,
                base + 2,
            ));
        } else {
            descs.push(desc(req_addr, req_len, F_NEXT, base + 1));
        }
        if resp_len > 0 {
            descs.push(desc(RESP, resp_len, F_WRITE, 0));
        } else {
            let last = descs.len() - 1;
            let d = Descriptor::from(descs[last]);
            descs[last] = desc(d.addr().0, d.len(), 0, 0);
        }
        if mocks[q].add_desc_chains(&descs, base).is_err() {
            break;
        }
        next_desc[q] = (base + descs.len() as u16) % (QUEUE_SIZE - 4);
        let which = if q == 0 {
            GpuQueue::Control
        } else {
            GpuQueue::Cursor
        };
        process_queue(which, &mut queues[q], &mem, &interrupt, &backend);
        let entry = mocks[q]
            .used()
            .ring()
            .ref_at(usize::from(used[q]))
            .unwrap()
            .load();
        used[q] += 1;
        assert!(entry.len() <= resp_len, "the response fits its buffer");
        assert!(backend.lock().unwrap().host_bytes() <= MAX_HOST_BYTES);
    }
    let b = backend.lock().unwrap();
    for i in 0..2 {
        if let Some(f) = b.frame(i) {
            assert_eq!(f.pixels.len(), (f.width * f.height) as usize);
        }
    }
});
