//! Raw images: the guest's disk is the file, byte for byte.

use std::io;
use std::path::Path;

use crate::file::{HostFile, Storage, DIRECT_ALIGN};
use crate::{BlockError, CacheMode, DiskImage};

/// The qcow2 magic: a raw image whose format was probed must not start
/// with it, or the next probe would treat guest-written data as metadata
/// (and could follow a "backing file" the guest chose).
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

#[derive(Debug)]
pub struct RawImage {
    file: HostFile,
    size: u64,
    read_only: bool,
    probed: bool,
    id: Vec<u8>,
}

impl RawImage {
    /// Opens `path`, locking it: shared for a read-only disk, exclusive
    /// otherwise, so two VMs cannot both write one image.
    pub fn open(path: &Path, read_only: bool, cache: CacheMode) -> Result<Self, BlockError> {
        let file = HostFile::open(path, read_only, cache)?;
        let size = file.len().map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        if cache == CacheMode::None && size % DIRECT_ALIGN != 0 {
            return Err(BlockError::Unaligned {
                path: path.to_path_buf(),
                size,
            });
        }
        let id = format!("hv{:x}-{:x}", file.ident.0, file.ident.1).into_bytes();
        Ok(RawImage {
            file,
            size,
            read_only,
            probed: false,
            id: id[..id.len().min(20)].to_vec(),
        })
    }

    /// Marks the format as probed rather than named by the user: the guest
    /// may then not write a qcow2 header into the first sector (as QEMU).
    pub fn set_probed(&mut self, probed: bool) {
        self.probed = probed;
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        Ok(())
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
        self.file.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        if self.probed && offset == 0 && buf.starts_with(QCOW2_MAGIC) {
            tracing::warn!("refused a guest write of a qcow2 header into a probed raw image");
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.file.write_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.file.punch(offset, len, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check_writable()?;
        self.file.punch(offset, len, !unmap)
    }

    fn id(&self) -> Vec<u8> {
        self.id.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

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
    fn a_probed_raw_image_refuses_a_qcow2_header_in_sector_0() {
        let path = image("probed", 4096);
        let mut disk = RawImage::open(&path, false, CacheMode::Writeback).unwrap();
        disk.write_at(b"QFI\xfb....", 0).unwrap();
        disk.set_probed(true);
        assert!(disk.write_at(b"QFI\xfb....", 0).is_err());
        disk.write_at(b"QFI\xfb....", 512).unwrap();
        disk.write_at(b"ext4", 0).unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn cache_modes_parse() {
        assert_eq!("none".parse(), Ok(CacheMode::None));
        assert!("direct".parse::<CacheMode>().is_err());
    }
}
