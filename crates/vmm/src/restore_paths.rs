//! Which files a snapshot's state may name when `hostvisor run
//! --restore DIR` takes the VM's configuration from it.
//!
//! A state file can come from elsewhere, and its configuration names host
//! paths: disks, kernel, initrd, firmware, shared directories, the vsock
//! socket. Taken as they are, a hostile one could share `/` with the guest
//! or load `/etc/shadow` as its initrd. So each path must be inside the
//! snapshot's directory, or inside the directory that holds it (where
//! `hostvisor run` keeps a VM's disks beside its snapshots), or inside
//! one of `also` (the default guest's directory) or the directories the
//! user allowed (`--allow-backing`, `block::backing::allowed`). Managed
//! VMs do not need this: their configuration comes from their own
//! directory, never from a state file.

use std::path::{Path, PathBuf};

use crate::config::VmConfig;
use crate::snapshot::SnapshotError;

/// Checks every path `config` (read from the state in `dir`) names.
pub fn check(config: &VmConfig, dir: &Path, also: &[PathBuf]) -> Result<(), SnapshotError> {
    let mut roots: Vec<PathBuf> = Vec::new();
    let snap = std::fs::canonicalize(dir).map_err(|e| {
        SnapshotError::UntrustedPath(format!("cannot resolve {}: {e}", dir.display()))
    })?;
    if let Some(parent) = snap.parent() {
        roots.push(parent.to_path_buf());
    }
    roots.push(snap);
    roots.extend(also.iter().filter_map(|p| std::fs::canonicalize(p).ok()));
    roots.extend(block::backing::allowed());
    let mut named: Vec<(&str, PathBuf)> = Vec::new();
    if !config.kernel.as_os_str().is_empty() {
        named.push(("kernel", config.kernel.clone()));
    }
    if let Some(initrd) = &config.initrd {
        named.push(("initrd", initrd.clone()));
    }
    if let Some(crate::firmware::Firmware::File(f)) = &config.firmware {
        named.push(("firmware", f.clone()));
    }
    for disk in &config.disks {
        named.push(("disk", disk.path.clone()));
    }
    for share in &config.shares {
        named.push(("shared directory", share.path.clone()));
    }
    if let Some(socket) = config.vsock.as_ref().and_then(|v| v.socket.clone()) {
        named.push(("vsock socket", socket));
    }
    for (what, path) in named {
        let resolved = resolve(&path);
        if !roots.iter().any(|r| resolved.starts_with(r)) {
            return Err(SnapshotError::UntrustedPath(format!(
                "the snapshot names the {what} {}, outside the snapshot's directory and the one \
                 holding it; if you trust this snapshot, allow it with --allow-backing {}",
                path.display(),
                resolved.parent().unwrap_or(Path::new("/")).display()
            )));
        }
    }
    Ok(())
}

/// `path` with symlinks and `..` resolved; for a file that does not exist
/// (yet), its directory resolved and its name kept. A relative path
/// resolves to nowhere it could be allowed.
fn resolve(path: &Path) -> PathBuf {
    if !path.is_absolute() {
        return PathBuf::from("/nonexistent-relative").join(path);
    }
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => match std::fs::canonicalize(dir) {
            Ok(d) => d.join(name),
            Err(_) => PathBuf::from("/nonexistent").join(path.strip_prefix("/").unwrap_or(path)),
        },
        _ => PathBuf::from("/nonexistent"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskConfig, ShareConfig};

    #[test]
    fn a_state_may_name_files_beside_its_snapshot_only() {
        let base = std::env::temp_dir().join(format!("hv-restore-paths-{}", std::process::id()));
        let vm = base.join("vm");
        let snap = vm.join("snap");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(vm.join("disk.qcow2"), b"").unwrap();
        let guest = base.join("guest");
        std::fs::create_dir_all(&guest).unwrap();
        let mut config = VmConfig::new(guest.join("vmlinux"));
        config.disks.push(DiskConfig {
            path: vm.join("disk.qcow2"),
            readonly: false,
            cache: Default::default(),
            format: None,
            iops: None,
            bps: None,
        });
        check(&config, &snap, std::slice::from_ref(&guest)).unwrap();
        // Without the guest directory allowed, its kernel is refused.
        let err = check(&config, &snap, &[]).unwrap_err().to_string();
        assert!(
            err.contains("kernel") && err.contains("--allow-backing"),
            "{err}"
        );
        // A share of `/`, an initrd that is a host secret, a disk reached
        // through `..`: refused.
        let mut share = config.clone();
        share.shares.push(ShareConfig {
            path: "/".into(),
            tag: "root".into(),
            readonly: false,
            cache: Default::default(),
            owner: None,
            mount: None,
        });
        assert!(check(&share, &snap, std::slice::from_ref(&guest)).is_err());
        let mut initrd = config.clone();
        initrd.initrd = Some("/etc/shadow".into());
        assert!(check(&initrd, &snap, std::slice::from_ref(&guest)).is_err());
        let mut dotdot = config.clone();
        dotdot.disks[0].path = vm.join("../../../../../../../../etc/passwd");
        assert!(check(&dotdot, &snap, std::slice::from_ref(&guest)).is_err());
        let mut relative = config.clone();
        relative.disks[0].path = "disk.qcow2".into();
        assert!(check(&relative, &snap, std::slice::from_ref(&guest)).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
