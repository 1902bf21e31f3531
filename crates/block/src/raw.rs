//! Raw images: the guest's disk is the file, byte for byte.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::{BlockError, CacheMode, DiskImage};

/// Alignment of buffers, offsets and lengths for `O_DIRECT` (the largest
/// logical block size in common use).
const DIRECT_ALIGN: u64 = 4096;

#[derive(Debug)]
pub struct RawImage {
    file: File,
    size: u64,
    read_only: bool,
    cache: CacheMode,
    id: Vec<u8>,
}

impl RawImage {
    /// Opens `path`, locking it: shared for a read-only disk, exclusive
    /// otherwise, so two VMs cannot both write one image.
    pub fn open(path: &Path, read_only: bool, cache: CacheMode) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut options = OpenOptions::new();
        options.read(true).write(!read_only);
        if cache == CacheMode::None {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.file_type().is_file() && !meta.file_type().is_block_device() {
            return Err(BlockError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let lock = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(BlockError::Locked {
                    path: path.to_path_buf(),
                });
            }
            return Err(open_err(e));
        }
        let size = if meta.file_type().is_block_device() {
            use std::io::Seek;
            (&file).seek(io::SeekFrom::End(0)).map_err(open_err)?
        } else {
            meta.len()
        };
        if cache == CacheMode::None && size % DIRECT_ALIGN != 0 {
            return Err(BlockError::Unaligned {
                path: path.to_path_buf(),
                size,
            });
        }
        let id = format!("hv{:x}-{:x}", meta.dev(), meta.ino()).into_bytes();
        Ok(RawImage {
            file,
            size,
            read_only,
            cache,
            id: id[..id.len().min(20)].to_vec(),
        })
    }

    fn direct(&self) -> bool {
        self.cache == CacheMode::None
    }

    /// The aligned window around `[offset, offset + len)` for O_DIRECT.
    fn window(offset: u64, len: usize) -> (u64, usize) {
        let start = offset / DIRECT_ALIGN * DIRECT_ALIGN;
        let end = (offset + len as u64).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        (start, (end - start) as usize)
    }

    /// Reads the aligned window into an aligned bounce buffer; bytes past
    /// the end of the file read as zeroes.
    fn read_window(&self, start: u64, len: usize) -> io::Result<AlignedBuf> {
        let mut bounce = AlignedBuf::new(len)?;
        let mut done = 0;
        while done < len {
            match self
                .file
                .read_at(&mut bounce.as_mut()[done..], start + done as u64)
            {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(bounce)
    }
}

impl DiskImage for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if !self.direct() {
            return self.file.read_exact_at(buf, offset);
        }
        let (start, len) = Self::window(offset, buf.len());
        let bounce = self.read_window(start, len)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce.as_ref()[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if !self.direct() {
            return self.file.write_all_at(buf, offset);
        }
        // Read-modify-write of the aligned window. One worker thread serves
        // a disk, so no other request races with this.
        let (start, len) = Self::window(offset, buf.len());
        let mut bounce = if start == offset && len == buf.len() {
            AlignedBuf::new(len)?
        } else {
            self.read_window(start, len)?
        };
        let skip = (offset - start) as usize;
        bounce.as_mut()[skip..skip + buf.len()].copy_from_slice(buf);
        // The window never passes the end of the image: `open` requires a
        // size that is a multiple of DIRECT_ALIGN for O_DIRECT.
        self.file.write_all_at(bounce.as_ref(), start)
    }

    fn flush(&self) -> io::Result<()> {
        match self.cache {
            CacheMode::Unsafe => Ok(()),
            CacheMode::Writeback | CacheMode::None => self.file.sync_data(),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.punch(
            offset,
            len,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.punch(offset, len, mode) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // The host filesystem cannot: write the zeroes.
                let chunk = vec![0u8; 1 << 20];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(chunk.len() as u64) as usize;
                    self.write_at(&chunk[..n], offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            other => other,
        }
    }

    fn id(&self) -> Vec<u8> {
        self.id.clone()
    }
}

impl RawImage {
    fn punch(&self, offset: u64, len: u64, mode: libc::c_int) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on a descriptor we own; no memory is involved.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A zeroed, page-aligned buffer, as O_DIRECT needs.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> io::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), DIRECT_ALIGN as usize)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(AlignedBuf { ptr, layout })
    }

    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str, size: u64) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("hv-raw-{name}-{}", std::process::id()));
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        path
    }

    #[test]
    fn reads_and_writes_in_every_cache_mode() {
        for cache in [CacheMode::Writeback, CacheMode::Unsafe, CacheMode::None] {
            let path = image(&format!("rw-{cache}"), 1 << 20);
            let disk = RawImage::open(&path, false, cache).unwrap();
            assert_eq!(disk.size(), 1 << 20);
            // Unaligned for O_DIRECT on purpose: 512-byte sector granularity.
            disk.write_at(&[7u8; 1536], 512).unwrap();
            disk.flush().unwrap();
            let mut buf = vec![0u8; 2048];
            disk.read_at(&mut buf, 0).unwrap();
            assert_eq!(&buf[..512], &[0u8; 512][..]);
            assert_eq!(&buf[512..2048], &[7u8; 1536][..]);
            drop(disk);
            let on_disk = std::fs::read(&path).unwrap();
            assert_eq!(on_disk.len(), 1 << 20, "{cache}: size unchanged");
            assert_eq!(&on_disk[512..2048], &[7u8; 1536][..]);
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn discard_and_write_zeroes_read_back_as_zeroes() {
        let path = image("zero", 1 << 20);
        let disk = RawImage::open(&path, false, CacheMode::Writeback).unwrap();
        disk.write_at(&[1u8; 65536], 0).unwrap();
        disk.discard(0, 4096).unwrap();
        disk.write_zeroes(8192, 4096, false).unwrap();
        disk.write_zeroes(16384, 4096, true).unwrap();
        let mut buf = vec![0u8; 65536];
        disk.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..8192].iter().all(|&b| b == 1));
        assert!(buf[8192..12288].iter().all(|&b| b == 0));
        assert!(buf[16384..20480].iter().all(|&b| b == 0));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn read_only_images_refuse_writes() {
        let path = image("ro", 4096);
        let disk = RawImage::open(&path, true, CacheMode::Writeback).unwrap();
        assert!(disk.read_only());
        assert!(disk.write_at(&[1], 0).is_err());
        assert!(disk.discard(0, 512).is_err());
        // Two read-only users may share an image.
        assert!(RawImage::open(&path, true, CacheMode::Writeback).is_ok());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_writable_image_is_locked_against_a_second_vm() {
        let path = image("lock", 4096);
        let first = RawImage::open(&path, false, CacheMode::Writeback).unwrap();
        let second = RawImage::open(&path, false, CacheMode::Writeback).unwrap_err();
        assert!(matches!(second, BlockError::Locked { .. }), "{second}");
        assert!(second.to_string().contains("in use by another VM"));
        assert!(matches!(
            RawImage::open(&path, true, CacheMode::Writeback),
            Err(BlockError::Locked { .. })
        ));
        drop(first);
        assert!(RawImage::open(&path, false, CacheMode::Writeback).is_ok());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn directories_and_missing_files_are_errors() {
        let err = RawImage::open(
            Path::new("/nonexistent/disk.img"),
            false,
            CacheMode::Writeback,
        )
        .unwrap_err();
        assert!(err.to_string().contains("cannot open the disk image"));
        assert!(RawImage::open(&std::env::temp_dir(), true, CacheMode::Writeback).is_err());
    }

    #[test]
    fn direct_io_needs_an_aligned_size() {
        let path = image("odd", 5000);
        let err = RawImage::open(&path, false, CacheMode::None).unwrap_err();
        assert!(err.to_string().contains("multiple of 4 KiB"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn cache_modes_parse() {
        assert_eq!("none".parse(), Ok(CacheMode::None));
        assert!("direct".parse::<CacheMode>().is_err());
    }
}
