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
    let mut buf = vec![0u8; CHUNK];
    let mut saved = Saved::default();
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from((len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(start + done))
                .map_err(|e| io(std::io::Error::other(e)))?;
            saved.pages += write_nonzero_pages(&file, chunk, start + done).map_err(io)?;
            done += n as u64;
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

/// Writes the runs of non-zero pages of `chunk` (guest-physical address
/// `at`) at their offsets; the number of pages written.
fn write_nonzero_pages(file: &File, chunk: &[u8], at: u64) -> std::io::Result<u64> {
    let mut pages = 0;
    let mut run: Option<usize> = None;
    let count = chunk.len().div_ceil(PAGE);
    for i in 0..=count {
        let nonzero = i < count && {
            let page = &chunk[i * PAGE..((i + 1) * PAGE).min(chunk.len())];
            page.iter().any(|&b| b != 0)
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
