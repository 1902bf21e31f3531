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
pub use delete::linked_clones_of;
pub mod layers;
pub mod meta;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use api::Client;

use crate::store::VmDir;
use crate::CliError;
use meta::{Current, Fingerprint, FrozenLayer, Journal, ResumeMark, SnapshotMeta, Tree};

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
    /// A VM process runs it (and holds its lock).
    Running,
}

impl Access {
    pub fn running(&self) -> bool {
        matches!(self, Access::Running)
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
                for f in files.iter().filter(|f| f.exists()) {
                    layers::repair_leaks(f)?;
                }
                self.finish_delete(access, &id, parent.as_deref(), &layers)?;
            }
        }
        self.end()
    }

    /// Undoes the overlays an interrupted operation made: only files in
    /// the VM's `disks/` (the journal could name any file).
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

    /// After a take's commit point: the definition names the new tops, the
    /// snapshot is current.
    fn commit_take(&self, id: &str, new_tops: &[PathBuf]) -> Result<(), SnapshotError> {
        let mut config = self.vm.config()?;
        if self.tops(&config) != new_tops {
            for (d, top) in config.disks.iter_mut().zip(new_tops) {
                d.path = top.clone();
                d.format = Some(block::Format::Qcow2);
            }
            self.vm.write_config(&config)?;
        }
        self.set_current(&Current {
            current: Some(id.to_string()),
            resume: None,
        })
    }

    /// After a restore's commit point: current set, old tops removed.
    fn commit_restore(
        &self,
        id: &str,
        old_tops: &[PathBuf],
        new_tops: &[PathBuf],
        resume: bool,
    ) -> Result<(), SnapshotError> {
        let resume = if resume {
            Some(ResumeMark {
                state_dir: self.state_dir(id),
                tops: new_tops
                    .iter()
                    .map(|p| {
                        Fingerprint::of(p)
                            .map(|f| (p.clone(), f))
                            .map_err(|e| SnapshotError::io(p, e))
                    })
                    .collect::<Result<_, _>>()?,
            })
        } else {
            None
        };
        self.set_current(&Current {
            current: Some(id.to_string()),
            resume,
        })?;
        self.discard_tops(old_tops, new_tops)
    }

    /// Removes old top overlays nothing refers to any more: only files in
    /// the VM's `disks/` that no snapshot froze and that are not the new
    /// tops (a base disk is never removed).
    fn discard_tops(&self, old: &[PathBuf], new: &[PathBuf]) -> Result<(), SnapshotError> {
        let disks = self.disks_dir()?;
        let tree = self.tree()?;
        for p in old {
            let frozen = tree
                .nodes
                .values()
                .any(|m| m.disks.iter().any(|l| &l.path == p));
            if !frozen && !new.contains(p) && layers::removable(p, &disks) {
                layers::remove_if_present(p)?;
            }
        }
        meta::sync_dir(&disks).map_err(|e| SnapshotError::io(&disks, e))
    }

    /// A new overlay path for disk `index`.
    fn overlay_path(&self, disks: &Path, index: usize) -> PathBuf {
        loop {
            let p = disks.join(format!("disk{index}-{}.qcow2", meta::new_id()));
            if !p.exists() {
                return p;
            }
        }
    }

    /// `snapshot take`; returns the new snapshot.
    pub fn take(
        &self,
        access: &Access,
        name: Option<String>,
        description: String,
    ) -> Result<SnapshotMeta, SnapshotError> {
        let tree = self.tree()?;
        let name = name.unwrap_or_else(|| tree.default_name());
        if name.trim().is_empty() || name.len() > 200 || name.contains(['\n', '\r']) {
            return Err(refused(
                "a snapshot name must be one line of 1 to 200 characters",
            ));
        }
        if tree.find(&name).is_some() {
            return Err(refused(format!(
                "{} already has a snapshot named `{name}` (names and ids must be unique)",
                self.vm.name
            )));
        }
        let config = self.vm.config()?;
        let old_tops = self.tops(&config);
        for p in &old_tops {
            if !p.is_file() {
                return Err(refused(format!(
                    "disk {} of {} does not exist",
                    p.display(),
                    self.vm.name
                )));
            }
        }
        let disks = self.disks_dir()?;
        let id = self.fresh_id();
        let new_tops: Vec<PathBuf> = (0..old_tops.len())
            .map(|i| self.overlay_path(&disks, i))
            .collect();
        let layers = old_tops
            .iter()
            .zip(&config.disks)
            .map(|(p, d)| {
                let removable = layers::removable(p, &disks);
                let fingerprint = if removable {
                    None
                } else {
                    Some(Fingerprint::of(p).map_err(|e| SnapshotError::io(p, e))?)
                };
                Ok(FrozenLayer {
                    path: p.clone(),
                    removable,
                    format: d.format,
                    fingerprint,
                })
            })
            .collect::<Result<Vec<_>, SnapshotError>>()?;
        let current = self.current()?;
        let running = access.running();
        let mut m = SnapshotMeta {
            id: id.clone(),
            name,
            parent: current.current.filter(|c| tree.nodes.contains_key(c)),
            created: meta::now_rfc3339(),
            description,
            disks: layers,
            saved_state: running,
            size: 0,
        };
        self.begin(&Journal::Take {
            id: id.clone(),
            old_tops: old_tops.clone(),
            new_tops: new_tops.clone(),
            running,
        })?;
        self.write_meta(&m)?;
        let cfg_path = self.node_dir(&id).join("config.toml");
        let text = toml::to_string(&config).map_err(|e| SnapshotError::Disk {
            path: cfg_path.clone(),
            message: e.to_string(),
        })?;
        meta::write_atomic(&cfg_path, text.as_bytes())
            .map_err(|e| SnapshotError::io(&cfg_path, e))?;
        if running {
            if let Err(e) = self.take_running(&id, &new_tops) {
                if !new_tops.iter().any(|p| p.exists()) {
                    self.remove_node(&id)?;
                    self.end()?;
                }
                return Err(e);
            }
            // A running VM wrote to a base until the VMM paused it: its
            // fingerprint is the one it has now that it is frozen.
            for l in m.disks.iter_mut().filter(|l| !l.removable) {
                l.fingerprint =
                    Some(Fingerprint::of(&l.path).map_err(|e| SnapshotError::io(&l.path, e))?);
            }
            self.write_meta(&m)?;
        } else {
            for (top, old) in new_tops.iter().zip(&m.disks) {
                layers::create_overlay(top, &old.path, old.format)?;
            }
        }
        self.commit_take(&id, &new_tops)?;
        self.end()?;
        m.size = m
            .disks
            .iter()
            .filter(|l| l.removable)
            .map(|l| layers::allocated(&l.path))
            .sum::<u64>()
            + layers::allocated_dir(&self.state_dir(&id));
        self.write_meta(&m)?;
        Ok(m)
    }

    /// Asks the running VM's VMM to save its state into the snapshot's
    /// `state/` and switch each disk to its new overlay.
    fn take_running(&self, id: &str, new_tops: &[PathBuf]) -> Result<(), SnapshotError> {
        let state = self.state_dir(id);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&state)
            .map_err(|e| SnapshotError::io(&state, e))?;
        let client = Client::new(&self.vm.socket());
        match client.snapshot(&state, new_tops) {
            Ok(r) if r.status < 300 => Ok(()),
            Ok(r) if matches!(r.status, 404 | 405) => Err(refused(format!(
                "taking a snapshot of a running VM needs the VMM's snapshot support (PUT /vm/snapshot), which {}'s VM process does not offer; stop the VM and take the snapshot then",
                self.vm.name
            ))),
            Ok(r) => Err(refused(format!(
                "{}: the VM could not take the snapshot: {}",
                self.vm.name,
                r.error_message()
            ))),
            Err(e) => Err(refused(format!("{}: {e}", self.vm.name))),
        }
    }

    /// Checks that a snapshot's files are all there and its base disks
    /// unchanged, so restoring it gives its own contents.
    fn check_restorable(&self, m: &SnapshotMeta) -> Result<(), SnapshotError> {
        for l in &m.disks {
            if !l.path.is_file() {
                return Err(refused(format!(
                    "snapshot `{}` cannot be restored: its disk layer {} is missing",
                    m.name,
                    l.path.display()
                )));
            }
            if let Some(f) = l.fingerprint {
                let now = Fingerprint::of(&l.path).map_err(|e| SnapshotError::io(&l.path, e))?;
                if now != f {
                    return Err(refused(format!(
                        "snapshot `{}` cannot be restored: its base disk {} was changed after the snapshot was taken (a snapshot's base must not be written), so it would not restore the contents it had",
                        m.name,
                        l.path.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// `snapshot restore` on a stopped VM (the caller stops a running one
    /// first): new empty overlays on the snapshot's layers, the old tops
    /// discarded, the definition as it was when it was taken.
    pub fn restore(&self, m: &SnapshotMeta) -> Result<(), SnapshotError> {
        self.check_restorable(m)?;
        let disks = self.disks_dir()?;
        let mut config = self.config_of(&m.id).or_else(|_| self.vm.config())?;
        if config.disks.len() != m.disks.len() {
            return Err(refused(format!(
                "snapshot `{}` is damaged: its definition has {} disks and its metadata {}",
                m.name,
                config.disks.len(),
                m.disks.len()
            )));
        }
        let old_tops = self.tops(&self.vm.config()?);
        let new_tops: Vec<PathBuf> = (0..m.disks.len())
            .map(|i| self.overlay_path(&disks, i))
            .collect();
        let resume = m.saved_state && self.state_dir(&m.id).is_dir();
        self.begin(&Journal::Restore {
            id: m.id.clone(),
            old_tops: old_tops.clone(),
            new_tops: new_tops.clone(),
            resume,
        })?;
        for (top, layer) in new_tops.iter().zip(&m.disks) {
            layers::create_overlay(top, &layer.path, layer.format)?;
        }
        for (d, top) in config.disks.iter_mut().zip(&new_tops) {
            d.path = top.clone();
            d.format = Some(block::Format::Qcow2);
        }
        self.vm.write_config(&config)?;
        self.commit_restore(&m.id, &old_tops, &new_tops, resume)?;
        self.end()
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
