//! Work on a running VM's disk files that needs them closed: deleting a
//! managed snapshot the VM stands on rebases the layers of its disks'
//! backing chains, which the VMM holds open (and caches). The machine is
//! paused with its devices asleep, every disk's image is flushed and
//! closed, the job runs, and the disks are opened again on the same paths
//! (their chains as the job left them); the guest sees a pause only.

use std::sync::Arc;

use crate::builder::{open_disk, DiskHandle};

type Job = dyn Fn() -> Result<(), String> + Send + Sync;

/// A job to run on the disk files while every disk is closed
/// ([`crate::control::ControlRequest::WithDisksClosed`]). It must leave
/// each disk's image reading exactly as before (a safe rebase does).
#[derive(Clone)]
pub struct DiskJob(Arc<Job>);

impl DiskJob {
    pub fn new(job: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Self {
        DiskJob(Arc::new(job))
    }
}

impl std::fmt::Debug for DiskJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiskJob")
    }
}

impl PartialEq for DiskJob {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for DiskJob {}

/// Closes every disk in `disks` (the devices asleep), runs `job`, and
/// opens them again. Whatever the job did, each disk is reopened on its
/// path; when the job fails its error is returned (after the reopen).
pub(crate) fn run_closed(disks: &[DiskHandle], job: &DiskJob) -> Result<(), String> {
    // Each disk is closed inside the previous one's switch, so that all
    // are closed when the job runs, and each is reopened as the switches
    // unwind (a failure anywhere reopens the old image: the same path).
    let Some((disk, rest)) = disks.split_first() else {
        return (job.0)();
    };
    let job_error = std::cell::RefCell::new(None);
    let switched = disk.image.switch(
        || {
            if let Err(e) = run_closed(rest, job) {
                *job_error.borrow_mut() = Some(e.clone());
                return Err(std::io::Error::other(e));
            }
            open_disk(&disk.config.path, &disk.config).map_err(std::io::Error::other)
        },
        || open_disk(&disk.config.path, &disk.config).map_err(std::io::Error::other),
    );
    match (switched, job_error.into_inner()) {
        (_, Some(e)) => Err(e),
        (Err(e), None) => Err(format!(
            "cannot reopen the disk {}: {e}",
            disk.config.path.display()
        )),
        (Ok(()), None) => Ok(()),
    }
}
