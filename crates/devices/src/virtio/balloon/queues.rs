//! The balloon's queue decoders (pure, fuzzed: `fuzz/fuzz_targets/
//! balloon_queues.rs`) and the handling of each queue's buffers.
//!
//! Everything a buffer says is the guest's and checked: page numbers and
//! ranges outside guest RAM are skipped and counted, a buffer is read up to
//! a fixed size at most, and no allocation grows with what the guest
//! claims.

use memory::discard::{discard, PAGE_SIZE};
use memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{BalloonCounters, PAGE_SHIFT};
use crate::virtio::Interrupt;

/// The most page numbers one inflate or deflate buffer is read for (Linux
/// sends 256); the rest of a larger buffer is ignored.
pub const MAX_PFNS: usize = 4096;
/// A statistics entry: le16 tag, le64 value (packed).
pub const STAT_LEN: usize = 10;
/// The most statistics entries read from a buffer (Linux sends 10-16).
pub const MAX_STATS: usize = 64;

/// The guest's memory statistics; `None` for what it did not send.
/// Sizes are in bytes, faults are counts.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
pub struct GuestStats {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
}

/// Decodes a statistics buffer: 10-byte entries (le16 tag, le64 value),
/// at most [`MAX_STATS`]; unknown tags and a trailing partial entry are
/// ignored; a tag given twice keeps its last value.
pub fn parse_stats(bytes: &[u8]) -> GuestStats {
    let mut s = GuestStats::default();
    for entry in bytes.chunks_exact(STAT_LEN).take(MAX_STATS) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let mut v = [0u8; 8];
        v.copy_from_slice(&entry[2..]);
        let value = Some(u64::from_le_bytes(v));
        match tag {
            0 => s.swap_in = value,
            1 => s.swap_out = value,
            2 => s.major_faults = value,
            3 => s.minor_faults = value,
            4 => s.free_memory = value,
            5 => s.total_memory = value,
            6 => s.available_memory = value,
            7 => s.disk_caches = value,
            8 => s.hugetlb_allocations = value,
            9 => s.hugetlb_failures = value,
            _ => {}
        }
    }
    s
}

/// Decodes an inflate or deflate buffer (le32 page numbers of 4 KiB
/// pages, at most [`MAX_PFNS`]; a trailing partial number is ignored)
/// into sorted runs of guest-physical `(address, length)`: duplicates
/// merge, neighbours join.
pub fn pfn_ranges(bytes: &[u8]) -> Vec<(u64, u64)> {
    let mut pfns: Vec<u32> = bytes
        .chunks_exact(4)
        .take(MAX_PFNS)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    pfns.sort_unstable();
    pfns.dedup();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for pfn in pfns {
        let addr = u64::from(pfn) << PAGE_SHIFT;
        match runs.last_mut() {
            Some((start, len)) if *start + *len == addr => *len += PAGE_SIZE,
            _ => runs.push((addr, PAGE_SIZE)),
        }
    }
    runs
}

/// Reads the device-readable part of a chain, at most `limit` bytes (a
/// buffer outside RAM ends the read).
fn read_chain<I>(mem: &GuestMemoryMmap, chain: I, limit: usize) -> Vec<u8>
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let mut out = Vec::new();
    for desc in chain {
        if desc.is_write_only() || out.len() >= limit {
            break;
        }
        let n = (desc.len() as usize).min(limit - out.len());
        let at = out.len();
        out.resize(at + n, 0);
        if mem
            .read_slice(&mut out[at..], GuestAddress(desc.addr().0))
            .is_err()
        {
            out.truncate(at);
            break;
        }
    }
    out
}

/// Gives `len` bytes at `addr` back to the host, skipping (and counting)
/// the pages that are not guest RAM; adds what was released.
pub fn release(mem: &GuestMemoryMmap, addr: u64, len: u64, counters: &mut BalloonCounters) {
    let end = addr.saturating_add(len);
    let mut at = addr;
    while at < end {
        let piece_end = match mem.find_region(GuestAddress(at)) {
            Some(r) => end.min(r.start_addr().0.saturating_add(r.len())),
            None => {
                // Not RAM: skip to the next page (a run is at most
                // MAX_PFNS pages, a reported range is checked whole).
                counters.refused += 1;
                at = at.saturating_add(PAGE_SIZE);
                continue;
            }
        };
        match discard(mem, GuestAddress(at), piece_end - at) {
            Ok(n) => counters.released_bytes += n,
            Err(e) => {
                counters.refused += 1;
                tracing::debug!("balloon: {e}");
            }
        }
        at = piece_end;
    }
}

/// What a queue's handler gives its caller: whether buffers were used.
fn finish(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt, used: bool) {
    if used && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used();
    }
}

/// Serves the inflate queue (`inflate`: true) or the deflate queue: each
/// buffer's pages are counted, and inflated ones given back to the host.
pub fn process_pfns(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    inflate: bool,
    counters: &mut BalloonCounters,
) {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let bytes = read_chain(mem, chain, MAX_PFNS * 4);
        let runs = pfn_ranges(&bytes);
        let pages: u64 = runs.iter().map(|(_, len)| len / PAGE_SIZE).sum();
        if inflate {
            counters.inflated_pages += pages;
            for (addr, len) in runs {
                release(mem, addr, len, counters);
            }
        } else {
            // Deflated pages come back as zero pages on first touch.
            counters.deflated_pages += pages;
        }
        if queue.add_used(mem, head, 0).is_err() {
            break;
        }
        used = true;
    }
    finish(queue, mem, interrupt, used);
}

/// Serves the free page reporting queue: each descriptor of a buffer is a
/// free range (Linux hands them device-writable); aligned ranges wholly in
/// RAM are given back, others are refused whole.
pub fn process_reports(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    counters: &mut BalloonCounters,
) {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        for desc in chain {
            let (addr, len) = (desc.addr().0, u64::from(desc.len()));
            counters.reported_bytes += len;
            match discard(mem, GuestAddress(addr), len) {
                Ok(n) => counters.released_bytes += n,
                Err(e) => {
                    counters.refused += 1;
                    tracing::debug!("balloon report: {e}");
                }
            }
        }
        if queue.add_used(mem, head, 0).is_err() {
            break;
        }
        used = true;
    }
    finish(queue, mem, interrupt, used);
}

/// Takes the statistics buffers the guest made available: each is parsed
/// (`on_stats`) and the newest held (its head in `held`) until statistics
/// are wanted again; an older one still held goes back at once (a driver
/// has one; a flood of them costs one pass over the queue).
pub fn process_stats(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    held: &mut Option<u16>,
    on_stats: &mut dyn FnMut(GuestStats),
) {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let bytes = read_chain(mem, chain, MAX_STATS * STAT_LEN);
        on_stats(parse_stats(&bytes));
        if let Some(old) = held.replace(head) {
            if queue.add_used(mem, old, 0).is_err() {
                break;
            }
            used = true;
        }
    }
    finish(queue, mem, interrupt, used);
}

/// Hands the held statistics buffer back, which asks the guest for new
/// statistics; false when there is none held.
pub fn request_stats(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    held: &mut Option<u16>,
) -> bool {
    let Some(head) = held.take() else {
        return false;
    };
    if let Err(e) = queue.add_used(mem, head, 0) {
        tracing::debug!("balloon: cannot return the statistics buffer: {e}");
        return false;
    }
    finish(queue, mem, interrupt, true);
    true
}
