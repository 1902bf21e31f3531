//! The guest-to-host mapping: L1 entries, L2 tables through their cache,
//! and changing an entry (with copy-on-write of L2 tables shared with an
//! internal snapshot).

use std::io;

use super::{classify, eio, low_bits, Inner, Mapping, OFFSET_MASK, OFLAG_COPIED};

impl Inner {
    pub(super) fn l2_offset(&self, l1_index: u64) -> io::Result<Option<u64>> {
        let Some(&e) = usize::try_from(l1_index).ok().and_then(|i| self.l1.get(i)) else {
            return Ok(None);
        };
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cs()) {
            return Err(eio(format!("unaligned L2 table offset {off:#x}")));
        }
        Ok(Some(off))
    }

    pub(crate) fn entry(&mut self, vc: u64) -> io::Result<u64> {
        let Some(off) = self.l2_offset(vc >> self.l2_bits)? else {
            return Ok(0);
        };
        let index = low_bits(vc, self.l2_bits);
        self.l2_room(off)?;
        let table = self.l2_cache.get(off, &*self.storage)?;
        table
            .get(index)
            .copied()
            .ok_or_else(|| eio("an L2 table is short"))
    }

    pub(super) fn mapping(&mut self, vc: u64) -> io::Result<Mapping> {
        let e = self.entry(vc)?;
        classify(e, self.cluster_bits, self.h.version)
    }

    /// The L2 table for `vc`, made private to the active L1 (allocated, or
    /// copied if a snapshot shares it). Returns its host offset.
    pub(super) fn l2_for_write(&mut self, vc: u64) -> io::Result<u64> {
        let l1_index = vc >> self.l2_bits;
        let i = usize::try_from(l1_index)
            .ok()
            .filter(|&i| i < self.l1.len())
            .ok_or_else(|| eio("write past the L1 table"))?;
        match self.l2_offset(l1_index)? {
            None => {
                let off = self.alloc_cluster()?;
                let table = vec![0u64; self.cluster_bytes() / 8];
                self.insert_l2(off, table)?;
                self.l1[i] = off | OFLAG_COPIED;
                self.l1_dirty = true;
                Ok(off)
            }
            Some(off) if self.refcount(off >> self.cluster_bits)? == 1 => {
                if self.l1[i] & OFLAG_COPIED == 0 {
                    self.l1[i] |= OFLAG_COPIED;
                    self.l1_dirty = true;
                }
                Ok(off)
            }
            Some(old) => {
                self.l2_room(old)?;
                let table = self.l2_cache.get(old, &*self.storage)?.clone();
                let off = self.alloc_cluster()?;
                self.insert_l2(off, table)?;
                self.l1[i] = off | OFLAG_COPIED;
                self.l1_dirty = true;
                self.free_later(old, self.cs())?;
                Ok(off)
            }
        }
    }

    fn insert_l2(&mut self, off: u64, table: Vec<u64>) -> io::Result<()> {
        self.l2_room(off)?;
        self.l2_cache.insert(off, table, &*self.storage)
    }

    /// Sets the L2 entry for `vc`, freeing what it mapped before.
    pub(super) fn set_entry(&mut self, vc: u64, entry: u64) -> io::Result<()> {
        let old = self.mapping(vc)?;
        let off = self.l2_for_write(vc)?;
        let index = low_bits(vc, self.l2_bits);
        self.l2_room(off)?;
        let table = self.l2_cache.get_mut(off, &*self.storage)?;
        *table
            .get_mut(index)
            .ok_or_else(|| eio("an L2 table is short"))? = entry;
        let new = classify(entry, self.cluster_bits, self.h.version)?;
        let same_host = matches!((old, new),
            (Mapping::Data(a) | Mapping::Zero(Some(a)), Mapping::Data(b) | Mapping::Zero(Some(b))) if a == b);
        if !same_host {
            self.free_mapping(old)?;
        }
        if let Mapping::Compressed { .. } = old {
            self.decompressed = None;
        }
        Ok(())
    }
}
