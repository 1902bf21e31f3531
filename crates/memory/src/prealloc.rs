//! Preallocation: every page of guest RAM faulted in before the guest
//! runs, by several threads at once (page faults on a fresh mapping scale
//! with cores: the kernel zeroes each page on the faulting CPU).

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::GuestMemoryMmap;

/// Work is handed out in pieces of this size (a multiple of 2 MiB, so a
/// piece never splits a huge page).
const PIECE: usize = 32 << 20;
/// At most this many threads: past it the host's page allocator, not the
/// number of faulting CPUs, is the limit.
const MAX_THREADS: usize = 16;
/// The preallocation threads' stacks: they only call madvise.
const STACK: usize = 64 << 10;

/// One thread per CPU this process may run on, capped.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_THREADS)
}

/// Faults in every page of `mem` with `threads` threads (at least one),
/// reporting `(bytes done, total)` to `progress` as pieces finish.
pub fn populate(
    mem: &GuestMemoryMmap,
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> io::Result<()> {
    // (host address, length) of each piece; addresses as integers so the
    // list can be shared by the threads.
    let mut pieces = Vec::new();
    for region in mem.iter() {
        let (base, len) = (region.as_ptr() as usize, region.len() as usize);
        let mut at = 0;
        while at < len {
            let n = PIECE.min(len - at);
            pieces.push((base + at, n));
            at += n;
        }
    }
    let total: u64 = pieces.iter().map(|&(_, n)| n as u64).sum();
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let threads = threads.clamp(1, pieces.len().max(1));
    let worker = || -> io::Result<()> {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(addr, len)) = pieces.get(i) else {
                return Ok(());
            };
            populate_piece(addr, len)?;
            let now = done.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
            progress(now, total);
        }
    };
    std::thread::scope(|s| {
        let handles = (1..threads)
            .map(|_| {
                std::thread::Builder::new()
                    .name("prealloc".into())
                    .stack_size(STACK)
                    .spawn_scoped(s, worker)
            })
            .collect::<Vec<_>>();
        // This thread works too.
        let mut result = worker();
        for handle in handles {
            let r = match handle {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("a preallocation thread panicked"))),
                // Fewer threads than asked: the others took its share.
                Err(_) => Ok(()),
            };
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

/// Faults in `len` bytes at host address `addr`, writable, without
/// changing their contents.
fn populate_piece(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: `addr..addr + len` lies inside a guest RAM mapping that the
    // caller's `mem` keeps alive; MADV_POPULATE_WRITE faults pages in as
    // if written but leaves their contents as they are.
    if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) {
        return Err(err);
    }
    // Kernels before 5.14 lack MADV_POPULATE_WRITE: touch each page,
    // writing back the byte that is there.
    let page = 4096;
    let mut at = 0;
    while at < len {
        let p = (addr + at) as *mut u8;
        // SAFETY: `p` is inside the mapping (see above) and nothing else
        // uses guest RAM before the guest runs.
        unsafe { p.write_volatile(p.read_volatile()) };
        at += page;
    }
    Ok(())
}

/// Guests at least this big get a progress line while preallocating.
pub const REPORT_FROM: u64 = 1 << 30;

/// A progress report for [`populate`] that prints a line on stderr at
/// every tenth of a guest of [`REPORT_FROM`] or more (on a terminal, the
/// line is rewritten in place).
pub fn stderr_progress() -> impl Fn(u64, u64) + Sync {
    use std::io::{IsTerminal, Write};
    let last = AtomicU64::new(0);
    let tty = io::stderr().is_terminal();
    move |done, total| {
        let Some(text) = progress_line(&last, done, total) else {
            return;
        };
        let mut err = io::stderr().lock();
        let _ = match (tty, done == total) {
            (true, false) => write!(err, "\r{text}"),
            (true, true) => writeln!(err, "\r{text}"),
            (false, _) => writeln!(err, "{text}"),
        };
    }
}

/// The progress line due when `done` of `total` bytes are preallocated:
/// one per new tenth (`last` holds the last tenth reported; threads may
/// report out of order, and a tenth is never reported twice), only for
/// guests of [`REPORT_FROM`] or more.
fn progress_line(last: &AtomicU64, done: u64, total: u64) -> Option<String> {
    if total < REPORT_FROM {
        return None;
    }
    let tenth = done.min(total) * 10 / total;
    if last.fetch_max(tenth, Ordering::Relaxed) >= tenth {
        return None;
    }
    Some(format!(
        "preallocating guest RAM: {} of {} MiB ({}%)",
        done >> 20,
        total >> 20,
        tenth * 10
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// What a preallocation of `total` bytes in 32 MiB pieces, finishing
    /// in order, prints.
    fn lines(total: u64) -> Vec<String> {
        let last = AtomicU64::new(0);
        let mut done = 0;
        let mut out = Vec::new();
        while done < total {
            done = (done + PIECE as u64).min(total);
            out.extend(progress_line(&last, done, total));
        }
        out
    }

    #[test]
    fn small_guests_get_no_progress_lines() {
        assert!(lines(256 * MIB).is_empty());
        assert!(lines(REPORT_FROM - 2 * MIB).is_empty());
        assert_eq!(progress_line(&AtomicU64::new(0), 0, 0), None);
    }

    #[test]
    fn large_guests_get_a_line_per_tenth() {
        let got = lines(REPORT_FROM);
        assert_eq!(got.len(), 10, "{got:#?}");
        assert_eq!(got[0], "preallocating guest RAM: 128 of 1024 MiB (10%)");
        assert_eq!(got[9], "preallocating guest RAM: 1024 of 1024 MiB (100%)");
        let got = lines(2048 * MIB);
        assert_eq!(got.len(), 10, "{got:#?}");
        assert_eq!(got[4], "preallocating guest RAM: 1024 of 2048 MiB (50%)");
        // Out of order (threads): an earlier tenth after a later one, or
        // the same tenth again, prints nothing.
        let last = AtomicU64::new(0);
        assert!(progress_line(&last, 600 * MIB, REPORT_FROM).is_some());
        assert_eq!(progress_line(&last, 300 * MIB, REPORT_FROM), None);
        assert_eq!(progress_line(&last, 610 * MIB, REPORT_FROM), None);
    }
}
