//! Giving guest pages back to the host: what the balloon does with pages
//! the guest inflates or reports free.
//!
//! How a range is released depends on how its region is mapped:
//! - private anonymous memory (a booted VM): `MADV_DONTNEED`; the next
//!   touch gets a fresh zero page;
//! - a shared file mapping (memfd backing): the file's blocks are punched
//!   out (`fallocate(PUNCH_HOLE | KEEP_SIZE)`), then `MADV_DONTNEED` drops
//!   the page-table entries; the next touch reads the hole, zeros;
//! - shared anonymous memory: `MADV_REMOVE` (the same hole punch);
//! - a private file mapping (a VM restored from a snapshot maps its memory
//!   file copy-on-write): `MADV_DONTNEED` there would bring back the
//!   *file's* old page on the next touch — data the guest freed long ago.
//!   The range is instead replaced by fresh anonymous zero pages (`mmap`
//!   `MAP_FIXED | MAP_ANONYMOUS | MAP_PRIVATE` over exactly that range),
//!   which also releases the private copies and the file's page cache
//!   references.
//!
//! Every range is checked first: it must be whole 4 KiB pages and lie in
//! guest RAM entirely, or nothing is done — a guest-supplied address can
//! never reach host memory outside its RAM.

use std::os::fd::AsRawFd;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::GuestMemoryMmap;

/// The page size ranges are given back in.
pub const PAGE_SIZE: u64 = 4096;
/// The huge page size a hugetlb region is released in.
const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Why a range was not given back.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    #[error("{len:#x} bytes at guest address {addr:#x} are not whole 4 KiB pages")]
    Unaligned { addr: u64, len: u64 },
    #[error("{len:#x} bytes at guest address {addr:#x} are not all guest RAM")]
    OutsideRam { addr: u64, len: u64 },
    #[error("cannot give {len:#x} bytes at guest address {addr:#x} back to the host")]
    Io {
        addr: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}

/// How a region of guest RAM is mapped, which decides how pages go back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// `MAP_PRIVATE | MAP_ANONYMOUS`.
    PrivateAnonymous,
    /// `MAP_SHARED` on a file (memfd).
    SharedFile,
    /// `MAP_SHARED | MAP_ANONYMOUS`.
    SharedAnonymous,
    /// `MAP_PRIVATE` on a file (a snapshot's memory file).
    PrivateFile,
}

fn backing_of(region: &vm_memory::GuestRegionMmap<()>) -> Backing {
    let shared = region.flags() & libc::MAP_SHARED != 0;
    match (shared, region.file_offset().is_some()) {
        (false, false) => Backing::PrivateAnonymous,
        (true, true) => Backing::SharedFile,
        (true, false) => Backing::SharedAnonymous,
        (false, true) => Backing::PrivateFile,
    }
}

fn is_hugetlb(region: &vm_memory::GuestRegionMmap<()>) -> bool {
    region.flags() & libc::MAP_HUGETLB != 0 || region.is_hugetlbfs() == Some(true)
}

/// The backing of the region holding `addr`, if it is RAM.
pub fn backing(mem: &GuestMemoryMmap, addr: GuestAddress) -> Option<Backing> {
    mem.find_region(addr).map(backing_of)
}

/// One region's share of a range: the region, the offset in it, the length.
type Piece<'a> = (&'a vm_memory::GuestRegionMmap<()>, u64, u64);

/// Gives the `len` bytes of guest RAM at `addr` back to the host; the
/// guest reads zeros there afterwards. Returns how many bytes were
/// released (less than `len` only in hugetlb regions, which release whole
/// 2 MiB pages only). A range that is not page-aligned or not entirely RAM
/// is refused before anything is touched.
pub fn discard(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<u64, DiscardError> {
    let (a, l) = (addr.0, len);
    if !a.is_multiple_of(PAGE_SIZE) || !l.is_multiple_of(PAGE_SIZE) {
        return Err(DiscardError::Unaligned { addr: a, len: l });
    }
    if l == 0 {
        return Ok(0);
    }
    let end = a
        .checked_add(l)
        .ok_or(DiscardError::OutsideRam { addr: a, len: l })?;
    // Find every region's piece first: a range with a hole is refused
    // whole. (A range spans at most every region, a handful.)
    let mut pieces: Vec<Piece<'_>> = Vec::new();
    let mut at = a;
    while at < end {
        let region = mem
            .find_region(GuestAddress(at))
            .ok_or(DiscardError::OutsideRam { addr: a, len: l })?;
        let start = region.start_addr().0;
        let region_end = start.saturating_add(region.len());
        let piece_end = end.min(region_end);
        pieces.push((region, at - start, piece_end - at));
        at = piece_end;
    }
    let mut released = 0;
    for (region, offset, len) in pieces {
        released += discard_piece(region, offset, len).map_err(|source| DiscardError::Io {
            addr: region.start_addr().0 + offset,
            len,
            source,
        })?;
    }
    Ok(released)
}

/// Releases `len` bytes at `offset` of `region` (checked to lie inside
/// it).
fn discard_piece(
    region: &vm_memory::GuestRegionMmap<()>,
    mut offset: u64,
    mut len: u64,
) -> std::io::Result<u64> {
    if is_hugetlb(region) {
        // Only whole huge pages can go.
        let first = offset.next_multiple_of(HUGE_PAGE_SIZE);
        let last = (offset + len) / HUGE_PAGE_SIZE * HUGE_PAGE_SIZE;
        if last <= first {
            return Ok(0);
        }
        (offset, len) = (first, last - first);
    }
    if offset.checked_add(len).is_none_or(|e| e > region.len()) {
        return Err(std::io::Error::other("the range leaves its region"));
    }
    let host_offset = usize::try_from(offset).map_err(std::io::Error::other)?;
    let host_len = usize::try_from(len).map_err(std::io::Error::other)?;
    // The range lies inside the region's mapping (checked above).
    let host = region.as_ptr().wrapping_add(host_offset);
    match backing_of(region) {
        Backing::PrivateAnonymous => madvise(host, host_len, libc::MADV_DONTNEED)?,
        Backing::SharedAnonymous => madvise(host, host_len, libc::MADV_REMOVE)?,
        Backing::SharedFile => {
            let file = region
                .file_offset()
                .ok_or_else(|| std::io::Error::other("a file mapping without its file"))?;
            let file_at = file
                .start()
                .checked_add(offset)
                .and_then(|o| i64::try_from(o).ok())
                .ok_or_else(|| std::io::Error::other("file offset overflow"))?;
            let file_len = i64::try_from(len).map_err(std::io::Error::other)?;
            // SAFETY: plain syscall on a file descriptor we hold open; the
            // range lies in the part of the file mapped as this region.
            let rc = unsafe {
                libc::fallocate(
                    file.file().as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    file_at,
                    file_len,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            madvise(host, host_len, libc::MADV_DONTNEED)?;
        }
        Backing::PrivateFile => {
            // SAFETY: `host..host+host_len` lies inside this region's own
            // mapping (checked above), so MAP_FIXED replaces only guest RAM
            // with zero pages of the same protection; the region keeps
            // owning (and eventually unmaps) the whole address range.
            let got = unsafe {
                libc::mmap(
                    host.cast(),
                    host_len,
                    region.prot(),
                    libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if got == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            if got.cast::<u8>() != host {
                return Err(std::io::Error::other(
                    "mmap placed the zero pages elsewhere",
                ));
            }
        }
    }
    Ok(len)
}

fn madvise(host: *mut u8, len: usize, advice: libc::c_int) -> std::io::Result<()> {
    // SAFETY: the caller passes a page-aligned range inside a guest RAM
    // mapping; the advice only drops page contents (the guest reads zeros
    // next), never unmaps.
    let rc = unsafe { libc::madvise(host.cast(), len, advice) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, FileOffset, GuestRegionMmap, MmapRegion};

    const MIB: usize = 1 << 20;

    /// How many of the pages at `host` are resident (mincore).
    fn resident_pages(mem: &GuestMemoryMmap, addr: u64, len: usize) -> usize {
        let host = mem.get_host_address(GuestAddress(addr)).unwrap();
        let mut vec = vec![0u8; len.div_ceil(PAGE_SIZE as usize)];
        // SAFETY: `host..host+len` is mapped guest RAM; `vec` has one byte
        // a page.
        let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Two regions with a hole between them: [0, 1 MiB) and [2, 3 MiB).
    fn anonymous() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIB), (GuestAddress(2 * MIB as u64), MIB)])
            .unwrap()
    }

    #[test]
    fn anonymous_pages_go_back_and_read_as_zeros() {
        let mem = anonymous();
        mem.write_slice(&[0xaa; 3 * 4096], GuestAddress(0x10000))
            .unwrap();
        assert_eq!(resident_pages(&mem, 0x10000, 3 * 4096), 3);
        assert_eq!(discard(&mem, GuestAddress(0x11000), 4096).unwrap(), 4096);
        assert_eq!(resident_pages(&mem, 0x10000, 3 * 4096), 2);
        assert_eq!(read(&mem, 0x11000, 4096), vec![0; 4096]);
        assert_eq!(read(&mem, 0x10000, 4096), vec![0xaa; 4096]);
        assert_eq!(read(&mem, 0x12000, 4096), vec![0xaa; 4096]);
        // Twice is harmless.
        assert_eq!(discard(&mem, GuestAddress(0x11000), 4096).unwrap(), 4096);
        assert_eq!(
            backing(&mem, GuestAddress(0)),
            Some(Backing::PrivateAnonymous)
        );
    }

    #[test]
    fn hostile_ranges_are_refused_whole() {
        let mem = anonymous();
        mem.write_slice(&[7; 4096], GuestAddress(MIB as u64 - 4096))
            .unwrap();
        let bad = [
            (1u64, 4096u64),
            (0, 100),
            (MIB as u64, 4096),            // the hole
            (MIB as u64 - 4096, 2 * 4096), // RAM, then the hole
            (3 * MIB as u64, 4096),        // past the end
            (u64::MAX - 4095, 4096),       // the top of the address space
            (0x1000, u64::MAX - 0xfff),    // an overflowing end
            (0, 1 << 40),                  // a huge count
        ];
        for (addr, len) in bad {
            assert!(
                discard(&mem, GuestAddress(addr), len).is_err(),
                "{addr:#x}+{len:#x}"
            );
        }
        // Nothing was touched by the refused range that began in RAM.
        assert_eq!(read(&mem, MIB as u64 - 4096, 4096), vec![7; 4096]);
        assert_eq!(discard(&mem, GuestAddress(0), 0).unwrap(), 0);
    }

    fn memfd(len: usize) -> std::fs::File {
        // SAFETY: a constant, NUL-terminated name; the fd is new and ours.
        let fd = unsafe { libc::memfd_create(c"hv-discard-test".as_ptr(), 0) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(len as u64).unwrap();
        file
    }

    fn file_memory(file: &std::fs::File, len: usize, flags: i32) -> GuestMemoryMmap {
        let region = MmapRegion::build(
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
        )
        .unwrap();
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap()
    }

    fn allocated_bytes(file: &std::fs::File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        file.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn shared_file_pages_are_punched_out() {
        let file = memfd(MIB);
        let mem = file_memory(&file, MIB, libc::MAP_SHARED);
        assert_eq!(backing(&mem, GuestAddress(0)), Some(Backing::SharedFile));
        mem.write_slice(&vec![0x55; 64 * 4096], GuestAddress(0))
            .unwrap();
        let before = allocated_bytes(&file);
        assert!(before >= 64 * 4096, "{before}");
        discard(&mem, GuestAddress(0), 32 * 4096).unwrap();
        // (Checked before reading: a read fault on shmem fills the hole.)
        assert_eq!(
            allocated_bytes(&file),
            before - 32 * 4096,
            "the hole is punched"
        );
        assert_eq!(read(&mem, 0, 32 * 4096), vec![0; 32 * 4096]);
        assert_eq!(read(&mem, 32 * 4096, 4096), vec![0x55; 4096]);
        assert_eq!(file.metadata().unwrap().len(), MIB as u64, "the size stays");
    }

    /// A restored VM's RAM is its snapshot's memory file mapped
    /// copy-on-write: after a discard, the guest must read zeros, not the
    /// snapshot's old data (which MADV_DONTNEED would bring back).
    #[test]
    fn private_file_pages_do_not_come_back_from_the_file() {
        let path = std::env::temp_dir().join(format!("hv-discard-{}.mem", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![0x5a; MIB]).unwrap();
        drop(f);
        let file = std::fs::File::open(&path).unwrap();
        let mem = file_memory(&file, MIB, libc::MAP_PRIVATE | libc::MAP_NORESERVE);
        assert_eq!(backing(&mem, GuestAddress(0)), Some(Backing::PrivateFile));
        // Some pages written by the guest after the restore, some only read.
        mem.write_slice(&[0x11; 2 * 4096], GuestAddress(0x4000))
            .unwrap();
        assert_eq!(read(&mem, 0x8000, 4096), vec![0x5a; 4096]);
        discard(&mem, GuestAddress(0x4000), 8 * 4096).unwrap();
        assert_eq!(resident_pages(&mem, 0x4000, 8 * 4096), 0);
        assert_eq!(read(&mem, 0x4000, 8 * 4096), vec![0; 8 * 4096]);
        // Neighbours keep the file's data; the range stays writable and
        // can be discarded again.
        assert_eq!(read(&mem, 0x3000, 4096), vec![0x5a; 4096]);
        assert_eq!(read(&mem, 0xc000, 4096), vec![0x5a; 4096]);
        mem.write_slice(&[0x22; 4096], GuestAddress(0x5000))
            .unwrap();
        assert_eq!(read(&mem, 0x5000, 4096), vec![0x22; 4096]);
        discard(&mem, GuestAddress(0x5000), 4096).unwrap();
        assert_eq!(read(&mem, 0x5000, 4096), vec![0; 4096]);
        // The file itself never changes.
        let mut on_disk = vec![0u8; MIB];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut on_disk, 0).unwrap();
        assert!(on_disk.iter().all(|&b| b == 0x5a));
        drop(mem);
        std::fs::remove_file(&path).unwrap();
    }
}
