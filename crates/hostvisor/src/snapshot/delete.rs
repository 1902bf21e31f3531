//! `snapshot delete`: the layers backed by the deleted snapshot's are
//! rebased onto its backing file (safe rebase: what they read stays), the
//! children move up, then its files go; refused while a linked clone uses
//! its layers. Layers a running VM has open (the snapshot it stands on,
//! its ancestors, the current tops) are rebased by the VM's own process
//! with the disks closed around the work: the guest sees a pause only.

use std::path::{Path, PathBuf};

use super::meta::{self, Current, FrozenLayer, Journal, SnapshotMeta, Tree};
use super::{absolute, layers, refused, Access, SnapshotError, Snapshots};
use crate::store::VmDir;

impl Snapshots {
    /// Refuses to delete a snapshot another VM's disks (a linked clone's)
    /// are backed by.
    fn check_no_clone_uses(&self, m: &SnapshotMeta) -> Result<(), SnapshotError> {
        let ours: Vec<&Path> = m
            .disks
            .iter()
            .filter(|l| l.removable)
            .map(|l| l.path.as_path())
            .collect();
        if ours.is_empty() {
            return Ok(());
        }
        for other in VmDir::all()? {
            if other.name == self.vm.name {
                continue;
            }
            let Ok(config) = other.config() else { continue };
            for d in &config.disks {
                let chain = layers::chain(&absolute(&d.path), d.format);
                if chain.iter().any(|p| ours.contains(&p.as_path())) {
                    return Err(refused(format!(
                        "snapshot `{}` cannot be deleted: the linked clone {} is backed by it (delete or fully clone {} first)",
                        m.name, other.name, other.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// `snapshot delete`.
    pub fn delete(&self, access: &Access, m: &SnapshotMeta) -> Result<(), SnapshotError> {
        self.check_no_clone_uses(m)?;
        self.check_not_open(access, &self.tree()?, &m.id)?;
        self.begin(&Journal::Delete {
            id: m.id.clone(),
            parent: m.parent.clone(),
            layers: m.disks.clone(),
        })?;
        self.finish_delete(access, &m.id, m.parent.as_deref(), &m.disks)?;
        self.end()
    }

    /// Refuses to delete, from another process while the VM runs, the
    /// snapshot it stands on or one of that one's ancestors: their layers
    /// are open in the VMM, and only the VM's process can close them
    /// (the CLI asks it, through the API, to delete).
    fn check_not_open(&self, access: &Access, tree: &Tree, id: &str) -> Result<(), SnapshotError> {
        if !matches!(access, Access::Running) {
            return Ok(());
        }
        let current = self.current()?;
        let path = current
            .current
            .as_deref()
            .map(|c| tree.path_to_root(c))
            .unwrap_or_default();
        if path.iter().any(|m| m.id == id) {
            return Err(refused(format!(
                "{} is running on snapshot `{}` or one of its children: its disk layers are open in the VM, so only its VM process can delete it (PUT /vm/snapshots/delete)",
                self.vm.name,
                tree.nodes.get(id).map_or(id, |m| m.name.as_str()),
            )));
        }
        Ok(())
    }

    /// The files the running VM has open: the current snapshot's layers
    /// and those of its ancestors, and its current tops.
    pub(super) fn in_use(&self, tree: &Tree) -> Result<Vec<PathBuf>, SnapshotError> {
        let current = self.current()?;
        let mut files = self.tops(&self.vm.config()?);
        if let Some(c) = current.current.as_deref() {
            for m in tree.path_to_root(c) {
                files.extend(m.disks.iter().map(|l| l.path.clone()));
            }
        }
        Ok(files)
    }

    /// The steps of a delete, each idempotent (a recovery runs them again):
    /// rebase what is backed by the deleted layers, re-parent the
    /// children, move "current" up, remove the metadata, then the layers.
    pub(super) fn finish_delete(
        &self,
        access: &Access,
        id: &str,
        parent: Option<&str>,
        deleted: &[FrozenLayer],
    ) -> Result<(), SnapshotError> {
        let tree = self.tree()?;
        let current = self.current()?;
        self.check_not_open(access, &tree, id)?;
        // Every layer that may be backed by a deleted one, with its format
        // (a raw base is never read as an image header).
        let mut candidates: Vec<(PathBuf, Option<block::Format>)> = tree
            .nodes
            .values()
            .filter(|m| m.id != id)
            .flat_map(|m| m.disks.iter().map(|l| (l.path.clone(), l.format)))
            .collect();
        // The tops are backed by the deleted layers when it is current; a
        // VM run by another process has them open (and is refused above).
        if !matches!(access, Access::Running) {
            let config = self.vm.config()?;
            candidates.extend(
                self.tops(&config)
                    .into_iter()
                    .zip(config.disks.iter().map(|d| d.format)),
            );
        }
        let in_use = if access.running() {
            self.in_use(&tree)?
        } else {
            Vec::new()
        };
        // Rebases of open layers, done with the VM's disks closed.
        let mut closed_work: Vec<Rebase> = Vec::new();
        candidates.sort_by(|a, b| a.0.cmp(&b.0));
        candidates.dedup_by(|a, b| a.0 == b.0);
        for layer in deleted.iter().filter(|l| l.removable) {
            if !layer.path.exists() {
                continue;
            }
            let below = layers::backing_known(&layer.path, layer.format)?;
            for (d, format) in &candidates {
                if !d.exists()
                    || layers::backing_known(d, *format)?.map(|(p, _)| p).as_ref()
                        != Some(&layer.path)
                {
                    continue;
                }
                if !in_use.contains(d) {
                    layers::rebase_past(d, below.as_ref().map(|(p, f)| (p.as_path(), *f)))?;
                } else if let Access::Served(_) = access {
                    closed_work.push((d.clone(), below.clone()));
                } else {
                    return Err(refused(format!(
                        "{} is open in the running VM {}; stop it to finish deleting the snapshot",
                        d.display(),
                        self.vm.name
                    )));
                }
            }
        }
        if let (Access::Served(control), false) = (access, closed_work.is_empty()) {
            self.rebase_closed(control, closed_work)?;
        }
        for child in tree.children(Some(id)) {
            let mut c = child.clone();
            c.parent = parent.map(str::to_string);
            self.write_meta(&c)?;
        }
        if current.current.as_deref() == Some(id) {
            self.set_current(&Current {
                current: parent.map(str::to_string),
                resume: None,
            })?;
        }
        self.remove_node(id)?;
        let disks = self.disks_dir()?;
        // Only hostvisor's own overlays are removed (the metadata could
        // name any file).
        for layer in deleted.iter().filter(|l| l.removable) {
            if layer.path.parent() == Some(disks.as_path()) {
                layers::remove_if_present(&layer.path)?;
            }
        }
        meta::sync_dir(&disks).map_err(|e| SnapshotError::io(&disks, e))
    }
}

/// A layer to rebase past its backing file, onto what lies below that.
type Rebase = (PathBuf, Option<(PathBuf, Option<block::Format>)>);

impl Snapshots {
    /// Rebases layers the running VM has open: the VMM pauses, closes its
    /// disks, runs the rebases, reopens them (their chains one layer
    /// shorter, reading the same) and resumes. Each rebase is safe
    /// against a kill (the image reads as before until its header names
    /// the new backing file) and is simply run again by recovery.
    fn rebase_closed(
        &self,
        control: &vmm::control::VmControl,
        work: Vec<Rebase>,
    ) -> Result<(), SnapshotError> {
        let job = vmm::reopen::DiskJob::new(move || {
            for (d, below) in &work {
                layers::rebase_past(d, below.as_ref().map(|(p, f)| (p.as_path(), *f)))
                    .map_err(|e| vmm::error_chain(&e))?;
            }
            Ok(())
        });
        control
            .request(vmm::control::ControlRequest::WithDisksClosed(job))
            .map(|_| ())
            .map_err(|e| {
                refused(format!(
                    "{}: merging the snapshot's layer into the disks the VM has open failed: {e}",
                    self.vm.name
                ))
            })
    }
}

/// The other VMs whose disks are backed by a file in `vm`'s directory:
/// its linked clones (which deleting `vm` would break).
pub fn linked_clones_of(vm: &VmDir) -> Vec<String> {
    let ours = absolute(&vm.dir);
    let mut out = Vec::new();
    for other in VmDir::all().unwrap_or_default() {
        if other.name == vm.name {
            continue;
        }
        let Ok(config) = other.config() else { continue };
        let uses = config.disks.iter().any(|d| {
            layers::chain(&absolute(&d.path), d.format)
                .iter()
                .any(|p| p.starts_with(&ours))
        });
        if uses {
            out.push(other.name);
        }
    }
    out
}
