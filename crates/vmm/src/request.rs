//! What a controller (the API) asks of a running VM and what it gets
//! back.

use std::sync::atomic::Ordering;

use crate::shared::VcpuStats;

/// What a controller can ask of a running VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlRequest {
    /// Stop the vCPUs (and the guest's clock) until `Resume`.
    Pause,
    Resume,
    /// End the VM now, as a power cut would.
    Kill,
    /// A status snapshot.
    Info,
    /// Press the ACPI power button (`pc` machines): the guest's OS shuts
    /// down cleanly, as after a short press on a PC.
    PowerButton,
    /// Save the VM's whole state into a snapshot directory (pausing it
    /// for the time of the save if it runs).
    Snapshot(crate::snapshot::SnapshotRequest),
    /// Pause (if it runs), close every disk's image, run the job on the
    /// files, reopen them and resume: the guest sees a pause only.
    WithDisksClosed(crate::reopen::DiskJob),
}

impl ControlRequest {
    /// How long a controller waits for the answer: a snapshot writes all
    /// of guest RAM.
    pub fn timeout(&self) -> std::time::Duration {
        match self {
            ControlRequest::Snapshot(_) | ControlRequest::WithDisksClosed(_) => {
                std::time::Duration::from_secs(600)
            }
            _ => std::time::Duration::from_secs(30),
        }
    }
}

/// The VM's run state as controllers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
}

/// vCPU exit counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VcpuCounters {
    pub exits: u64,
    pub pio_exits: u64,
    pub mmio_exits: u64,
    pub unhandled_accesses: u64,
    /// Instructions hostvisor completed for KVM, by kind.
    pub assists: std::collections::BTreeMap<String, u64>,
}

impl VcpuCounters {
    pub fn from_stats(stats: &VcpuStats) -> Self {
        VcpuCounters {
            exits: stats.exits.load(Ordering::Relaxed),
            pio_exits: stats.pio_exits.load(Ordering::Relaxed),
            mmio_exits: stats.mmio_exits.load(Ordering::Relaxed),
            unhandled_accesses: stats.unhandled_accesses.load(Ordering::Relaxed),
            assists: stats
                .assist_counts()
                .into_iter()
                .map(|(name, n)| (name.to_string(), n))
                .collect(),
        }
    }
}

/// A device as `GET /vm` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// virtio device type: block, console, rng.
    pub kind: String,
    pub mmio_base: u64,
    pub irq: u32,
    /// Interrupts the device has raised.
    pub interrupts: u64,
}

/// The status snapshot answering [`ControlRequest::Info`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VmStatus {
    pub state: RunState,
    /// Since this boot of the machine (a restart resets it).
    pub uptime_ms: u64,
    /// Time spent paused during this boot.
    pub paused_ms: u64,
    pub vcpus: u32,
    pub memory: u64,
    pub counters: VcpuCounters,
    pub devices: Vec<DeviceInfo>,
    /// The balloon's figures, when the VM has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balloon: Option<devices::virtio::balloon::BalloonStatus>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The request does not fit the VM's state (pausing a paused VM).
    #[error("{0}")]
    Conflict(String),
    /// The VM is not running (between a reset and the next boot, or gone).
    #[error("the VM is not running")]
    NotRunning,
    #[error("{0}")]
    Failed(String),
    /// The guest did not do its part in time (it does not read its
    /// console, or is paused).
    #[error("{0}")]
    Timeout(String),
}

pub type ControlReply = Result<Option<VmStatus>, ControlError>;
