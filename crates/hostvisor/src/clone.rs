//! `hostvisor clone SRC DST [--snapshot SNAP] [--linked]`.
//!
//! A full clone copies each disk, flattened through its backing chain into
//! one qcow2 image in DST's `disks/`; a linked clone gets new empty
//! overlays backed by a snapshot's frozen layers in SRC's directory (so it
//! needs a snapshot: without --snapshot one is taken, as VirtualBox does).
//! Without --snapshot, a stopped SRC's current disks are copied under its
//! lock; a running SRC is snapshotted first (its disks are open). The
//! clone is built in a hidden directory and renamed into place, so DST
//! either exists whole or not at all. It gets a new identity: MACs derived
//! from its name, a free vsock CID, and `hostvisor.hostname=` /
//! `hostvisor.machine_id=` on its kernel command line (read by the default
//! guest's init). A clone of a snapshot with a running state resumes from
//! a copy of it at its first start.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::snapshot::meta::{self, Current, Fingerprint, ResumeMark};
use crate::snapshot::{access, layers, SnapshotError, Snapshots};
use crate::store::{self, VmDir};
use crate::CliError;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |e| SnapshotError::io(path, e)
}

/// What the clone is made from.
struct Source {
    config: vmm::VmConfig,
    /// One image (with its chain) per disk, and its format when known.
    disks: Vec<(PathBuf, Option<block::Format>)>,
    /// The snapshot's running state to resume from, if it has one.
    state: Option<PathBuf>,
    what: String,
}

pub fn clone(src: &str, dst: &str, snapshot: Option<&str>, linked: bool) -> Result<i32, CliError> {
    let vm = VmDir::open(src).map_err(|e| CliError::Failure(e.to_string()))?;
    store::check_name(dst).map_err(|e| CliError::Usage(e.to_string()))?;
    let final_dir = store::root().join(dst);
    if final_dir.exists() {
        return Err(CliError::Failure(format!(
            "a VM named {dst} already exists"
        )));
    }
    let snaps = Snapshots::lock(&vm)?;
    let acc = access(&vm)?;
    snaps.recover(&acc)?;
    let source = match snapshot {
        Some(key) => {
            let tree = snaps.tree()?;
            let m = tree
                .find(key)
                .ok_or_else(|| CliError::Failure(format!("{src} has no snapshot named `{key}`")))?;
            from_snapshot(&snaps, m)?
        }
        None if linked || acc.running() => {
            // The disks must be frozen to be shared, or to be read while
            // the source runs on.
            let tree = snaps.tree()?;
            let name = (1..)
                .map(|n| match n {
                    1 => format!("base of {dst}"),
                    n => format!("base of {dst} ({n})"),
                })
                .find(|n| tree.find(n).is_none())
                .unwrap_or_default();
            let m = snaps.take(&acc, Some(name), format!("taken to clone {dst}"))?;
            eprintln!("took snapshot `{}` of {src} to clone it", m.name);
            from_snapshot(&snaps, &m)?
        }
        None => {
            let config = vm.config().map_err(SnapshotError::from)?;
            Source {
                disks: config
                    .disks
                    .iter()
                    .map(|d| (crate::snapshot::absolute(&d.path), d.format))
                    .collect(),
                config,
                state: None,
                what: "its current state".into(),
            }
        }
    };
    build(dst, &final_dir, source, linked)?;
    drop(acc);
    drop(snaps);
    Ok(0)
}

fn from_snapshot(snaps: &Snapshots, m: &meta::SnapshotMeta) -> Result<Source, SnapshotError> {
    let config = snaps.config_of(&m.id).or_else(|_| snaps.vm.config())?;
    let state = snaps.state_dir(&m.id);
    Ok(Source {
        config,
        disks: m.disks.iter().map(|l| (l.path.clone(), l.format)).collect(),
        state: (m.saved_state && state.is_dir()).then_some(state),
        what: format!("snapshot `{}`", m.name),
    })
}

/// A random 128-bit machine id (32 hex digits), as /etc/machine-id holds.
fn machine_id() -> String {
    agent::identity::new_machine_id().unwrap_or_else(|_| {
        // Unreachable on Linux (getrandom); the clock still makes it
        // unique enough.
        format!("{}{}00000000", meta::new_id(), meta::new_id())
    })
}

/// `append` with the clone's hostname and machine id (replacing any the
/// source had).
fn identity_append(append: Option<&str>, hostname: &str, id: &str) -> String {
    let mut words: Vec<&str> = append
        .unwrap_or("")
        .split_whitespace()
        .filter(|w| {
            !w.starts_with("hostvisor.hostname=") && !w.starts_with("hostvisor.machine_id=")
        })
        .collect();
    let host = format!("hostvisor.hostname={hostname}");
    let mid = format!("hostvisor.machine_id={id}");
    words.push(&host);
    words.push(&mid);
    words.join(" ")
}

/// The clone's definition: disks in its own directory, a new identity.
fn clone_config(
    dst: &str,
    final_dir: &Path,
    mut config: vmm::VmConfig,
) -> Result<vmm::VmConfig, SnapshotError> {
    for (i, d) in config.disks.iter_mut().enumerate() {
        d.path = final_dir.join("disks").join(format!("disk{i}.qcow2"));
        d.format = Some(block::Format::Qcow2);
    }
    for (i, nic) in config.nets.iter_mut().enumerate() {
        nic.mac = Some(net::MacAddr::for_vm(dst, i as u32));
    }
    if let Some(v) = config.vsock.as_mut() {
        v.cid = store::free_cid()?;
        // A socket the source named would be shared: the clone's lives in
        // its own directory.
        v.socket = None;
    }
    // A hostname has no '_' (a VM name may).
    config.append = Some(identity_append(
        config.append.as_deref(),
        &dst.replace('_', "-"),
        &machine_id(),
    ));
    Ok(config)
}

fn build(dst: &str, final_dir: &Path, source: Source, linked: bool) -> Result<(), SnapshotError> {
    let root = store::root();
    remove_stale_stages(&root);
    let stage = root.join(format!(".clone-{dst}-{}", std::process::id()));
    let result = (|| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(stage.join("disks"))
            .map_err(io(&stage))?;
        let config = clone_config(dst, final_dir, source.config)?;
        for (i, (src, format)) in source.disks.iter().enumerate() {
            let to = stage.join("disks").join(format!("disk{i}.qcow2"));
            // A cloud-init seed is made anew for the clone's identity.
            if config.disks[i].readonly
                && crate::cloudinit::reseed_for_clone(src, *format, &to, dst, &config)
                    .map_err(SnapshotError::Refused)?
            {
                continue;
            }
            if linked {
                layers::create_overlay(&to, src, *format)?;
            } else {
                let (bar, mut progress) =
                    crate::progress::progress_bar(&format!("copying disk {i}"));
                let r =
                    block::tools::convert(src, *format, &to, block::Format::Qcow2, &mut progress);
                bar.finish_and_clear();
                r.map_err(|e| SnapshotError::Disk {
                    path: src.clone(),
                    message: vmm::error_chain(&e),
                })?;
                layers::sync_file(&to)?;
            }
        }
        if let Some(state) = &source.state {
            let copy = stage.join("resume-state");
            copy_dir(state, &copy)?;
            let snaps = stage.join("snapshots");
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&snaps)
                .map_err(io(&snaps))?;
            let tops = config
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let staged = stage.join("disks").join(format!("disk{i}.qcow2"));
                    Fingerprint::of(&staged)
                        .map(|f| (d.path.clone(), f))
                        .map_err(|e| SnapshotError::io(&staged, e))
                })
                .collect::<Result<_, _>>()?;
            let current = Current {
                current: None,
                resume: Some(ResumeMark {
                    state_dir: final_dir.join("resume-state"),
                    tops,
                }),
            };
            let path = snaps.join("current.json");
            meta::write_json(&path, &current).map_err(io(&path))?;
        }
        let text = toml::to_string(&config).map_err(|e| SnapshotError::Refused(e.to_string()))?;
        let cfg = stage.join("config.toml");
        meta::write_atomic(&cfg, text.as_bytes()).map_err(io(&cfg))?;
        meta::sync_dir(&stage.join("disks")).map_err(io(&stage))?;
        rename_noreplace(&stage, final_dir)?;
        meta::sync_dir(&root).map_err(io(&root))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&stage);
        return result;
    }
    println!(
        "cloned {} into {dst} ({} clone{})",
        source.what,
        if linked { "linked" } else { "full" },
        if source.state.is_some() {
            "; it resumes from the snapshot's running state at its first start"
        } else {
            ""
        }
    );
    Ok(())
}

/// Removes what killed clones left: `.clone-NAME-PID` directories whose
/// process is gone.
fn remove_stale_stages(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".clone-") else {
            continue;
        };
        let Some(pid) = rest.rsplit('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: kill(2) with signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Renames a directory into place, failing if the target exists (two
/// concurrent clones to one name: one wins).
fn rename_noreplace(from: &Path, to: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
    let (Ok(a), Ok(b)) = (c(from), c(to)) else {
        return Err(SnapshotError::Refused(format!(
            "{} is not a valid path",
            to.display()
        )));
    };
    // SAFETY: renameat2 with two NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::AlreadyExists {
        return Err(SnapshotError::Refused(format!(
            "a VM named {} already exists",
            to.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        )));
    }
    Err(SnapshotError::io(to, e))
}

/// Copies a saved-state directory (regular files and directories only).
fn copy_dir(from: &Path, to: &Path) -> Result<(), SnapshotError> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(to)
        .map_err(io(to))?;
    for e in std::fs::read_dir(from).map_err(io(from))? {
        let e = e.map_err(io(from))?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let kind = e.file_type().map_err(io(&src))?;
        if kind.is_dir() {
            copy_dir(&src, &dst)?;
        } else if kind.is_file() {
            copy_keeping_holes(&src, &dst).map_err(io(&src))?;
            layers::sync_file(&dst)?;
        }
    }
    Ok(())
}

/// Copies a file with its holes: a running state's memory file is the
/// guest's RAM size with holes where pages were never touched, and
/// `std::fs::copy` writes those as zeros (a clone of an 8 GiB guest would
/// allocate 8 GiB). Data ranges are found with `SEEK_DATA`/`SEEK_HOLE`;
/// where the file system has no holes to report, it is one data range.
fn copy_keeping_holes(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::PermissionsExt;

    let mut from = std::fs::File::open(src)?;
    let meta = from.metadata()?;
    let len = meta.len();
    let mut to = std::fs::File::create(dst)?;
    to.set_permissions(std::fs::Permissions::from_mode(
        meta.permissions().mode() & 0o777,
    ))?;
    to.set_len(len)?;
    let seek = |whence: i32, at: u64| -> std::io::Result<Option<u64>> {
        let at = libc::off_t::try_from(at).map_err(std::io::Error::other)?;
        // SAFETY: lseek on an open descriptor of ours touches no memory.
        let r = unsafe { libc::lseek(from.as_raw_fd(), at, whence) };
        if r >= 0 {
            return Ok(u64::try_from(r).ok());
        }
        let e = std::io::Error::last_os_error();
        // ENXIO: no data at or after `at`.
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    };
    let mut ranges = Vec::new();
    let mut at = 0;
    while at < len {
        let Some(data) = seek(libc::SEEK_DATA, at)? else {
            break;
        };
        let end = seek(libc::SEEK_HOLE, data)?.unwrap_or(len).min(len);
        ranges.push((data, end));
        at = end;
    }
    let mut buf = vec![0u8; 1 << 20];
    for (start, end) in ranges {
        from.seek(SeekFrom::Start(start))?;
        to.seek(SeekFrom::Start(start))?;
        let mut left = end - start;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            from.read_exact(&mut buf[..n])?;
            to.write_all(&buf[..n])?;
            left -= n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_keeps_the_holes_and_the_bytes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = std::env::temp_dir().join(format!("hv-sparse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        let f = std::fs::File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&[7u8; 8192], 20 << 20).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        drop(f);
        copy_keeping_holes(&a, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let blocks = std::fs::metadata(&b).unwrap().blocks() * 512;
        assert!(
            blocks < 1 << 20,
            "{blocks} bytes allocated for 16 KiB of data"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn identity_replaces_the_source_one() {
        let a = identity_append(
            Some("quiet hostvisor.hostname=src hostvisor.machine_id=00"),
            "dst",
            "ab",
        );
        assert_eq!(a, "quiet hostvisor.hostname=dst hostvisor.machine_id=ab");
        assert_eq!(
            identity_append(None, "x", "1"),
            "hostvisor.hostname=x hostvisor.machine_id=1"
        );
        let id = machine_id();
        assert_eq!(id.len(), 32);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(id, machine_id());
    }
}
