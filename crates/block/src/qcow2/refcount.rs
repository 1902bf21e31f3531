//! Refcounts and allocation: reading and changing cluster refcounts through
//! the refcount-block cache, finding free clusters, creating refcount
//! blocks, and growing the refcount table.

use std::io;

use crate::file::to_index;

use super::{eio, header, low_bits, table_bytes, Inner, OFFSET_MASK};

/// Reads refcount entry `index` of a block with 2^order-bit entries.
pub(crate) fn get_refcount(block: &[u8], order: u32, index: usize) -> u64 {
    let bits = 1usize << order;
    if bits >= 8 {
        let n = bits / 8;
        block[index * n..index * n + n]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    } else {
        let per_byte = 8 / bits;
        let shift = (index % per_byte) * bits;
        u64::from((block[index / per_byte] >> shift) & ((1u8 << bits) - 1))
    }
}

pub(crate) fn set_refcount(block: &mut [u8], order: u32, index: usize, value: u64) {
    let bits = 1usize << order;
    if bits >= 8 {
        let n = bits / 8;
        let bytes = value.to_be_bytes();
        block[index * n..index * n + n].copy_from_slice(&bytes[8 - n..]);
    } else {
        let per_byte = 8 / bits;
        let shift = (index % per_byte) * bits;
        let mask = ((1u8 << bits) - 1) << shift;
        let b = &mut block[index / per_byte];
        // Masked to the entry's width (under 8 bits), so it fits a byte.
        let value = u8::try_from(value & ((1 << bits) - 1)).unwrap_or(0);
        *b = (*b & !mask) | ((value << shift) & mask);
    }
}

impl Inner {
    pub(super) fn max_refcount(&self) -> u64 {
        if self.h.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.h.refcount_order)) - 1
        }
    }

    /// The host offset of the refcount block for cluster `c`, if any.
    fn refblock_offset(&self, c: u64) -> io::Result<Option<u64>> {
        let bi = c >> self.rb_bits;
        match usize::try_from(bi).ok().and_then(|i| self.reftable.get(i)) {
            None | Some(0) => Ok(None),
            Some(&e) => {
                let off = e & OFFSET_MASK;
                if !off.is_multiple_of(self.cs()) || off == 0 {
                    return Err(eio(format!("bad refcount table entry {e:#x}")));
                }
                Ok(Some(off))
            }
        }
    }

    pub(crate) fn refcount(&mut self, c: u64) -> io::Result<u64> {
        let Some(off) = self.refblock_offset(c)? else {
            return Ok(0);
        };
        let index = low_bits(c, self.rb_bits);
        let order = self.h.refcount_order;
        let block = self.rb_cache.get(off, &*self.storage)?;
        Ok(get_refcount(block, order, index))
    }

    pub(super) fn set_cluster_refcount(&mut self, c: u64, value: u64) -> io::Result<()> {
        if value > self.max_refcount() {
            return Err(eio(format!("refcount overflow for cluster {c}")));
        }
        let off = self
            .refblock_offset(c)?
            .ok_or_else(|| eio(format!("cluster {c} has no refcount block")))?;
        let index = low_bits(c, self.rb_bits);
        let order = self.h.refcount_order;
        let block = self.rb_cache.get_mut(off, &*self.storage)?;
        set_refcount(block, order, index, value);
        if value == 0 && c < self.free_hint {
            self.free_hint = c.max(1);
        }
        Ok(())
    }

    fn block_exists(&self, bi: u64) -> bool {
        usize::try_from(bi)
            .ok()
            .and_then(|i| self.reftable.get(i))
            .is_some_and(|&e| e != 0)
    }

    /// The refcount blocks missing for `n` clusters from `start`, counting
    /// the clusters those blocks themselves take just before the run.
    fn missing_blocks(&self, start: u64, n: u64) -> Vec<u64> {
        let per_block = 1u64 << self.rb_bits;
        let mut missing = 0;
        loop {
            let end = start + missing + n;
            let blocks: Vec<u64> = (start / per_block..=(end - 1) / per_block)
                .filter(|&bi| !self.block_exists(bi))
                .collect();
            if blocks.len() as u64 == missing {
                return blocks;
            }
            missing = blocks.len() as u64;
        }
    }

    /// An empty refcount block `bi` at `cluster` (the caller sets its
    /// refcounts, including its own).
    fn new_refblock(&mut self, bi: u64, cluster: u64) -> io::Result<()> {
        let off = cluster << self.cluster_bits;
        let entry = usize::try_from(bi)
            .ok()
            .and_then(|i| self.reftable.get_mut(i))
            .ok_or_else(|| eio(format!("refcount block {bi} is past the refcount table")))?;
        *entry = off;
        let block = vec![0u8; self.cluster_bytes()];
        self.rb_cache.insert(off, block, &*self.storage)
    }

    /// Reserves `n` contiguous clusters past everything in use, with any
    /// refcount blocks they need placed just before them.
    pub(super) fn alloc_run(&mut self, n: u64) -> io::Result<u64> {
        loop {
            let start = self.high_water;
            let per_block = 1u64 << self.rb_bits;
            let blocks = self.missing_blocks(start, n);
            let missing = blocks.len() as u64;
            let end = start + missing + n;
            let last_block = (end - 1) / per_block;
            if last_block >= self.reftable.len() as u64 {
                self.grow_reftable(last_block)?;
                continue;
            }
            for (k, &bi) in blocks.iter().enumerate() {
                self.new_refblock(bi, start + k as u64)?;
                self.reftable_dirty = true;
            }
            for c in start..end {
                self.set_cluster_refcount(c, 1)?;
            }
            self.high_water = end;
            return Ok(start + missing);
        }
    }

    /// Allocates one cluster (refcount 1) and returns its host offset.
    pub(super) fn alloc_cluster(&mut self) -> io::Result<u64> {
        let per_block = 1u64 << self.rb_bits;
        let mut c = self.free_hint.max(1);
        while c < self.high_water {
            if !self.block_exists(c / per_block) {
                c = (c / per_block + 1) * per_block;
                continue;
            }
            if self.refcount(c)? == 0 {
                self.set_cluster_refcount(c, 1)?;
                self.free_hint = c + 1;
                return Ok(c << self.cluster_bits);
            }
            c += 1;
        }
        self.free_hint = self.high_water;
        let c = self.alloc_run(1)?;
        self.free_hint = c + 1;
        Ok(c << self.cluster_bits)
    }

    /// Replaces the refcount table with a larger one covering block index
    /// `need`, written to fresh clusters before the header points to it.
    fn grow_reftable(&mut self, need: u64) -> io::Result<()> {
        self.write_refcounts()?;
        let cs = self.cs();
        let per_block = 1u64 << self.rb_bits;
        let per_cluster = cs / 8;
        let mut len = (need + 1).max(self.reftable.len() as u64 * 2);
        let (start, table_clusters, blocks) = loop {
            len = len.div_ceil(per_cluster) * per_cluster;
            if len * 8 > header::MAX_REFTABLE_BYTES {
                return Err(eio("the refcount table would exceed its maximum size"));
            }
            let table_clusters = len / per_cluster;
            let start = self.high_water;
            let blocks = self.missing_blocks(start, table_clusters);
            let end = start + blocks.len() as u64 + table_clusters;
            if (end - 1) / per_block < len {
                break (start, table_clusters, blocks);
            }
            len *= 2;
        };
        let clusters = u32::try_from(table_clusters)
            .map_err(|_| eio("the refcount table would exceed its maximum size"))?;
        let old_offset = self.h.refcount_table_offset;
        let old_clusters = u64::from(self.h.refcount_table_clusters);
        self.reftable.resize(to_index(len)?, 0);
        for (k, &bi) in blocks.iter().enumerate() {
            self.new_refblock(bi, start + k as u64)?;
        }
        let table_start = start + blocks.len() as u64;
        let end = table_start + table_clusters;
        for c in start..end {
            self.set_cluster_refcount(c, 1)?;
        }
        self.high_water = end;
        // Blocks, then the new table, then the header that switches to it.
        self.reftable_dirty = false;
        self.rb_cache.write_dirty(&*self.storage)?;
        self.storage
            .write_at(&table_bytes(&self.reftable), table_start * cs)?;
        self.storage.sync()?;
        let mut fields = Vec::with_capacity(12);
        fields.extend_from_slice(&(table_start * cs).to_be_bytes());
        fields.extend_from_slice(&clusters.to_be_bytes());
        self.storage.write_at(&fields, header::OFF_REFTABLE)?;
        self.storage.sync()?;
        self.synced();
        self.h.refcount_table_offset = table_start * cs;
        self.h.refcount_table_clusters = clusters;
        // The old table is unreferenced now.
        for c in 0..old_clusters {
            let cluster = (old_offset >> self.cluster_bits) + c;
            let rc = self.refcount(cluster)?;
            self.set_cluster_refcount(cluster, rc.saturating_sub(1))?;
        }
        Ok(())
    }
}
