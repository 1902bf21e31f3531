//! Image operations behind `hostvisor disk`: create, info, convert,
//! resize, check, rebase and commit. Each works on paths and reports
//! errors a user can act on; none leaves a half-written destination on
//! failure when it can avoid it.

use std::fs::OpenOptions as FsOpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::file::HostFile;
use crate::qcow2::{self, CheckReport, Qcow2, Snapshot};
use crate::{open_image, open_qcow2, probe, BlockError, CacheMode, DiskImage, Format, OpenOptions};

mod layers;
pub use layers::{backing_of, create_overlay, create_overlay_named, rebase_past_backing};

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Qcow2 {
        path: PathBuf,
        #[source]
        source: qcow2::Qcow2Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ToolError + '_ {
    move |source| ToolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn q_err(path: &Path) -> impl FnOnce(qcow2::Qcow2Error) -> ToolError + '_ {
    move |source| ToolError::Qcow2 {
        path: path.to_path_buf(),
        source,
    }
}

/// Parses a size like `20G`, `512M`, `1T` or `4096` (binary units, as
/// qemu-img reads them).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size (like 20G, 512M or 1048576)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Renders a byte count the way `disk info` shows it.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.3} {}", UNITS[unit]).replace(".000 ", " ")
    }
}

fn check_size(size: u64) -> Result<(), ToolError> {
    if size == 0 || !size.is_multiple_of(512) {
        return Err(ToolError::Invalid(format!(
            "the size must be a positive multiple of 512 bytes, not {size}"
        )));
    }
    Ok(())
}

/// Makes a new, empty file; refuses to overwrite one.
fn new_file(path: &Path) -> Result<(), ToolError> {
    FsOpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                ToolError::Invalid(format!(
                    "{} already exists; hostvisor does not overwrite images",
                    path.display()
                ))
            } else {
                io_err(path)(e)
            }
        })?;
    Ok(())
}

/// What `disk create` makes.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub path: PathBuf,
    /// Defaults to the backing file's size.
    pub size: Option<u64>,
    pub format: Format,
    /// The backing file as the user named it; stored as given, resolved
    /// relative to the new image's directory.
    pub backing: Option<String>,
    pub backing_format: Option<Format>,
    pub cluster_size: Option<u64>,
}

fn read_only() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    }
}

pub fn create(spec: &CreateSpec) -> Result<u64, ToolError> {
    let backing = match &spec.backing {
        None => None,
        Some(name) => {
            if spec.format == Format::Raw {
                return Err(ToolError::Invalid(
                    "raw images cannot have a backing file; use --format qcow2".into(),
                ));
            }
            let path = qcow2::backing_path(&spec.path, name);
            let format = match spec.backing_format {
                Some(f) => f,
                None => probe(&path)?,
            };
            let image = open_image(
                &path,
                OpenOptions {
                    format: Some(format),
                    ..read_only()
                },
            )?;
            Some((name.clone(), format, image.size()))
        }
    };
    let size = match (spec.size, &backing) {
        (Some(size), _) => size,
        (None, Some((_, _, size))) => *size,
        (None, None) => {
            return Err(ToolError::Invalid(
                "give the image a size, like --size 20G".into(),
            ))
        }
    };
    check_size(size)?;
    let cluster_bits = match spec.cluster_size {
        None => 16,
        Some(cs) if cs.is_power_of_two() && (512..=2 << 20).contains(&cs) => cs.trailing_zeros(),
        Some(cs) => {
            return Err(ToolError::Invalid(format!(
                "cluster size {cs} is not a power of two from 512 bytes to 2 MiB"
            )))
        }
    };
    new_file(&spec.path)?;
    let result = (|| match spec.format {
        Format::Raw => std::fs::File::options()
            .write(true)
            .open(&spec.path)
            .and_then(|f| f.set_len(size))
            .map_err(io_err(&spec.path)),
        Format::Qcow2 => {
            let file = HostFile::open(&spec.path, false, CacheMode::Writeback)?;
            let opts = qcow2::CreateOptions {
                size,
                cluster_bits,
                backing: backing
                    .as_ref()
                    .map(|(name, format, _)| (name.clone(), format.to_string())),
                ..qcow2::CreateOptions::default()
            };
            qcow2::create(&file, &opts).map_err(q_err(&spec.path))
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&spec.path);
    }
    result.map(|()| size)
}

/// `disk info`: one image and, under `backing`, the rest of its chain.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageInfo {
    pub filename: String,
    pub format: Format,
    pub virtual_size: u64,
    /// Host bytes the file occupies.
    pub actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qcow2: Option<Qcow2Info>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_format: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<Snapshot>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing: Option<Box<ImageInfo>>,
    /// Why the backing file was not opened (the rules of
    /// [`crate::backing`] refuse it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_refused: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Qcow2Info {
    pub version: u32,
    pub refcount_bits: u32,
    pub compression_type: &'static str,
    pub lazy_refcounts: bool,
    pub dirty: bool,
    pub corrupt: bool,
}

pub fn info(path: &Path, format: Option<Format>) -> Result<ImageInfo, ToolError> {
    info_at(path, format, 0)
}

fn info_at(path: &Path, format: Option<Format>, depth: usize) -> Result<ImageInfo, ToolError> {
    if depth > crate::MAX_CHAIN {
        return Err(BlockError::ChainTooDeep {
            path: path.to_path_buf(),
        }
        .into());
    }
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    let actual_size = std::fs::metadata(path)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .map_err(io_err(path))?;
    let filename = path.display().to_string();
    if format == Format::Raw {
        let image = open_image(
            path,
            OpenOptions {
                format: Some(Format::Raw),
                ..read_only()
            },
        )?;
        return Ok(ImageInfo {
            filename,
            format,
            virtual_size: image.size(),
            actual_size,
            cluster_size: None,
            qcow2: None,
            backing_file: None,
            backing_format: None,
            snapshots: Vec::new(),
            backing: None,
            backing_refused: None,
        });
    }
    // The image alone (its backing chain is described one by one below).
    let file = HostFile::open(path, true, CacheMode::Writeback)?;
    let image =
        Qcow2::open(Box::new(file), true, Vec::new(), Some(&no_backing)).map_err(q_err(path))?;
    let h = image.header();
    let snapshots = image.snapshots().map_err(q_err(path))?;
    let mut backing_refused = None;
    let backing = match &h.backing_file {
        None => None,
        Some(name) => {
            let bformat = h
                .backing_format
                .as_deref()
                .map(str::parse::<Format>)
                .transpose()
                .map_err(|e| ToolError::Invalid(format!("{}: {e}", path.display())))?;
            // A name the rules refuse is shown, never opened.
            match crate::backing::resolve(path, name) {
                Ok(bpath) => Some(Box::new(info_at(&bpath, bformat, depth + 1)?)),
                Err(e) => {
                    backing_refused = Some(e.to_string());
                    None
                }
            }
        }
    };
    Ok(ImageInfo {
        filename,
        format,
        virtual_size: h.size,
        actual_size,
        cluster_size: Some(h.cluster_size()),
        qcow2: Some(Qcow2Info {
            version: h.version,
            refcount_bits: 1 << h.refcount_order,
            compression_type: if h.compression_type == 1 {
                "zstd"
            } else {
                "zlib"
            },
            lazy_refcounts: h.compatible & qcow2::header::COMPAT_LAZY_REFCOUNTS != 0,
            dirty: h.incompatible & qcow2::header::INCOMPAT_DIRTY != 0,
            corrupt: h.incompatible & qcow2::header::INCOMPAT_CORRUPT != 0,
        }),
        backing_file: h.backing_file.clone(),
        backing_format: h.backing_format.clone(),
        snapshots,
        backing,
        backing_refused,
    })
}

/// Stands in for a backing file an operation never reads: an image opened
/// without its chain, whose unallocated clusters then read as zeroes.
#[derive(Debug)]
struct NoBacking;

fn no_backing(_: &str, _: Option<&str>) -> Result<Arc<dyn DiskImage>, qcow2::Qcow2Error> {
    Ok(Arc::new(NoBacking))
}

impl DiskImage for NoBacking {
    fn size(&self) -> u64 {
        0
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EROFS))
    }
    fn id(&self) -> Vec<u8> {
        Vec::new()
    }
}

/// The unit convert reads and tests for zeroes: chunks that are all zero
/// are not written, so the output stays sparse.
const CONVERT_CHUNK: usize = 1 << 20;
const ZERO_GRAIN: usize = 64 << 10;

/// `disk convert`: copies the guest-visible contents of `src` (with its
/// chain) into a new image. `progress(done, total)` is called as it goes.
pub fn convert(
    src: &Path,
    src_format: Option<Format>,
    dst: &Path,
    dst_format: Format,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ToolError> {
    let source = open_image(
        src,
        OpenOptions {
            format: src_format,
            ..read_only()
        },
    )?;
    let size = source.size();
    if size % 512 != 0 {
        return Err(ToolError::Invalid(format!(
            "{} is {size} bytes, not a whole number of sectors",
            src.display()
        )));
    }
    create(&CreateSpec {
        path: dst.to_path_buf(),
        size: Some(size),
        format: dst_format,
        backing: None,
        backing_format: None,
        cluster_size: None,
    })?;
    let result = (|| {
        let target = open_image(
            dst,
            OpenOptions {
                format: Some(dst_format),
                ..OpenOptions::default()
            },
        )?;
        let mut buf = vec![0u8; CONVERT_CHUNK];
        let mut pos = 0u64;
        while pos < size {
            let n =
                usize::try_from(size - pos).map_or(CONVERT_CHUNK, |left| left.min(CONVERT_CHUNK));
            source.read_at(&mut buf[..n], pos).map_err(io_err(src))?;
            for (i, grain) in buf[..n].chunks(ZERO_GRAIN).enumerate() {
                if grain.iter().any(|&b| b != 0) {
                    target
                        .write_at(grain, pos + (i * ZERO_GRAIN) as u64)
                        .map_err(io_err(dst))?;
                }
            }
            pos += n as u64;
            progress(pos, size);
        }
        target.flush().map_err(io_err(dst))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

/// How `disk resize` changes the size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewSize {
    Absolute(u64),
    Grow(u64),
}

impl std::str::FromStr for NewSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix('+') {
            return Ok(NewSize::Grow(parse_size(rest)?));
        }
        if s.starts_with('-') {
            return Err("shrinking an image would lose data; hostvisor only grows images".into());
        }
        Ok(NewSize::Absolute(parse_size(s)?))
    }
}

/// `disk resize`: grows an image; returns the new size.
pub fn resize(path: &Path, format: Option<Format>, new: NewSize) -> Result<u64, ToolError> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    let opts = OpenOptions {
        format: Some(format),
        ..OpenOptions::default()
    };
    let old = match format {
        Format::Raw => open_image(path, opts)?.size(),
        Format::Qcow2 => info(path, Some(Format::Qcow2))?.virtual_size,
    };
    let size = match new {
        NewSize::Absolute(n) => n,
        NewSize::Grow(n) => old
            .checked_add(n)
            .ok_or_else(|| ToolError::Invalid("the new size is too large".into()))?,
    };
    check_size(size)?;
    if size < old {
        return Err(ToolError::Invalid(format!(
            "{} is {old} bytes; shrinking would lose data, hostvisor only grows images",
            path.display()
        )));
    }
    match format {
        Format::Raw => {
            // Lock it as a VM would, so a running VM's disk is not resized.
            let file = HostFile::open(path, false, CacheMode::Writeback)?;
            crate::file::Storage::set_len(&file, size).map_err(io_err(path))?;
        }
        Format::Qcow2 => {
            let mut image = open_qcow2(path, opts, 0, false)?;
            image.resize(size).map_err(q_err(path))?;
        }
    }
    Ok(size)
}

/// `disk check`: for qcow2 images, the metadata report (repairing it when
/// asked). Raw images have no metadata: an empty report.
pub fn check(path: &Path, format: Option<Format>, repair: bool) -> Result<CheckReport, ToolError> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    if format == Format::Raw {
        return Ok(CheckReport::default());
    }
    let image = open_qcow2(
        path,
        OpenOptions {
            read_only: !repair,
            format: Some(Format::Qcow2),
            ..OpenOptions::default()
        },
        0,
        repair,
    )?;
    image.check(repair).map_err(q_err(path))
}

/// Opens a qcow2 overlay for writing; its backing chain is read-only.
fn open_overlay(path: &Path) -> Result<Qcow2, ToolError> {
    if probe(path)? != Format::Qcow2 {
        return Err(ToolError::Invalid(format!(
            "{} is a raw image; only qcow2 images have backing files",
            path.display()
        )));
    }
    Ok(open_qcow2(
        path,
        OpenOptions {
            format: Some(Format::Qcow2),
            ..OpenOptions::default()
        },
        0,
        false,
    )?)
}

/// `disk rebase`: points an overlay at another backing file (or none).
/// Unless `unsafe_`, first copies into the overlay every cluster whose
/// contents would otherwise change, so the guest sees the same data.
pub fn rebase(
    path: &Path,
    new_backing: Option<&str>,
    new_format: Option<Format>,
    unsafe_: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ToolError> {
    let mut image = open_overlay(path)?;
    let new = match new_backing {
        None => None,
        Some(name) => {
            let bpath = qcow2::backing_path(path, name);
            let format = match new_format {
                Some(f) => f,
                None => probe(&bpath)?,
            };
            let backing = open_image(
                &bpath,
                OpenOptions {
                    format: Some(format),
                    ..read_only()
                },
            )?;
            Some((name.to_string(), format, backing))
        }
    };
    if !unsafe_ {
        let size = image.size();
        let cb = image.cluster_bytes();
        let mut old = vec![0u8; cb];
        let mut fresh = vec![0u8; cb];
        let mut pos = 0;
        while pos < size {
            let n = usize::try_from(size - pos).map_or(cb, |left| left.min(cb));
            if !image.is_allocated(pos).map_err(io_err(path))? {
                image.read_at(&mut old[..n], pos).map_err(io_err(path))?;
                fresh[..n].fill(0);
                if let Some((_, _, backing)) = &new {
                    let bsize = backing.size();
                    if pos < bsize {
                        let m = usize::try_from(bsize - pos).map_or(n, |left| left.min(n));
                        backing
                            .read_at(&mut fresh[..m], pos)
                            .map_err(io_err(path))?;
                    }
                }
                if old[..n] != fresh[..n] {
                    image.write_at(&old[..n], pos).map_err(io_err(path))?;
                }
            }
            pos += n as u64;
            progress(pos, size);
        }
        image.flush().map_err(io_err(path))?;
    }
    let (name, format) = match &new {
        Some((name, format, _)) => (Some(name.as_str()), format.to_string()),
        None => (None, String::new()),
    };
    let opener = |_: &str, _: Option<&str>| -> Result<Arc<dyn DiskImage>, qcow2::Qcow2Error> {
        match &new {
            Some((_, _, backing)) => Ok(backing.clone()),
            None => no_backing("", None),
        }
    };
    image
        .set_backing(name.map(|n| (n, format.as_str())), Some(&opener))
        .map_err(q_err(path))
}

/// `disk commit`: writes an overlay's data into its backing file, then
/// empties the overlay (it reads the same, now through the backing file).
pub fn commit(path: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<(), ToolError> {
    // The overlay is opened without its chain, so the backing file can be
    // opened for writing; only allocated clusters are read from it.
    let file = HostFile::open(path, false, CacheMode::Writeback)?;
    if probe(path)? != Format::Qcow2 {
        return Err(ToolError::Invalid(format!(
            "{} is a raw image; only qcow2 overlays can be committed",
            path.display()
        )));
    }
    let image =
        Qcow2::open(Box::new(file), false, Vec::new(), Some(&no_backing)).map_err(q_err(path))?;
    let h = image.header();
    let Some(name) = h.backing_file.clone() else {
        return Err(ToolError::Invalid(format!(
            "{} has no backing file to commit into",
            path.display()
        )));
    };
    let bpath = crate::backing::resolve(path, &name)
        .map_err(|e| ToolError::Invalid(format!("{}: {e}", path.display())))?;
    let bformat = h
        .backing_format
        .as_deref()
        .map(str::parse::<Format>)
        .transpose()
        .map_err(|e| ToolError::Invalid(e.to_string()))?;
    let backing = open_image(
        &bpath,
        OpenOptions {
            format: bformat,
            ..OpenOptions::default()
        },
    )?;
    let size = image.size();
    if size > backing.size() {
        return Err(ToolError::Invalid(format!(
            "{} ({size} bytes) is larger than its backing file {}; resize the backing file first",
            path.display(),
            bpath.display()
        )));
    }
    let cs = image.cluster_size();
    let cb = image.cluster_bytes();
    let mut buf = vec![0u8; cb];
    let mut pos = 0;
    while pos < size {
        let n = usize::try_from(size - pos).map_or(cb, |left| left.min(cb));
        if image.is_allocated(pos).map_err(io_err(path))? {
            image.read_at(&mut buf[..n], pos).map_err(io_err(path))?;
            backing.write_at(&buf[..n], pos).map_err(io_err(&bpath))?;
        }
        pos += n as u64;
        progress(pos / 2, size);
    }
    // The backing file holds the data durably before the overlay drops it.
    backing.flush().map_err(io_err(&bpath))?;
    let mut pos = 0;
    while pos < size {
        image.deallocate(pos).map_err(io_err(path))?;
        pos += cs;
        progress(size / 2 + pos.min(size) / 2, size);
    }
    image.flush().map_err(io_err(path))?;
    Ok(())
}

/// `disk bench`: `count` requests of `size` bytes, the first at `offset`,
/// each `step` bytes after the previous one modulo the image size — the
/// same sequence `qemu-img bench` issues (depth 1), so the two can be
/// compared on one file.
#[derive(Debug, Clone, Copy)]
pub struct BenchSpec {
    pub count: u64,
    pub size: usize,
    pub offset: u64,
    pub step: u64,
    pub write: bool,
    pub cache: CacheMode,
    pub format: Option<Format>,
}

/// Runs the requests; returns the time they took. As in qemu-img bench,
/// the clock runs from the first request to the last completion: opening
/// the image and the final flush on close are not counted.
pub fn bench(path: &Path, spec: BenchSpec) -> Result<std::time::Duration, ToolError> {
    let image = open_image(
        path,
        OpenOptions {
            read_only: !spec.write,
            cache: spec.cache,
            format: spec.format,
        },
    )?;
    let size = image.size();
    if spec.size == 0 || spec.size as u64 > size {
        return Err(ToolError::Invalid(
            "the request size must fit in the image".into(),
        ));
    }
    // A page-aligned buffer, as qemu-img bench uses (O_DIRECT needs no
    // bounce buffer then).
    let mut backing = vec![0xa5u8; spec.size + 4096];
    let skip = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[skip..skip + spec.size];
    let mut offset = spec.offset % size;
    let start = std::time::Instant::now();
    for _ in 0..spec.count {
        if offset + spec.size as u64 > size {
            offset = 0;
        }
        if spec.write {
            image.write_at(buf, offset).map_err(io_err(path))?;
        } else {
            image.read_at(buf, offset).map_err(io_err(path))?;
        }
        offset = (offset + spec.step) % size;
    }
    let took = start.elapsed();
    image.flush().map_err(io_err(path))?;
    Ok(took)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!("+5G".parse(), Ok(NewSize::Grow(5 << 30)));
        assert!("-1G".parse::<NewSize>().is_err());
        assert_eq!(human_size(20 << 30), "20 GiB");
        assert_eq!(human_size(1536), "1.500 KiB");
    }
}
