//! Opens arbitrary bytes as a qcow2 image and drives it: the header,
//! extensions, L1/L2 tables, refcount table and blocks, snapshot table and
//! compressed clusters all come from the input. Every outcome must be an
//! error or data, never a panic, a hang or an unbounded allocation.
//!
//! Input: one byte giving the number of operations (8 bytes each), the
//! operations, then the image.

#![no_main]

use std::sync::Arc;

use block::file::MemFile;
use block::qcow2::Qcow2;
use block::DiskImage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let ops_len = (usize::from(count) * 8).min(rest.len());
    let (ops, image) = rest.split_at(ops_len);
    for read_only in [true, false] {
        // Writes may grow the image by at most 16 MiB.
        let mem = Arc::new(MemFile::with_limit(
            image.to_vec(),
            image.len() as u64 + (16 << 20),
        ));
        let Ok(img) = Qcow2::open(Box::new(mem), read_only, Vec::new(), None) else {
            continue;
        };
        let size = img.size();
        let _ = img.snapshots();
        let mut buf = vec![0u8; 256 << 10];
        for op in ops.chunks_exact(8) {
            let offset = u64::from(u32::from_le_bytes([op[1], op[2], op[3], op[4]])) * 512;
            let len = (usize::from(u16::from_le_bytes([op[5], op[6]])) * 8).min(buf.len());
            if size == 0 {
                break;
            }
            let offset = offset % size;
            let len = len.min((size - offset) as usize);
            let _ = match op[0] % 6 {
                0 => img.read_at(&mut buf[..len], offset),
                1 => {
                    buf[..len].fill(op[7]);
                    img.write_at(&buf[..len], offset)
                }
                2 => img.write_zeroes(offset, len as u64, op[7] & 1 == 0),
                3 => img.discard(offset, len as u64),
                4 => img.flush(),
                _ => img.check(!read_only && op[7] & 1 == 0).map(|_| ()).map_err(|e| {
                    std::io::Error::other(e.to_string())
                }),
            };
        }
        let _ = img.check(false);
    }
});
