//! Tools for layered images (managed-VM snapshots): reading an image's
//! backing file from its header alone, and taking a middle layer out of a
//! chain without changing what the top reads.

use std::path::Path;

#[cfg(test)]
use super::{check, create, CreateSpec};
use super::{io_err, open_overlay, q_err, read_only, rebase, ToolError};
#[cfg(test)]
use crate::open_image;
use crate::qcow2;
use crate::{open_qcow2, probe, DiskImage, Format, OpenOptions};

/// A qcow2 image's header, read without opening the image (no lock, no
/// backing chain): it and the backing file's name lie in the first
/// cluster, at most 2 MiB.
fn qcow2_header(path: &Path) -> Result<qcow2::header::Header, ToolError> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(2 << 20).read_to_end(&mut buf))
        .map_err(io_err(path))?;
    qcow2::header::Header::parse(&buf).map_err(q_err(path))
}

/// The backing file an image names in its own header (as written there,
/// with its format), without opening the chain or taking the image's
/// lock (it works on an image a running VM holds, and when the backing
/// file is missing): `None` for raw images and qcow2 images without one.
pub fn backing_of(path: &Path) -> Result<Option<(String, Option<String>)>, ToolError> {
    if probe(path)? == Format::Raw {
        return Ok(None);
    }
    let h = qcow2_header(path)?;
    Ok(h.backing_file.map(|b| (b, h.backing_format)))
}

/// Creates a qcow2 overlay at `path` (which must not exist) backed by
/// the image at `backing`, named by its absolute path, with its format
/// and — when it is a qcow2 — its cluster size (a snapshot layer behaves
/// like the layer below it). Works while a VM reads the backing image.
///
/// Pass the format the disk was opened with: probing a raw disk a guest
/// wrote to would take a qcow2 header the guest wrote for the image's own
/// (and its backing file name, a host path, for the guest's to choose).
pub fn create_overlay(path: &Path, backing: &Path, format: Format) -> Result<u64, ToolError> {
    let canonical = std::fs::canonicalize(backing).map_err(io_err(backing))?;
    create_overlay_named(path, backing, &canonical.to_string_lossy(), format)
}

/// Allows `backing` (one file) as a backing file in this process: the
/// caller put an overlay on it, so it is trusted as the caller's own
/// image (a VM's disk it moves onto a new overlay, a file the user named).
fn allow_own_backing(backing: &Path) {
    if let Err(e) = crate::backing::allow(backing) {
        tracing::debug!(path = %backing.display(), "cannot allow the backing file: {e}");
    }
}

/// As [`create_overlay`], with the name the overlay's header records for
/// its backing file given (a bare file name when both lie in one
/// directory, so the directory can move; resolved against `path`'s
/// directory as every reader does).
pub fn create_overlay_named(
    path: &Path,
    backing: &Path,
    name: &str,
    format: Format,
) -> Result<u64, ToolError> {
    let cluster_size = match format {
        Format::Raw => None,
        Format::Qcow2 => Some(1u64 << qcow2_header(backing)?.cluster_bits),
    };
    allow_own_backing(backing);
    if path.exists() {
        return Err(ToolError::Invalid(format!(
            "{} already exists; hostvisor does not overwrite images",
            path.display()
        )));
    }
    // Made under a temporary name in the same directory and renamed into
    // place once written and synced: a process killed meanwhile (a VMM
    // killed during a snapshot) leaves no half-made image under the name
    // a snapshot records — only the temporary file.
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let partial = path.with_file_name(format!(".{file_name}.partial"));
    let _ = std::fs::remove_file(&partial);
    let made = super::create(&super::CreateSpec {
        path: partial.clone(),
        size: None,
        format: Format::Qcow2,
        backing: Some(name.to_string()),
        backing_format: Some(format),
        cluster_size,
    })
    .and_then(|size| {
        std::fs::File::open(&partial)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&partial, path))
            .map_err(io_err(path))?;
        if let Some(dir) = path.parent() {
            // The rename is durable once the directory is synced.
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(size)
    });
    if made.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    made
}

/// Takes an overlay's backing file out of its chain: afterwards the
/// overlay is backed by `new_backing` — which must be what its backing
/// file is itself backed by (checked), or `None` when that has none — and
/// reads exactly as before. Only the clusters the backing file itself
/// defines and the overlay does not are copied into the overlay: the same
/// result as a safe `rebase` onto `new_backing`, in time proportional to
/// the backing file's own data rather than the disk's size. The data is
/// flushed before the header names the new backing file, so a kill at any
/// moment leaves the overlay reading as before.
pub fn rebase_past_backing(
    path: &Path,
    new_backing: Option<&str>,
    new_format: Option<Format>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ToolError> {
    let image = open_overlay(path)?;
    let h = image.header();
    let Some(name) = h.backing_file.clone() else {
        return Err(ToolError::Invalid(format!(
            "{} has no backing file to take out of its chain",
            path.display()
        )));
    };
    let bpath = crate::backing::resolve(path, &name)
        .map_err(|e| ToolError::Invalid(format!("{}: {e}", path.display())))?;
    if probe(&bpath)? != Format::Qcow2 {
        return Err(ToolError::Invalid(format!(
            "{} is a raw image: it has no backing file to take its place",
            bpath.display()
        )));
    }
    let backing = open_qcow2(
        &bpath,
        OpenOptions {
            format: Some(Format::Qcow2),
            ..read_only()
        },
        0,
        false,
    )?;
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let below = backing
        .header()
        .backing_file
        .map(|n| canonical(&qcow2::backing_path(&bpath, &n)));
    let wanted = new_backing.map(|n| canonical(&qcow2::backing_path(path, n)));
    if below != wanted {
        return Err(ToolError::Invalid(format!(
            "{} is not what {} is backed by; use rebase",
            new_backing.unwrap_or("no backing file"),
            bpath.display()
        )));
    }
    let size = image.size();
    let bsize = backing.size();
    let cb = image.cluster_bytes();
    let cs = image.cluster_size();
    let bcs = backing.cluster_size();
    let mut buf = vec![0u8; cb];
    let mut pos = 0;
    while pos < size {
        let n = usize::try_from(size - pos).map_or(cb, |left| left.min(cb));
        if pos < bsize && !image.is_allocated(pos).map_err(io_err(path))? {
            // Does the backing file define any part of this cluster?
            let end = (pos + n as u64).min(bsize);
            let mut b = pos - pos % bcs;
            let mut defined = false;
            while b < end && !defined {
                defined = backing.is_allocated(b).map_err(io_err(&bpath))?;
                b += bcs;
            }
            if defined {
                image.read_at(&mut buf[..n], pos).map_err(io_err(path))?;
                image.write_at(&buf[..n], pos).map_err(io_err(path))?;
            }
        }
        pos += cs;
        progress(pos.min(size), size);
    }
    image.flush().map_err(io_err(path))?;
    drop(image);
    // The header now: the same switch as `rebase`, with nothing left to
    // copy (every cluster reads the same through the new backing file).
    rebase(path, new_backing, new_format, true, &mut |_, _| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An overlay appears whole or not at all: it is written under a
    /// temporary name (a stale one from a killed process is replaced) and
    /// renamed; an existing image is never overwritten.
    #[test]
    fn overlays_appear_whole_under_their_name() {
        let dir = std::env::temp_dir().join(format!("hv-overlay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let base = dir.join("base.qcow2");
        create(&CreateSpec {
            path: base.clone(),
            size: Some(1 << 20),
            format: Format::Qcow2,
            backing: None,
            backing_format: None,
            cluster_size: None,
        })
        .expect("base");
        let top = dir.join("top.qcow2");
        let partial = dir.join(".top.qcow2.partial");
        std::fs::write(&partial, b"left by a killed process").expect("stale");
        create_overlay(&top, &base, Format::Qcow2).expect("overlay");
        assert!(!partial.exists(), "the temporary file is gone");
        assert_eq!(probe(&top).expect("probe"), Format::Qcow2);
        let again = create_overlay(&top, &base, Format::Qcow2).unwrap_err();
        assert!(again.to_string().contains("already exists"), "{again}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn rebase_past_backing_keeps_the_contents_and_copies_only_the_middle() {
        let dir = std::env::temp_dir().join(format!("hv-past-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = |n: &str| dir.join(n);
        let mk = |n: &str, backing: Option<&str>| {
            create(&CreateSpec {
                path: path(n),
                size: Some(1 << 20),
                format: Format::Qcow2,
                backing: backing.map(str::to_string),
                backing_format: backing.map(|_| Format::Qcow2),
                cluster_size: None,
            })
            .expect("create");
        };
        let fill = |n: &str, cluster: u64, byte: u8| {
            let img = open_image(&path(n), OpenOptions::default()).expect("open");
            img.write_at(&[byte; 65536], cluster * 65536)
                .expect("write");
            img.flush().expect("flush");
        };
        mk("base.qcow2", None);
        for c in 0..3 {
            fill("base.qcow2", c, 1);
        }
        mk("mid.qcow2", Some("base.qcow2"));
        fill("mid.qcow2", 1, 2);
        {
            let img = open_image(&path("mid.qcow2"), OpenOptions::default()).expect("open");
            img.write_zeroes(2 * 65536, 65536, false).expect("zeroes");
            img.flush().expect("flush");
        }
        mk("top.qcow2", Some("mid.qcow2"));
        fill("top.qcow2", 3, 4);
        fill("top.qcow2", 1, 5);
        let read = |n: &str| {
            let img = open_image(&path(n), read_only()).expect("open");
            let mut buf = vec![0u8; 1 << 20];
            img.read_at(&mut buf, 0).expect("read");
            buf
        };
        let before = read("top.qcow2");
        let err = rebase_past_backing(&path("top.qcow2"), None, None, &mut |_, _| {});
        assert!(err.is_err(), "mid is backed by base, not by nothing");
        rebase_past_backing(
            &path("top.qcow2"),
            Some("base.qcow2"),
            Some(Format::Qcow2),
            &mut |_, _| {},
        )
        .expect("rebase past mid");
        assert_eq!(read("top.qcow2"), before);
        assert_eq!(
            backing_of(&path("top.qcow2")).expect("header"),
            Some(("base.qcow2".to_string(), Some("qcow2".to_string())))
        );
        let top = open_qcow2(&path("top.qcow2"), read_only(), 0, false).expect("open");
        let defined: Vec<bool> = (0..5)
            .map(|c| top.is_allocated(c * 65536).expect("map"))
            .collect();
        // Cluster 0 stays with base; 1 was the top's; 2 (mid's zeroes) was
        // copied; 3 was the top's; 4 is nobody's.
        assert_eq!(defined, [false, true, true, true, false]);
        assert!(
            check(&path("top.qcow2"), None, false)
                .expect("check")
                .corruptions
                == 0
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn backing_of_reads_the_header_even_of_a_locked_image() {
        let dir = std::env::temp_dir().join(format!("hv-backing-of-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (raw, top) = (dir.join("base.raw"), dir.join("top.qcow2"));
        let spec = |path: &Path, format, backing: Option<&str>| CreateSpec {
            path: path.to_path_buf(),
            size: Some(1 << 20),
            format,
            backing: backing.map(str::to_string),
            backing_format: None,
            cluster_size: None,
        };
        create(&spec(&raw, Format::Raw, None)).expect("raw");
        create(&spec(&top, Format::Qcow2, Some("base.raw"))).expect("overlay");
        assert_eq!(backing_of(&raw).expect("raw"), None);
        // Held for writing, as by a running VM.
        let _open = open_image(&top, OpenOptions::default()).expect("open");
        assert_eq!(
            backing_of(&top).expect("overlay"),
            Some(("base.raw".to_string(), Some("raw".to_string())))
        );
        assert!(backing_of(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
