//! Feeds the virtio-fs device's request path — queue, bridge, FUSE server
//! and the share's file system — a stream of guest requests: FUSE headers
//! (opcode, node ID, length as the fuzzer says), bodies, and descriptor
//! layouts (split buffers, short or missing reply buffers, buffers outside
//! RAM). The share is a fresh temporary directory with a file, a
//! subdirectory and a symlink pointing out of it; nothing may panic, and
//! nothing outside the share may change.

#![no_main]

use std::sync::OnceLock;

use devices::virtio::fs::bridge::Bridge;
use devices::virtio::fs::{process_queue, share_server, ShareOptions};
use devices::virtio::{Interrupt, Queue};
use libfuzzer_sys::fuzz_target;
use memory::GuestMemoryMmap;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 1 << 20;
const REQ: u64 = 0x8_0000;
const REPLY: u64 = 0xa_0000;

struct Dirs {
    share: std::path::PathBuf,
    outside: std::path::PathBuf,
}

fn dirs() -> &'static Dirs {
    static DIRS: OnceLock<Dirs> = OnceLock::new();
    DIRS.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("hv-fuzz-fs-{}", std::process::id()));
        let share = base.join("share");
        let outside = base.join("outside");
        std::fs::create_dir_all(share.join("dir")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(share.join("file"), b"0123456789").unwrap();
        std::fs::write(outside.join("secret"), b"secret").unwrap();
        let _ = std::os::unix::fs::symlink(&outside, share.join("out"));
        Dirs { share, outside }
    })
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

fuzz_target!(|data: &[u8]| {
    let d = dirs();
    let Ok(server) = share_server(&d.share, ShareOptions::default()) else {
        return;
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut bridge = Bridge::new(&mem).unwrap();
    let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut rest = data;
    // Each request: 1 layout byte, 2 length bytes, then that many request
    // bytes (a FUSE header and body as the fuzzer wrote them).
    while rest.len() > 3 {
        let layout = rest[0];
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let req = &rest[3..3 + len];
        rest = &rest[3 + len..];
        mem.write_slice(req, GuestAddress(REQ)).unwrap();
        let rlen = req.len() as u32;
        let reply = match layout >> 4 {
            0 => 0,
            1 => 16,
            2 => 100,
            _ => 64 * 1024,
        };
        let chain = match layout & 3 {
            // Request then reply.
            0 => vec![desc(REQ, rlen, 1, 1), desc(REPLY, reply, 2, 0)],
            // The request split in two, the reply in two.
            1 => {
                let h = rlen / 2;
                vec![
                    desc(REQ, h, 1, 1),
                    desc(REQ + u64::from(h), rlen - h, 1, 2),
                    desc(REPLY, reply / 2, 3, 3),
                    desc(REPLY + u64::from(reply / 2), reply - reply / 2, 2, 0),
                ]
            }
            // A reply buffer outside RAM.
            2 => vec![desc(REQ, rlen, 1, 1), desc(MEM as u64 - 8, reply, 2, 0)],
            // The length the fuzzer claims, no reply buffer.
            _ => vec![desc(REQ, u32::from(layout) << 8 | rlen, 0, 0)],
        };
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        if mock.build_desc_chain(&chain).is_err() {
            continue;
        }
        let Ok(mut q) = mock.create_queue::<Queue>() else {
            continue;
        };
        process_queue(&mut q, &mem, &mut bridge, &server, &irq);
    }
    // Nothing outside the share changed.
    assert_eq!(std::fs::read(d.outside.join("secret")).unwrap(), b"secret");
    assert_eq!(std::fs::read_dir(&d.outside).unwrap().count(), 1);
});
