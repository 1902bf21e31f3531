//! Hands a guest's FUSE request to fuse-backend-rs without copying it.
//!
//! fuse-backend-rs 0.14 pins vm-memory 0.17 and virtio-queue 0.17 and
//! takes its requests as a 0.17 `DescriptorChain`, which only a 0.17 queue
//! can make; the workspace is on 0.18. The bridge keeps, per activation:
//! - a 0.17 view of guest RAM: regions that alias the 0.18 mappings (the
//!   same host pages, no copy), so the server reads and writes the guest's
//!   buffers in place;
//! - a private shadow queue: a descriptor table and rings in a small
//!   region of its own, placed above all guest RAM.
//!
//! Each request popped from the real (0.18) queue is checked — every
//! buffer inside guest RAM, at most [`MAX_DESCRIPTORS`] of them — and
//! copied, as a flat chain of (address, length, direction), into the
//! shadow table; popping the shadow queue then gives the 0.17 chain the
//! server takes. The guest never sees or reaches the shadow region: its
//! address lies above guest RAM and no buffer outside guest RAM is
//! accepted.

use std::sync::Arc;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use memory::GuestMemoryMmap;
use virtio_queue_fuse::{Queue as ShadowQueue, QueueT as _};
use vm_memory::{Address as _, GuestMemoryBackend as _, GuestMemoryRegion as _};
use vm_memory_fuse::{
    Bytes as _, GuestAddress as GuestAddress17, GuestMemoryMmap as Memory17, GuestRegionMmap,
    MmapRegion,
};

/// The most buffers one request may have (a 1 MiB read in 4 KiB pages
/// needs 257, with headers).
pub const MAX_DESCRIPTORS: u16 = 1024;

const DESC_SIZE: u64 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// One buffer of a request, as the guest gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (the reply).
    pub write: bool,
}

/// Why a request was refused before the server saw it.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("the request has more than {MAX_DESCRIPTORS} buffers")]
    TooManyBuffers,
    #[error("a buffer at {addr:#x} (+{len}) lies outside guest RAM")]
    OutsideRam { addr: u64, len: u32 },
    #[error("the request has no buffers")]
    Empty,
    #[error("a device-readable buffer follows a device-writable one")]
    Order,
    #[error("cannot map guest RAM for the FUSE server: {0}")]
    Map(String),
    #[error("the shadow queue refused the request")]
    Shadow,
}

/// The 0.17 view of guest RAM and the shadow queue.
pub struct Bridge {
    /// Keeps the mappings the view aliases alive.
    _mem: GuestMemoryMmap,
    view: Memory17,
    queue: ShadowQueue,
    table: u64,
    avail: u64,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl Bridge {
    pub fn new(mem: &GuestMemoryMmap) -> Result<Self, BridgeError> {
        let map = |e: &dyn std::fmt::Display| BridgeError::Map(e.to_string());
        let mut regions = Vec::new();
        let mut top = 0u64;
        for r in mem.iter() {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| map(&e))?;
            let len = usize::try_from(r.len()).map_err(|e| map(&e))?;
            // SAFETY: `host..host + len` is the whole of one mapping of
            // `mem`, which this bridge keeps (a clone of the same
            // reference-counted regions) for as long as the view lives;
            // the view never unmaps it (raw regions are not owned).
            let region = unsafe {
                MmapRegion::build_raw(
                    host,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                )
            }
            .map_err(|e| map(&e))?;
            let start = r.start_addr().raw_value();
            regions.push(
                GuestRegionMmap::new(region, GuestAddress17(start))
                    .ok_or_else(|| map(&"a guest RAM region wraps the address space"))?,
            );
            top = top.max(r.last_addr().raw_value());
        }
        // The shadow region: a page-aligned address above all RAM.
        let base = top
            .checked_add(1)
            .and_then(|t| t.checked_next_multiple_of(4096))
            .ok_or_else(|| map(&"no address above guest RAM"))?;
        let n = u64::from(MAX_DESCRIPTORS);
        let table = base;
        let avail = table + n * DESC_SIZE;
        let used = (avail + 4 + 2 * n + 2).next_multiple_of(4);
        let size = used + 4 + 8 * n + 2 - base;
        let shadow =
            MmapRegion::new(usize::try_from(size).map_err(|e| map(&e))?).map_err(|e| map(&e))?;
        regions.push(
            GuestRegionMmap::new(shadow, GuestAddress17(base))
                .ok_or_else(|| map(&"the shadow region wraps the address space"))?,
        );
        let view = Memory17::from_regions(regions).map_err(|e| map(&e))?;
        let mut queue = ShadowQueue::new(MAX_DESCRIPTORS).map_err(|e| map(&e))?;
        queue.set_size(MAX_DESCRIPTORS);
        queue
            .try_set_desc_table_address(GuestAddress17(table))
            .map_err(|e| map(&e))?;
        queue
            .try_set_avail_ring_address(GuestAddress17(avail))
            .map_err(|e| map(&e))?;
        queue
            .try_set_used_ring_address(GuestAddress17(used))
            .map_err(|e| map(&e))?;
        queue.set_ready(true);
        Ok(Bridge {
            _mem: mem.clone(),
            view,
            queue,
            table,
            avail,
        })
    }

    /// Checks `buffers` (a request as the guest gave it) and runs it
    /// through `server`; the bytes of reply written.
    pub fn handle<F: FileSystem + Sync>(
        &mut self,
        mem: &GuestMemoryMmap,
        buffers: &[Buffer],
        server: &Arc<Server<F>>,
    ) -> Result<usize, RequestError> {
        self.stage(mem, buffers)?;
        let chain = self
            .queue
            .pop_descriptor_chain(&self.view)
            .ok_or(BridgeError::Shadow)?;
        let reader =
            Reader::from_descriptor_chain(&self.view, chain.clone()).map_err(RequestError::Fuse)?;
        let writer = VirtioFsWriter::new(&self.view, chain).map_err(RequestError::Fuse)?;
        server
            .handle_message(reader, Writer::from(writer), None, None)
            .map_err(RequestError::Server)
    }

    /// Writes `buffers` into the shadow table as one chain at index 0 and
    /// makes it the one available entry.
    fn stage(&mut self, mem: &GuestMemoryMmap, buffers: &[Buffer]) -> Result<(), BridgeError> {
        if buffers.is_empty() {
            return Err(BridgeError::Empty);
        }
        if buffers.len() > usize::from(MAX_DESCRIPTORS) {
            return Err(BridgeError::TooManyBuffers);
        }
        let mut seen_write = false;
        for (i, b) in buffers.iter().enumerate() {
            let len = usize::try_from(b.len).unwrap_or(usize::MAX);
            let access = if b.write {
                vm_memory::Permissions::Write
            } else {
                vm_memory::Permissions::Read
            };
            if !vm_memory::GuestMemory::check_range(
                mem,
                vm_memory::GuestAddress(b.addr),
                len,
                access,
            ) {
                return Err(BridgeError::OutsideRam {
                    addr: b.addr,
                    len: b.len,
                });
            }
            if seen_write && !b.write {
                return Err(BridgeError::Order);
            }
            seen_write |= b.write;
            let last = i + 1 == buffers.len();
            let mut flags = if b.write { F_WRITE } else { 0 };
            let mut next = 0u16;
            if !last {
                flags |= F_NEXT;
                next = u16::try_from(i + 1).map_err(|_| BridgeError::TooManyBuffers)?;
            }
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&b.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&b.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            let at = self.table + DESC_SIZE * u64::try_from(i).unwrap_or(u64::MAX);
            self.view
                .write_slice(&raw, GuestAddress17(at))
                .map_err(|_| BridgeError::Shadow)?;
        }
        // avail: flags, idx = 1, ring[0] = 0; the shadow queue takes it
        // from next_avail 0 each time.
        let ring = [0u8, 0, 1, 0, 0, 0];
        self.view
            .write_slice(&ring, GuestAddress17(self.avail))
            .map_err(|_| BridgeError::Shadow)?;
        self.queue.set_next_avail(0);
        Ok(())
    }
}

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    #[error("the request's buffers are unusable")]
    Fuse(#[source] fuse_backend_rs::transport::Error),
    #[error("the FUSE server refused the request")]
    Server(#[source] fuse_backend_rs::Error),
}
