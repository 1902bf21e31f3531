//! The bytes under an image format: a host file (with its cache mode and
//! lock) or, for tests and fuzzing, memory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;

use crate::{BlockError, CacheMode};

/// Alignment of buffers, offsets and lengths for `O_DIRECT` (the largest
/// logical block size in common use).
pub const DIRECT_ALIGN: u64 = ALIGN_BYTES as u64;
/// [`DIRECT_ALIGN`] as a buffer length.
const ALIGN_BYTES: usize = 4096;

/// A byte offset or count as a buffer index: an error where it does not
/// fit this host's address space.
pub(crate) fn to_index(x: u64) -> io::Result<usize> {
    usize::try_from(x).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{x} bytes do not fit in memory"),
        )
    })
}

/// Positioned byte storage. Reads past the end are errors
/// (`UnexpectedEof`); writes past the end grow it.
pub trait Storage: Send + Sync + std::fmt::Debug {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes completed writes durable (a no-op for `cache=unsafe`).
    fn sync(&self) -> io::Result<()>;
    /// Deallocates a range, which then reads as zeroes; `zero_only` keeps
    /// the space allocated.
    fn punch(&self, offset: u64, len: u64, zero_only: bool) -> io::Result<()>;
}

impl<T: Storage + ?Sized> Storage for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn punch(&self, offset: u64, len: u64, zero_only: bool) -> io::Result<()> {
        (**self).punch(offset, len, zero_only)
    }
}

/// An open host file or block device, locked against other writers.
#[derive(Debug)]
pub struct HostFile {
    file: File,
    cache: CacheMode,
    block_device: bool,
    /// `st_dev`/`st_ino`, for a stable disk id.
    pub ident: (u64, u64),
}

impl HostFile {
    /// Opens `path`, locking it: shared for read-only use, exclusive
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
        Ok(HostFile {
            file,
            cache,
            block_device: meta.file_type().is_block_device(),
            ident: (meta.dev(), meta.ino()),
        })
    }

    /// Whether I/O on `buf` at `offset` must go through a bounce buffer.
    fn needs_bounce(&self, buf: &[u8], offset: u64) -> bool {
        self.cache == CacheMode::None
            && !((buf.as_ptr() as usize).is_multiple_of(ALIGN_BYTES)
                && offset.is_multiple_of(DIRECT_ALIGN)
                && (buf.len() as u64).is_multiple_of(DIRECT_ALIGN))
    }

    /// The aligned window around `[offset, offset + len)` for O_DIRECT.
    fn window(offset: u64, len: usize) -> io::Result<(u64, usize)> {
        let start = offset / DIRECT_ALIGN * DIRECT_ALIGN;
        let end = (offset + len as u64).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        Ok((start, to_index(end - start)?))
    }

    /// Reads the aligned window into an aligned bounce buffer; returns how
    /// many bytes the file had (the rest reads as zeroes).
    fn read_window(&self, start: u64, len: usize) -> io::Result<(AlignedBuf, usize)> {
        let mut bounce = AlignedBuf::new(len)?;
        let mut done = 0;
        while done < len {
            match self
                .file
                .read_at(&mut bounce.as_mut_slice()[done..], start + done as u64)
            {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok((bounce, done))
    }
}

impl Storage for HostFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if !self.needs_bounce(buf, offset) {
            return self.file.read_exact_at(buf, offset);
        }
        let (start, len) = Self::window(offset, buf.len())?;
        let (bounce, got) = self.read_window(start, len)?;
        let skip = to_index(offset - start)?;
        if got < skip + buf.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&bounce.as_slice()[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.needs_bounce(buf, offset) {
            return self.file.write_all_at(buf, offset);
        }
        // Read-modify-write of the aligned window. One worker thread serves
        // a disk, so no other request races with this. A window past the
        // end of the file grows it to the next 4 KiB.
        let (start, len) = Self::window(offset, buf.len())?;
        let mut bounce = if start == offset && len == buf.len() {
            AlignedBuf::new(len)?
        } else {
            self.read_window(start, len)?.0
        };
        let skip = to_index(offset - start)?;
        bounce.as_mut_slice()[skip..skip + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(bounce.as_slice(), start)
    }

    fn len(&self) -> io::Result<u64> {
        if self.block_device {
            use std::io::Seek;
            return (&self.file).seek(io::SeekFrom::End(0));
        }
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        match self.cache {
            CacheMode::Unsafe => Ok(()),
            CacheMode::Writeback | CacheMode::None => self.file.sync_data(),
        }
    }

    fn punch(&self, offset: u64, len: u64, zero_only: bool) -> io::Result<()> {
        let mode = if zero_only {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        };
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on a descriptor we own; no memory is involved.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, n) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
        // The host filesystem cannot: write the zeroes.
        let chunk = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < len {
            let n = to_index((len - done).min(chunk.len() as u64))?;
            self.write_at(&chunk[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Storage in memory: for tests and fuzzing (no file system involved).
#[derive(Debug, Default)]
pub struct MemFile {
    data: Mutex<Vec<u8>>,
    /// Refuse to grow past this many bytes (fuzzing keeps memory bounded).
    pub limit: Option<u64>,
}

impl MemFile {
    pub fn new(data: Vec<u8>) -> Self {
        MemFile {
            data: Mutex::new(data),
            limit: None,
        }
    }

    /// Storage holding `data` that refuses to grow past `limit` bytes.
    pub fn with_limit(data: Vec<u8>, limit: u64) -> Self {
        MemFile {
            data: Mutex::new(data),
            limit: Some(limit),
        }
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.data.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the bytes.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Storage for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.lock();
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= data.len() as u64)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&data[to_index(offset)?..to_index(end)?]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(io::ErrorKind::InvalidInput)?;
        if self.limit.is_some_and(|limit| end > limit) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let mut data = self.lock();
        let (start, end) = (to_index(offset)?, to_index(end)?);
        if end > data.len() {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.limit.is_some_and(|limit| len > limit) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        self.lock().resize(len, 0);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64, _zero_only: bool) -> io::Result<()> {
        let mut data = self.lock();
        let size = data.len() as u64;
        let start = to_index(offset.min(size))?;
        let end = to_index(offset.saturating_add(len).min(size))?;
        data[start..end].fill(0);
        Ok(())
    }
}

/// A zeroed, page-aligned buffer, as O_DIRECT needs. Devices stage guest
/// data in one so that `cache=none` I/O needs no second copy.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    /// A buffer of exactly `len` bytes (at least one).
    pub fn new(len: usize) -> io::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), ALIGN_BYTES)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(AlignedBuf { ptr, layout })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
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

// SAFETY: the buffer is plain owned memory, used by one thread at a time.
unsafe impl Send for AlignedBuf {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_file_reads_past_the_end_are_errors_and_writes_grow_it() {
        let f = MemFile::new(vec![1; 10]);
        let mut buf = [0u8; 4];
        assert!(f.read_at(&mut buf, 8).is_err());
        assert!(f.read_at(&mut buf, u64::MAX).is_err());
        f.write_at(&[2; 4], 12).unwrap();
        assert_eq!(f.len().unwrap(), 16);
        f.read_at(&mut buf, 10).unwrap();
        assert_eq!(buf, [0, 0, 2, 2]);
        let limited = MemFile {
            limit: Some(8),
            ..MemFile::default()
        };
        assert!(limited.write_at(&[0; 9], 0).is_err());
    }

    #[test]
    fn direct_host_files_read_and_write_unaligned_ranges() {
        let path = std::env::temp_dir().join(format!("hv-file-direct-{}", std::process::id()));
        File::create(&path).unwrap().set_len(8192).unwrap();
        let f = HostFile::open(&path, false, CacheMode::None).unwrap();
        f.write_at(&[9; 100], 4000).unwrap();
        let mut buf = [0u8; 100];
        f.read_at(&mut buf, 4000).unwrap();
        assert_eq!(buf, [9; 100]);
        assert!(f.read_at(&mut buf, 8150).is_err(), "past the end");
        // Growing through a direct write rounds the file to 4 KiB.
        f.write_at(&[1; 10], 8192).unwrap();
        assert_eq!(f.len().unwrap(), 12288);
        // Aligned buffers skip the bounce buffer.
        let mut backing = vec![0u8; 3 * 4096];
        let skip = backing.as_ptr().align_offset(4096);
        let aligned = &mut backing[skip..skip + 4096];
        aligned.fill(5);
        f.write_at(aligned, 4096).unwrap();
        aligned.fill(0);
        f.read_at(aligned, 4096).unwrap();
        assert!(aligned.iter().all(|&b| b == 5));
        std::fs::remove_file(&path).unwrap();
    }
}
