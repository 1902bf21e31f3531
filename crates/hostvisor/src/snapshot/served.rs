//! The managed-snapshot operations on the per-VM API (`/vm/snapshots...`),
//! carried out by the VM's own process with the same code the CLI runs on
//! a stopped VM. The VMM is called directly ([`Access::Served`]): the API
//! server never waits on its own socket. The CLI sends these requests when
//! the VM runs, so there is one implementation of each operation.
//!
//! Restoring a running VM happens in place: the machine is killed, the
//! files are restored, and the process's run loop ([`Relaunch`]) starts a
//! new machine from the snapshot's running state — or ends, powered off,
//! when the snapshot was taken with the VM stopped.

use std::path::PathBuf;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use api::ApiError;
use serde_json::Value;
use vmm::control::{ControlRequest, VmControl};

use super::meta::{Current, SnapshotMeta};
use super::{layers, Access, SnapshotError, Snapshots};
use crate::store::VmDir;

/// How long an API request waits for another snapshot operation to end.
const LOCK_WAIT: Duration = Duration::from_secs(10);

fn api_error(e: SnapshotError) -> ApiError {
    match e {
        SnapshotError::Refused(m) => ApiError::conflict(m),
        e => ApiError::internal(vmm::error_chain(&e)),
    }
}

fn no_such(vm: &VmDir, key: &str) -> ApiError {
    ApiError::new(404, format!("{} has no snapshot named `{key}`", vm.name))
}

/// The snapshot lock, with an interrupted operation finished first.
fn enter(vm: &VmDir, access: &Access) -> Result<Snapshots, ApiError> {
    let snaps = Snapshots::lock_within(vm, LOCK_WAIT).map_err(api_error)?;
    snaps.recover(access).map_err(api_error)?;
    Ok(snaps)
}

/// Host bytes of a snapshot's own files now (layers grow when a
/// neighbour is deleted).
pub fn size_of(snaps: &Snapshots, m: &SnapshotMeta) -> u64 {
    m.disks
        .iter()
        .filter(|l| l.removable)
        .map(|l| layers::allocated(&l.path))
        .sum::<u64>()
        + layers::allocated_dir(&snaps.state_dir(&m.id))
}

/// One snapshot as `list` shows it.
pub fn snapshot_json(snaps: &Snapshots, m: &SnapshotMeta, current: &Current) -> Value {
    serde_json::json!({
        "id": m.id,
        "name": m.name,
        "parent": m.parent,
        "created": m.created,
        "description": m.description,
        "saved_state": m.saved_state,
        "size": size_of(snaps, m),
        "current": current.current.as_deref() == Some(m.id.as_str()),
        "disks": m.disks,
    })
}

/// The tree as `snapshot list --json` and `GET /vm/snapshots` give it.
pub fn list_json(snaps: &Snapshots) -> Result<Value, SnapshotError> {
    let tree = snaps.tree()?;
    let current = snaps.current()?;
    let mut list: Vec<&SnapshotMeta> = tree.nodes.values().collect();
    list.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
    let rows: Vec<Value> = list
        .iter()
        .map(|m| snapshot_json(snaps, m, &current))
        .collect();
    Ok(serde_json::json!({
        "vm": snaps.vm.name,
        "current": current.current,
        "resume_pending": current.resume.is_some(),
        "snapshots": rows,
    }))
}

/// `GET /vm/snapshots`.
pub fn list(vm: &VmDir, control: &VmControl) -> Result<Value, ApiError> {
    let snaps = enter(vm, &Access::Served(control.clone()))?;
    list_json(&snaps).map_err(api_error)
}

/// `PUT /vm/snapshots/take`: the new snapshot, as `list` shows it.
pub fn take(
    vm: &VmDir,
    control: &VmControl,
    name: Option<String>,
    description: String,
) -> Result<Value, ApiError> {
    let access = Access::Served(control.clone());
    let snaps = enter(vm, &access)?;
    let m = snaps.take(&access, name, description).map_err(api_error)?;
    let current = snaps.current().map_err(api_error)?;
    Ok(snapshot_json(&snaps, &m, &current))
}

/// `PUT /vm/snapshots/delete`, whichever snapshot it is (the VM pauses
/// while the layers it has open are merged).
pub fn delete(vm: &VmDir, control: &VmControl, key: &str) -> Result<(), ApiError> {
    let access = Access::Served(control.clone());
    let snaps = enter(vm, &access)?;
    let tree = snaps.tree().map_err(api_error)?;
    let m = tree.find(key).ok_or_else(|| no_such(vm, key))?.clone();
    snaps.delete(&access, &m).map_err(api_error)
}

/// What the VM process does once its machine has ended for a restore.
#[derive(Debug)]
pub enum Next {
    /// Run again: the definition as restored, resuming the saved state in
    /// the directory given (a snapshot with a running state).
    Run(Option<PathBuf>),
    /// End: the snapshot was taken with the VM stopped (VirtualBox powers
    /// the VM off when it restores such a snapshot), or the restore failed.
    Exit,
}

#[derive(Debug, Default)]
enum Phase {
    #[default]
    Idle,
    /// A restore killed the machine and waits for the run loop.
    Asked,
    /// The machine has ended; the run loop waits for the restore.
    Ended,
    Decided(Next),
}

/// The hand-over between a restore (on an API thread) and the VM
/// process's run loop.
#[derive(Debug, Default)]
pub struct Relaunch {
    phase: Mutex<Phase>,
    changed: Condvar,
}

impl Relaunch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Called by the run loop when a machine has ended: `None` when no
    /// restore asked for it (the VM process ends), else what to do next,
    /// once the restore says.
    pub fn after_run(&self) -> Option<Next> {
        let mut phase = self.lock();
        if !matches!(*phase, Phase::Asked) {
            return None;
        }
        *phase = Phase::Ended;
        self.changed.notify_all();
        loop {
            match std::mem::take(&mut *phase) {
                Phase::Decided(next) => return Some(next),
                other => *phase = other,
            }
            phase = self
                .changed
                .wait(phase)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Asks for the machine to end (the caller then kills it) and waits
    /// until the run loop has it ended.
    fn end_machine(&self, control: &VmControl) -> Result<(), ApiError> {
        {
            let mut phase = self.lock();
            if !matches!(*phase, Phase::Idle) {
                return Err(ApiError::conflict("a restore is already under way"));
            }
            *phase = Phase::Asked;
        }
        // A machine that ends on its own meanwhile does as well.
        let _ = control.request(ControlRequest::Kill);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut phase = self.lock();
        while !matches!(*phase, Phase::Ended) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                *phase = Phase::Idle;
                return Err(ApiError::internal("the VM did not end for the restore"));
            }
            phase = self
                .changed
                .wait_timeout(phase, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        Ok(())
    }

    fn decide(&self, next: Next) {
        *self.lock() = Phase::Decided(next);
        self.changed.notify_all();
    }
}

/// `PUT /vm/snapshots/restore`: the running VM goes on from the
/// snapshot's running state (or ends, powered off, when the snapshot has
/// none). Answers `{"snapshot", "state": "running"|"stopped"}` once the
/// new machine runs.
pub fn restore(
    vm: &VmDir,
    control: &VmControl,
    relaunch: &Relaunch,
    key: &str,
) -> Result<Value, ApiError> {
    let snaps = enter(vm, &Access::Served(control.clone()))?;
    let tree = snaps.tree().map_err(api_error)?;
    let m = tree.find(key).ok_or_else(|| no_such(vm, key))?.clone();
    // Refuse before the VM is touched.
    snaps.check_restorable(&m).map_err(api_error)?;
    relaunch.end_machine(control)?;
    let restored = snaps.restore(&m).and_then(|()| {
        // The process resumes the state now: the resume mark is used.
        let mut c = snaps.current()?;
        let resume = c.resume.take().map(|r| r.state_dir);
        snaps.set_current(&c)?;
        Ok(resume)
    });
    drop(snaps);
    let resume = match restored {
        Ok(resume) => resume,
        Err(e) => {
            relaunch.decide(Next::Exit);
            return Err(api_error(e));
        }
    };
    let state = if let Some(dir) = resume {
        relaunch.decide(Next::Run(Some(dir)));
        // Answer once the new machine takes requests.
        let deadline = Instant::now() + Duration::from_secs(60);
        while control.request(ControlRequest::Info).is_err() {
            if Instant::now() > deadline {
                return Err(ApiError::internal(
                    "the VM did not come back from the snapshot within 60 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        "running"
    } else {
        relaunch.decide(Next::Exit);
        "stopped"
    };
    Ok(serde_json::json!({ "snapshot": m.name, "id": m.id, "state": state }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine that ends with no restore asking ends the process; one a
    /// restore ended waits for the restore's word and gets it; a second
    /// restore meanwhile is refused.
    #[test]
    fn the_run_loop_waits_for_the_restore_that_ended_its_machine() {
        let relaunch = std::sync::Arc::new(Relaunch::default());
        assert!(relaunch.after_run().is_none());
        let control = VmControl::new();
        let run_loop = {
            let relaunch = relaunch.clone();
            std::thread::spawn(move || loop {
                // The machine "ends" once asked (the kill).
                if let Some(next) = relaunch.after_run() {
                    return next;
                }
                std::thread::sleep(Duration::from_millis(5));
            })
        };
        relaunch.end_machine(&control).expect("the machine ends");
        let again = relaunch.end_machine(&control).unwrap_err();
        assert_eq!(again.status, 409);
        relaunch.decide(Next::Run(Some(PathBuf::from("/state"))));
        match run_loop.join().expect("the run loop") {
            Next::Run(Some(dir)) => assert_eq!(dir, PathBuf::from("/state")),
            other => panic!("{other:?}"),
        }
        // Idle again: the next machine's end is the process's.
        assert!(relaunch.after_run().is_none());
    }
}
