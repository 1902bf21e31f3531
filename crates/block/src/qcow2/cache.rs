//! A bounded LRU cache of metadata tables (L2 tables, refcount blocks),
//! keyed by their host offset, with dirty tracking.
//!
//! The cache writes a table back only when it evicts it dirty or when
//! asked to write every dirty table; *when* that is allowed (refcounts
//! before the tables that point to new clusters) is the caller's rule —
//! see `writeback.rs` — which [`MetadataCache::must_write_to_make_room`]
//! lets it apply before an eviction happens.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io;

use super::{be_entries, eio, table_bytes};
use crate::file::Storage;

/// A table as it is cached and as it is stored (one cluster).
pub(super) trait Table: Sized {
    /// The table from its bytes in the file.
    fn from_bytes(bytes: Vec<u8>) -> Self;
    /// The table's bytes for the file.
    fn to_bytes(&self) -> Cow<'_, [u8]>;
}

/// Refcount blocks stay raw bytes: entries are 1 to 64 bits wide.
impl Table for Vec<u8> {
    fn from_bytes(bytes: Vec<u8>) -> Self {
        bytes
    }
    fn to_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self)
    }
}

/// L2 tables: big-endian 64-bit entries.
impl Table for Vec<u64> {
    fn from_bytes(bytes: Vec<u8>) -> Self {
        be_entries(&bytes)
    }
    fn to_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Owned(table_bytes(self))
    }
}

#[derive(Debug)]
struct Slot<T> {
    table: T,
    dirty: bool,
    /// The tick of the last use (least recently used = smallest).
    used: u64,
}

/// At most `capacity` tables of `table_len` bytes.
#[derive(Debug)]
pub(super) struct MetadataCache<T> {
    map: HashMap<u64, Slot<T>>,
    capacity: usize,
    table_len: usize,
    /// What the tables are, for messages ("L2 table").
    what: &'static str,
    tick: u64,
    /// Tables written since the last [`MetadataCache::mark_synced`].
    unsynced: bool,
}

/// The fewest tables a cache holds, whatever its byte budget: a write
/// needs a few tables at once (an L2 table and the one it is copied from).
const MIN_TABLES: usize = 4;

impl<T: Table> MetadataCache<T> {
    pub(super) fn new(what: &'static str, capacity: usize, table_len: usize) -> Self {
        MetadataCache {
            map: HashMap::new(),
            capacity: capacity.max(MIN_TABLES),
            table_len,
            what,
            tick: 0,
            unsynced: false,
        }
    }

    #[cfg(test)]
    pub(super) fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(MIN_TABLES);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    pub(super) fn contains(&self, off: u64) -> bool {
        self.map.contains_key(&off)
    }

    /// Whether one more table would first write back a dirty one.
    pub(super) fn must_write_to_make_room(&self) -> bool {
        self.victim()
            .and_then(|off| self.map.get(&off))
            .is_some_and(|slot| slot.dirty)
    }

    /// Whether a table is waiting to be written.
    pub(super) fn has_dirty(&self) -> bool {
        self.map.values().any(|slot| slot.dirty)
    }

    /// Whether tables were written since the last sync.
    pub(super) fn unsynced(&self) -> bool {
        self.unsynced
    }

    pub(super) fn mark_synced(&mut self) {
        self.unsynced = false;
    }

    /// The table at `off`, read from `storage` if it is not cached.
    pub(super) fn get(&mut self, off: u64, storage: &dyn Storage) -> io::Result<&T> {
        Ok(&self.slot(off, storage)?.table)
    }

    /// As [`MetadataCache::get`], for changing it: the table is dirty.
    pub(super) fn get_mut(&mut self, off: u64, storage: &dyn Storage) -> io::Result<&mut T> {
        let slot = self.slot(off, storage)?;
        slot.dirty = true;
        Ok(&mut slot.table)
    }

    /// Adds a table that is not in the file yet (dirty).
    pub(super) fn insert(&mut self, off: u64, table: T, storage: &dyn Storage) -> io::Result<()> {
        if !self.contains(off) {
            self.make_room(storage)?;
        }
        self.tick += 1;
        self.map.insert(
            off,
            Slot {
                table,
                dirty: true,
                used: self.tick,
            },
        );
        Ok(())
    }

    /// Writes every dirty table, in offset order.
    pub(super) fn write_dirty(&mut self, storage: &dyn Storage) -> io::Result<()> {
        let mut dirty: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, slot)| slot.dirty)
            .map(|(&off, _)| off)
            .collect();
        dirty.sort_unstable();
        for off in dirty {
            if let Some(slot) = self.map.get_mut(&off) {
                storage.write_at(&slot.table.to_bytes(), off)?;
                slot.dirty = false;
                self.unsynced = true;
            }
        }
        Ok(())
    }

    /// Forgets every table, dirty or not (after the file's metadata was
    /// rewritten underneath).
    pub(super) fn clear(&mut self) {
        self.map.clear();
    }

    fn slot(&mut self, off: u64, storage: &dyn Storage) -> io::Result<&mut Slot<T>> {
        if !self.contains(off) {
            self.make_room(storage)?;
            let mut bytes = vec![0u8; self.table_len];
            storage
                .read_at(&mut bytes, off)
                .map_err(|e| eio(format!("{} at {off:#x}: {e}", self.what)))?;
            self.map.insert(
                off,
                Slot {
                    table: T::from_bytes(bytes),
                    dirty: false,
                    used: 0,
                },
            );
        }
        self.tick += 1;
        let tick = self.tick;
        let slot = self
            .map
            .get_mut(&off)
            .ok_or_else(|| eio(format!("the {} cache lost a table", self.what)))?;
        slot.used = tick;
        Ok(slot)
    }

    /// The least recently used table, if the cache is full.
    fn victim(&self) -> Option<u64> {
        if self.map.len() < self.capacity {
            return None;
        }
        self.map
            .iter()
            .min_by_key(|(_, slot)| slot.used)
            .map(|(&off, _)| off)
    }

    /// Evicts the least recently used table if the cache is full, writing
    /// it back first if it is dirty (it stays cached if that fails).
    fn make_room(&mut self, storage: &dyn Storage) -> io::Result<()> {
        let Some(off) = self.victim() else {
            return Ok(());
        };
        if let Some(slot) = self.map.get(&off) {
            if slot.dirty {
                storage.write_at(&slot.table.to_bytes(), off)?;
                self.unsynced = true;
            }
        }
        self.map.remove(&off);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::file::MemFile;

    fn read(storage: &MemFile, off: u64) -> Vec<u8> {
        let mut b = vec![0u8; 8];
        storage.read_at(&mut b, off).unwrap();
        b
    }

    #[test]
    fn eviction_writes_back_dirty_tables_only_and_keeps_the_bound() {
        let storage = MemFile::new(vec![0u8; 64]);
        let mut cache: MetadataCache<Vec<u8>> = MetadataCache::new("test table", 4, 8);
        // Four tables: 0 and 8 loaded clean, 16 and 24 new (dirty).
        assert_eq!(cache.get(0, &storage).unwrap(), &vec![0u8; 8]);
        cache.get(8, &storage).unwrap();
        cache.insert(16, vec![3; 8], &storage).unwrap();
        cache.insert(24, vec![4; 8], &storage).unwrap();
        assert_eq!(cache.len(), 4);
        assert!(!cache.unsynced());
        // Full, and the least recently used (0) is clean.
        assert!(!cache.must_write_to_make_room());
        // The file changes under the clean table: evicting it must not
        // write it back.
        storage.write_at(&[9; 8], 0).unwrap();
        cache.get_mut(8, &storage).unwrap()[0] = 2; // 8 is dirty now
        cache.get(16, &storage).unwrap();
        cache.get(24, &storage).unwrap();
        cache.get(32, &storage).unwrap(); // evicts 0
        assert_eq!(cache.len(), 4);
        assert!(!cache.contains(0));
        assert_eq!(read(&storage, 0), vec![9; 8]);
        assert!(!cache.unsynced());
        // Now 8 is the least recently used, and dirty.
        assert!(cache.must_write_to_make_room());
        cache.get(40, &storage).unwrap(); // evicts 8, written back
        assert_eq!(cache.len(), 4);
        assert_eq!(read(&storage, 8), vec![2, 0, 0, 0, 0, 0, 0, 0]);
        assert!(cache.unsynced());
        // Read again, it comes back from the file as written.
        assert_eq!(cache.get(8, &storage).unwrap()[0], 2);
        assert_eq!(cache.len(), 4);
    }

    #[test]
    fn write_dirty_writes_each_dirty_table_once() {
        let storage = MemFile::new(vec![0u8; 32]);
        let mut cache: MetadataCache<Vec<u64>> = MetadataCache::new("test table", 8, 8);
        cache.insert(0, vec![0x0102], &storage).unwrap();
        cache.get_mut(8, &storage).unwrap()[0] = 7;
        cache.get(16, &storage).unwrap();
        assert!(cache.has_dirty());
        storage.write_at(&[5; 8], 16).unwrap();
        cache.write_dirty(&storage).unwrap();
        assert!(!cache.has_dirty());
        assert!(cache.unsynced());
        assert_eq!(read(&storage, 0), 0x0102u64.to_be_bytes());
        assert_eq!(read(&storage, 8), 7u64.to_be_bytes());
        // The clean table was not written over the file's bytes.
        assert_eq!(read(&storage, 16), vec![5; 8]);
        cache.mark_synced();
        // Nothing dirty: nothing written.
        storage.write_at(&[6; 8], 0).unwrap();
        cache.write_dirty(&storage).unwrap();
        assert_eq!(read(&storage, 0), vec![6; 8]);
        assert!(!cache.unsynced());
    }

    #[test]
    fn a_table_that_cannot_be_read_is_an_error_not_an_entry() {
        let storage = MemFile::new(vec![0u8; 8]);
        let mut cache: MetadataCache<Vec<u8>> = MetadataCache::new("test table", 4, 8);
        assert!(cache.get(64, &storage).is_err());
        assert!(!cache.contains(64));
    }
}
