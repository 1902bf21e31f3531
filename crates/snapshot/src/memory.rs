//! The memory file: guest-physical page N at file offset N × 4 KiB. Pages
//! that are all zero are not written (the file is sparse there), and the
//! file is as long as the end of the highest RAM region, so the MMIO gap
//! below 4 GiB and untouched RAM cost nothing on disk.
//!
//! A restore maps the file copy-on-write (`MAP_PRIVATE`): no page is read
//! until the guest touches it, so restoring costs the same for 256 MiB
//! and 8 GiB; the guest's writes go to private pages and the file is never
//! changed. [`Load::Eager`] reads the whole file in at restore
//! (`MAP_POPULATE`), for files on slow or remote storage.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use memory::GuestMemoryMmap;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

use crate::SnapshotError;

pub const PAGE: usize = 4096;
/// How much guest memory is staged at a time while saving: the save's
/// whole memory overhead.
const CHUNK: usize = 1 << 20;

/// How the memory file is brought in at restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Load {
    /// Pages come in on first touch.
    #[default]
    Lazy,
    /// Every page is read at restore.
    Eager,
}

/// What a save wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Saved {
    /// Pages with data (the rest are holes).
    pub pages: u64,
    /// The file's apparent length (the end of the highest region).
    pub len: u64,
}

/// Writes `mem` into a new file at `path` (which must not exist). The
/// caller makes sure nothing changes guest memory meanwhile (vCPUs
/// paused, devices asleep). The file is synced.
pub fn save(mem: &GuestMemoryMmap, path: &Path) -> Result<Saved, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io)?;
    // Which pages a process ever touched: anonymous memory the guest never
    // wrote (or read) is zero and need not even be read.
    let pagemap = File::open("/proc/self/pagemap").ok();
    let mut buf = vec![0u8; CHUNK];
    let mut saved = Saved::default();
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        // A file-backed region (a restored VM's RAM) holds data in pages
        // it never touched: those are read. A shared one (memfd-backed
        // RAM) has its data in the file, whose holes are zero pages (and
        // reading them would allocate them).
        let anonymous = region.file_offset().is_none();
        let shared_file = region
            .file_offset()
            .filter(|_| region.flags() & libc::MAP_SHARED != 0);
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from((len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            let at = GuestAddress(start + done);
            done += n as u64;
            if anonymous {
                if let (Some(pagemap), Ok(host)) = (&pagemap, mem.get_host_address(at)) {
                    if untouched(pagemap, host as usize, n) {
                        continue;
                    }
                }
            }
            // The parts of the chunk to read: all of it, or a shared
            // file's data extents.
            let runs = match shared_file {
                Some(fo) => data_runs(fo.file(), fo.start() + (at.0 - start), n),
                None => None,
            }
            .unwrap_or_else(|| vec![(0, n)]);
            for (skip, len) in runs {
                let chunk = &mut buf[..len];
                let at = GuestAddress(at.0 + skip as u64);
                mem.read_slice(chunk, at)
                    .map_err(|e| io(std::io::Error::other(e)))?;
                saved.pages += write_nonzero_pages(&file, chunk, at.0).map_err(io)?;
            }
        }
        saved.len = saved.len.max(start + len);
    }
    file.set_len(saved.len).map_err(io)?;
    file.flush().map_err(io)?;
    file.sync_all().map_err(io)?;
    // Leave the position at the end, as a plain write would.
    let _ = file.seek(SeekFrom::End(0));
    Ok(saved)
}

/// Whether no page of the `len` bytes of this process's memory at `addr`
/// was ever present or swapped out (so an anonymous mapping reads as
/// zeros there), by `/proc/self/pagemap` (bits 63 and 62 of each page's
/// entry; no privilege needed for them). Any doubt (a short read) says
/// touched.
fn untouched(pagemap: &File, addr: usize, len: usize) -> bool {
    const PRESENT_OR_SWAPPED: u64 = 3 << 62;
    let pages = len.div_ceil(PAGE);
    let mut entries = vec![0u8; pages * 8];
    let offset = (addr / PAGE) as u64 * 8;
    if pagemap.read_exact_at(&mut entries, offset).is_err() {
        return false;
    }
    entries.chunks_exact(8).all(|e| {
        let mut word = [0u8; 8];
        word.copy_from_slice(e);
        u64::from_le_bytes(word) & PRESENT_OR_SWAPPED == 0
    })
}

/// The data extents of `file` within `offset..offset + len`, as (start
/// relative to `offset`, length) in whole pages, by `SEEK_DATA` and
/// `SEEK_HOLE`; None when the file system cannot tell (read it all).
fn data_runs(file: &File, offset: u64, len: usize) -> Option<Vec<(usize, usize)>> {
    use std::os::fd::AsRawFd;
    let end = offset + len as u64;
    let seek = |at: u64, whence| -> Option<u64> {
        let at = libc::off_t::try_from(at).ok()?;
        // SAFETY: lseek on a descriptor we hold; it only moves the shared
        // position, which nothing here uses (all I/O is positional).
        let got = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
        if got < 0 {
            // ENXIO: no data at or after `at`.
            let nxio = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
            return nxio.then_some(end);
        }
        u64::try_from(got).ok()
    };
    let mut runs = Vec::new();
    let mut at = offset;
    while at < end {
        let data = seek(at, libc::SEEK_DATA)?.min(end);
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.clamp(data, end);
        // Whole pages: extents of a memfd are page-aligned anyway.
        let first = (data - offset) / PAGE as u64 * PAGE as u64;
        let last = (hole - offset).div_ceil(PAGE as u64) * PAGE as u64;
        let last = last.min(len as u64);
        runs.push((
            usize::try_from(first).ok()?,
            usize::try_from(last - first).ok()?,
        ));
        at = hole.max(data + 1);
    }
    Some(runs)
}

/// Whether a page is all zeros, compared a word at a time.
fn is_zero(page: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets
    // the aligned middle of the slice.
    let (head, words, tail) = unsafe { page.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Writes the runs of non-zero pages of `chunk` (guest-physical address
/// `at`) at their offsets; the number of pages written.
fn write_nonzero_pages(file: &File, chunk: &[u8], at: u64) -> std::io::Result<u64> {
    let mut pages = 0;
    let mut run: Option<usize> = None;
    let count = chunk.len().div_ceil(PAGE);
    for i in 0..=count {
        let nonzero = i < count && {
            let page = &chunk[i * PAGE..((i + 1) * PAGE).min(chunk.len())];
            !is_zero(page)
        };
        match (nonzero, run) {
            (true, None) => run = Some(i),
            (false, Some(first)) => {
                let bytes = &chunk[first * PAGE..(i * PAGE).min(chunk.len())];
                file.write_all_at(bytes, at + (first * PAGE) as u64)?;
                pages += (i - first) as u64;
                run = None;
            }
            _ => {}
        }
    }
    Ok(pages)
}

/// Maps the memory file at `path` as guest RAM with the given
/// `(guest address, size)` ranges, copy-on-write. The file must cover
/// every range (a shorter file is a truncated snapshot).
pub fn map(
    path: &Path,
    ranges: &[(GuestAddress, usize)],
    load: Load,
) -> Result<GuestMemoryMmap, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut regions = Vec::with_capacity(ranges.len());
    for &(addr, size) in ranges {
        let end = addr.0.checked_add(size as u64);
        if end.is_none_or(|end| end > file_len) {
            return Err(SnapshotError::MemoryTooShort {
                needed: end.unwrap_or(u64::MAX),
                got: file_len,
            });
        }
        let mut flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE;
        if load == Load::Eager {
            flags |= libc::MAP_POPULATE;
        }
        let handle = file.try_clone().map_err(io)?;
        let region = MmapRegion::build(
            Some(FileOffset::new(handle, addr.0)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
        )
        .map_err(|e| io(std::io::Error::other(e)))?;
        let region = GuestRegionMmap::new(region, addr)
            .ok_or_else(|| io(std::io::Error::other("a memory region overflows")))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| io(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hv-snapmem-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Two regions with a gap, like RAM around the MMIO hole.
    fn ranges() -> Vec<(GuestAddress, usize)> {
        vec![
            (GuestAddress(0), 8 << 20),
            (GuestAddress(16 << 20), 4 << 20),
        ]
    }

    #[test]
    fn pages_land_at_their_addresses_and_zero_pages_are_holes() {
        let dir = tmp("layout");
        let mem = GuestMemoryMmap::from_ranges(&ranges()).unwrap();
        mem.write_slice(b"first", GuestAddress(0)).unwrap();
        mem.write_slice(b"middle", GuestAddress(5 * PAGE as u64 + 17))
            .unwrap();
        mem.write_slice(b"high", GuestAddress((16 << 20) + 3 * PAGE as u64))
            .unwrap();
        let path = dir.join("memory");
        let saved = save(&mem, &path).unwrap();
        assert_eq!(saved.pages, 3);
        assert_eq!(saved.len, 20 << 20);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 20 << 20);
        assert_eq!(&bytes[..5], b"first");
        assert_eq!(&bytes[5 * PAGE + 17..5 * PAGE + 23], b"middle");
        assert_eq!(&bytes[(16 << 20) + 3 * PAGE..][..4], b"high");
        // 3 pages of data: the file takes about that on disk, not 20 MiB.
        let on_disk = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(on_disk <= 64 * 1024, "{on_disk} bytes allocated");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_mapped_file_is_the_guest_memory_and_writes_stay_private() {
        let dir = tmp("map");
        let mem = GuestMemoryMmap::from_ranges(&ranges()).unwrap();
        mem.write_slice(b"state", GuestAddress(4096)).unwrap();
        mem.write_slice(b"top", GuestAddress((20 << 20) - 3))
            .unwrap();
        let path = dir.join("memory");
        save(&mem, &path).unwrap();
        let before = std::fs::read(&path).unwrap();
        for load in [Load::Lazy, Load::Eager] {
            let restored = map(&path, &ranges(), load).unwrap();
            let mut b = [0u8; 5];
            restored.read_slice(&mut b, GuestAddress(4096)).unwrap();
            assert_eq!(&b, b"state");
            let mut t = [0u8; 3];
            restored
                .read_slice(&mut t, GuestAddress((20 << 20) - 3))
                .unwrap();
            assert_eq!(&t, b"top");
            restored
                .write_slice(b"CHANGED", GuestAddress(4096))
                .unwrap();
            restored.read_slice(&mut b, GuestAddress(4096)).unwrap();
            assert_eq!(&b, b"CHANG");
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "the file never changes"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Saving a restored VM's RAM (mapped from a memory file) keeps the
    /// pages it never touched, which hold the file's data; saving fresh
    /// RAM skips pages never touched without losing written ones.
    #[test]
    fn a_restored_vms_untouched_pages_are_saved_again() {
        let dir = tmp("resave");
        let mem = GuestMemoryMmap::from_ranges(&ranges()).unwrap();
        for (i, at) in [0u64, 3 << 20, (17 << 20) + 4096].into_iter().enumerate() {
            mem.write_slice(&[i as u8 + 1; 100], GuestAddress(at))
                .unwrap();
        }
        let first = dir.join("first");
        assert_eq!(save(&mem, &first).unwrap().pages, 3);
        let restored = map(&first, &ranges(), Load::Lazy).unwrap();
        restored.write_slice(b"new", GuestAddress(8 << 10)).unwrap();
        let second = dir.join("second");
        assert_eq!(save(&restored, &second).unwrap().pages, 4);
        let (a, b) = (
            std::fs::read(&first).unwrap(),
            std::fs::read(&second).unwrap(),
        );
        assert_eq!(&b[8 << 10..(8 << 10) + 3], b"new");
        assert_eq!(a[..8 << 10], b[..8 << 10]);
        assert_eq!(a[(8 << 10) + 3..], b[(8 << 10) + 3..]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// memfd-backed RAM (`backing=memfd`) saves and restores; its holes
    /// are skipped without being read, so saving allocates no memfd page.
    #[test]
    fn memfd_backed_ram_saves_and_restores() {
        let dir = tmp("memfd");
        let opts: memory::MemoryOptions = "backing=memfd".parse().unwrap();
        let mem = memory::create(&ranges(), &opts, &|_, _| {}).unwrap();
        mem.write_slice(b"low", GuestAddress(PAGE as u64)).unwrap();
        mem.write_slice(b"high", GuestAddress((16 << 20) + 5 * PAGE as u64))
            .unwrap();
        let memfd = mem.iter().next().unwrap().file_offset().unwrap().file();
        let allocated = |f: &File| f.metadata().unwrap().blocks() * 512;
        let before = allocated(memfd);
        let path = dir.join("memory");
        let saved = save(&mem, &path).unwrap();
        assert_eq!(saved.pages, 2);
        assert_eq!(allocated(memfd), before, "saving allocated memfd pages");
        let restored = map(&path, &ranges(), Load::Lazy).unwrap();
        let mut b = [0u8; 4];
        restored
            .read_slice(&mut b, GuestAddress((16 << 20) + 5 * PAGE as u64))
            .unwrap();
        assert_eq!(&b, b"high");
        restored
            .read_slice(&mut b[..3], GuestAddress(PAGE as u64))
            .unwrap();
        assert_eq!(&b[..3], b"low");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Pages never touched are told from touched ones by the pagemap.
    #[test]
    fn untouched_pages_are_known_without_reading_them() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let host = |at: u64| mem.get_host_address(GuestAddress(at)).unwrap() as usize;
        assert!(untouched(&pagemap, host(0), 4 << 20));
        mem.write_slice(&[1], GuestAddress(3 << 20)).unwrap();
        assert!(untouched(&pagemap, host(0), 2 << 20));
        assert!(!untouched(&pagemap, host(2 << 20), 2 << 20));
    }

    #[test]
    fn zero_pages_are_told_from_pages_with_a_byte_anywhere() {
        let mut page = vec![0u8; PAGE + 1];
        for offset in [0, 1] {
            let p = &mut page[offset..offset + PAGE];
            assert!(is_zero(p));
            for at in [0, 15, 16, 2047, PAGE - 1] {
                p[at] = 1;
                assert!(!is_zero(p), "{at}");
                p[at] = 0;
            }
        }
    }

    #[test]
    fn a_short_or_missing_file_is_refused() {
        let dir = tmp("short");
        let mem = GuestMemoryMmap::from_ranges(&ranges()).unwrap();
        let path = dir.join("memory");
        save(&mem, &path).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(12 << 20)
            .unwrap();
        let e = map(&path, &ranges(), Load::Lazy).unwrap_err();
        assert!(matches!(e, SnapshotError::MemoryTooShort { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = map(&dir.join("none"), &ranges(), Load::Lazy).unwrap_err();
        assert!(e.to_string().contains("none"), "{e}");
        // An existing file is never overwritten by a save.
        assert!(save(&mem, &path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
