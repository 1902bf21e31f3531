//! `snapshot take` and `snapshot restore` on the files (and, for a take
//! of a running VM, through its VMM), with their commit steps, which
//! recovery also runs.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use api::Client;

use super::meta::{self, Current, Fingerprint, FrozenLayer, Journal, ResumeMark, SnapshotMeta};
use super::{layers, refused, Access, SnapshotError, Snapshots};

impl Snapshots {
    /// After a take's commit point: the definition names the new tops, the
    /// snapshot is current.
    pub(crate) fn commit_take(&self, id: &str, new_tops: &[PathBuf]) -> Result<(), SnapshotError> {
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
    pub(crate) fn commit_restore(
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
    pub(crate) fn discard_tops(
        &self,
        old: &[PathBuf],
        new: &[PathBuf],
    ) -> Result<(), SnapshotError> {
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
            if let Err(e) = self.take_running(access, &id, &new_tops) {
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
    /// `state/` and switch each disk to its new overlay: directly when this
    /// is the VM's process, else over the per-VM API (`PUT /vm/snapshot`).
    fn take_running(
        &self,
        access: &Access,
        id: &str,
        new_tops: &[PathBuf],
    ) -> Result<(), SnapshotError> {
        let state = self.state_dir(id);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&state)
            .map_err(|e| SnapshotError::io(&state, e))?;
        if let Access::Served(control) = access {
            let request = vmm::control::ControlRequest::Snapshot(vmm::SnapshotRequest {
                dir: state,
                overlays: new_tops.to_vec(),
            });
            return control.request(request).map(|_| ()).map_err(|e| {
                refused(format!(
                    "{}: the VM could not take the snapshot: {e}",
                    self.vm.name
                ))
            });
        }
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
    pub(crate) fn check_restorable(&self, m: &SnapshotMeta) -> Result<(), SnapshotError> {
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
