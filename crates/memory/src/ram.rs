//! Making guest RAM: the mappings for each backing, the advice given to
//! the host kernel about them (transparent huge pages, KSM), and locking.
//! Preallocation is in [`crate::prealloc`].

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use crate::options::{Backing, MemoryOptions, OptionsError, HUGE_PAGE};
use crate::GuestMemoryMmap;

/// The name guest RAM carries in `/proc/PID/maps` and `smaps`: the memfd's
/// name (`/memfd:hostvisor-guest-ram`) or the anonymous mapping's
/// (`[anon:hostvisor-guest-ram]`), so tools can tell it from the VMM's own
/// memory.
pub const RAM_NAME: &str = "hostvisor-guest-ram";
const RAM_NAME_C: &CStr = c"hostvisor-guest-ram";

/// `MAP_HUGE_2MB`: log2(2 MiB) in the mmap flags' huge-page-size bits.
const MAP_HUGE_2MB: i32 = 21 << 26;

/// Why guest RAM could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(transparent)]
    Options(#[from] OptionsError),
    #[error("{0} bytes of guest RAM do not fit this host's address space")]
    TooBig(u64),
    #[error("could not create the memfd for guest RAM")]
    Memfd(#[source] io::Error),
    #[error("could not map {size} bytes of guest RAM ({backing})")]
    Map {
        size: usize,
        backing: Backing,
        #[source]
        source: io::Error,
    },
    #[error(
        "not enough 2 MiB huge pages for backing=hugetlb: the guest needs {needed} and the host has {free} free; reserve more with `echo {want} > /proc/sys/vm/nr_hugepages` (as root), or use another backing"
    )]
    HugePages { needed: u64, free: u64, want: u64 },
    #[error("could not preallocate guest RAM")]
    Prealloc(#[source] io::Error),
    #[error(
        "could not lock {bytes} bytes of guest RAM in memory: the locked-memory limit (RLIMIT_MEMLOCK) is {limit}; raise it (`ulimit -l unlimited`, `memlock` in /etc/security/limits.conf or LimitMEMLOCK= for a systemd unit) or drop the `lock` option"
    )]
    Lock {
        bytes: u64,
        limit: String,
        #[source]
        source: io::Error,
    },
    #[error("could not offer guest RAM to KSM (merge); does the host kernel have CONFIG_KSM?")]
    Merge(#[source] io::Error),
}

/// Creates guest RAM for the `(guest address, size)` ranges as `opts`
/// ask: mapped, advised, preallocated (reporting bytes done and the total
/// to `progress`, from several threads) and locked. Nothing is left
/// mapped when it fails.
pub fn create(
    ranges: &[(GuestAddress, usize)],
    opts: &MemoryOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<GuestMemoryMmap, MemoryError> {
    let total = ranges
        .iter()
        .try_fold(0u64, |sum, &(_, size)| sum.checked_add(size as u64))
        .ok_or(MemoryError::TooBig(u64::MAX))?;
    opts.check_size(total)?;
    if opts.backing == Backing::Hugetlb {
        if let Some(&(_, size)) = ranges
            .iter()
            .find(|(_, s)| !(*s as u64).is_multiple_of(HUGE_PAGE))
        {
            return Err(OptionsError::HugeAlign(size as u64).into());
        }
        check_huge_pages(total / HUGE_PAGE)?;
    }
    let memfd = match opts.backing {
        Backing::Memfd => Some(memfd(total)?),
        _ => None,
    };
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for &(addr, size) in ranges {
        let region = map_region(addr, size, opts.backing, memfd.as_ref(), offset, total)?;
        offset += size as u64;
        advise(&region, opts)?;
        regions.push(region);
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map {
        size: usize::try_from(total).unwrap_or(usize::MAX),
        backing: opts.backing,
        source: io::Error::other(e),
    })?;
    if opts.prealloc {
        crate::prealloc::populate(&mem, crate::prealloc::default_threads(), progress)
            .map_err(MemoryError::Prealloc)?;
    }
    if opts.lock {
        lock(&mem)?;
    }
    Ok(mem)
}

fn memfd(total: u64) -> Result<File, MemoryError> {
    // SAFETY: a valid NUL-terminated name and plain flags; the result is
    // checked.
    let fd = unsafe { libc::memfd_create(RAM_NAME_C.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(total).map_err(MemoryError::Memfd)?;
    Ok(file)
}

fn map_region(
    addr: GuestAddress,
    size: usize,
    backing: Backing,
    memfd: Option<&File>,
    offset: u64,
    total: u64,
) -> Result<GuestRegionMmap<()>, MemoryError> {
    let map_err = |source| MemoryError::Map {
        size,
        backing,
        source,
    };
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let region = match (backing, memfd) {
        (Backing::Memfd, Some(file)) => {
            let file = file.try_clone().map_err(map_err)?;
            MmapRegion::build(
                Some(FileOffset::new(file, offset)),
                size,
                prot,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            )
        }
        // No MAP_NORESERVE: the huge pages are reserved at mmap, so a host
        // without enough fails here and not with a SIGBUS mid-boot.
        (Backing::Hugetlb, _) => MmapRegion::build(
            None,
            size,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | MAP_HUGE_2MB,
        )
        .map(|mut r| {
            r.set_hugetlbfs(true);
            r
        }),
        _ => MmapRegion::build(
            None,
            size,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        ),
    };
    let region = region.map_err(|e| match e {
        vm_memory::mmap::MmapRegionError::Mmap(err)
            if backing == Backing::Hugetlb && err.raw_os_error() == Some(libc::ENOMEM) =>
        {
            huge_pages_error(total / HUGE_PAGE)
        }
        e => map_err(io::Error::other(e)),
    })?;
    GuestRegionMmap::new(region, addr).ok_or(MemoryError::TooBig(total))
}

/// Names the mapping and gives the kernel the advice the options ask
/// for.
fn advise(region: &GuestRegionMmap<()>, opts: &MemoryOptions) -> Result<(), MemoryError> {
    let (ptr, len) = (region.as_ptr(), region.len() as usize);
    if opts.backing == Backing::Anon {
        // SAFETY: names a mapping we own; the kernel copies the name. A
        // kernel without CONFIG_ANON_VMA_NAME refuses, which is harmless.
        unsafe {
            libc::prctl(
                libc::PR_SET_VMA,
                libc::PR_SET_VMA_ANON_NAME,
                ptr as libc::c_ulong,
                len as libc::c_ulong,
                RAM_NAME_C.as_ptr() as libc::c_ulong,
            )
        };
    }
    if opts.backing != Backing::Hugetlb {
        // Transparent huge pages where the host allows them: fewer TLB
        // misses for the guest. Refused (EINVAL) where THP is compiled
        // out, which changes nothing else.
        // SAFETY: advice on a mapping we own; it moves no memory.
        unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) };
    }
    if opts.merge {
        // SAFETY: as above.
        if unsafe { libc::madvise(ptr.cast(), len, libc::MADV_MERGEABLE) } != 0 {
            return Err(MemoryError::Merge(io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn lock(mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    use vm_memory::GuestMemoryBackend;
    let bytes: u64 = mem.iter().map(|r| r.len()).sum();
    for region in mem.iter() {
        // SAFETY: locks pages of a mapping we own; it changes no memory.
        if unsafe { libc::mlock(region.as_ptr().cast(), region.len() as usize) } != 0 {
            let source = io::Error::last_os_error();
            return Err(MemoryError::Lock {
                bytes,
                limit: memlock_limit(),
                source,
            });
        }
    }
    Ok(())
}

/// The soft RLIMIT_MEMLOCK, as text for an error message.
fn memlock_limit() -> String {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: fills the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return "unknown".into();
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        format!("{} KiB", lim.rlim_cur / 1024)
    }
}

/// Free 2 MiB pages in the host's pool that nobody has reserved yet.
pub fn free_huge_pages() -> u64 {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{name}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    read("free_hugepages").saturating_sub(read("resv_hugepages"))
}

fn huge_pages_error(needed: u64) -> MemoryError {
    let free = free_huge_pages();
    let total = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    MemoryError::HugePages {
        needed,
        free,
        want: total + needed.saturating_sub(free),
    }
}

fn check_huge_pages(needed: u64) -> Result<(), MemoryError> {
    if free_huge_pages() < needed {
        return Err(huge_pages_error(needed));
    }
    Ok(())
}
