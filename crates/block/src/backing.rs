//! Which backing files an image may name.
//!
//! A qcow2 header names its backing file, and an image can come from
//! anywhere: a hostile one could name `/etc/shadow` or a device node and
//! have its contents shown to the guest as the disk's unallocated data.
//! So a name from a file is never trusted as it is. [`resolve`] follows
//! the name (relative to the directory of the image that names it, never
//! the working directory; symlinks followed) and accepts it only when it is
//! a regular file
//!
//! - in that image's directory or below it, or
//! - in (or below) a directory, or equal to a file, that the user allowed
//!   ([`allow`]: `--allow-backing`, `HOSTVISOR_ALLOW_BACKING`, and for a
//!   managed VM the image it was created from, kept in its configuration),
//!
//! and never below `/proc`, `/sys` or `/dev`. Images inside the VM store
//! ([`trust_images_below`]) may name any regular file: hostvisor wrote
//! those names itself, on files the user named. Everything else is refused
//! with an error that names the file and says how to allow it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// Directories and files the user allowed as backing files, canonical.
static ALLOWED: RwLock<Vec<PathBuf>> = RwLock::new(Vec::new());

/// Directories whose images' backing names hostvisor wrote itself (the
/// VM store): such an image may name any regular file.
static TRUSTED_WRITERS: RwLock<Vec<PathBuf>> = RwLock::new(Vec::new());

/// Never allowed, whatever the user said: kernel interfaces and devices.
const NEVER: [&str; 3] = ["/proc", "/sys", "/dev"];

/// The environment variable with more allowed directories (`:` between).
pub const ALLOW_ENV: &str = "HOSTVISOR_ALLOW_BACKING";

/// Why a backing file is refused.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error("the backing file name {name:?} is empty or holds a NUL byte")]
    BadName { name: String },
    #[error("the backing file {path} cannot be found")]
    Missing {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the backing file {name:?} resolves to {resolved}, which is not a regular file; \
         a backing file never is a device, a directory or anything below /proc, /sys or /dev"
    )]
    NotAFile { name: String, resolved: PathBuf },
    #[error(
        "the backing file {name:?} resolves to {resolved}, outside the image's directory \
         {dir} and the directories allowed; if you trust this image, allow it with \
         --allow-backing {parent} (or {ALLOW_ENV})"
    )]
    NotAllowed {
        name: String,
        resolved: PathBuf,
        dir: PathBuf,
        parent: PathBuf,
    },
}

/// Allows backing files at `path` (a directory: anything below it; a
/// file: that file) for the rest of this process.
pub fn allow(path: &Path) -> io::Result<()> {
    let canonical = std::fs::canonicalize(path)?;
    let mut list = ALLOWED.write().unwrap_or_else(|e| e.into_inner());
    if !list.contains(&canonical) {
        list.push(canonical);
    }
    Ok(())
}

/// Allows what [`ALLOW_ENV`] names (entries that do not exist are skipped
/// with a warning: the variable may be set for several hosts).
pub fn allow_from_env() {
    let Some(value) = std::env::var_os(ALLOW_ENV) else {
        return;
    };
    for dir in std::env::split_paths(&value) {
        if dir.as_os_str().is_empty() {
            continue;
        }
        if let Err(e) = allow(&dir) {
            tracing::warn!("{ALLOW_ENV}: {}: {e}", dir.display());
        }
    }
}

/// Trusts the backing names of images at or below `dir` (for the rest of
/// this process): hostvisor wrote every one of them, on files the user
/// named (the VM store: snapshot overlays on a VM's original disks,
/// linked clones on another VM's layers). What those files name in turn
/// is checked as usual.
pub fn trust_images_below(dir: &Path) -> io::Result<()> {
    let canonical = std::fs::canonicalize(dir)?;
    let mut list = TRUSTED_WRITERS.write().unwrap_or_else(|e| e.into_inner());
    if !list.contains(&canonical) {
        list.push(canonical);
    }
    Ok(())
}

/// What the user allowed so far (canonical paths).
pub fn allowed() -> Vec<PathBuf> {
    ALLOWED.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The path `name` (as an image at `image` records it) stands for, not yet
/// checked: relative names are relative to the image's directory.
pub fn backing_path(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    image.parent().unwrap_or(Path::new(".")).join(p)
}

/// Resolves the backing file `name` that the image at `image` records,
/// refusing it unless the rules in this module's description allow it.
/// Returns the canonical path to open.
pub fn resolve(image: &Path, name: &str) -> Result<PathBuf, BackingError> {
    if name.is_empty() || name.contains('\0') {
        return Err(BackingError::BadName {
            name: name.to_string(),
        });
    }
    let path = backing_path(image, name);
    let resolved = std::fs::canonicalize(&path).map_err(|source| BackingError::Missing {
        path: path.clone(),
        source,
    })?;
    let is_file = std::fs::metadata(&resolved).is_ok_and(|m| m.is_file());
    if !is_file || NEVER.iter().any(|n| resolved.starts_with(n)) {
        return Err(BackingError::NotAFile {
            name: name.to_string(),
            resolved,
        });
    }
    let dir = image_dir(image);
    let trusted_writer = TRUSTED_WRITERS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|t| dir.starts_with(t));
    if trusted_writer
        || resolved.starts_with(&dir)
        || allowed().iter().any(|a| resolved.starts_with(a))
    {
        return Ok(resolved);
    }
    let parent = resolved.parent().unwrap_or(Path::new("/")).to_path_buf();
    Err(BackingError::NotAllowed {
        name: name.to_string(),
        resolved,
        dir,
        parent,
    })
}

/// The canonical directory of `image` (as given when it cannot be made
/// canonical, which then matches nothing outside it).
fn image_dir(image: &Path) -> PathBuf {
    let parent = match image.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hv-backing-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn files_beside_or_below_the_image_are_allowed() {
        let dir = temp("beside");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("base.img"), b"x").unwrap();
        std::fs::write(dir.join("sub/deep.img"), b"x").unwrap();
        let image = dir.join("top.qcow2");
        assert_eq!(
            resolve(&image, "base.img").unwrap(),
            dir.join("base.img").canonicalize().unwrap()
        );
        assert!(resolve(&image, "sub/deep.img").is_ok());
        let absolute = dir.join("base.img");
        assert!(resolve(&image, absolute.to_str().unwrap()).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn host_files_devices_and_escapes_are_refused() {
        let dir = temp("escape");
        let image = dir.join("top.qcow2");
        let outside = temp("escape-outside");
        std::fs::write(outside.join("secret"), b"x").unwrap();
        let secret = outside.join("secret");
        // An absolute name, a `..` escape, and a symlink out of the
        // directory are all the same file outside it.
        std::os::unix::fs::symlink(&secret, dir.join("link")).unwrap();
        let dotdot = format!(
            "../{}/secret",
            outside.file_name().unwrap().to_str().unwrap()
        );
        for name in [secret.to_str().unwrap(), dotdot.as_str(), "link"] {
            let err = resolve(&image, name).unwrap_err();
            assert!(
                matches!(err, BackingError::NotAllowed { .. }),
                "{name}: {err}"
            );
            assert!(err.to_string().contains("--allow-backing"), "{err}");
        }
        for name in ["/dev/zero", "/proc/self/environ", "/etc"] {
            let err = resolve(&image, name).unwrap_err();
            assert!(
                matches!(err, BackingError::NotAFile { .. }),
                "{name}: {err}"
            );
        }
        assert!(matches!(
            resolve(&image, "").unwrap_err(),
            BackingError::BadName { .. }
        ));
        assert!(matches!(
            resolve(&image, "missing").unwrap_err(),
            BackingError::Missing { .. }
        ));
        // Allowing the directory lets the same names through (and only
        // files below it: /dev stays refused).
        allow(&outside).unwrap();
        for name in [secret.to_str().unwrap(), dotdot.as_str(), "link"] {
            assert!(resolve(&image, name).is_ok(), "{name}");
        }
        assert!(resolve(&image, "/dev/zero").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn an_overlay_made_here_may_sit_on_a_file_outside_its_directory() {
        // A snapshot's overlay in the API client's directory, on the disk
        // the VM had open elsewhere: the process made it, so it opens.
        let dir = temp("own");
        let sub = dir.join("snap");
        std::fs::create_dir_all(&sub).unwrap();
        let base = dir.join("base.qcow2");
        crate::tools::create(&crate::tools::CreateSpec {
            path: base.clone(),
            size: Some(1 << 20),
            format: crate::Format::Qcow2,
            backing: None,
            backing_format: None,
            cluster_size: None,
        })
        .unwrap();
        let top = sub.join("top.qcow2");
        crate::tools::create_overlay(&top, &base, crate::Format::Qcow2).unwrap();
        crate::open_image(&top, crate::OpenOptions::default()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn images_in_a_trusted_directory_may_name_any_regular_file() {
        let store = temp("store");
        let elsewhere = temp("store-elsewhere");
        std::fs::write(elsewhere.join("base.raw"), b"x").unwrap();
        let base = elsewhere.join("base.raw");
        let image = store.join("vm/disks/top.qcow2");
        std::fs::create_dir_all(image.parent().unwrap()).unwrap();
        assert!(resolve(&image, base.to_str().unwrap()).is_err());
        trust_images_below(&store).unwrap();
        assert!(resolve(&image, base.to_str().unwrap()).is_ok());
        // Still never a device, and the base itself is not trusted.
        assert!(resolve(&image, "/dev/zero").is_err());
        let other = temp("store-other");
        std::fs::write(other.join("x"), b"x").unwrap();
        let far = other.join("x");
        assert!(resolve(&base, far.to_str().unwrap()).is_err());
        for d in [&store, &elsewhere, &other] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn a_relative_image_resolves_against_its_own_directory_not_the_cwd() {
        let dir = temp("relative");
        std::fs::write(dir.join("base.img"), b"x").unwrap();
        let image = dir.join("./top.qcow2");
        assert!(resolve(&image, "base.img").is_ok());
        // `image_dir` of a bare file name is the working directory, which
        // is where a bare image name lives.
        assert_eq!(
            image_dir(Path::new("top.qcow2")),
            std::env::current_dir().unwrap().canonicalize().unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
