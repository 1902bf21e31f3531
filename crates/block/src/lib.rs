//! Disk images behind virtual disks.
//!
//! [`DiskImage`] is what a disk device needs from an image: its size and
//! positioned reads, writes, flushes, discards and zeroing. [`raw::RawImage`]
//! implements it for plain files; formats with their own metadata (qcow2,
//! backing chains) implement the same trait.

pub mod raw;

use std::io;
use std::path::PathBuf;
use std::str::FromStr;

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
