//! Reading a machine's state out (while it runs, paused) and writing it
//! back (into a machine built for the snapshot, before it runs).

use std::path::Path;
use std::time::Duration;

use hypervisor::{GuestMemoryMmap, Vcpu, Vm};

use crate::builder::{DiskHandle, LegacyDevices, VirtioMmio};
use crate::shared::{GateJob, PauseGate};
use crate::snapshot::{
    now_unix_ms, prepare_dir, DeviceStates, SnapshotError, SnapshotRequest, VmSnapshot,
    MEMORY_FILE, STATE_FILE,
};

/// How long parked vCPUs get to hand over their state.
const VCPU_SAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a machine was built from, which a snapshot records.
#[derive(Debug, Clone)]
pub struct Described {
    pub config: crate::config::VmConfig,
    pub macs: Vec<net::MacAddr>,
}

/// The parts of a running machine a save reads.
pub(crate) struct SaveContext<'a> {
    pub vm: &'a dyn Vm,
    pub mem: &'a GuestMemoryMmap,
    pub legacy: &'a LegacyDevices,
    pub virtio: &'a VirtioMmio,
    pub described: Option<&'a Described>,
    /// The machine's disks (their current images).
    pub disks: &'a std::sync::Mutex<Vec<DiskHandle>>,
    pub gate: &'a PauseGate,
    /// The vCPUs parked at the gate.
    pub vcpus: usize,
    /// The guest's clock when it was paused.
    pub clock: u64,
}

/// Saves the paused machine into `request.dir`. Devices are put to sleep
/// for the save (if they are not) and, with `wake`, woken after it,
/// whatever happened.
pub(crate) fn save(
    ctx: &SaveContext<'_>,
    request: &SnapshotRequest,
    wake: bool,
) -> Result<(), SnapshotError> {
    let described = ctx.described.ok_or_else(|| {
        SnapshotError::Save("this machine was not built from a VM configuration".into())
    })?;
    let mut disks = ctx
        .disks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // The disks as they are now (an earlier snapshot may have moved them
    // onto overlays).
    let mut config = described.config.clone();
    config.disks = disks.iter().map(|d| d.config.clone()).collect();
    let config = &config;
    let writable = config.disks.iter().filter(|d| !d.readonly).count();
    if request.overlays.is_empty() && writable > 0 {
        return Err(SnapshotError::NeedsOverlays(writable));
    }
    // One overlay per disk, or one per writable disk (read-only disks do
    // not change, so they need none).
    let every_disk = request.overlays.len() == config.disks.len();
    if !every_disk && request.overlays.len() != writable {
        return Err(SnapshotError::OverlayCount {
            given: request.overlays.len(),
            disks: config.disks.len(),
            writable,
        });
    }
    if let Some(taken) = request.overlays.iter().find(|o| o.exists()) {
        return Err(SnapshotError::DirNotEmpty(taken.clone()));
    }
    let recorded = crate::snapshot::recorded_config(config)?;
    prepare_dir(&request.dir)?;
    ctx.virtio.sleep_all().map_err(SnapshotError::Save)?;
    let saved = save_asleep(ctx, described, recorded, &request.dir);
    let swapped = saved.and_then(|()| {
        disks
            .iter_mut()
            .filter(|d| every_disk || !d.config.readonly)
            .zip(&request.overlays)
            .try_for_each(|(disk, overlay)| disk.switch_to_overlay(overlay))
            .map_err(SnapshotError::Save)
    });
    if swapped.is_err() {
        // A failed save, or a disk the snapshot names that would change
        // under it: no partial snapshot is left behind.
        let _ = std::fs::remove_file(request.dir.join(STATE_FILE));
        let _ = std::fs::remove_file(request.dir.join(MEMORY_FILE));
    }
    let woken = if wake {
        ctx.virtio.wake_all().map_err(SnapshotError::Save)
    } else {
        Ok(())
    };
    swapped.and(woken)
}

fn save_asleep(
    ctx: &SaveContext<'_>,
    described: &Described,
    config: crate::config::VmConfig,
    dir: &Path,
) -> Result<(), SnapshotError> {
    let mut answers = ctx
        .gate
        .run_job(GateJob::SaveState, ctx.vcpus, VCPU_SAVE_TIMEOUT)
        .ok_or_else(|| SnapshotError::Save("the vCPUs did not hand over their state".into()))?;
    answers.sort_by_key(|a| a.vcpu);
    let vcpus = answers
        .into_iter()
        .map(|a| {
            a.state
                .map(|s| *s)
                .map_err(|e| SnapshotError::Save(format!("vCPU {}: {e}", a.vcpu)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The clock as it stood when the guest was paused: a restored guest
    // continues from there.
    ctx.vm
        .set_clock(ctx.clock)
        .map_err(|e| SnapshotError::Save(crate::error::error_chain(&e)))?;
    let vm = ctx
        .vm
        .save_state()
        .map_err(|e| SnapshotError::Save(crate::error::error_chain(&e)))?;
    let transports = ctx.virtio.save_all().map_err(SnapshotError::Save)?;
    let devices = DeviceStates {
        legacy: ctx.legacy.save(),
        virtio: transports.mmio,
        virtio_pci: transports.pci,
    };
    let memory_ranges = memory_ranges(ctx.mem);
    snapshot::memory::save(ctx.mem, &dir.join(MEMORY_FILE))?;
    let document = VmSnapshot {
        writer: format!("hostvisor {}", env!("CARGO_PKG_VERSION")),
        created_unix_ms: now_unix_ms(),
        config,
        macs: described.macs.iter().map(ToString::to_string).collect(),
        memory_ranges,
        vm,
        vcpus,
        devices,
    };
    // Last: a directory with a state file is a whole snapshot.
    snapshot::format::write_file(&dir.join(STATE_FILE), &document)?;
    Ok(())
}

/// Guest RAM's `(address, length)` ranges.
pub(crate) fn memory_ranges(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

/// Puts `snap`'s state into a machine built for it (same configuration,
/// RAM mapped from the snapshot's memory file, legacy devices made from
/// their states), before it runs: the VM's, each vCPU's, each virtio
/// device's.
pub(crate) fn restore(
    vm: &dyn Vm,
    vcpus: &mut [Box<dyn Vcpu>],
    virtio: &VirtioMmio,
    snap: &VmSnapshot,
) -> Result<(), SnapshotError> {
    let fail =
        |e: hypervisor::HypervisorError| SnapshotError::Restore(crate::error::error_chain(&e));
    if vcpus.len() != snap.vcpus.len() {
        return Err(SnapshotError::Mismatch(format!(
            "{} vCPU states for {} vCPUs",
            snap.vcpus.len(),
            vcpus.len()
        )));
    }
    vm.restore_state(&snap.vm).map_err(fail)?;
    for (vcpu, state) in vcpus.iter_mut().zip(&snap.vcpus) {
        vcpu.restore_state(state).map_err(fail)?;
    }
    virtio
        .restore_all(&snap.devices.virtio, &snap.devices.virtio_pci)
        .map_err(SnapshotError::Restore)?;
    Ok(())
}
