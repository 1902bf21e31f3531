//! The Landlock rules of a VM process: what it may open once confined.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, ABI,
};

use super::LandlockState;
use crate::config::{NetMode, SerialConfig, VmConfig};

/// The newest ABI whose rights these rules use (IoctlDev: /dev/kvm and
/// /dev/net/tun need it); older kernels get what they support.
const ABI_USED: ABI = ABI::V5;

/// How a path may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Read files (and list directories) at or below it.
    Read,
    /// Read, write, create (files, directories, symlinks: a share's guest
    /// makes them), rename and remove at or below it; no device nodes or
    /// fifos, no execution.
    ReadWrite,
    /// Create and remove Unix sockets in the directory.
    Sockets,
}

/// What the caller adds to a configuration's own files: the VM's
/// directory (managed VMs), the API socket, a snapshot to restore from.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    /// Directories read and written below (a managed VM's directory;
    /// `hostvisor run --api-socket`'s directory, where its snapshots go).
    pub read_write: Vec<PathBuf>,
    /// Files or directories only read (`--restore DIR`).
    pub read: Vec<PathBuf>,
    /// Directories where sockets are made (the API socket's).
    pub sockets: Vec<PathBuf>,
}

/// A list of paths and their uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub entries: Vec<(PathBuf, Use)>,
}

impl Rules {
    fn add(&mut self, path: impl Into<PathBuf>, how: Use) {
        let path = path.into();
        if !path.as_os_str().is_empty() && !self.entries.contains(&(path.clone(), how)) {
            self.entries.push((path, how));
        }
    }

    /// What running `config` needs (preparing what must exist first: the
    /// serial log file, internal networks' directories, libslirp loaded).
    pub fn for_vm(config: &VmConfig, extra: &Extra) -> Rules {
        let mut r = Rules::default();
        r.add(hypervisor::kvm::KvmHypervisor::DEVICE, Use::ReadWrite);
        // Guest RAM: huge page counts (for the error that says how many
        // are missing); /proc/self: pagemap for snapshots, smaps for the
        // overhead figures.
        r.add("/sys/kernel/mm/hugepages", Use::Read);
        r.add("/proc/sys/vm/nr_hugepages", Use::Read);
        // GLib seeds a NAT engine's random numbers (libslirp) from it; a
        // restore in place makes a new engine after confinement.
        r.add("/dev/urandom", Use::Read);
        if let Ok(me) = std::fs::canonicalize("/proc/self") {
            r.add(me, Use::Read);
        }
        r.add(&config.kernel, Use::Read);
        if let Some(initrd) = &config.initrd {
            r.add(initrd, Use::Read);
        }
        if let Some(firmware) = &config.firmware {
            r.add(firmware.image(), Use::Read);
            r.add(crate::firmware::linuxboot::LINUXBOOT_ROM, Use::Read);
        }
        for disk in &config.disks {
            let top = if disk.readonly {
                Use::Read
            } else {
                Use::ReadWrite
            };
            r.add(&disk.path, top);
            for layer in chain_below(&disk.path) {
                r.add(layer, Use::Read);
            }
        }
        for share in &config.shares {
            let how = if share.readonly {
                Use::Read
            } else {
                Use::ReadWrite
            };
            r.add(&share.path, how);
        }
        if let SerialConfig::File(path) = &config.serial {
            // Opened (appending) at every boot: made now, then only it.
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path);
            r.add(path, Use::ReadWrite);
        }
        if let Some(vsock) = &config.vsock {
            if let Some(dir) = vsock.socket_path().parent() {
                r.add(dir, Use::Sockets);
            }
        }
        for nic in &config.nets {
            match &nic.mode {
                NetMode::Tap { .. } => r.add("/dev/net/tun", Use::ReadWrite),
                NetMode::Nat { .. } => {
                    // dlopen needs the library's files: load it now.
                    // libslirp reads the host's resolver on DNS queries.
                    let _ = net::nat::libslirp_version();
                    r.add("/etc/resolv.conf", Use::Read);
                }
                NetMode::Internal { name } => {
                    let dir = net::switch::network_dir(name);
                    let _ = std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(&dir);
                    r.add(dir, Use::ReadWrite);
                }
            }
        }
        for dir in &extra.read_write {
            r.add(dir, Use::ReadWrite);
        }
        for path in &extra.read {
            r.add(path, Use::Read);
        }
        for dir in &extra.sockets {
            r.add(dir, Use::Sockets);
        }
        r
    }

    /// Confines this thread and the threads it starts from now on to the
    /// rules (paths that do not exist are left out: nothing can open
    /// them anyway).
    pub fn restrict_self(&self) -> Result<LandlockState, landlock::RulesetError> {
        let handled = AccessFs::from_all(ABI_USED);
        let mut ruleset = Ruleset::default().handle_access(handled)?.create()?;
        for (path, how) in &self.entries {
            let Ok(fd) = PathFd::new(path) else {
                tracing::debug!(path = %path.display(), "not in the sandbox: it does not exist");
                continue;
            };
            let is_dir = std::fs::metadata(path).is_ok_and(|m| m.is_dir());
            let mut access = rights(*how);
            if !is_dir {
                access &= AccessFs::from_file(ABI_USED);
            }
            if access.is_empty() {
                continue;
            }
            ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?;
        }
        let status = ruleset.restrict_self()?;
        Ok(match status.ruleset {
            RulesetStatus::NotEnforced => LandlockState::Unsupported,
            RulesetStatus::PartiallyEnforced => LandlockState::Enforced { fully: false },
            RulesetStatus::FullyEnforced => LandlockState::Enforced { fully: true },
        })
    }
}

/// The rights each use gives.
fn rights(how: Use) -> BitFlags<AccessFs> {
    match how {
        Use::Read => AccessFs::ReadFile | AccessFs::ReadDir,
        Use::ReadWrite => {
            AccessFs::from_all(ABI_USED)
                & !(AccessFs::Execute
                    | AccessFs::MakeChar
                    | AccessFs::MakeBlock
                    | AccessFs::MakeFifo)
        }
        Use::Sockets => AccessFs::MakeSock | AccessFs::RemoveFile,
    }
}

/// The backing files below `image`, as far as the rules of
/// `block::backing` allow them and they can be read.
fn chain_below(image: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut current = image.to_path_buf();
    while out.len() < block::MAX_CHAIN {
        let Ok(Some((name, _))) = block::tools::backing_of(&current) else {
            break;
        };
        let Ok(next) = block::backing::resolve(&current, &name) else {
            break;
        };
        if out.contains(&next) {
            break;
        }
        out.push(next.clone());
        current = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskConfig, ShareConfig};

    #[test]
    fn a_vm_s_rules_name_its_files_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("hv-rules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.raw");
        std::fs::write(&base, vec![0u8; 65536]).unwrap();
        let top = dir.join("top.qcow2");
        block::tools::create_overlay(&top, &base, block::Format::Raw).unwrap();
        let mut config = VmConfig::new(dir.join("vmlinux"));
        config.disks.push(DiskConfig {
            path: top.clone(),
            readonly: false,
            cache: block::CacheMode::Writeback,
            format: None,
            iops: None,
            bps: None,
        });
        config.shares.push(ShareConfig {
            path: dir.join("share"),
            tag: "s".into(),
            readonly: true,
            cache: Default::default(),
            owner: None,
            mount: None,
        });
        let rules = Rules::for_vm(&config, &Extra::default());
        let has = |p: &Path, how| rules.entries.contains(&(p.to_path_buf(), how));
        assert!(has(&top, Use::ReadWrite));
        assert!(has(&base.canonicalize().unwrap(), Use::Read));
        assert!(has(&dir.join("share"), Use::Read));
        assert!(has(&dir.join("vmlinux"), Use::Read));
        assert!(has(Path::new("/dev/kvm"), Use::ReadWrite));
        assert!(!rules
            .entries
            .iter()
            .any(|(p, _)| p == Path::new("/dev/net/tun")));
        assert!(!rules.entries.iter().any(|(p, _)| p == Path::new("/")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_confined_thread_opens_its_files_and_nothing_else() {
        if super::super::landlock_abi().is_err() {
            eprintln!("SKIPPED: the kernel has no Landlock");
            return;
        }
        let dir = std::env::temp_dir().join(format!("hv-confined-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("in")).unwrap();
        std::fs::write(dir.join("in/a"), b"a").unwrap();
        std::fs::write(dir.join("out"), b"b").unwrap();
        let rules = Rules {
            entries: vec![(dir.join("in"), Use::ReadWrite)],
        };
        let d = dir.clone();
        // A thread of its own: Landlock confines only it.
        let (inside, made, outside) = std::thread::spawn(move || {
            let state = rules.restrict_self().unwrap();
            assert!(matches!(state, LandlockState::Enforced { .. }), "{state:?}");
            (
                std::fs::read(d.join("in/a")).is_ok(),
                std::fs::write(d.join("in/new"), b"n").is_ok(),
                std::fs::read(d.join("out")).map_err(|e| e.raw_os_error()),
            )
        })
        .join()
        .unwrap();
        assert!(inside && made);
        assert_eq!(outside.unwrap_err(), Some(libc::EACCES));
        // This thread is not confined.
        assert!(std::fs::read(dir.join("out")).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
