//! Saving a running VM to a snapshot directory and building a machine
//! back from one.
//!
//! A snapshot directory holds two files: [`STATE_FILE`], the
//! [`VmSnapshot`] document in the `snapshot` crate's checksummed format
//! (the VM's configuration, the vCPUs', the VM's and every device's
//! state), and [`MEMORY_FILE`], guest RAM at fixed offsets with holes for
//! zero pages. The memory file is written first and the state file last,
//! so a directory with a state file is a whole snapshot.
//!
//! Saving happens with the vCPUs parked and the devices asleep (their
//! workers stopped, their queues handed back to the transports), so nothing
//! changes guest memory or device state while it is read.

use std::path::{Path, PathBuf};

use devices::virtio::mmio::persist::MmioTransportState;
use serde::{Deserialize, Serialize};
pub use snapshot::memory::Load;

use crate::config::VmConfig;

/// The state document's file name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The guest memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Everything needed to resume a VM, but its RAM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// The program that wrote it ("hostvisor 0.1.0").
    pub writer: String,
    /// When it was taken, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The VM's configuration at the time (disks as absolute paths).
    pub config: VmConfig,
    /// The NICs' addresses, in order (a VM run without `mac=` got its own).
    pub macs: Vec<String>,
    /// Guest RAM as `(guest address, bytes)` ranges, as the memory file
    /// holds them.
    pub memory_ranges: Vec<(u64, u64)>,
    pub vm: hypervisor::VmState,
    pub vcpus: Vec<hypervisor::VcpuState>,
    pub devices: DeviceStates,
}

/// The state of every device of the machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStates {
    pub legacy: LegacyStates,
    /// The virtio transports (each with its device's state), in the order
    /// of their windows.
    pub virtio: Vec<MmioTransportState>,
    /// The virtio-pci functions of a `pc` machine, in slot order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtio_pci: Vec<devices::virtio::pci::VirtioPciState>,
}

/// The PC's legacy devices. (The debug-exit port has no state.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LegacyStates {
    pub serial: devices::serial::SerialDeviceState,
    pub i8042: devices::i8042::I8042State,
    pub cmos: devices::cmos::CmosState,
    pub pci: devices::pci::PciRootState,
    /// The ACPI PM block of a `pc` machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acpi_pm: Option<devices::acpi_pm::AcpiPmState>,
}

/// What a snapshot request asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// Where to write the snapshot: a directory that does not exist yet or
    /// is empty.
    pub dir: PathBuf,
    /// For each disk, or for each writable disk, in order, a new qcow2
    /// overlay to create on top of the disk's image and to switch the disk
    /// to after saving, so that the image the snapshot names never changes
    /// again. (Read-only disks never change and need none, but a caller
    /// that layers every disk may give them one.)
    pub overlays: Vec<PathBuf>,
}

/// Where a restore comes from: the snapshot directory, read and checked
/// once ([`RestoreSpec::read`]) by whoever starts the restore, which
/// then takes its configuration (or checks its own against it) from
/// `snapshot`.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreSpec {
    pub dir: PathBuf,
    pub load: Load,
    /// The directory's state document.
    pub snapshot: VmSnapshot,
}

impl RestoreSpec {
    /// Reads the state document of the snapshot in `dir` (see
    /// [`VmSnapshot::read`]); guest RAM is mapped from its memory file,
    /// as `load` says, when the machine is built.
    pub fn read(dir: &Path, load: Load) -> Result<RestoreSpec, SnapshotError> {
        Ok(RestoreSpec {
            dir: dir.to_path_buf(),
            load,
            snapshot: VmSnapshot::read(dir)?,
        })
    }
}

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    File(#[from] snapshot::SnapshotError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} already exists (and is not an empty directory)")]
    DirNotEmpty(PathBuf),
    #[error("{0} is not a snapshot directory (it has no state file)")]
    NotASnapshot(PathBuf),
    #[error("the VM has writable disks: a snapshot must be given an overlay for each ({0} disks) so the images it names stay as they were")]
    NeedsOverlays(usize),
    #[error("{given} overlays given: the VM has {disks} disks, {writable} of them writable; give one per disk or one per writable disk")]
    OverlayCount {
        given: usize,
        disks: usize,
        writable: usize,
    },
    #[error("the snapshot does not fit this VM: {0}")]
    Mismatch(String),
    /// A path the state names that `restore_paths` refuses.
    #[error("{0}")]
    UntrustedPath(String),
    #[error("cannot save the VM: {0}")]
    Save(String),
    #[error("cannot restore the VM: {0}")]
    Restore(String),
}

impl VmSnapshot {
    /// Reads a snapshot directory's state document (checked: magic,
    /// version, checksum, shape).
    pub fn read(dir: &Path) -> Result<VmSnapshot, SnapshotError> {
        let path = dir.join(STATE_FILE);
        if !path.exists() {
            return Err(SnapshotError::NotASnapshot(dir.to_path_buf()));
        }
        let snap: VmSnapshot = snapshot::format::read_file(&path)?;
        snap.check_shape()?;
        Ok(snap)
    }

    /// The checks that need no machine: counts agree with the
    /// configuration.
    fn check_shape(&self) -> Result<(), SnapshotError> {
        let cpus = usize::try_from(self.config.cpus).unwrap_or(usize::MAX);
        if self.vcpus.len() != cpus {
            return Err(SnapshotError::Mismatch(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                self.config.cpus
            )));
        }
        if self.macs.len() != self.config.nets.len() {
            return Err(SnapshotError::Mismatch(format!(
                "{} MAC addresses for {} NICs",
                self.macs.len(),
                self.config.nets.len()
            )));
        }
        Ok(())
    }

    /// Refuses to restore this snapshot into a VM configured as `config`
    /// when the machine would differ (another VM's snapshot, or this VM
    /// changed since): vCPUs, RAM, and the devices.
    pub fn check_fits(&self, config: &VmConfig) -> Result<(), SnapshotError> {
        config_fits(&self.config, config)
    }
}

/// Whether a snapshot of a VM configured as `saved` can resume as a VM
/// configured as `config` (only what the machine's shape depends on: disk
/// paths, MACs, CIDs and the like may differ, as a clone's do).
fn config_fits(saved: &VmConfig, config: &VmConfig) -> Result<(), SnapshotError> {
    let mut diffs = Vec::new();
    if saved.cpus != config.cpus {
        diffs.push(format!("{} vCPUs, the VM has {}", saved.cpus, config.cpus));
    }
    if saved.memory != config.memory {
        diffs.push(format!(
            "{} of RAM, the VM has {}",
            saved.memory, config.memory
        ));
    }
    if saved.disks.len() != config.disks.len() {
        diffs.push(format!(
            "{} disks, the VM has {}",
            saved.disks.len(),
            config.disks.len()
        ));
    }
    if saved.nets.len() != config.nets.len() {
        diffs.push(format!(
            "{} NICs, the VM has {}",
            saved.nets.len(),
            config.nets.len()
        ));
    }
    if saved.rng != config.rng
        || saved.vsock.is_some() != config.vsock.is_some()
        || saved.console != config.console
        || saved.balloon.is_some() != config.balloon.is_some()
    {
        diffs.push("a different set of devices".to_string());
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(SnapshotError::Mismatch(diffs.join("; ")))
    }
}

/// Makes `dir` ready to receive a snapshot: created if missing, refused
/// if it holds anything.
pub(crate) fn prepare_dir(dir: &Path) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: dir.to_path_buf(),
        source,
    };
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(SnapshotError::DirNotEmpty(dir.to_path_buf()));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io)
        }
        Err(e) => Err(io(e)),
    }
}

/// The configuration as a snapshot records it: disk paths made absolute,
/// so the snapshot restores from any working directory.
pub(crate) fn recorded_config(config: &VmConfig) -> Result<VmConfig, SnapshotError> {
    let mut config = config.clone();
    for disk in &mut config.disks {
        disk.path = std::fs::canonicalize(&disk.path).map_err(|source| SnapshotError::Io {
            path: disk.path.clone(),
            source,
        })?;
    }
    Ok(config)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_vms_snapshot_does_not_fit() {
        let saved = VmConfig::new("/k");
        let mut clone = saved.clone();
        clone.append = Some("hostvisor.hostname=other".into());
        clone.kernel = "/elsewhere".into();
        config_fits(&saved, &clone).unwrap();
        let mut bigger = saved.clone();
        bigger.cpus = 2;
        bigger.memory = "1G".parse().unwrap();
        bigger.rng = true;
        let e = config_fits(&saved, &bigger).unwrap_err().to_string();
        assert!(
            e.contains("1 vCPUs, the VM has 2")
                && e.contains("of RAM, the VM has 1G")
                && e.contains("a different set of devices"),
            "{e}"
        );
        let mut disks = saved.clone();
        disks.disks.push("path=/d.qcow2".parse().unwrap());
        let e = config_fits(&saved, &disks).unwrap_err().to_string();
        assert!(e.contains("0 disks, the VM has 1"), "{e}");
    }
}
