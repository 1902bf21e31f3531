//! virtio-blk on a [`block::DiskImage`]: read, write, flush, get-id,
//! discard and write-zeroes, read-only disks.
//!
//! A request is read from its chain as two byte streams, whatever the
//! descriptors' framing (virtio 1.x: any layout): the device-readable one
//! (the 16-byte header, then OUT data or a discard segment) and the
//! device-writable one (IN data or the id, then the status byte as the
//! chain's last byte). Every request is checked before it touches the
//! image: a whole header, a status byte in a device-writable buffer at the
//! chain's end, readable buffers before writable ones, data in the right
//! direction and in guest RAM, segments within size_max and seg_max, and
//! sectors on the disk. A bad request gets an error status (or, when there
//! is not even a status byte, is returned unused); nothing the guest writes
//! into a queue can make the VMM panic.

use std::sync::Arc;

use block::file::AlignedBuf;
use block::DiskImage;
use memory::GuestMemoryMmap;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::persist::OwnState;
use super::rate_limit::{RateLimitConfig, RateLimiter};
use super::worker::{stop_worker, WorkerError, WorkerThread};
use super::{
    read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice, VirtioDeviceState,
    VirtioStateError,
};

/// log2 of the 512-byte sector that request offsets count in.
const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
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
    /// Limits on the guest's I/O (bytes and requests a second).
    rate_limit: RateLimitConfig,
    worker: Option<WorkerThread<BlockWorker>>,
    /// A sleeping device's limiter: how full its buckets are survives a
    /// pause (and is saved in a snapshot).
    limiter: Option<RateLimiter>,
    /// Bucket levels from a restored snapshot, for the next activation.
    restored_limiter: Option<super::rate_limit::RateLimiterState>,
}

/// What the worker thread owns.
#[derive(Debug)]
struct BlockWorker {
    queue: Queue,
    limiter: Option<RateLimiter>,
}

impl Block {
    pub fn new(disk: Arc<dyn DiskImage>) -> Self {
        let config = config_space(disk.size(), disk.read_only());
        Block {
            disk,
            config,
            rate_limit: RateLimitConfig::default(),
            worker: None,
            limiter: None,
            restored_limiter: None,
        }
    }

    /// Limits the guest's I/O on this disk.
    pub fn with_rate_limit(mut self, rate_limit: RateLimitConfig) -> Self {
        self.rate_limit = rate_limit;
        self
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
    put32(&mut c, 20, 1 << SECTOR_SHIFT); // blk_size
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
    const fn byte(self) -> u8 {
        match self {
            Status::Ok => STATUS_OK,
            Status::IoError => STATUS_IOERR,
            Status::Unsupported => STATUS_UNSUPP,
        }
    }
}

/// The status codes as the byte the device writes.
const STATUS_OK: u8 = low_byte(VIRTIO_BLK_S_OK);
const STATUS_IOERR: u8 = low_byte(VIRTIO_BLK_S_IOERR);
const STATUS_UNSUPP: u8 = low_byte(VIRTIO_BLK_S_UNSUPP);

/// A status code as a byte; evaluated at compile time, so a code that
/// did not fit would not build.
const fn low_byte(code: u32) -> u8 {
    let [byte, 0, 0, 0] = code.to_le_bytes() else {
        panic!("a virtio-blk status code does not fit a byte");
    };
    byte
}

/// A run of guest memory the device may touch: all or part of one
/// descriptor's buffer. A chain with a buffer whose `addr + len` overflows
/// is refused before any of its segments is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    addr: u64,
    len: u32,
}

/// The bytes of some descriptors taken as one stream. virtio 1.x lets a
/// driver frame a request any way it likes (VIRTIO_F_ANY_LAYOUT is part
/// of VERSION_1): the header may be split across descriptors or share one
/// with data, data may share the status byte's descriptor. Requests are
/// therefore parsed from the device-readable and device-writable streams
/// by byte position, never by descriptor.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Stream(Vec<Segment>);

impl Stream {
    fn push(&mut self, seg: Segment) {
        if seg.len > 0 {
            self.0.push(seg);
        }
    }

    fn len(&self) -> u64 {
        self.0.iter().map(|s| u64::from(s.len)).sum()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first `n` bytes and the rest (all of it in the first part when
    /// the stream is shorter).
    fn split_at(mut self, n: u64) -> (Stream, Stream) {
        let mut left = 0u64;
        for (i, seg) in self.0.iter().enumerate() {
            let len = u64::from(seg.len);
            if left + len <= n {
                left += len;
                continue;
            }
            // Splits inside this segment; `cut < seg.len`, so it fits a u32
            // and `addr + cut` stays below the checked `addr + len`.
            let cut = u32::try_from(n - left).unwrap_or(seg.len);
            let mut tail = self.0.split_off(i);
            let whole = tail[0];
            if cut > 0 {
                self.0.push(Segment {
                    addr: whole.addr,
                    len: cut,
                });
                tail[0] = Segment {
                    addr: whole.addr + u64::from(cut),
                    len: whole.len - cut,
                };
            }
            return (self, Stream(tail));
        }
        (self, Stream::default())
    }

    /// Fills `out` with the stream's bytes (gather); `out` is as long as
    /// the stream.
    fn gather(&self, mem: &GuestMemoryMmap, out: &mut [u8]) -> Result<(), ()> {
        let mut pos = 0usize;
        for seg in &self.0 {
            let end = pos + seg.len as usize;
            let part = out.get_mut(pos..end).ok_or(())?;
            mem.read_slice(part, GuestAddress(seg.addr))
                .map_err(|_| ())?;
            pos = end;
        }
        Ok(())
    }

    /// Writes `data` across the stream (scatter); `data` is as long as
    /// the stream. On failure, returns how many bytes were written.
    fn scatter(&self, mem: &GuestMemoryMmap, data: &[u8]) -> Result<(), u32> {
        let mut pos = 0usize;
        let mut written = 0u32;
        for seg in &self.0 {
            let end = pos + seg.len as usize;
            let Some(part) = data.get(pos..end) else {
                return Err(written);
            };
            if mem.write_slice(part, GuestAddress(seg.addr)).is_err() {
                return Err(written);
            }
            written = written.saturating_add(seg.len);
            pos = end;
        }
        Ok(())
    }
}

/// A request as its chain lays it out: the 16-byte header, everything
/// device-readable after it (`payload`) and everything device-writable
/// before the status byte (`data_in`).
#[derive(Debug)]
struct Request {
    header: [u8; HEADER_SIZE as usize],
    /// Device-readable bytes after the header (OUT data, discard segments).
    payload: Stream,
    /// Device-writable bytes before the status byte (IN data, the id).
    data_in: Stream,
}

/// What a chain holds.
#[derive(Debug)]
enum Parsed {
    /// No usable status byte, or no whole header: returned unused.
    Unanswerable,
    /// A malformed request; IOERR goes to the status byte here.
    Failed(GuestAddress),
    /// A request and its status byte.
    Request(Request, GuestAddress),
}

/// Splits a chain into header, payload, data and status byte.
fn parse_chain(chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> Parsed {
    let mut readable = Stream::default();
    let mut writable = Stream::default();
    let mut misordered = false;
    let mut overflow = false;
    let mut last: Option<(Segment, bool)> = None;
    // The iterator stops at loops and at the queue size (virtio-queue's TTL).
    for d in chain {
        let seg = Segment {
            addr: d.addr().0,
            len: d.len(),
        };
        if seg.len == 0 {
            continue;
        }
        if seg.addr.checked_add(u64::from(seg.len)).is_none() {
            // Found by the fuzzer: the guest picks the address, so sums
            // with it must be checked.
            overflow = true;
        }
        if d.is_write_only() {
            writable.push(seg);
        } else {
            // Device-readable buffers must all come first (the spec's rule
            // for drivers filling a descriptor chain).
            misordered |= !writable.is_empty();
            readable.push(seg);
        }
        last = Some((seg, d.is_write_only()));
    }
    // The status byte is the chain's last byte, in a device-writable buffer.
    let status = match last {
        Some((seg, true)) => seg
            .addr
            .checked_add(u64::from(seg.len) - 1)
            .map(GuestAddress)
            .filter(|&a| mem.read_obj::<u8>(a).is_ok()),
        _ => None,
    };
    let Some(status) = status else {
        return Parsed::Unanswerable;
    };
    if readable.len() < u64::from(HEADER_SIZE) {
        return Parsed::Unanswerable;
    }
    if misordered || overflow {
        return Parsed::Failed(status);
    }
    let (header_stream, payload) = readable.split_at(u64::from(HEADER_SIZE));
    let data_len = writable.len() - 1;
    let (data_in, _status) = writable.split_at(data_len);
    let mut header = [0u8; HEADER_SIZE as usize];
    if header_stream.gather(mem, &mut header).is_err() {
        return Parsed::Failed(status);
    }
    let request = Request {
        header,
        payload,
        data_in,
    };
    Parsed::Request(request, status)
}

/// Serves every available request of `queue`.
pub fn process_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    disk: &dyn DiskImage,
    interrupt: &Interrupt,
) {
    process_queue_limited(queue, mem, disk, interrupt, None);
}

/// The bytes a request moves, as its rate limit counts them: its
/// buffers less the header and the status byte.
fn request_bytes(chain: &DescriptorChain<&GuestMemoryMmap>) -> u64 {
    let total: u64 = chain.clone().map(|d| u64::from(d.len())).sum();
    total.saturating_sub(u64::from(HEADER_SIZE) + 1)
}

/// Serves the available requests of `queue` that `limiter` admits. A
/// request it refuses stays in the queue (notifications stay off): the
/// limiter's timer brings the worker back for it.
pub fn process_queue_limited(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    disk: &dyn DiskImage,
    interrupt: &Interrupt,
    mut limiter: Option<&mut RateLimiter>,
) {
    // With EVENT_IDX the driver kicks only past the avail_event we publish,
    // so: drain with kicks off, turn them back on (publishing our position)
    // and drain again if requests slipped in meanwhile.
    let mut used_any = false;
    loop {
        let _ = queue.disable_notification(mem);
        let mut progressed = false;
        let mut throttled = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            if let Some(l) = limiter.as_deref_mut() {
                if !l.consume(request_bytes(&chain), 1) {
                    queue.go_to_previous_position();
                    throttled = true;
                    break;
                }
            }
            let head = chain.head_index();
            let written = handle_chain(chain, mem, disk);
            if let Err(e) = queue.add_used(mem, head, written) {
                tracing::warn!("virtio-blk cannot return a request: {e}");
                return;
            }
            progressed = true;
            used_any = true;
        }
        if throttled {
            break;
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
        // The request queue is the only one.
        interrupt.signal_queue(0);
    }
}

/// Runs one request; returns the bytes written into guest buffers.
fn handle_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    disk: &dyn DiskImage,
) -> u32 {
    let (status_addr, (result, data_written)) = match parse_chain(chain, mem) {
        Parsed::Request(r, status) => (status, execute(&r, mem, disk)),
        Parsed::Failed(status) => (status, (Status::IoError, 0)),
        Parsed::Unanswerable => {
            tracing::debug!("malformed virtio-blk request dropped");
            return 0;
        }
    };
    if mem.write_obj(result.byte(), status_addr).is_err() {
        return data_written;
    }
    data_written.saturating_add(1)
}

/// Checks that `[sector * 512, + len)` lies on the disk; returns the byte
/// offset.
fn disk_range(sector: u64, len: u64, disk: &dyn DiskImage) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    (end <= disk.size()).then_some(offset)
}

/// Whether a data stream keeps to the limits the device advertises: no
/// segment over size_max, at most seg_max segments.
fn within_limits(data: &Stream) -> bool {
    data.0.len() <= SEG_MAX as usize && data.0.iter().all(|s| s.len <= SIZE_MAX)
}

/// The staging buffer for one host I/O: the request's data in pieces of
/// at most [`SIZE_MAX`] bytes, so that its many small segments become few
/// `pread`/`pwrite`s with bounded memory.
fn staging(total: u64) -> Option<AlignedBuf> {
    AlignedBuf::new(usize::try_from(total.min(u64::from(SIZE_MAX))).ok()?).ok()
}

/// The part of the staging buffer one chunk of a request uses (a chunk is
/// at most [`SIZE_MAX`] long, the buffer's length).
fn staging_for<'a>(buffer: &'a mut AlignedBuf, chunk: &Stream) -> Option<&'a mut [u8]> {
    let n = usize::try_from(chunk.len()).ok()?;
    buffer.as_mut_slice().get_mut(..n)
}

/// IN: disk to guest, one host read per chunk, scattered into the guest's
/// buffers. Returns the status and the bytes written into guest memory.
fn read_request(
    sector: u64,
    data: Stream,
    mem: &GuestMemoryMmap,
    disk: &dyn DiskImage,
) -> (Status, u32) {
    let total = data.len();
    let Some(mut offset) = disk_range(sector, total, disk) else {
        return (Status::IoError, 0);
    };
    let Some(mut buffer) = staging(total) else {
        return (Status::IoError, 0);
    };
    let mut written = 0u32;
    let mut rest = data;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(u64::from(SIZE_MAX));
        rest = tail;
        let Some(staging) = staging_for(&mut buffer, &chunk) else {
            return (Status::IoError, written);
        };
        if disk.read_at(staging, offset).is_err() {
            return (Status::IoError, written);
        }
        if let Err(n) = chunk.scatter(mem, staging) {
            return (Status::IoError, written.saturating_add(n));
        }
        written = written.saturating_add(u32::try_from(staging.len()).unwrap_or(u32::MAX));
        offset += chunk.len();
    }
    (Status::Ok, written)
}

/// OUT: guest to disk, the guest's buffers gathered into one host write
/// per chunk.
fn write_request(sector: u64, data: Stream, mem: &GuestMemoryMmap, disk: &dyn DiskImage) -> Status {
    let total = data.len();
    let Some(mut offset) = disk_range(sector, total, disk) else {
        return Status::IoError;
    };
    let Some(mut buffer) = staging(total) else {
        return Status::IoError;
    };
    let mut rest = data;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(u64::from(SIZE_MAX));
        rest = tail;
        let Some(staging) = staging_for(&mut buffer, &chunk) else {
            return Status::IoError;
        };
        if chunk.gather(mem, staging).is_err() || disk.write_at(staging, offset).is_err() {
            return Status::IoError;
        }
        offset += chunk.len();
    }
    Status::Ok
}

/// DISCARD and WRITE_ZEROES with their one 16-byte segment (sector,
/// count, flags).
fn discard_request(
    kind: u32,
    payload: &Stream,
    mem: &GuestMemoryMmap,
    disk: &dyn DiskImage,
) -> Status {
    // One segment per request (max_discard_seg = 1).
    if payload.len() != u64::from(DISCARD_SEGMENT_SIZE) {
        return Status::Unsupported;
    }
    let mut s = [0u8; DISCARD_SEGMENT_SIZE as usize];
    if payload.gather(mem, &mut s).is_err() {
        return Status::IoError;
    }
    let (start, rest) = s.split_at(8);
    let (count, flags) = rest.split_at(4);
    let start = u64::from_le_bytes(start.try_into().unwrap_or_default());
    let count = u64::from(u32::from_le_bytes(count.try_into().unwrap_or_default()));
    let flags = u32::from_le_bytes(flags.try_into().unwrap_or_default());
    let len = count * SECTOR_SIZE;
    let Some(offset) = disk_range(start, len, disk) else {
        return Status::IoError;
    };
    let result = if kind == VIRTIO_BLK_T_DISCARD {
        disk.discard(offset, len)
    } else {
        disk.write_zeroes(offset, len, flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0)
    };
    if result.is_ok() {
        Status::Ok
    } else {
        Status::IoError
    }
}

fn execute(r: &Request, mem: &GuestMemoryMmap, disk: &dyn DiskImage) -> (Status, u32) {
    let (kind, rest) = r.header.split_at(4);
    let kind = u32::from_le_bytes(kind.try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(rest[4..12].try_into().unwrap_or_default());
    match kind {
        VIRTIO_BLK_T_IN => {
            if !r.payload.is_empty() || !within_limits(&r.data_in) {
                return (Status::IoError, 0);
            }
            read_request(sector, r.data_in.clone(), mem, disk)
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only() || !r.data_in.is_empty() || !within_limits(&r.payload) {
                return (Status::IoError, 0);
            }
            (write_request(sector, r.payload.clone(), mem, disk), 0)
        }
        VIRTIO_BLK_T_FLUSH => match disk.flush() {
            Ok(()) => (Status::Ok, 0),
            Err(_) => (Status::IoError, 0),
        },
        VIRTIO_BLK_T_GET_ID => {
            let mut id = disk.id();
            id.resize(VIRTIO_BLK_ID_BYTES as usize, 0);
            let (room, _) = r.data_in.clone().split_at(u64::from(VIRTIO_BLK_ID_BYTES));
            if room.is_empty() {
                return (Status::IoError, 0);
            }
            // At most VIRTIO_BLK_ID_BYTES (20).
            let n = id
                .len()
                .min(usize::try_from(room.len()).unwrap_or(usize::MAX));
            match room.scatter(mem, &id[..n]) {
                Ok(()) => (Status::Ok, u32::try_from(n).unwrap_or(0)),
                Err(_) => (Status::IoError, 0),
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if disk.read_only() {
                return (Status::IoError, 0);
            }
            if !r.data_in.is_empty() {
                return (Status::Unsupported, 0);
            }
            (discard_request(kind, &r.payload, mem, disk), 0)
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
        let (mem, interrupt, [(queue, event)]) = a.take_queues::<1>()?;
        let disk = self.disk.clone();
        let limiter = match self.limiter.take() {
            Some(l) => Some(l),
            None if self.rate_limit.is_limited() => {
                let mut l = RateLimiter::new(self.rate_limit).map_err(ActivateError::Thread)?;
                if let Some(saved) = self.restored_limiter.take() {
                    l.restore(&saved);
                }
                Some(l)
            }
            None => None,
        };
        let fds: Vec<_> = limiter.iter().map(RateLimiter::timer_fd).collect();
        let mut state = BlockWorker { queue, limiter };
        if state.limiter.is_some() {
            // Requests a throttled worker left in the queue (with kicks
            // off) before a pause or a snapshot: serve what may go now.
            process_queue_limited(
                &mut state.queue,
                &mem,
                disk.as_ref(),
                &interrupt,
                state.limiter.as_mut(),
            );
        }
        // Each request completes before the handler returns: a stopped
        // worker has none in flight. Index 0: the queue's kick; 1: the
        // rate limiter's timer.
        let worker = WorkerThread::start_with_fds(
            "virtio-blk",
            vec![event],
            &fds,
            state,
            move |w: &mut BlockWorker, i| {
                if i == 1 {
                    if let Some(l) = w.limiter.as_mut() {
                        l.timer_fired();
                    }
                }
                process_queue_limited(
                    &mut w.queue,
                    &mem,
                    disk.as_ref(),
                    &interrupt,
                    w.limiter.as_mut(),
                );
            },
        )
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        self.limiter = None;
    }

    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, WorkerError> {
        let Some(w) = stop_worker(&mut self.worker)? else {
            return Ok(None);
        };
        self.limiter = w.limiter;
        Ok(Some(vec![w.queue]))
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block(self.state())
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioStateError> {
        let s = persist::BlockState::own(state, self.name(), self.worker.is_some())?;
        self.check_state(s)?;
        self.restore_limiter(s);
        Ok(())
    }
}

pub mod persist;

#[cfg(test)]
mod tests;
