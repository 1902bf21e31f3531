//! The read path: clusters from this image, its backing file, zeroes,
//! or compressed data (deflate or zstd, the last cluster kept inflated).

use std::io;

use super::{classify, eio, Inner, Mapping};
use crate::file::to_index;

/// Inflates raw deflate data (no zlib header) until `out` is full, as
/// QEMU's compressed clusters hold it.
fn deflate_decompress(input: &[u8], out: &mut [u8]) -> bool {
    let mut d = flate2::Decompress::new(false);
    match d.decompress(input, out, flate2::FlushDecompress::Finish) {
        Ok(_) => d.total_out() == out.len() as u64,
        Err(_) => false,
    }
}

/// Decompresses zstd frames until `out` is full.
fn zstd_decompress(input: &[u8], out: &mut [u8]) -> bool {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let Ok(mut decoder) = Decoder::new() else {
        return false;
    };
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let (in_before, out_before) = (inb.pos(), outb.pos());
        if decoder.run(&mut inb, &mut outb).is_err() {
            return false;
        }
        if outb.pos() == outb.capacity() {
            return true;
        }
        if inb.pos() == in_before && outb.pos() == out_before {
            return false;
        }
    }
}

impl Inner {
    fn decompress(&mut self, entry: u64, offset: u64, len: u64) -> io::Result<()> {
        if self.decompressed.as_ref().is_some_and(|(e, _)| *e == entry) {
            return Ok(());
        }
        let file_len = self.storage.len()?;
        if offset >= file_len {
            return Err(eio(format!(
                "compressed cluster at {offset:#x} is past the end"
            )));
        }
        let mut input = vec![0u8; to_index(len.min(file_len - offset))?];
        self.storage.read_at(&mut input, offset)?;
        let mut out = vec![0u8; self.cluster_bytes()];
        let ok = if self.h.compression_type == 1 {
            zstd_decompress(&input, &mut out)
        } else {
            deflate_decompress(&input, &mut out)
        };
        if !ok {
            return Err(eio(format!(
                "compressed cluster at {offset:#x} does not decompress"
            )));
        }
        self.decompressed = Some((entry, out));
        Ok(())
    }

    /// Fills `out` with virtual cluster `vc`'s bytes from `in_off` on.
    pub(super) fn read_cluster(&mut self, vc: u64, in_off: u64, out: &mut [u8]) -> io::Result<()> {
        let entry = self.entry(vc)?;
        match classify(entry, self.cluster_bits, self.h.version)? {
            Mapping::Unallocated => {
                out.fill(0);
                if let Some(backing) = &self.backing {
                    let pos = (vc << self.cluster_bits) + in_off;
                    let bsize = backing.size();
                    if pos < bsize {
                        // What is left of the backing file, if less than `out`.
                        let n =
                            usize::try_from(bsize - pos).map_or(out.len(), |r| r.min(out.len()));
                        backing.read_at(&mut out[..n], pos)?;
                    }
                }
                Ok(())
            }
            Mapping::Zero(_) => {
                out.fill(0);
                Ok(())
            }
            Mapping::Compressed { offset, len } => {
                self.decompress(entry, offset, len)?;
                let start = to_index(in_off)?;
                if let Some((_, data)) = &self.decompressed {
                    out.copy_from_slice(&data[start..start + out.len()]);
                }
                Ok(())
            }
            Mapping::Data(host) => self.storage.read_at(out, host + in_off),
        }
    }

    pub(crate) fn read(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let cs = self.cs();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let vc = pos >> self.cluster_bits;
            let in_off = pos & (cs - 1);
            let mut n = to_index(cs - in_off)?.min(buf.len() - done);
            if let Mapping::Data(host) = self.mapping(vc)? {
                // Coalesce physically contiguous clusters into one read.
                let mut next = vc + 1;
                while done + n < buf.len()
                    && self.mapping(next)? == Mapping::Data(host + (next - vc) * cs)
                {
                    n = (n + self.cluster_bytes()).min(buf.len() - done);
                    next += 1;
                }
                self.storage
                    .read_at(&mut buf[done..done + n], host + in_off)?;
            } else {
                self.read_cluster(vc, in_off, &mut buf[done..done + n])?;
            }
            done += n;
        }
        Ok(())
    }
}
