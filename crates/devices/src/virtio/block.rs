//! virtio-blk on a [`block::DiskImage`]: read, write, flush, get-id,
//! discard and write-zeroes, read-only disks.
//!
//! Every request is checked before it touches the image: the header must
//! be device-readable, the status byte device-writable, data buffers must
//! point the right way and lie in guest RAM, and the sectors must lie on
//! the disk. A bad request gets an error status (or, when there is not even
//! a status byte, is returned unused); nothing the guest writes into a
//! queue can make the VMM panic.

use std::sync::Arc;

use block::file::AlignedBuf;
use block::DiskImage;
use memory::GuestMemoryMmap;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::worker::WorkerThread;
use super::{read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice};

pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
/// Largest data buffer the device accepts (advertised as size_max).
pub const SIZE_MAX: u32 = 1 << 20;
/// Data buffers per request (seg_max): the queue less header and status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
const HEADER_SIZE: u32 = 16;
const DISCARD_SEGMENT_SIZE: u32 = 16;

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    disk: Arc<dyn DiskImage>,
    config: Vec<u8>,
    worker: Option<WorkerThread>,
}

impl Block {
    pub fn new(disk: Arc<dyn DiskImage>) -> Self {
        let config = config_space(disk.size(), disk.read_only());
        Block {
            disk,
            config,
            worker: None,
        }
    }
}

/// The device configuration: capacity, size/segment limits, block size,
/// discard and write-zeroes limits (little endian, virtio_blk_config).
fn config_space(size: u64, read_only: bool) -> Vec<u8> {
    let mut c = vec![0u8; 64];
    let put32 =
        |c: &mut Vec<u8>, at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
    c[0..8].copy_from_slice(&(size / SECTOR_SIZE).to_le_bytes());
    put32(&mut c, 8, SIZE_MAX);
    put32(&mut c, 12, SEG_MAX);
    put32(&mut c, 20, SECTOR_SIZE as u32); // blk_size
    if !read_only {
        put32(&mut c, 36, u32::MAX >> 9); // max_discard_sectors
        put32(&mut c, 40, 1); // max_discard_seg
        put32(&mut c, 44, 1); // discard_sector_alignment
        put32(&mut c, 48, u32::MAX >> 9); // max_write_zeroes_sectors
        put32(&mut c, 52, 1); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
    }
    c
}

/// The outcome of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    IoError,
    Unsupported,
}

impl Status {
    fn byte(self) -> u8 {
        (match self {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoError => VIRTIO_BLK_S_IOERR,
            Status::Unsupported => VIRTIO_BLK_S_UNSUPP,
        }) as u8
    }
}

/// One descriptor of a chain.
#[derive(Debug, Clone, Copy)]
struct Buffer {
    addr: u64,
    len: u32,
    writable: bool,
}

/// Serves every available request of `queue`.
pub fn process_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    disk: &dyn DiskImage,
    interrupt: &Interrupt,
) {
    // With EVENT_IDX the driver kicks only past the avail_event we publish,
    // so: drain with kicks off, turn them back on (publishing our position)
    // and drain again if requests slipped in meanwhile.
    let mut used_any = false;
    loop {
        let _ = queue.disable_notification(mem);
        let mut progressed = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let written = handle_chain(chain, mem, disk);
            if let Err(e) = queue.add_used(mem, head, written) {
                tracing::warn!("virtio-blk cannot return a request: {e}");
                return;
            }
            progressed = true;
            used_any = true;
        }
        match queue.enable_notification(mem) {
            Ok(true) if progressed => continue,
            Ok(true) => {
                // "More available" but nothing could be taken: the driver's
                // available index is bogus (found by the fuzzer). Waiting for
                // the next kick beats spinning on it.
                tracing::warn!("virtio-blk: the driver's available ring index is invalid");
                break;
            }
            Ok(false) => break,
            Err(e) => {
                tracing::warn!("virtio-blk queue is broken: {e}");
                break;
            }
        }
    }
    if used_any && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used();
    }
}

/// Runs one request; returns the bytes written into guest buffers.
fn handle_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    disk: &dyn DiskImage,
) -> u32 {
    // The iterator stops at loops and at the queue size (virtio-queue's TTL).
    let buffers: Vec<Buffer> = chain
        .map(|d| Buffer {
            addr: d.addr().0,
            len: d.len(),
            writable: d.is_write_only(),
        })
        .collect();
    let (Some(header), Some(status)) = (buffers.first(), buffers.last()) else {
        return 0;
    };
    if buffers.len() < 2
        || header.writable
        || header.len < HEADER_SIZE
        || !status.writable
        || status.len < 1
    {
        tracing::debug!("malformed virtio-blk request dropped");
        return 0;
    }
    // The status byte is the last byte of the last buffer (found by the
    // fuzzer: the guest picks the address, so the sum must be checked).
    let Some(status_addr) = status
        .addr
        .checked_add(u64::from(status.len) - 1)
        .map(GuestAddress)
    else {
        return 0;
    };
    if mem.read_obj::<u8>(status_addr).is_err() {
        return 0;
    }
    let data = &buffers[1..buffers.len() - 1];
    let (result, data_written) = match mem.read_obj::<[u8; 16]>(GuestAddress(header.addr)) {
        Ok(h) => {
            let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
            let sector = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
            execute(kind, sector, data, mem, disk)
        }
        Err(_) => (Status::IoError, 0),
    };
    if mem.write_obj(result.byte(), status_addr).is_err() {
        return data_written;
    }
    data_written + 1
}

/// Consecutive data buffers in groups of at most [`SIZE_MAX`] bytes (a
/// single larger buffer is refused before this), so that a request's many
/// small segments become few host I/Os with bounded staging memory.
fn chunks(data: &[Buffer]) -> impl Iterator<Item = &[Buffer]> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut len = 0u64;
        let n = rest
            .iter()
            .take_while(|b| {
                len += u64::from(b.len);
                len <= u64::from(SIZE_MAX)
            })
            .count()
            .max(1);
        let (group, tail) = rest.split_at(n);
        rest = tail;
        Some(group)
    })
}

/// Checks that `[sector * 512, + len)` lies on the disk; returns the byte
/// offset.
fn disk_range(sector: u64, len: u64, disk: &dyn DiskImage) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    (end <= disk.size()).then_some(offset)
}

fn execute(
    kind: u32,
    sector: u64,
    data: &[Buffer],
    mem: &GuestMemoryMmap,
    disk: &dyn DiskImage,
) -> (Status, u32) {
    match kind {
        VIRTIO_BLK_T_IN => {
            if data.iter().any(|b| !b.writable || b.len > SIZE_MAX) || data.len() > SEG_MAX as usize
            {
                return (Status::IoError, 0);
            }
            let total: u64 = data.iter().map(|b| u64::from(b.len)).sum();
            let Some(mut offset) = disk_range(sector, total, disk) else {
                return (Status::IoError, 0);
            };
            let mut written = 0u32;
            for group in chunks(data) {
                // One host read per chunk, scattered into the guest's buffers.
                let len: usize = group.iter().map(|b| b.len as usize).sum();
                let Ok(mut buffer) = AlignedBuf::new(len) else {
                    return (Status::IoError, written);
                };
                let staging = &mut buffer.as_mut_slice()[..len];
                if disk.read_at(staging, offset).is_err() {
                    return (Status::IoError, written);
                }
                let mut pos = 0usize;
                for b in group {
                    let part = &staging[pos..pos + b.len as usize];
                    if mem.write_slice(part, GuestAddress(b.addr)).is_err() {
                        return (Status::IoError, written);
                    }
                    pos += b.len as usize;
                    written += b.len;
                }
                offset += pos as u64;
            }
            (Status::Ok, written)
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only() {
                return (Status::IoError, 0);
            }
            if data.iter().any(|b| b.writable || b.len > SIZE_MAX) || data.len() > SEG_MAX as usize
            {
                return (Status::IoError, 0);
            }
            let total: u64 = data.iter().map(|b| u64::from(b.len)).sum();
            let Some(mut offset) = disk_range(sector, total, disk) else {
                return (Status::IoError, 0);
            };
            for group in chunks(data) {
                // The guest's buffers gathered into one host write per chunk.
                let len: usize = group.iter().map(|b| b.len as usize).sum();
                let Ok(mut buffer) = AlignedBuf::new(len) else {
                    return (Status::IoError, 0);
                };
                let staging = &mut buffer.as_mut_slice()[..len];
                let mut pos = 0usize;
                for b in group {
                    let part = &mut staging[pos..pos + b.len as usize];
                    if mem.read_slice(part, GuestAddress(b.addr)).is_err() {
                        return (Status::IoError, 0);
                    }
                    pos += b.len as usize;
                }
                if disk.write_at(staging, offset).is_err() {
                    return (Status::IoError, 0);
                }
                offset += pos as u64;
            }
            (Status::Ok, 0)
        }
        VIRTIO_BLK_T_FLUSH => match disk.flush() {
            Ok(()) => (Status::Ok, 0),
            Err(_) => (Status::IoError, 0),
        },
        VIRTIO_BLK_T_GET_ID => {
            let Some(b) = data.first().filter(|b| b.writable) else {
                return (Status::IoError, 0);
            };
            let mut id = disk.id();
            id.resize(VIRTIO_BLK_ID_BYTES as usize, 0);
            let n = (b.len as usize).min(id.len());
            match mem.write_slice(&id[..n], GuestAddress(b.addr)) {
                Ok(()) => (Status::Ok, n as u32),
                Err(_) => (Status::IoError, 0),
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if disk.read_only() {
                return (Status::IoError, 0);
            }
            // One segment per request (max_discard_seg = 1).
            let [seg] = data else {
                return (Status::Unsupported, 0);
            };
            if seg.writable || seg.len != DISCARD_SEGMENT_SIZE {
                return (Status::Unsupported, 0);
            }
            let Ok(s) = mem.read_obj::<[u8; 16]>(GuestAddress(seg.addr)) else {
                return (Status::IoError, 0);
            };
            let start = u64::from_le_bytes(s[0..8].try_into().unwrap_or_default());
            let count = u64::from(u32::from_le_bytes([s[8], s[9], s[10], s[11]]));
            let flags = u32::from_le_bytes([s[12], s[13], s[14], s[15]]);
            let Some(offset) = disk_range(start, count * SECTOR_SIZE, disk) else {
                return (Status::IoError, 0);
            };
            let len = count * SECTOR_SIZE;
            let result = if kind == VIRTIO_BLK_T_DISCARD {
                disk.discard(offset, len)
            } else {
                disk.write_zeroes(offset, len, flags & 1 != 0)
            };
            (
                if result.is_ok() {
                    Status::Ok
                } else {
                    Status::IoError
                },
                0,
            )
        }
        _ => (Status::Unsupported, 0),
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
    fn name(&self) -> &'static str {
        "block"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << super::VIRTIO_RING_F_EVENT_IDX);
        if self.disk.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let (mem, interrupt, [(mut queue, event)]) = a.take_queues::<1>()?;
        let disk = self.disk.clone();
        let worker = WorkerThread::start("virtio-blk", vec![event], move |_| {
            process_queue(&mut queue, &mem, disk.as_ref(), &interrupt);
        })
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

#[cfg(test)]
mod tests;
