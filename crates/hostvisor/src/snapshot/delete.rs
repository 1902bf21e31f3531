//! `snapshot delete`: the layers backed by the deleted snapshot's are
//! rebased onto its backing file (safe rebase: what they read stays), the
//! children move up, then its files go; refused while a linked clone or
//! the running VM uses its layers.

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

    /// Refuses to delete, while the VM runs, the snapshot it stands on or
    /// one of that one's ancestors: their layers are open in the VMM.
    fn check_not_open(&self, access: &Access, tree: &Tree, id: &str) -> Result<(), SnapshotError> {
        if !access.running() {
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
                "{} is running on snapshot `{}` or one of its children: its disk layers are open in the VM, so it can be deleted only with the VM stopped (hostvisor stop {})",
                self.vm.name,
                tree.nodes.get(id).map_or(id, |m| m.name.as_str()),
                self.vm.name
            )));
        }
        Ok(())
    }

    /// The files the running VM has open: the current snapshot's layers
    /// and those of its ancestors.
    fn in_use(&self, tree: &Tree) -> Result<Vec<PathBuf>, SnapshotError> {
        let current = self.current()?;
        let mut files = Vec::new();
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
        let in_use = if access.running() {
            self.in_use(&tree)?
        } else {
            let config = self.vm.config()?;
            candidates.extend(
                self.tops(&config)
                    .into_iter()
                    .zip(config.disks.iter().map(|d| d.format)),
            );
            Vec::new()
        };
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
                if in_use.contains(d) {
                    return Err(refused(format!(
                        "{} is open in the running VM {}; stop it to finish deleting the snapshot",
                        d.display(),
                        self.vm.name
                    )));
                }
                layers::rebase_past(d, below.as_ref().map(|(p, f)| (p.as_path(), *f)))?;
            }
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
