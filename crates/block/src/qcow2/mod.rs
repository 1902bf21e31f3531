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
//!
//! # Modules
//! - `header`: the header and its extensions; `create`: new images;
//! - `cache`: the bounded LRU cache of tables (L2 tables, refcount blocks)
//!   with dirty tracking;
//! - `l2`: guest cluster → host mapping through L1 and L2 tables;
//! - `refcount`: refcounts, cluster allocation, refcount-table growth;
//! - `read` / `write`: the data paths;
//! - `writeback`: the crash-safe write-back order and deferred frees;
//! - `check`: consistency check and repair, the snapshot table.

mod cache;
mod check;
mod create;
pub mod header;
mod l2;
mod read;
mod refcount;
mod write;
mod writeback;

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cache::MetadataCache;
pub use check::{CheckReport, Snapshot};
pub use create::{create, CreateOptions};
use header::Header;
pub(crate) use refcount::{get_refcount, set_refcount};

use crate::file::{to_index, Storage};
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
const L2_CACHE_BYTES: usize = 4 << 20;
const REFBLOCK_CACHE_BYTES: usize = 1 << 20;

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
    l2_cache: MetadataCache<Vec<u64>>,
    pub(crate) reftable: Vec<u64>,
    reftable_dirty: bool,
    rb_cache: MetadataCache<Vec<u8>>,
    /// Refcount-table writes not yet followed by a sync (the block cache
    /// tracks its own).
    reftable_unsynced: bool,
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
            l2_cache: MetadataCache::new(
                "L2 table",
                L2_CACHE_BYTES >> cluster_bits,
                1 << cluster_bits,
            ),
            reftable,
            reftable_dirty: false,
            rb_cache: MetadataCache::new(
                "refcount block",
                REFBLOCK_CACHE_BYTES >> cluster_bits,
                1 << cluster_bits,
            ),
            reftable_unsynced: false,
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

    /// The cluster size as a buffer length (at most 2 MiB).
    pub fn cluster_bytes(&self) -> usize {
        self.lock().cluster_bytes()
    }
}

/// Reads `entries` big-endian u64s at `offset`.
fn read_table(storage: &dyn Storage, offset: u64, entries: u64) -> io::Result<Vec<u64>> {
    let bytes = entries
        .checked_mul(8)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| eio("table too large"))?;
    let mut raw = vec![0u8; bytes];
    storage.read_at(&mut raw, offset)?;
    Ok(be_entries(&raw))
}

/// Big-endian u64s (a trailing partial entry is ignored).
fn be_entries(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

fn table_bytes(table: &[u64]) -> Vec<u8> {
    table.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// The low `bits` bits of `x`, as an index into a table of `2^bits`
/// entries (`bits` ≤ 21 here: a cluster's worth of entries at most).
fn low_bits(x: u64, bits: u32) -> usize {
    let mask = (1usize << bits) - 1;
    // Truncating `x` keeps its low bits, and usize has at least 32 of
    // them, more than `bits`: the masked value is exact.
    #[allow(clippy::cast_possible_truncation)]
    let low = x as usize;
    low & mask
}

impl Inner {
    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The cluster size as a buffer length (at most 2 MiB: the header
    /// refuses cluster_bits above 21).
    fn cluster_bytes(&self) -> usize {
        1 << self.cluster_bits
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
        self.l2_cache.clear();
        self.rb_cache.clear();
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

    // ---- L1 / L2 --------------------------------------------------------

    // ---- data -----------------------------------------------------------

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
            bytes.resize(to_index(new_clusters * cs)?, 0);
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
    crate::backing::backing_path(image, name)
}

#[cfg(test)]
mod tests;
