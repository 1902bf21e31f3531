//! The VMM's own memory (everything in the process but guest RAM), and
//! giving back what only setting up the VM needed.
//!
//! Most of a VMM's resident set beside guest RAM is file pages: its own
//! code and glibc's, mapped by the page faults of the code that ran. Code
//! that runs once (argument parsing, the configuration, loading the kernel
//! and initrd, building the machine) stays mapped long after, and the
//! kernel maps up to 16 neighbouring pages with every fault
//! (`fault_around_bytes`). [`release_startup_memory`] unmaps the
//! read-only file pages when setup is over; they stay in the page cache
//! (shared with any other process running the same files) and what keeps
//! running comes back with a minor fault. It also returns the allocator's
//! free memory (`malloc_trim`).

use std::io;

/// Makes glibc's allocator keep one arena for every thread. By default it
/// makes one per thread that allocates (up to 8 per core), each a 64 MiB
/// reservation of which 100-150 KiB ends up resident; the VMM's threads
/// allocate little, and glibc's per-thread caches (tcache) keep the
/// common small allocations lock-free anyway. Call it first thing in
/// `main`, before any thread starts.
pub fn limit_allocator_arenas() {
    // SAFETY: sets an allocator tunable; no memory is touched.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// What [`release_startup_memory`] found mapped and gave back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    /// Resident KiB of read-only file mappings that were unmapped.
    pub file_kib: u64,
    /// Mappings unmapped.
    pub mappings: u32,
}

/// One mapping of `/proc/self/smaps` that may be dropped: file-backed,
/// private, not writable and never written (no anonymous pages, so
/// unmapping loses nothing: every page reads back from the file, or from
/// the page cache while the file's newest writes are not yet on disk).
#[derive(Debug, PartialEq, Eq)]
struct Droppable {
    start: usize,
    len: usize,
    rss_kib: u64,
}

/// The droppable mappings in the text of `/proc/self/smaps`.
fn droppable(smaps: &str) -> Vec<Droppable> {
    let mut out = Vec::new();
    let mut current: Option<Droppable> = None;
    let mut anonymous = 0u64;
    let mut finish = |current: &mut Option<Droppable>, anonymous: u64| {
        if let Some(d) = current.take() {
            if anonymous == 0 && d.rss_kib > 0 {
                out.push(d);
            }
        }
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                finish(&mut current, anonymous);
                anonymous = 0;
                let perms = fields.next().unwrap_or("");
                let path = fields.nth(3).unwrap_or("");
                // Private and read-only, with a file behind it (not
                // [vdso], [heap], anonymous or a device).
                let ok = perms.len() == 4
                    && perms.starts_with('r')
                    && &perms[1..2] == "-"
                    && perms.ends_with('p')
                    && path.starts_with('/')
                    && !path.starts_with("/dev/")
                    && !path.starts_with("/memfd:")
                    && b > a;
                current = ok.then_some(Droppable {
                    start: a,
                    len: b - a,
                    rss_kib: 0,
                });
                continue;
            }
        }
        let value = || {
            line.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(u64::MAX)
        };
        if line.starts_with("Rss:") {
            if let Some(d) = current.as_mut() {
                d.rss_kib = value();
            }
        } else if line.starts_with("Anonymous:") || line.starts_with("Swap:") {
            // Not `Private_Dirty`: it also counts page-cache pages that
            // are dirty because the file was just written (an executable
            // run right after the build that linked it). Those belong to
            // the file, stay in the page cache when unmapped, and were
            // counted as private data here once — then nothing of the
            // executable was released and the VMM kept ~5.5 MiB mapped.
            anonymous = anonymous.saturating_add(value());
        }
    }
    finish(&mut current, anonymous);
    out
}

/// Unmaps the process's resident read-only file pages and trims the
/// allocator. Call it once the VM is set up, before its vCPUs run.
pub fn release_startup_memory() -> io::Result<Released> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = Released::default();
    for d in droppable(&smaps) {
        // SAFETY: the range is a private, read-only file mapping with no
        // anonymous (copied-on-write) pages: MADV_DONTNEED only drops
        // page-table entries, and every page reads back unchanged from
        // the file on its next access. Read-only mappings cannot gain
        // private pages between the read of smaps and this call.
        let rc = unsafe { libc::madvise(d.start as *mut libc::c_void, d.len, libc::MADV_DONTNEED) };
        if rc == 0 {
            released.file_kib += d.rss_kib;
            released.mappings += 1;
        }
    }
    // SAFETY: malloc_trim only returns free allocator memory to the
    // kernel.
    unsafe { libc::malloc_trim(0) };
    Ok(released)
}

/// Resident KiB of file pages this process maps (`RssFile` in
/// /proc/self/status: code and read-only data of the executable and its
/// libraries, and any other file mapping; memfd and shared memory, such as
/// guest RAM in a memfd, are `RssShmem` and not counted).
pub fn rss_file_kib() -> io::Result<u64> {
    parse_rss_file(&std::fs::read_to_string("/proc/self/status")?)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no RssFile line"))
}

fn parse_rss_file(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssFile:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Keeps the running VMM's file pages low, as [`release_startup_memory`]
/// does once at the start. Every code path that runs later (an exec
/// through the agent's socket, an API request, a snapshot, a device's
/// rarer branches) maps its code back with the kernel's fault-around (up
/// to 64 KiB a fault): a managed VM that had served one exec and one API
/// request held 6.2 MiB beside guest RAM against 3.2 MiB idle after boot
/// (2026-11-28, release build), nearly all of the difference the
/// executable's and libc's code. The run loop calls [`Trimmer::tick`]
/// every [`Trimmer::PERIOD`]; when file pages grew by more than
/// [`Trimmer::GROWTH_KIB`] since the last release they are released
/// again. What runs often comes back with a minor fault (tens of them,
/// well under a millisecond, per release).
#[derive(Debug)]
pub struct Trimmer {
    /// `RssFile` right after the last release.
    after_last_kib: u64,
}

impl Trimmer {
    /// How often the owner calls [`Trimmer::tick`]. A tick that finds no
    /// growth reads one line of `/proc/self/status` and nothing else.
    pub const PERIOD: std::time::Duration = std::time::Duration::from_secs(2);
    /// Growth of file pages that makes a tick release them.
    pub const GROWTH_KIB: u64 = 256;

    /// Starts from the file pages mapped now: make it right after a
    /// release ([`release_startup_memory`]), before other threads run
    /// code, or its first tick may see no growth while a whole boot's
    /// code stays mapped.
    pub fn new() -> Self {
        Trimmer {
            after_last_kib: rss_file_kib().unwrap_or(0),
        }
    }

    /// Releases the process's read-only file pages again when they grew
    /// since the last release; returns what was released.
    pub fn tick(&mut self) -> Option<Released> {
        let now = rss_file_kib().ok()?;
        if !self.due(now) {
            return None;
        }
        let released = release_startup_memory().ok();
        self.after_last_kib = rss_file_kib().unwrap_or(now);
        released
    }

    fn due(&self, now_kib: u64) -> bool {
        now_kib > self.after_last_kib.saturating_add(Self::GROWTH_KIB)
    }
}

impl Default for Trimmer {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55a0-55b0 r--p 00000000 fe:00 12 /usr/bin/hostvisor
Rss:                  12 kB
Anonymous:             0 kB
55b0-55c0 r-xp 00010000 fe:00 12 /usr/bin/hostvisor
Rss:                 300 kB
Private_Dirty:       300 kB
Anonymous:             0 kB
55c0-55d0 r--p 00020000 fe:00 12 /usr/bin/hostvisor
Rss:                  40 kB
Anonymous:            40 kB
55d0-55e0 rw-p 00030000 fe:00 12 /usr/bin/hostvisor
Rss:                   8 kB
Anonymous:             8 kB
7000-8000 rw-p 00000000 00:00 0
Rss:                 100 kB
Anonymous:           100 kB
8000-9000 r-xp 00000000 00:00 0 [vdso]
Rss:                   4 kB
Anonymous:             0 kB
9000-a000 rw-s 00000000 00:01 7 /memfd:hostvisor-guest-ram (deleted)
Rss:                  40 kB
a000-b000 r--s 00000000 00:01 7 /dev/shm/x
Rss:                  40 kB
b000-c000 r-xp 00000000 fe:00 9 /usr/lib/libc.so.6
Rss:                   0 kB
Anonymous:             0 kB
c000-d000 r-xp 00000000 fe:00 9 /usr/lib/libc.so.6
Rss:                 900 kB
Swap:                  4 kB
";

    /// The executable's code mapping above is dirty in the page cache
    /// (just linked) but holds no anonymous page: it is dropped.
    #[test]
    fn only_clean_private_read_only_file_mappings_are_dropped() {
        let got = droppable(SMAPS);
        assert_eq!(
            got,
            vec![
                Droppable {
                    start: 0x55a0,
                    len: 0x10,
                    rss_kib: 12
                },
                Droppable {
                    start: 0x55b0,
                    len: 0x10,
                    rss_kib: 300
                },
            ]
        );
    }

    #[test]
    fn rss_file_is_read_from_the_status_file() {
        let status = "Name:\tx\nRssAnon:\t  100 kB\nRssFile:\t 2048 kB\nRssShmem:\t 5 kB\n";
        assert_eq!(parse_rss_file(status), Some(2048));
        assert_eq!(parse_rss_file("Name: x\n"), None);
        assert!(rss_file_kib().unwrap() > 0);
    }

    #[test]
    fn the_trimmer_releases_only_after_growth() {
        let t = Trimmer {
            after_last_kib: 1000,
        };
        assert!(!t.due(1000));
        assert!(!t.due(1000 + Trimmer::GROWTH_KIB));
        assert!(t.due(1001 + Trimmer::GROWTH_KIB));
        // A trimmer that last saw no file pages is due at once: this test
        // process's code is released.
        let mut t = Trimmer { after_last_kib: 0 };
        let released = t.tick().unwrap();
        assert!(released.file_kib > 0, "{released:?}");
        assert!(t.after_last_kib > 0);
    }

    #[test]
    fn releasing_keeps_the_process_working() {
        // A read-only file mapping of this test's own binary is dropped
        // and still reads the same.
        let before = std::fs::read("/proc/self/exe").unwrap();
        let released = release_startup_memory().unwrap();
        assert!(released.mappings > 0, "{released:?}");
        assert!(released.file_kib > 0, "{released:?}");
        let after = std::fs::read("/proc/self/exe").unwrap();
        assert_eq!(before, after);
        // Code keeps running (this assertion is code too).
        assert_eq!(droppable("").len(), 0);
    }
}
