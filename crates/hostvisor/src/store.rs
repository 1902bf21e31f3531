//! The VM store: one directory per VM under
//! `$XDG_DATA_HOME/hostvisor/vms/NAME/` holding its definition
//! (`config.toml`, the same `VmConfig` as `hostvisor run`), console log,
//! VM-process log, API socket, pidfile, lock and last exit.
//!
//! Which state a VM is in comes from the files and the lock, never from a
//! cache: the VM process holds `lock` (flock) for its whole life, so a
//! held lock means running; a free lock with a pidfile left behind means
//! the process died (crashed); otherwise `exit` says how it last ended.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use vmm::VmConfig;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("`{0}` is not a valid VM name: use letters, digits, '.', '_' and '-' (up to 64, starting with a letter or digit)")]
    BadName(String),
    #[error("there is no VM named {0} (see hostvisor list)")]
    NoSuchVm(String),
    #[error("a VM named {0} already exists")]
    Exists(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {message}")]
    BadConfig { path: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How a VM stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Defined, never started.
    Created,
    Running,
    Paused,
    /// Ended cleanly (powered off, stopped or killed on request).
    Stopped,
    /// The guest crashed, or the VM process died.
    Crashed,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
            VmState::Crashed => "crashed",
        })
    }
}

/// How the VM process last ended (`exit` in the VM's directory).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LastExit {
    pub crashed: bool,
    pub message: String,
}

/// The root of the store.
pub fn root() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("hostvisor/vms");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".local/share/hostvisor/vms")
}

pub fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName(name.to_string()))
    }
}

/// The lowest guest CID (3 or above) no managed VM uses.
pub fn free_cid() -> Result<u32, StoreError> {
    let used: std::collections::HashSet<u32> = VmDir::all()?
        .iter()
        .filter_map(|vm| vm.config().ok()?.vsock.map(|v| v.cid))
        .collect();
    Ok((3..).find(|c| !used.contains(c)).unwrap_or(3))
}

/// One VM's directory.
#[derive(Debug, Clone)]
pub struct VmDir {
    pub name: String,
    pub dir: PathBuf,
}

impl VmDir {
    /// An existing VM.
    pub fn open(name: &str) -> Result<VmDir, StoreError> {
        check_name(name)?;
        let dir = root().join(name);
        if !dir.join("config.toml").is_file() {
            return Err(StoreError::NoSuchVm(name.to_string()));
        }
        Ok(VmDir {
            name: name.to_string(),
            dir,
        })
    }

    /// Makes a new VM's directory (private to the user) with its
    /// definition; fails if the name is taken, even by a concurrent create.
    pub fn create(name: &str, config: &VmConfig) -> Result<VmDir, StoreError> {
        check_name(name)?;
        let root = root();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(io_err(&root))?;
        let dir = root.join(name);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::Exists(name.to_string()))
            }
            Err(e) => return Err(io_err(&dir)(e)),
        }
        let vm = VmDir {
            name: name.to_string(),
            dir,
        };
        if let Err(e) = vm.write_config(config) {
            let _ = std::fs::remove_dir_all(&vm.dir);
            return Err(e);
        }
        Ok(vm)
    }

    pub fn all() -> Result<Vec<VmDir>, StoreError> {
        let root = root();
        let entries = match std::fs::read_dir(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&root)(e)),
        };
        let mut vms: Vec<VmDir> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|name| VmDir::open(&name).ok())
            .collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(vms)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("config.toml")
    }
    pub fn console_log(&self) -> PathBuf {
        self.path("console.log")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.path("vmm.log")
    }
    pub fn socket(&self) -> PathBuf {
        self.path("api.sock")
    }
    /// Where the VM's vsock device listens (host programs reach guest
    /// ports through it): the configured socket, or `vsock.sock` here.
    pub fn vsock_socket(&self, config: &VmConfig) -> Option<PathBuf> {
        let v = config.vsock.as_ref()?;
        Some(v.socket.clone().unwrap_or_else(|| self.path("vsock.sock")))
    }
    pub fn pidfile(&self) -> PathBuf {
        self.path("pid")
    }
    fn lockfile(&self) -> PathBuf {
        self.path("lock")
    }
    fn exitfile(&self) -> PathBuf {
        self.path("exit")
    }

    /// The definition; unknown fields are refused with their name.
    ///
    /// Reading it also allows (in this process) the backing files a VM's
    /// images may have besides their own directories: images in the store
    /// name what hostvisor wrote there (snapshot overlays on the disks the
    /// user named, linked clones on another VM's layers), and what the
    /// user named at `create` (`sandbox.allow_backing`: the `--image`
    /// file, `--allow-backing` directories). See `block::backing`.
    pub fn config(&self) -> Result<VmConfig, StoreError> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let config: VmConfig = toml::from_str(&text).map_err(|e| StoreError::BadConfig {
            path: path.clone(),
            message: e.message().to_string(),
        })?;
        let _ = block::backing::trust_images_below(&root());
        for allowed in &config.sandbox.allow_backing {
            if let Err(e) = block::backing::allow(allowed) {
                tracing::warn!("{}: allowed backing {}: {e}", self.name, allowed.display());
            }
        }
        Ok(config)
    }

    /// Replaces the definition atomically (a new file renamed over it).
    pub fn write_config(&self, config: &VmConfig) -> Result<(), StoreError> {
        let path = self.config_path();
        let text = toml::to_string(config).map_err(|e| StoreError::BadConfig {
            path: path.clone(),
            message: e.to_string(),
        })?;
        // Written whole and durably: a temporary file, fsync, rename over
        // the old one, fsync of the directory (snapshots rely on a kill
        // leaving either the old or the new definition).
        let tmp = self.path(".config.toml.new");
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()
        };
        write().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }

    /// Takes the VM's lock without waiting: `None` if a VM process holds it.
    pub fn try_lock(&self) -> Result<Option<File>, StoreError> {
        let path = self.lockfile();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            Ok(Some(file))
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Ok(None)
            } else {
                Err(io_err(&path)(e))
            }
        }
    }

    /// The VM process's pid, if its pidfile exists.
    pub fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pidfile())
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// The state as the files and the lock tell it (running is refined to
    /// paused by asking the VM).
    pub fn state(&self) -> Result<VmState, StoreError> {
        let Some(_lock) = self.try_lock()? else {
            return Ok(VmState::Running);
        };
        if self.pidfile().exists() {
            // The process held the lock until it died without cleaning up.
            return Ok(VmState::Crashed);
        }
        Ok(match self.last_exit() {
            Some(exit) if exit.crashed => VmState::Crashed,
            Some(_) => VmState::Stopped,
            None => VmState::Created,
        })
    }

    pub fn last_exit(&self) -> Option<LastExit> {
        let text = std::fs::read_to_string(self.exitfile()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Called by the VM process, lock held: clears what a dead process
    /// left and records this one.
    pub fn begin_run(&self) -> Result<(), StoreError> {
        let _ = std::fs::remove_file(self.exitfile());
        let _ = std::fs::remove_file(self.socket());
        let path = self.pidfile();
        let mut f = File::create(&path).map_err(io_err(&path))?;
        writeln!(f, "{}", std::process::id()).map_err(io_err(&path))
    }

    /// Called by the VM process as it ends.
    pub fn end_run(&self, exit: &LastExit) {
        if let Ok(text) = serde_json::to_string(exit) {
            let _ = std::fs::write(self.exitfile(), text);
        }
        let _ = std::fs::remove_file(self.pidfile());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["web", "db-1", "a.b_c", "X9"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", ".hidden", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
