//! Disk images behind virtual disks.
//!
//! [`DiskImage`] is what a disk device needs from an image: its size and
//! positioned reads, writes, flushes, discards and zeroing. [`raw::RawImage`]
//! implements it for plain files and [`qcow2::Qcow2`] for qcow2 images with
//! backing chains; [`open_image`] probes the format and opens the chain.

#![warn(clippy::cast_possible_truncation)]

pub mod backing;
pub mod file;
pub mod qcow2;
pub mod raw;
pub mod switchable;
pub mod tools;

use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// How the host caches a disk's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// The host page cache holds writes; a guest flush is `fdatasync`.
    #[default]
    Writeback,
    /// `O_DIRECT`: no host page cache; a guest flush is still `fdatasync`
    /// (for the file's metadata and the device's cache).
    None,
    /// Page cache, and guest flushes are ignored: fast and unsafe on a host
    /// crash. For throwaway VMs.
    Unsafe,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown cache mode `{0}`: use writeback, none or unsafe")]
pub struct CacheModeError(String);

impl FromStr for CacheMode {
    type Err = CacheModeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "writeback" => Ok(CacheMode::Writeback),
            "none" => Ok(CacheMode::None),
            "unsafe" => Ok(CacheMode::Unsafe),
            _ => Err(CacheModeError(s.to_string())),
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheMode::Writeback => "writeback",
            CacheMode::None => "none",
            CacheMode::Unsafe => "unsafe",
        })
    }
}

/// Why an image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open the disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the disk image {path} is in use by another VM (it is locked)")]
    Locked { path: PathBuf },
    #[error("the disk image {path} is {size} bytes; cache=none needs a multiple of 4 KiB")]
    Unaligned { path: PathBuf, size: u64 },
    #[error("the disk image {path} is not a regular file or block device")]
    NotAFile { path: PathBuf },
    #[error("{path}: {source}")]
    Qcow2 {
        path: PathBuf,
        #[source]
        source: qcow2::Qcow2Error,
    },
    #[error("{path}: the backing chain is deeper than {MAX_CHAIN} images (does it loop?)")]
    ChainTooDeep { path: PathBuf },
}

/// Image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown image format `{0}`: use raw or qcow2")]
pub struct FormatError(String);

impl FromStr for Format {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(FormatError(s.to_string())),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

/// Backing chains longer than this are refused (a loop would be endless).
pub const MAX_CHAIN: usize = 64;

/// Tells a qcow2 image from a raw one by its magic.
pub fn probe(path: &Path) -> Result<Format, BlockError> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).map_err(|source| BlockError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut magic = [0u8; 4];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) if &magic == b"QFI\xfb" => Ok(Format::Qcow2),
        _ => Ok(Format::Raw),
    }
}

/// How to open an image.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    pub cache: CacheMode,
    /// `None` probes the file.
    pub format: Option<Format>,
}

/// Opens an image and, for qcow2, its whole backing chain (read-only).
pub fn open_image(path: &Path, opts: OpenOptions) -> Result<Arc<dyn DiskImage>, BlockError> {
    open_chain(path, opts, 0)
}

fn open_chain(
    path: &Path,
    opts: OpenOptions,
    depth: usize,
) -> Result<Arc<dyn DiskImage>, BlockError> {
    if depth > MAX_CHAIN {
        return Err(BlockError::ChainTooDeep {
            path: path.to_path_buf(),
        });
    }
    let format = match opts.format {
        Some(f) => f,
        None => probe(path)?,
    };
    match format {
        Format::Raw => {
            let mut raw = raw::RawImage::open(path, opts.read_only, opts.cache)?;
            raw.set_probed(opts.format.is_none());
            Ok(Arc::new(raw))
        }
        Format::Qcow2 => Ok(Arc::new(open_qcow2(path, opts, depth, false)?)),
    }
}

/// Opens a qcow2 file with its backing chain; `repairing` allows writing
/// an image marked corrupt.
pub fn open_qcow2(
    path: &Path,
    opts: OpenOptions,
    depth: usize,
    repairing: bool,
) -> Result<qcow2::Qcow2, BlockError> {
    let file = file::HostFile::open(path, opts.read_only, opts.cache)?;
    let id = format!("hv{:x}-{:x}", file.ident.0, file.ident.1).into_bytes();
    let backing_opts = OpenOptions {
        read_only: true,
        ..opts
    };
    let open_backing = |name: &str, format: Option<&str>| {
        let format = format
            .map(|f| f.parse::<Format>())
            .transpose()
            .map_err(|e| qcow2::Qcow2Error::Backing {
                name: name.to_string(),
                message: e.to_string(),
            })?;
        // The name comes from the file: only what `backing` allows.
        let backing_path =
            backing::resolve(path, name).map_err(|e| qcow2::Qcow2Error::Backing {
                name: name.to_string(),
                message: e.to_string(),
            })?;
        open_chain(
            &backing_path,
            OpenOptions {
                format,
                ..backing_opts
            },
            depth + 1,
        )
        .map_err(|e| qcow2::Qcow2Error::Backing {
            name: name.to_string(),
            message: e.to_string(),
        })
    };
    qcow2::Qcow2::open_with(
        Box::new(file),
        opts.read_only,
        id[..id.len().min(20)].to_vec(),
        Some(&open_backing),
        repairing,
    )
    .map_err(|source| BlockError::Qcow2 {
        path: path.to_path_buf(),
        source,
    })
}

/// A disk image. All offsets and lengths are in bytes; callers keep
/// requests inside [`DiskImage::size`].
pub trait DiskImage: Send + Sync + std::fmt::Debug {
    /// The virtual size in bytes.
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Tells the image that a range's data is no longer needed (it then
    /// reads as zeroes).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes a range, deallocating it if `unmap` allows.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// A stable identifier of the image (at most 20 bytes), for the guest.
    fn id(&self) -> Vec<u8>;
}
