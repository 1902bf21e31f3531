//! The disk-file side of snapshots: overlays made on top of a frozen
//! layer, backing chains read from image headers, and the safe rebase that
//! lets a layer be removed without changing what any other layer reads.

use std::path::{Path, PathBuf};

use block::tools;
use block::Format;

use super::meta::sync_dir;
use super::SnapshotError;

fn tool(path: &Path) -> impl FnOnce(tools::ToolError) -> SnapshotError + '_ {
    move |e| SnapshotError::Disk {
        path: path.to_path_buf(),
        message: vmm::error_chain(&e),
    }
}

/// The name an overlay at `overlay` records for `backing`: the bare file
/// name when both lie in one directory (the VM's directory can then move),
/// the absolute path otherwise.
pub fn backing_name(overlay: &Path, backing: &Path) -> String {
    if overlay.parent().is_some() && overlay.parent() == backing.parent() {
        if let Some(name) = backing.file_name() {
            return name.to_string_lossy().into_owned();
        }
    }
    backing.display().to_string()
}

/// Makes an empty qcow2 overlay at `path` backed by `backing` (block's
/// `create_overlay`, naming the backing file by [`backing_name`]) and
/// makes it durable (file and directory entry). The backing file's format is
/// the one given (as the VM's definition names it) and only probed when
/// unknown: a raw image whose guest wrote a qcow2 header must stay raw.
pub fn create_overlay(
    path: &Path,
    backing: &Path,
    format: Option<Format>,
) -> Result<(), SnapshotError> {
    let format = match format {
        Some(f) => f,
        None => block::probe(backing).map_err(|e| SnapshotError::Disk {
            path: backing.to_path_buf(),
            message: vmm::error_chain(&e),
        })?,
    };
    tools::create_overlay_named(path, backing, &backing_name(path, backing), format)
        .map_err(tool(path))?;
    sync_file(path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(|e| SnapshotError::io(dir, e))?;
    }
    Ok(())
}

pub fn sync_file(path: &Path) -> Result<(), SnapshotError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| SnapshotError::io(path, e))
}

/// The absolute path of the file `path` is backed by, read from its
/// header (no lock taken: works on an image a running VM holds).
pub fn backing_file(path: &Path) -> Result<Option<PathBuf>, SnapshotError> {
    Ok(backing(path)?.map(|(p, _)| p))
}

/// The backing file (absolute) and the format the header names for it.
pub fn backing(path: &Path) -> Result<Option<(PathBuf, Option<Format>)>, SnapshotError> {
    let Some((name, format)) = tools::backing_of(path).map_err(tool(path))? else {
        return Ok(None);
    };
    let format = format
        .map(|f| f.parse::<Format>())
        .transpose()
        .map_err(|e| SnapshotError::Disk {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok(Some((block::qcow2::backing_path(path, &name), format)))
}

/// `path` (of `format`, probed when `None`) and every file below it in
/// its backing chain, each read with the format the header above names;
/// as far as it can be read (a missing or damaged file ends it).
pub fn chain(path: &Path, format: Option<Format>) -> Vec<PathBuf> {
    let mut out = vec![path.to_path_buf()];
    let mut format = format;
    while let Ok(Some((next, next_format))) = backing_known(&out[out.len() - 1], format) {
        if out.len() > block::MAX_CHAIN || out.contains(&next) {
            break;
        }
        out.push(next);
        format = next_format;
    }
    out
}

/// As [`backing`], for an image of a known format: a raw image has no
/// backing file whatever its first bytes are.
pub fn backing_known(
    path: &Path,
    format: Option<Format>,
) -> Result<Option<(PathBuf, Option<Format>)>, SnapshotError> {
    if format == Some(Format::Raw) {
        return Ok(None);
    }
    backing(path)
}

/// Takes the file `path` is backed by out of its chain: `path` is then
/// backed by `below` (what that file was backed by, with its format), and
/// first gets a copy of every cluster that file defined and `path` did not
/// (block's `rebase_past_backing`: a safe rebase in time proportional to
/// the removed layer's data). A kill at any moment leaves it reading as
/// before: data is copied (and flushed) before the header names the new
/// backing file, in one write.
pub fn rebase_past(
    path: &Path,
    below: Option<(&Path, Option<Format>)>,
) -> Result<(), SnapshotError> {
    let name = below.map(|(b, _)| backing_name(path, b));
    let format = below.and_then(|(_, f)| f);
    let mut quiet = |_: u64, _: u64| {};
    tools::rebase_past_backing(path, name.as_deref(), format, &mut quiet).map_err(tool(path))?;
    sync_file(path)
}

/// Reclaims leaked clusters (allocated, referenced by nothing) in a qcow2
/// image, as `disk check --repair` does; refuses an image with real
/// corruption rather than touch it.
pub fn repair_leaks(path: &Path) -> Result<(), SnapshotError> {
    let report = tools::check(path, None, false).map_err(tool(path))?;
    if report.corruptions > 0 {
        return Err(SnapshotError::Disk {
            path: path.to_path_buf(),
            message: format!(
                "{} errors found; check it with `hostvisor disk check`",
                report.corruptions
            ),
        });
    }
    if report.leaks > 0 {
        tools::check(path, None, true).map_err(tool(path))?;
        sync_file(path)?;
    }
    Ok(())
}

/// Whether a file the VM wrote to can be removed once nothing needs it:
/// an overlay (it has a backing file) in the VM's own `disks/`. The disk
/// as it was before the first snapshot (the base) never is.
pub fn removable(path: &Path, disks_dir: &Path) -> bool {
    path.parent() == Some(disks_dir) && matches!(backing_file(path), Ok(Some(_)))
}

/// Host bytes a file occupies (allocated blocks), 0 if missing.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Host bytes a directory's files occupy, recursively.
pub fn allocated_dir(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                allocated_dir(&p)
            } else {
                allocated(&p)
            }
        })
        .sum()
}

/// Removes a file if it exists.
pub fn remove_if_present(path: &Path) -> Result<(), SnapshotError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SnapshotError::io(path, e)),
    }
}
