//! qcow2 images (versions 2 and 3), read and write, with backing chains.
//!
//! Written here rather than taken from a crate: the Rust qcow2 crates
//! either only read, are tied to an async runtime, or live inside another
//! VMM's tree; hostvisor needs write support, backing chains, compressed
//! clusters, repair, and the crash-ordering rules below, behind its own
//! [`DiskImage`] trait.
//!
//! # Metadata and crash safety
//! L2 tables and refcount blocks are cached in memory (bounded) and written
//! back on a guest flush or on eviction, in an order that keeps the file
//! consistent at every moment a process can die (at worst leaking
//! clusters, which `check --repair` reclaims):
//! 1. a cluster's refcount is raised in memory before anything points to
//!    it, and refcount blocks reach the file before the L2/L1 tables that
//!    point to new clusters (with a sync in between, for power loss);
//! 2. guest data goes straight to its cluster, before the L2 entry that
//!    makes it visible is written;
//! 3. a refcount is lowered only after the table that stopped pointing to
//!    the cluster has been written and synced, so a freed cluster is never
//!    reused while an on-disk table still references it.

mod check;
pub mod header;

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub use check::{CheckReport, Snapshot};
use header::Header;

use crate::file::Storage;
use crate::DiskImage;

#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("invalid qcow2 image: {0}")]
    Invalid(String),
    #[error("unsupported qcow2 image: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("backing file {name}: {message}")]
    Backing { name: String, message: String },
}

pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
pub(crate) const OFLAG_COMPRESSED: u64 = 1 << 62;
pub(crate) const OFLAG_ZERO: u64 = 1;

/// Bytes of L2 tables and refcount blocks kept in memory per image.
const L2_CACHE_BYTES: u64 = 4 << 20;
const REFBLOCK_CACHE_BYTES: u64 = 1 << 20;
/// Frees waiting for a table writeback before a metadata flush is forced.
const MAX_PENDING_FREES: usize = 4096;

fn eio(msg: impl std::fmt::Display) -> io::Error {
    tracing::error!("qcow2: {msg}");
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// What a virtual cluster maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Not in this image: the backing file's data, or zeroes.
    Unallocated,
    /// Reads as zeroes (v3); `Some` keeps a preallocated host cluster.
    Zero(Option<u64>),
    /// Deflate or zstd data at a byte offset spanning `len` bytes.
    Compressed { offset: u64, len: u64 },
    /// Data in the host cluster at this offset.
    Data(u64),
}

pub(crate) fn classify(entry: u64, cluster_bits: u32, version: u32) -> io::Result<Mapping> {
    if entry & OFLAG_COMPRESSED != 0 {
        let shift = 62 - (cluster_bits - 8);
        let mask = (1u64 << (cluster_bits - 8)) - 1;
        let offset = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & mask) + 1;
        return Ok(Mapping::Compressed {
            offset,
            len: sectors * 512 - (offset & 511),
        });
    }
    let host = entry & OFFSET_MASK;
    if host & ((1u64 << cluster_bits) - 1) != 0 {
        return Err(eio(format!("unaligned cluster offset {host:#x}")));
    }
    if entry & OFLAG_ZERO != 0 {
        if version < 3 {
            return Err(eio("a zero cluster in a version 2 image"));
        }
        return Ok(Mapping::Zero((host != 0).then_some(host)));
    }
    Ok(if host == 0 {
        Mapping::Unallocated
    } else {
        Mapping::Data(host)
    })
}

#[derive(Debug)]
struct Slot<T> {
    table: T,
    dirty: bool,
    used: u64,
}

/// A small LRU cache of metadata tables keyed by host offset.
#[derive(Debug)]
struct Cache<T> {
    map: HashMap<u64, Slot<T>>,
    capacity: usize,
    tick: u64,
}

impl<T> Cache<T> {
    fn new(capacity: usize) -> Self {
        Cache {
            map: HashMap::new(),
            capacity: capacity.max(4),
            tick: 0,
        }
    }

    fn touch(&mut self, key: u64) -> Option<&mut Slot<T>> {
        self.tick += 1;
        let tick = self.tick;
        let slot = self.map.get_mut(&key)?;
        slot.used = tick;
        Some(slot)
    }

    /// The least recently used entry, if the cache is full.
    fn victim(&self) -> Option<u64> {
        if self.map.len() < self.capacity {
            return None;
        }
        self.map
            .iter()
            .min_by_key(|(_, slot)| slot.used)
            .map(|(key, _)| *key)
    }

    fn dirty_keys(&self) -> Vec<u64> {
        let mut keys: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, slot)| slot.dirty)
            .map(|(key, _)| *key)
            .collect();
        keys.sort_unstable();
        keys
    }
}

/// Opens a backing file by name (and format, when the header records it).
pub type BackingOpener<'a> =
    &'a dyn Fn(&str, Option<&str>) -> Result<Arc<dyn DiskImage>, Qcow2Error>;

/// A qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    size: u64,
    read_only: bool,
    id: Vec<u8>,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) storage: Box<dyn Storage>,
    pub(crate) backing: Option<Arc<dyn DiskImage>>,
    pub(crate) h: Header,
    read_only: bool,
    cluster_bits: u32,
    l2_bits: u32,
    /// log2 of refcount entries per refcount block.
    rb_bits: u32,
    pub(crate) l1: Vec<u64>,
    l1_dirty: bool,
    l2_cache: Cache<Vec<u64>>,
    pub(crate) reftable: Vec<u64>,
    reftable_dirty: bool,
    rb_cache: Cache<Vec<u8>>,
    /// Refcount writes not yet followed by a sync.
    refcounts_unsynced: bool,
    /// Host byte ranges whose clusters lose one reference once the tables
    /// that dropped them are on disk.
    pending_frees: Vec<(u64, u64)>,
    /// First cluster that might be free.
    free_hint: u64,
    /// First cluster past everything allocated or in the file.
    high_water: u64,
    /// The last decompressed cluster (sequential reads of compressed
    /// images decompress each cluster once).
    decompressed: Option<(u64, Vec<u8>)>,
}

impl Qcow2 {
    /// Opens a qcow2 image on `storage`. `backing` opens the backing file
    /// the header names; without it, an image with a backing file is an
    /// error.
    pub fn open(
        storage: Box<dyn Storage>,
        read_only: bool,
        id: Vec<u8>,
        backing: Option<BackingOpener<'_>>,
    ) -> Result<Self, Qcow2Error> {
        Self::open_with(storage, read_only, id, backing, false)
    }

    /// As [`Qcow2::open`]; `repairing` allows a writable open of an image
    /// marked corrupt, for `check --repair`.
    pub fn open_with(
        storage: Box<dyn Storage>,
        read_only: bool,
        id: Vec<u8>,
        backing: Option<BackingOpener<'_>>,
        repairing: bool,
    ) -> Result<Self, Qcow2Error> {
        let len = storage.len()?;
        let mut first = vec![0u8; (len.min(1 << 21)) as usize];
        storage.read_at(&mut first, 0)?;
        let h = Header::parse(&first)?;
        if !read_only && !repairing && h.incompatible & header::INCOMPAT_CORRUPT != 0 {
            return Err(Qcow2Error::Invalid(
                "the image is marked corrupt; open it read-only, or repair it with \
                 `hostvisor disk check --repair`"
                    .into(),
            ));
        }
        let cs = h.cluster_size();
        let cluster_bits = h.cluster_bits;
        let l1 = read_table(&*storage, h.l1_table_offset, u64::from(h.l1_size))
            .map_err(|e| Qcow2Error::Invalid(format!("cannot read the L1 table: {e}")))?;
        let reftable_entries = u64::from(h.refcount_table_clusters) * cs / 8;
        let reftable = read_table(&*storage, h.refcount_table_offset, reftable_entries)
            .map_err(|e| Qcow2Error::Invalid(format!("cannot read the refcount table: {e}")))?;
        let backing_image = match (&h.backing_file, backing) {
            (None, _) => None,
            (Some(name), Some(open)) => Some(open(name, h.backing_format.as_deref())?),
            (Some(name), None) => {
                return Err(Qcow2Error::Backing {
                    name: name.clone(),
                    message: "backing files cannot be opened here".into(),
                })
            }
        };
        let mut inner = Inner {
            storage,
            backing: backing_image,
            read_only,
            cluster_bits,
            l2_bits: cluster_bits - 3,
            rb_bits: cluster_bits + 3 - h.refcount_order,
            l1,
            l1_dirty: false,
            l2_cache: Cache::new((L2_CACHE_BYTES >> cluster_bits) as usize),
            reftable,
            reftable_dirty: false,
            rb_cache: Cache::new((REFBLOCK_CACHE_BYTES >> cluster_bits) as usize),
            refcounts_unsynced: false,
            pending_frees: Vec::new(),
            free_hint: 1,
            high_water: len.div_ceil(cs),
            decompressed: None,
            h,
        };
        let size = inner.h.size;
        if !read_only {
            inner.open_for_writing()?;
        }
        Ok(Qcow2 {
            size,
            read_only,
            id,
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn header(&self) -> Header {
        self.lock().h.clone()
    }

    /// Whether this image (not its backing file) defines the cluster
    /// holding `offset`.
    pub fn is_allocated(&self, offset: u64) -> io::Result<bool> {
        let mut inner = self.lock();
        let vc = offset >> inner.cluster_bits;
        Ok(inner.mapping(vc)? != Mapping::Unallocated)
    }

    pub fn snapshots(&self) -> Result<Vec<Snapshot>, Qcow2Error> {
        let inner = self.lock();
        check::read_snapshots(&*inner.storage, &inner.h)
    }

    /// Checks the metadata; with `repair`, fixes what it can (leaks and
    /// wrong refcounts by rebuilding them, bad flags and entries pointing
    /// outside the file by clearing them).
    pub fn check(&self, repair: bool) -> Result<CheckReport, Qcow2Error> {
        let mut inner = self.lock();
        if repair && inner.read_only {
            return Err(Qcow2Error::Io(io::Error::from_raw_os_error(libc::EROFS)));
        }
        inner.flush_all()?;
        let report = check::check(&mut inner, repair)?;
        if repair {
            inner.reload()?;
        }
        Ok(report)
    }

    /// Grows the virtual size (shrinking would lose data and is refused).
    pub fn resize(&mut self, new_size: u64) -> Result<(), Qcow2Error> {
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        inner.resize(new_size)?;
        self.size = new_size;
        Ok(())
    }

    /// Points the image at another backing file (or none), without
    /// copying data: `rebase -u`. The new backing is opened by `open`.
    pub fn set_backing(
        &mut self,
        name: Option<(&str, &str)>,
        open: Option<BackingOpener<'_>>,
    ) -> Result<(), Qcow2Error> {
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        inner.flush_all()?;
        let mut h = inner.h.clone();
        h.backing_file = name.map(|(file, _)| file.to_string());
        h.backing_format = name.map(|(_, format)| format.to_string());
        // serialize() refuses a header that does not fit the first cluster.
        let bytes = h.serialize()?;
        let backing = match (name, open) {
            (Some((file, format)), Some(open)) => Some(open(file, Some(format))?),
            _ => None,
        };
        inner.storage.write_at(&bytes, 0)?;
        inner.storage.sync()?;
        inner.h = h;
        inner.backing = backing;
        Ok(())
    }

    /// Removes this image's data for the cluster at `offset`, so it reads
    /// from the backing file again (after `commit`).
    pub fn deallocate(&self, offset: u64) -> io::Result<()> {
        let mut inner = self.lock();
        if inner.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let vc = offset >> inner.cluster_bits;
        if inner.mapping(vc)? == Mapping::Unallocated {
            return Ok(());
        }
        inner.set_entry(vc, 0)
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.lock().cluster_bits
    }
}

/// Creation parameters for a new image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_bits: u32,
    pub version: u32,
    pub refcount_order: u32,
    /// Backing file name as stored, and its format.
    pub backing: Option<(String, String)>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_bits: 16,
            version: 3,
            refcount_order: 4,
            backing: None,
        }
    }
}

/// Writes a new, empty qcow2 image onto empty `storage`.
pub fn create(storage: &dyn Storage, opts: &CreateOptions) -> Result<(), Qcow2Error> {
    if !(9..=21).contains(&opts.cluster_bits) {
        return Err(Qcow2Error::Invalid(
            "the cluster size must be a power of two from 512 bytes to 2 MiB".into(),
        ));
    }
    if opts.version == 2 && opts.refcount_order != 4 {
        return Err(Qcow2Error::Invalid(
            "version 2 images have 16-bit refcounts".into(),
        ));
    }
    if opts.refcount_order > 6 {
        return Err(Qcow2Error::Invalid("refcount bits go up to 64".into()));
    }
    let cs = 1u64 << opts.cluster_bits;
    let l1_size = header::l1_entries_for(opts.size, opts.cluster_bits)?;
    let l1_clusters = (u64::from(l1_size) * 8).div_ceil(cs).max(1);
    let h = Header {
        version: opts.version,
        cluster_bits: opts.cluster_bits,
        size: opts.size,
        l1_size,
        l1_table_offset: cs,
        refcount_table_offset: 0,
        refcount_table_clusters: 0,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: 0,
        autoclear: 0,
        refcount_order: opts.refcount_order,
        header_length: if opts.version == 3 {
            header::V3_HEADER_LEN
        } else {
            header::V2_HEADER_LEN
        },
        compression_type: 0,
        backing_file: opts.backing.as_ref().map(|(name, _)| name.clone()),
        backing_format: opts.backing.as_ref().map(|(_, format)| format.clone()),
        feature_names: Vec::new(),
        other_extensions: Vec::new(),
    };
    let bytes = h.serialize()?;
    storage.set_len(0)?;
    storage.write_at(&bytes, 0)?;
    storage.set_len((1 + l1_clusters) * cs)?;
    let refs = vec![1u32; (1 + l1_clusters) as usize];
    check::write_refcounts_from(storage, &h, &refs)?;
    storage.sync()?;
    Ok(())
}

/// Reads `entries` big-endian u64s at `offset`.
fn read_table(storage: &dyn Storage, offset: u64, entries: u64) -> io::Result<Vec<u64>> {
    let bytes = entries
        .checked_mul(8)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| eio("table too large"))?;
    let mut raw = vec![0u8; bytes];
    storage.read_at(&mut raw, offset)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

fn table_bytes(table: &[u64]) -> Vec<u8> {
    table.iter().flat_map(|e| e.to_be_bytes()).collect()
}

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
        *b = (*b & !mask) | (((value as u8) << shift) & mask);
    }
}

impl Inner {
    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn max_refcount(&self) -> u64 {
        if self.h.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.h.refcount_order)) - 1
        }
    }

    /// Prepares an image opened for writing: repairs it if a previous user
    /// died with lazy refcounts (the dirty bit), and drops the autoclear
    /// features (bitmaps) that this implementation does not keep up to
    /// date, as the specification requires.
    fn open_for_writing(&mut self) -> Result<(), Qcow2Error> {
        if self.h.incompatible & header::INCOMPAT_DIRTY != 0 {
            tracing::warn!("qcow2: the image was not closed cleanly; repairing refcounts");
            check::check(self, true)?;
            self.reload()?;
            self.h.incompatible &= !header::INCOMPAT_DIRTY;
            self.storage
                .write_at(&self.h.incompatible.to_be_bytes(), header::OFF_INCOMPAT)?;
            self.storage.sync()?;
        }
        if self.h.version == 3 && self.h.autoclear != 0 {
            self.h.autoclear = 0;
            self.storage
                .write_at(&0u64.to_be_bytes(), header::OFF_AUTOCLEAR)?;
            self.storage.sync()?;
        }
        Ok(())
    }

    /// Re-reads the L1 and refcount tables after `check` rewrote them.
    pub(crate) fn reload(&mut self) -> Result<(), Qcow2Error> {
        let cs = self.cs();
        self.l2_cache.map.clear();
        self.rb_cache.map.clear();
        self.decompressed = None;
        self.l1 = read_table(
            &*self.storage,
            self.h.l1_table_offset,
            u64::from(self.h.l1_size),
        )?;
        self.reftable = read_table(
            &*self.storage,
            self.h.refcount_table_offset,
            u64::from(self.h.refcount_table_clusters) * cs / 8,
        )?;
        self.l1_dirty = false;
        self.reftable_dirty = false;
        self.free_hint = 1;
        self.high_water = self.storage.len()?.div_ceil(cs);
        Ok(())
    }

    // ---- refcounts ------------------------------------------------------

    /// Loads the refcount block at host offset `off` into the cache.
    fn refblock(&mut self, off: u64) -> io::Result<&mut Slot<Vec<u8>>> {
        if !self.rb_cache.map.contains_key(&off) {
            if let Some(victim) = self.rb_cache.victim() {
                self.evict_refblock(victim)?;
            }
            let mut block = vec![0u8; self.cs() as usize];
            self.storage
                .read_at(&mut block, off)
                .map_err(|e| eio(format!("refcount block at {off:#x}: {e}")))?;
            self.rb_cache.map.insert(
                off,
                Slot {
                    table: block,
                    dirty: false,
                    used: 0,
                },
            );
        }
        self.rb_cache
            .touch(off)
            .ok_or_else(|| eio("refcount cache lost a block"))
    }

    fn evict_refblock(&mut self, off: u64) -> io::Result<()> {
        if let Some(slot) = self.rb_cache.map.remove(&off) {
            if slot.dirty {
                self.storage.write_at(&slot.table, off)?;
                self.refcounts_unsynced = true;
            }
        }
        Ok(())
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
        let index = (c & ((1 << self.rb_bits) - 1)) as usize;
        let order = self.h.refcount_order;
        Ok(get_refcount(&self.refblock(off)?.table, order, index))
    }

    fn set_cluster_refcount(&mut self, c: u64, value: u64) -> io::Result<()> {
        if value > self.max_refcount() {
            return Err(eio(format!("refcount overflow for cluster {c}")));
        }
        let off = self
            .refblock_offset(c)?
            .ok_or_else(|| eio(format!("cluster {c} has no refcount block")))?;
        let index = (c & ((1 << self.rb_bits) - 1)) as usize;
        let order = self.h.refcount_order;
        let slot = self.refblock(off)?;
        set_refcount(&mut slot.table, order, index, value);
        slot.dirty = true;
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
    fn new_refblock(&mut self, bi: u64, cluster: u64) {
        let off = cluster << self.cluster_bits;
        self.rb_cache.map.insert(
            off,
            Slot {
                table: vec![0u8; self.cs() as usize],
                dirty: true,
                used: 0,
            },
        );
        self.reftable[bi as usize] = off;
    }

    /// Reserves `n` contiguous clusters past everything in use, with any
    /// refcount blocks they need placed just before them.
    fn alloc_run(&mut self, n: u64) -> io::Result<u64> {
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
                self.new_refblock(bi, start + k as u64);
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
    fn alloc_cluster(&mut self) -> io::Result<u64> {
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
        let old_offset = self.h.refcount_table_offset;
        let old_clusters = u64::from(self.h.refcount_table_clusters);
        self.reftable.resize(len as usize, 0);
        for (k, &bi) in blocks.iter().enumerate() {
            self.new_refblock(bi, start + k as u64);
        }
        let table_start = start + blocks.len() as u64;
        let end = table_start + table_clusters;
        for c in start..end {
            self.set_cluster_refcount(c, 1)?;
        }
        self.high_water = end;
        // Blocks, then the new table, then the header that switches to it.
        self.reftable_dirty = false;
        self.write_dirty_refblocks()?;
        self.storage
            .write_at(&table_bytes(&self.reftable), table_start * cs)?;
        self.storage.sync()?;
        let mut fields = Vec::with_capacity(12);
        fields.extend_from_slice(&(table_start * cs).to_be_bytes());
        fields.extend_from_slice(&(table_clusters as u32).to_be_bytes());
        self.storage.write_at(&fields, header::OFF_REFTABLE)?;
        self.storage.sync()?;
        self.refcounts_unsynced = false;
        self.h.refcount_table_offset = table_start * cs;
        self.h.refcount_table_clusters = table_clusters as u32;
        // The old table is unreferenced now.
        for c in 0..old_clusters {
            let cluster = (old_offset >> self.cluster_bits) + c;
            let rc = self.refcount(cluster)?;
            self.set_cluster_refcount(cluster, rc.saturating_sub(1))?;
        }
        Ok(())
    }

    fn write_dirty_refblocks(&mut self) -> io::Result<()> {
        for off in self.rb_cache.dirty_keys() {
            if let Some(slot) = self.rb_cache.map.get_mut(&off) {
                self.storage.write_at(&slot.table, off)?;
                slot.dirty = false;
                self.refcounts_unsynced = true;
            }
        }
        Ok(())
    }

    /// Writes dirty refcount blocks, then the refcount table if it gained
    /// entries (a block before the entry that points to it).
    fn write_refcounts(&mut self) -> io::Result<()> {
        self.write_dirty_refblocks()?;
        if self.reftable_dirty {
            self.storage
                .write_at(&table_bytes(&self.reftable), self.h.refcount_table_offset)?;
            self.reftable_dirty = false;
            self.refcounts_unsynced = true;
        }
        Ok(())
    }

    /// Drops one reference from every cluster overlapping the host range,
    /// once the tables that referenced it are on disk.
    fn free_later(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.pending_frees.push((offset, len));
        if self.pending_frees.len() >= MAX_PENDING_FREES {
            self.flush_all()?;
        }
        Ok(())
    }

    fn free_mapping(&mut self, mapping: Mapping) -> io::Result<()> {
        match mapping {
            Mapping::Data(off) | Mapping::Zero(Some(off)) => self.free_later(off, self.cs()),
            Mapping::Compressed { offset, len } => self.free_later(offset & !511, len),
            Mapping::Unallocated | Mapping::Zero(None) => Ok(()),
        }
    }

    // ---- L1 / L2 --------------------------------------------------------

    fn l2_slot(&mut self, off: u64) -> io::Result<&mut Slot<Vec<u64>>> {
        if !self.l2_cache.map.contains_key(&off) {
            if let Some(victim) = self.l2_cache.victim() {
                self.evict_l2(victim)?;
            }
            let table = read_table(&*self.storage, off, self.cs() / 8)
                .map_err(|e| eio(format!("L2 table at {off:#x}: {e}")))?;
            self.l2_cache.map.insert(
                off,
                Slot {
                    table,
                    dirty: false,
                    used: 0,
                },
            );
        }
        self.l2_cache
            .touch(off)
            .ok_or_else(|| eio("L2 cache lost a table"))
    }

    fn evict_l2(&mut self, off: u64) -> io::Result<()> {
        let dirty = self.l2_cache.map.get(&off).is_some_and(|s| s.dirty);
        if dirty {
            // Refcounts for what the table points to must be on disk first.
            self.write_refcounts()?;
            self.sync_refcounts()?;
        }
        if let Some(slot) = self.l2_cache.map.remove(&off) {
            if slot.dirty {
                self.storage.write_at(&table_bytes(&slot.table), off)?;
            }
        }
        Ok(())
    }

    fn sync_refcounts(&mut self) -> io::Result<()> {
        if self.refcounts_unsynced {
            self.storage.sync()?;
            self.refcounts_unsynced = false;
        }
        Ok(())
    }

    fn l2_offset(&self, l1_index: u64) -> io::Result<Option<u64>> {
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
        let index = (vc & ((1 << self.l2_bits) - 1)) as usize;
        Ok(self.l2_slot(off)?.table[index])
    }

    fn mapping(&mut self, vc: u64) -> io::Result<Mapping> {
        let e = self.entry(vc)?;
        classify(e, self.cluster_bits, self.h.version)
    }

    /// The L2 table for `vc`, made private to the active L1 (allocated, or
    /// copied if a snapshot shares it). Returns its host offset.
    fn l2_for_write(&mut self, vc: u64) -> io::Result<u64> {
        let l1_index = vc >> self.l2_bits;
        let i = usize::try_from(l1_index)
            .ok()
            .filter(|&i| i < self.l1.len())
            .ok_or_else(|| eio("write past the L1 table"))?;
        match self.l2_offset(l1_index)? {
            None => {
                let off = self.alloc_cluster()?;
                let table = vec![0u64; (self.cs() / 8) as usize];
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
                let table = self.l2_slot(old)?.table.clone();
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
        if let Some(victim) = self.l2_cache.victim() {
            self.evict_l2(victim)?;
        }
        self.l2_cache.map.insert(
            off,
            Slot {
                table,
                dirty: true,
                used: 0,
            },
        );
        self.l2_cache.touch(off);
        Ok(())
    }

    /// Sets the L2 entry for `vc`, freeing what it mapped before.
    fn set_entry(&mut self, vc: u64, entry: u64) -> io::Result<()> {
        let old = self.mapping(vc)?;
        let off = self.l2_for_write(vc)?;
        let index = (vc & ((1 << self.l2_bits) - 1)) as usize;
        let slot = self.l2_slot(off)?;
        slot.table[index] = entry;
        slot.dirty = true;
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

    // ---- data -----------------------------------------------------------

    /// Guards against data writes over metadata a corrupt image might point
    /// into; such an image is marked corrupt.
    fn check_data_target(&mut self, host: u64) -> io::Result<()> {
        let cs = self.cs();
        let l1_end = self.h.l1_table_offset + u64::from(self.h.l1_size) * 8;
        let rt_end = self.h.refcount_table_offset + u64::from(self.h.refcount_table_clusters) * cs;
        let overlaps = host < cs
            || (host + cs > self.h.l1_table_offset && host < l1_end)
            || (host + cs > self.h.refcount_table_offset && host < rt_end)
            || self.l2_cache.map.contains_key(&host)
            || self.rb_cache.map.contains_key(&host);
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
        let mut input = vec![0u8; len.min(file_len - offset) as usize];
        self.storage.read_at(&mut input, offset)?;
        let mut out = vec![0u8; self.cs() as usize];
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
    fn read_cluster(&mut self, vc: u64, in_off: u64, out: &mut [u8]) -> io::Result<()> {
        let entry = self.entry(vc)?;
        match classify(entry, self.cluster_bits, self.h.version)? {
            Mapping::Unallocated => {
                out.fill(0);
                if let Some(backing) = &self.backing {
                    let pos = (vc << self.cluster_bits) + in_off;
                    let bsize = backing.size();
                    if pos < bsize {
                        let n = ((bsize - pos) as usize).min(out.len());
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
                let start = in_off as usize;
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
            let mut n = ((cs - in_off) as usize).min(buf.len() - done);
            if let Mapping::Data(host) = self.mapping(vc)? {
                // Coalesce physically contiguous clusters into one read.
                let mut next = vc + 1;
                while done + n < buf.len()
                    && self.mapping(next)? == Mapping::Data(host + (next - vc) * cs)
                {
                    n = (n + cs as usize).min(buf.len() - done);
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
            let mut buffer = crate::file::AlignedBuf::new(cs as usize)?;
            let cluster = buffer.as_mut_slice();
            if !old_is_zero {
                self.read_cluster(vc, 0, cluster)?;
            }
            cluster[in_off as usize..in_off as usize + data.len()].copy_from_slice(data);
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
            self.storage.write_at(&data[..(k * cs) as usize], host)?;
            return Ok((k * cs) as usize);
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
        self.storage.write_at(&data[..(k * cs) as usize], first)?;
        for i in 0..k {
            self.set_entry(vc + i, (first + i * cs) | OFLAG_COPIED)?;
        }
        Ok((k * cs) as usize)
    }

    pub(crate) fn write(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let cs = self.cs();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let vc = pos >> self.cluster_bits;
            let in_off = pos & (cs - 1);
            if in_off == 0 && (buf.len() - done) as u64 >= cs {
                let whole = (buf.len() - done) / cs as usize * cs as usize;
                done += self.write_full_clusters(vc, &buf[done..done + whole])?;
                continue;
            }
            let n = ((cs - in_off) as usize).min(buf.len() - done);
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
                self.write_cluster(vc, in_off, &vec![0u8; n as usize])?;
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
                self.write_cluster(vc, 0, &vec![0u8; cs as usize])?;
            }
            pos += n;
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
        let l2_dirty = self.l2_cache.dirty_keys();
        if !l2_dirty.is_empty() || self.l1_dirty {
            self.sync_refcounts()?;
            for off in l2_dirty {
                if let Some(slot) = self.l2_cache.map.get_mut(&off) {
                    self.storage.write_at(&table_bytes(&slot.table), off)?;
                    slot.dirty = false;
                }
            }
            if self.l1_dirty {
                // New L2 tables reach the disk before the L1 points to them.
                self.storage.sync()?;
                self.storage
                    .write_at(&table_bytes(&self.l1), self.h.l1_table_offset)?;
                self.l1_dirty = false;
            }
        }
        self.storage.sync()?;
        self.refcounts_unsynced = false;
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

    fn resize(&mut self, new_size: u64) -> Result<(), Qcow2Error> {
        if new_size < self.h.size {
            return Err(Qcow2Error::Invalid(
                "shrinking an image would lose data; only growing is supported".into(),
            ));
        }
        if self.read_only {
            return Err(Qcow2Error::Io(io::Error::from_raw_os_error(libc::EROFS)));
        }
        self.flush_all()?;
        let cs = self.cs();
        let entries = header::l1_entries_for(new_size, self.cluster_bits)?;
        let old_clusters = (u64::from(self.h.l1_size) * 8).div_ceil(cs);
        let new_clusters = (u64::from(entries) * 8).div_ceil(cs);
        let mut fields = Vec::with_capacity(12);
        if entries > self.h.l1_size {
            let mut l1 = self.l1.clone();
            l1.resize(entries as usize, 0);
            let (offset, moved) = if new_clusters > old_clusters || self.h.l1_table_offset == 0 {
                (self.alloc_run(new_clusters)? * cs, true)
            } else {
                (self.h.l1_table_offset, false)
            };
            self.write_refcounts()?;
            self.storage.sync()?;
            let mut bytes = table_bytes(&l1);
            bytes.resize((new_clusters * cs) as usize, 0);
            self.storage.write_at(&bytes, offset)?;
            self.storage.sync()?;
            fields.extend_from_slice(&entries.to_be_bytes());
            fields.extend_from_slice(&offset.to_be_bytes());
            self.storage.write_at(&fields, header::OFF_L1)?;
            let old_offset = self.h.l1_table_offset;
            self.h.l1_size = entries;
            self.h.l1_table_offset = offset;
            self.l1 = l1;
            if moved && old_offset != 0 {
                self.free_later(old_offset, old_clusters * cs)?;
            }
        }
        self.storage
            .write_at(&new_size.to_be_bytes(), header::OFF_SIZE)?;
        self.h.size = new_size;
        self.flush_all()?;
        Ok(())
    }
}

/// Inflates raw deflate data (no zlib header) until `out` is full, as
/// QEMU's compressed clusters hold it.
pub(crate) fn deflate_decompress(input: &[u8], out: &mut [u8]) -> bool {
    let mut d = flate2::Decompress::new(false);
    match d.decompress(input, out, flate2::FlushDecompress::Finish) {
        Ok(_) => d.total_out() == out.len() as u64,
        Err(_) => false,
    }
}

/// Decompresses zstd frames until `out` is full.
pub(crate) fn zstd_decompress(input: &[u8], out: &mut [u8]) -> bool {
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

impl DiskImage for Qcow2 {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.lock().read(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writable()?;
        check_range(offset, buf.len() as u64, self.size)?;
        self.lock().write(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.lock().flush_all()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.writable()?;
        check_range(offset, len, self.size)?;
        self.lock().zero(offset, len, unmap)
    }

    fn id(&self) -> Vec<u8> {
        self.id.clone()
    }
}

impl Qcow2 {
    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        Ok(())
    }
}

fn check_range(offset: u64, len: u64, size: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = inner.flush_all() {
            tracing::error!("qcow2: writing metadata on close failed: {e}");
        }
    }
}

/// Resolves a backing file name relative to the image that names it.
pub fn backing_path(image: &Path, name: &str) -> std::path::PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    image.parent().unwrap_or(Path::new(".")).join(p)
}

#[cfg(test)]
mod tests;
