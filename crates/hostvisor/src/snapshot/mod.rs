//! Managed-VM snapshots: `snapshot take | list | restore | delete`.
//!
//! A snapshot freezes each disk's top layer (the file the VM writes to):
//! that file becomes read-only history and a new, empty qcow2 overlay
//! backed by it (in `vms/NAME/disks/`) becomes the disk the VM writes to.
//! The snapshots form a tree (each one's parent is the snapshot the disks
//! stood on when it was taken); the VM's disks stand on the "current" one.
//! Restoring puts new empty overlays on a snapshot's frozen layers and
//! discards the old top; deleting rebases every layer backed by the
//! deleted one onto its backing file (copying what would change), then
//! removes it. docs/snapshots.md describes the layout and the choices.
//!
//! Stopped VMs are changed directly on the files, under the VM's lock (so
//! `start` cannot race) and the snapshot lock; a running VM's snapshot is
//! taken by its VMM through the per-VM API (`PUT /vm/snapshot`).

pub mod cli;
mod delete;
mod ops;
pub use delete::linked_clones_of;
pub mod layers;
pub mod meta;
pub mod served;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use api::Client;

use crate::store::VmDir;
use crate::CliError;
use meta::{Current, Fingerprint, Journal, SnapshotMeta, Tree};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Disk { path: PathBuf, message: String },
    #[error("{0}")]
    Refused(String),
}

impl SnapshotError {
    pub fn io(path: &Path, source: std::io::Error) -> SnapshotError {
        SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<SnapshotError> for CliError {
    fn from(e: SnapshotError) -> CliError {
        CliError::Failure(vmm::error_chain(&e))
    }
}

impl From<crate::store::StoreError> for SnapshotError {
    fn from(e: crate::store::StoreError) -> SnapshotError {
        SnapshotError::Refused(vmm::error_chain(&e))
    }
}

fn refused(msg: impl Into<String>) -> SnapshotError {
    SnapshotError::Refused(msg.into())
}

/// How the VM stands while a snapshot operation works on it.
pub enum Access {
    /// Stopped: we hold its lock, so it cannot start meanwhile.
    Stopped(#[allow(dead_code)] File),
    /// Another process (the VM's) runs it and holds its lock; its VMM is
    /// reached through the per-VM API.
    Running,
    /// This process is the VM's process (serving its API) and the VM
    /// runs: its VMM is called directly (the API server must never wait
    /// on its own socket). Only here can the disks be closed around work
    /// on the layers they have open (a running delete).
    Served(vmm::control::VmControl),
}

impl Access {
    pub fn running(&self) -> bool {
        matches!(self, Access::Running | Access::Served(_))
    }
}

/// Takes the VM's lock, or finds its VM process.
pub fn access(vm: &VmDir) -> Result<Access, SnapshotError> {
    if let Some(lock) = vm.try_lock()? {
        return Ok(Access::Stopped(lock));
    }
    if Client::new(&vm.socket()).request("GET", "/vm", "").is_ok() {
        return Ok(Access::Running);
    }
    Err(refused(format!(
        "{} is busy (another hostvisor command holds its lock); try again",
        vm.name
    )))
}

/// One VM's snapshots directory.
pub struct Snapshots {
    pub vm: VmDir,
    pub dir: PathBuf,
    /// Held while this value lives: one snapshot operation at a time.
    _lock: File,
}

impl Snapshots {
    /// Opens (creating) `vms/NAME/snapshots/` and takes its lock, waiting
    /// up to 2 s for a short operation (a `list`) to end.
    pub fn lock(vm: &VmDir) -> Result<Snapshots, SnapshotError> {
        Snapshots::lock_within(vm, std::time::Duration::from_secs(2))
    }

    /// As [`Snapshots::lock`], waiting up to `limit`.
    pub fn lock_within(vm: &VmDir, limit: std::time::Duration) -> Result<Snapshots, SnapshotError> {
        let start = std::time::Instant::now();
        loop {
            match Snapshots::try_lock(vm)? {
                Some(s) => return Ok(s),
                None if start.elapsed() < limit => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                None => {
                    return Err(refused(format!(
                        "another snapshot or clone operation on {} is in progress",
                        vm.name
                    )))
                }
            }
        }
    }

    fn try_lock(vm: &VmDir) -> Result<Option<Snapshots>, SnapshotError> {
        let dir = vm.path("snapshots");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| SnapshotError::io(&dir, e))?;
        let path = dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| SnapshotError::io(&path, e))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(None);
            }
            return Err(SnapshotError::io(&path, e));
        }
        Ok(Some(Snapshots {
            vm: vm.clone(),
            dir,
            _lock: file,
        }))
    }

    fn node_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }
    fn meta_path(&self, id: &str) -> PathBuf {
        self.node_dir(id).join("meta.json")
    }
    pub fn state_dir(&self, id: &str) -> PathBuf {
        self.node_dir(id).join("state")
    }
    pub fn config_of(&self, id: &str) -> Result<vmm::VmConfig, SnapshotError> {
        let path = self.node_dir(id).join("config.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| SnapshotError::io(&path, e))?;
        toml::from_str(&text).map_err(|e| SnapshotError::Disk {
            path,
            message: e.message().to_string(),
        })
    }
    fn current_path(&self) -> PathBuf {
        self.dir.join("current.json")
    }
    fn journal_path(&self) -> PathBuf {
        self.dir.join("journal.json")
    }
    /// Where the VM's overlays live (made on first use), as a canonical
    /// path: layers are told apart by comparing canonical paths.
    pub fn disks_dir(&self) -> Result<PathBuf, SnapshotError> {
        let dir = self.vm.path("disks");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| SnapshotError::io(&dir, e))?;
        std::fs::canonicalize(&dir).map_err(|e| SnapshotError::io(&dir, e))
    }

    /// Every snapshot (a directory without a readable meta.json is not
    /// one: a take that was undone, or a delete half done).
    pub fn tree(&self) -> Result<Tree, SnapshotError> {
        let mut list = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(|e| SnapshotError::io(&self.dir, e))?;
        for e in entries.filter_map(Result::ok) {
            if !e.path().is_dir() {
                continue;
            }
            let path = e.path().join("meta.json");
            if let Some(m) =
                meta::read_json::<SnapshotMeta>(&path).map_err(|e| SnapshotError::io(&path, e))?
            {
                // The files are the user's to edit: an id is a name in
                // this directory, never a path elsewhere.
                if !meta::valid_id(&m.id) || *e.file_name() != *m.id {
                    return Err(SnapshotError::Disk {
                        path,
                        message: format!(
                            "the snapshot id `{}` does not match its directory; the metadata is damaged",
                            m.id
                        ),
                    });
                }
                list.push(m);
            }
        }
        Ok(Tree::new(list))
    }

    pub fn write_meta(&self, m: &SnapshotMeta) -> Result<(), SnapshotError> {
        let dir = self.node_dir(&m.id);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| SnapshotError::io(&dir, e))?;
        let path = self.meta_path(&m.id);
        meta::write_json(&path, m).map_err(|e| SnapshotError::io(&path, e))
    }

    pub fn current(&self) -> Result<Current, SnapshotError> {
        let path = self.current_path();
        Ok(meta::read_json(&path)
            .map_err(|e| SnapshotError::io(&path, e))?
            .unwrap_or_default())
    }

    pub fn set_current(&self, c: &Current) -> Result<(), SnapshotError> {
        let path = self.current_path();
        meta::write_json(&path, c).map_err(|e| SnapshotError::io(&path, e))
    }

    fn journal(&self) -> Result<Option<Journal>, SnapshotError> {
        let path = self.journal_path();
        let j: Option<Journal> = meta::read_json(&path).map_err(|e| SnapshotError::io(&path, e))?;
        let id = match &j {
            Some(
                Journal::Take { id, .. } | Journal::Restore { id, .. } | Journal::Delete { id, .. },
            ) => id,
            None => return Ok(None),
        };
        if !meta::valid_id(id) {
            return Err(SnapshotError::Disk {
                path,
                message: format!("`{id}` is not a snapshot id; the journal is damaged"),
            });
        }
        Ok(j)
    }

    fn begin(&self, j: &Journal) -> Result<(), SnapshotError> {
        let path = self.journal_path();
        meta::write_json(&path, j).map_err(|e| SnapshotError::io(&path, e))
    }

    fn end(&self) -> Result<(), SnapshotError> {
        layers::remove_if_present(&self.journal_path())?;
        meta::sync_dir(&self.dir).map_err(|e| SnapshotError::io(&self.dir, e))
    }

    /// Removes a snapshot's directory: meta.json first (then it is no
    /// snapshot any more), then the rest.
    fn remove_node(&self, id: &str) -> Result<(), SnapshotError> {
        layers::remove_if_present(&self.meta_path(id))?;
        meta::sync_dir(&self.node_dir(id)).ok();
        let dir = self.node_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(SnapshotError::io(&dir, e)),
        }
        meta::sync_dir(&self.dir).map_err(|e| SnapshotError::io(&self.dir, e))
    }

    /// The disks' current top layers, as absolute paths.
    fn tops(&self, config: &vmm::VmConfig) -> Vec<PathBuf> {
        config.disks.iter().map(|d| absolute(&d.path)).collect()
    }

    /// A fresh snapshot id no snapshot directory uses.
    fn fresh_id(&self) -> String {
        loop {
            let id = meta::new_id();
            if !self.node_dir(&id).exists() {
                return id;
            }
        }
    }

    /// Finishes or undoes an operation a killed process left (see
    /// [`Journal`]).
    pub fn recover(&self, access: &Access) -> Result<(), SnapshotError> {
        let Some(j) = self.journal()? else {
            return Ok(());
        };
        // Overlays are made under a temporary name and renamed whole
        // (block::tools::create_overlay): one a kill left half-made is
        // never a layer.
        self.remove_partial_overlays()?;
        let config = self.vm.config()?;
        let tops = self.tops(&config);
        match j {
            Journal::Take {
                id,
                new_tops,
                running,
                ..
            } => {
                let switched = tops == new_tops;
                let made = running && new_tops.iter().all(|p| p.exists());
                if switched || made {
                    self.commit_take(&id, &new_tops)?;
                } else if running && access.running() && new_tops.iter().any(|p| p.exists()) {
                    return Err(refused(format!(
                        "an interrupted snapshot of {} left part of its overlays; stop the VM and run the command again to clean up",
                        self.vm.name
                    )));
                } else {
                    self.remove_new_tops(&new_tops)?;
                    self.remove_node(&id)?;
                }
            }
            Journal::Restore {
                id,
                old_tops,
                new_tops,
                resume,
            } => {
                if tops == new_tops {
                    self.commit_restore(&id, &old_tops, &new_tops, resume)?;
                } else {
                    self.remove_new_tops(&new_tops)?;
                }
            }
            Journal::Delete { id, parent, layers } => {
                // A rebase killed midway leaves clusters it had allocated
                // but not yet mapped (leaks, no harm to data): reclaim them.
                let tree = self.tree()?;
                let mut files: Vec<PathBuf> = tree
                    .nodes
                    .values()
                    .flat_map(|m| m.disks.iter().filter(|l| l.removable))
                    .map(|l| l.path.clone())
                    .collect();
                if !access.running() {
                    files.extend(tops);
                }
                // Leaks are harmless: files a running VM has open are left
                // as they are.
                let open = if access.running() {
                    self.in_use(&tree)?
                } else {
                    Vec::new()
                };
                for f in files.iter().filter(|f| f.exists() && !open.contains(f)) {
                    layers::repair_leaks(f)?;
                }
                self.finish_delete(access, &id, parent.as_deref(), &layers)?;
            }
        }
        self.end()
    }

    /// Undoes the overlays an interrupted operation made: only files in
    /// the VM's `disks/` (the journal could name any file).
    fn remove_partial_overlays(&self) -> Result<(), SnapshotError> {
        let disks = self.disks_dir()?;
        let Ok(entries) = std::fs::read_dir(&disks) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".partial") {
                layers::remove_if_present(&entry.path())?;
            }
        }
        Ok(())
    }

    fn remove_new_tops(&self, new_tops: &[PathBuf]) -> Result<(), SnapshotError> {
        let disks = self.disks_dir()?;
        for p in new_tops
            .iter()
            .filter(|p| p.parent() == Some(disks.as_path()))
        {
            layers::remove_if_present(p)?;
        }
        Ok(())
    }
}

/// A disk path as an absolute path (relative ones are relative to the
/// working directory, as the VM process reads them).
pub fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().map_or_else(|_| p.to_path_buf(), |d| d.join(p))
        }
    })
}

/// The saved state `start` should resume the VM from: set when the last
/// restore (or clone) put it on a snapshot with a running state and its
/// disks are untouched since. Runs recovery first (the caller holds
/// neither lock; the VM is stopped).
pub fn resume_for_start(vm: &VmDir) -> Result<Option<PathBuf>, SnapshotError> {
    if !vm.path("snapshots").is_dir() {
        return Ok(None);
    }
    let snaps = Snapshots::lock_within(vm, std::time::Duration::from_secs(10))?;
    {
        let Some(lock) = vm.try_lock()? else {
            return Ok(None);
        };
        snaps.recover(&Access::Stopped(lock))?;
    }
    let Some(mark) = snaps.current()?.resume else {
        return Ok(None);
    };
    let tops = snaps.tops(&vm.config()?);
    let untouched = tops.len() == mark.tops.len()
        && tops
            .iter()
            .zip(&mark.tops)
            .all(|(t, (p, f))| *t == absolute(p) && Fingerprint::of(p).ok() == Some(*f));
    Ok((untouched && mark.state_dir.is_dir()).then_some(mark.state_dir))
}

/// Clears the resume mark once a start has used it (or found it stale).
pub fn resume_used(vm: &VmDir) -> Result<(), SnapshotError> {
    let snaps = Snapshots::lock_within(vm, std::time::Duration::from_secs(10))?;
    let mut c = snaps.current()?;
    if c.resume.take().is_some() {
        snaps.set_current(&c)?;
    }
    Ok(())
}
