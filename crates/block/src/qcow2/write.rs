//! The write path: in place where this image owns the cluster, else copy
//! on write into new clusters; zeroing and discarding; the guard against
//! data landing on metadata.

use std::io;

use crate::file::to_index;

use super::{classify, eio, header, Inner, Mapping, OFLAG_COPIED, OFLAG_ZERO};

impl Inner {
    /// The host cluster a write to `vc` may overwrite in place, if any.
    fn in_place(&mut self, vc: u64) -> io::Result<Option<u64>> {
        let entry = self.entry(vc)?;
        if let Mapping::Data(host) = classify(entry, self.cluster_bits, self.h.version)? {
            if entry & OFLAG_COPIED != 0 && self.refcount(host >> self.cluster_bits)? == 1 {
                return Ok(Some(host));
            }
        }
        Ok(None)
    }

    /// Writes part of one cluster.
    fn write_cluster(&mut self, vc: u64, in_off: u64, data: &[u8]) -> io::Result<()> {
        let cs = self.cs();
        if let Some(host) = self.in_place(vc)? {
            self.check_data_target(host)?;
            return self.storage.write_at(data, host + in_off);
        }
        let entry = self.entry(vc)?;
        let old = classify(entry, self.cluster_bits, self.h.version)?;
        let reuse = match old {
            Mapping::Zero(Some(host))
                if entry & OFLAG_COPIED != 0 && self.refcount(host >> self.cluster_bits)? == 1 =>
            {
                Some(host)
            }
            _ => None,
        };
        let old_is_zero = match old {
            Mapping::Zero(_) => true,
            Mapping::Unallocated => self.backing.is_none(),
            _ => false,
        };
        // Make the L2 table writable before allocating the data cluster, so
        // the allocation order is table first (as QEMU lays images out).
        self.l2_for_write(vc)?;
        let host = match reuse {
            Some(host) => host,
            None => self.alloc_cluster()?,
        };
        self.check_data_target(host)?;
        let file_len = self.storage.len()?;
        if old_is_zero && host >= file_len {
            // A cluster past the end of the file reads as zeroes once the
            // file covers it: write only the new bytes.
            self.storage.set_len(host + cs)?;
            self.storage.write_at(data, host + in_off)?;
        } else {
            // Copy on write: the new cluster holds the old contents around
            // the written bytes.
            let mut buffer = crate::file::AlignedBuf::new(self.cluster_bytes())?;
            let cluster = buffer.as_mut_slice();
            if !old_is_zero {
                self.read_cluster(vc, 0, cluster)?;
            }
            let at = to_index(in_off)?;
            cluster[at..at + data.len()].copy_from_slice(data);
            self.storage.write_at(cluster, host)?;
        }
        self.set_entry(vc, host | OFLAG_COPIED)
    }

    /// Writes whole clusters from `vc` on (`data` holds at least one),
    /// with one host write for as many as are physically contiguous;
    /// returns how many bytes it wrote.
    fn write_full_clusters(&mut self, vc: u64, data: &[u8]) -> io::Result<usize> {
        let cs = self.cs();
        let max = data.len() as u64 / cs;
        if let Some(host) = self.in_place(vc)? {
            let mut k = 1;
            while k < max && self.in_place(vc + k)? == Some(host + k * cs) {
                k += 1;
            }
            for i in 0..k {
                self.check_data_target(host + i * cs)?;
            }
            // k clusters of `data`, so at most its length.
            let bytes = to_index(k * cs)?;
            self.storage.write_at(&data[..bytes], host)?;
            return Ok(bytes);
        }
        // New clusters, allocated back to back while the allocator allows.
        self.l2_for_write(vc)?;
        let first = self.alloc_cluster()?;
        let mut k = 1;
        while k < max && self.in_place(vc + k)?.is_none() {
            self.l2_for_write(vc + k)?;
            let next = self.alloc_cluster()?;
            if next != first + k * cs {
                // Not contiguous: give it back (nothing refers to it yet).
                self.set_cluster_refcount(next >> self.cluster_bits, 0)?;
                break;
            }
            k += 1;
        }
        for i in 0..k {
            self.check_data_target(first + i * cs)?;
        }
        let bytes = to_index(k * cs)?;
        self.storage.write_at(&data[..bytes], first)?;
        for i in 0..k {
            self.set_entry(vc + i, (first + i * cs) | OFLAG_COPIED)?;
        }
        Ok(bytes)
    }

    pub(crate) fn write(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let cs = self.cs();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let vc = pos >> self.cluster_bits;
            let in_off = pos & (cs - 1);
            if in_off == 0 && (buf.len() - done) as u64 >= cs {
                let cb = self.cluster_bytes();
                let whole = (buf.len() - done) / cb * cb;
                done += self.write_full_clusters(vc, &buf[done..done + whole])?;
                continue;
            }
            let n = to_index(cs - in_off)?.min(buf.len() - done);
            self.write_cluster(vc, in_off, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn reads_as_zero(&mut self, vc: u64) -> io::Result<bool> {
        Ok(match self.mapping(vc)? {
            Mapping::Zero(_) => true,
            Mapping::Unallocated => self.backing.is_none(),
            _ => false,
        })
    }

    pub(crate) fn zero(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let cs = self.cs();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let vc = pos >> self.cluster_bits;
            let in_off = pos & (cs - 1);
            let n = (cs - in_off).min(end - pos);
            if self.reads_as_zero(vc)? {
                // Nothing to do.
            } else if n < cs {
                self.write_cluster(vc, in_off, &vec![0u8; to_index(n)?])?;
            } else if self.h.version >= 3 {
                let keep = match self.mapping(vc)? {
                    Mapping::Data(host) | Mapping::Zero(Some(host))
                        if !unmap
                            && self.entry(vc)? & OFLAG_COPIED != 0
                            && self.refcount(host >> self.cluster_bits)? == 1 =>
                    {
                        Some(host)
                    }
                    _ => None,
                };
                let entry = match keep {
                    Some(host) => host | OFLAG_COPIED | OFLAG_ZERO,
                    None => OFLAG_ZERO,
                };
                self.set_entry(vc, entry)?;
            } else if self.backing.is_none() {
                self.set_entry(vc, 0)?;
            } else {
                self.write_cluster(vc, 0, &vec![0u8; self.cluster_bytes()])?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Guards against data writes over metadata a corrupt image might point
    /// into; such an image is marked corrupt.
    fn check_data_target(&mut self, host: u64) -> io::Result<()> {
        let cs = self.cs();
        let l1_end = self.h.l1_table_offset + u64::from(self.h.l1_size) * 8;
        let rt_end = self.h.refcount_table_offset + u64::from(self.h.refcount_table_clusters) * cs;
        let overlaps = host < cs
            || (host + cs > self.h.l1_table_offset && host < l1_end)
            || (host + cs > self.h.refcount_table_offset && host < rt_end)
            || self.l2_cache.contains(host)
            || self.rb_cache.contains(host);
        if overlaps {
            self.mark_corrupt();
            return Err(eio(format!(
                "a data cluster at {host:#x} overlaps metadata; the image is marked corrupt"
            )));
        }
        Ok(())
    }

    fn mark_corrupt(&mut self) {
        if self.h.version == 3 && !self.read_only {
            self.h.incompatible |= header::INCOMPAT_CORRUPT;
            let _ = self
                .storage
                .write_at(&self.h.incompatible.to_be_bytes(), header::OFF_INCOMPAT)
                .and_then(|()| self.storage.sync());
        }
    }
}
