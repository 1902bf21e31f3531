//! Writing cached metadata back in crash-safe order.
//!
//! The order, so that a process dying at any moment leaves at worst
//! leaked clusters:
//! 1. refcount blocks (and the refcount table, when it gained entries),
//!    then a sync;
//! 2. L2 tables, then a sync;
//! 3. the L1 table, then a sync;
//!
//! and a cluster a table stopped pointing to is freed (its refcount
//! lowered) only after step 3, so a freed cluster is never reused while a
//! table on disk still references it. The caches may write a table back
//! early when they evict it: a refcount block at any time, an L2 table
//! only after step 1 (`l2_room`).

use std::io;

use super::{table_bytes, Inner, Mapping};

/// Frees waiting for a table writeback before a metadata flush is forced.
const MAX_PENDING_FREES: usize = 4096;

impl Inner {
    /// Writes dirty refcount blocks, then the refcount table if it gained
    /// entries (a block before the entry that points to it).
    pub(super) fn write_refcounts(&mut self) -> io::Result<()> {
        self.rb_cache.write_dirty(&*self.storage)?;
        if self.reftable_dirty {
            self.storage
                .write_at(&table_bytes(&self.reftable), self.h.refcount_table_offset)?;
            self.reftable_dirty = false;
            self.reftable_unsynced = true;
        }
        Ok(())
    }

    /// Syncs if refcount blocks or the refcount table were written since
    /// the last sync.
    pub(super) fn sync_refcounts(&mut self) -> io::Result<()> {
        if self.reftable_unsynced || self.rb_cache.unsynced() {
            self.storage.sync()?;
            self.synced();
        }
        Ok(())
    }

    /// Notes that everything written so far is durable.
    pub(super) fn synced(&mut self) {
        self.reftable_unsynced = false;
        self.rb_cache.mark_synced();
        self.l2_cache.mark_synced();
    }

    /// Makes room in the L2 cache for the table at `off`: a dirty table
    /// it evicts may point to new clusters, whose refcounts must be on
    /// disk first.
    pub(super) fn l2_room(&mut self, off: u64) -> io::Result<()> {
        if !self.l2_cache.contains(off) && self.l2_cache.must_write_to_make_room() {
            self.write_refcounts()?;
            self.sync_refcounts()?;
        }
        Ok(())
    }

    /// Writes all cached metadata in crash-safe order and syncs, then
    /// applies the frees that were waiting for it.
    pub(crate) fn flush_all(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.write_refcounts()?;
        if self.l2_cache.has_dirty() || self.l1_dirty {
            self.sync_refcounts()?;
            self.l2_cache.write_dirty(&*self.storage)?;
            if self.l1_dirty {
                // New L2 tables reach the disk before the L1 points to them.
                self.storage.sync()?;
                self.storage
                    .write_at(&table_bytes(&self.l1), self.h.l1_table_offset)?;
                self.l1_dirty = false;
            }
        }
        self.storage.sync()?;
        self.synced();
        if !self.pending_frees.is_empty() {
            let frees = std::mem::take(&mut self.pending_frees);
            for (offset, len) in frees {
                let first = offset >> self.cluster_bits;
                let last = (offset + len.max(1) - 1) >> self.cluster_bits;
                for c in first..=last {
                    let rc = self.refcount(c)?;
                    if rc == 0 {
                        tracing::warn!("qcow2: freeing cluster {c}, which has no references");
                        continue;
                    }
                    self.set_cluster_refcount(c, rc - 1)?;
                }
            }
            // Lost on a crash, these are only leaks.
            self.write_refcounts()?;
        }
        Ok(())
    }

    /// Drops one reference from every cluster overlapping the host range,
    /// once the tables that referenced it are on disk.
    pub(super) fn free_later(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.pending_frees.push((offset, len));
        if self.pending_frees.len() >= MAX_PENDING_FREES {
            self.flush_all()?;
        }
        Ok(())
    }

    pub(super) fn free_mapping(&mut self, mapping: Mapping) -> io::Result<()> {
        match mapping {
            Mapping::Data(off) | Mapping::Zero(Some(off)) => self.free_later(off, self.cs()),
            Mapping::Compressed { offset, len } => self.free_later(offset & !511, len),
            Mapping::Unallocated | Mapping::Zero(None) => Ok(()),
        }
    }
}
