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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::DiskConfig;
    use block::DiskImage;

    fn image(path: &std::path::Path, backing: Option<&std::path::Path>) {
        block::tools::create(&block::tools::CreateSpec {
            path: path.to_path_buf(),
            size: Some(1 << 20),
            format: block::Format::Qcow2,
            backing: backing.map(|b| b.display().to_string()),
            backing_format: backing.map(|_| block::Format::Qcow2),
            cluster_size: None,
        })
        .unwrap();
    }

    fn disk(path: &std::path::Path) -> DiskHandle {
        let config = DiskConfig {
            path: path.to_path_buf(),
            readonly: false,
            cache: block::CacheMode::default(),
            format: Some(block::Format::Qcow2),
            iops: None,
            bps: None,
        };
        let opened = open_disk(path, &config).unwrap();
        DiskHandle {
            image: Arc::new(block::switchable::Switchable::new(opened)),
            config,
        }
    }

    fn read(d: &DiskHandle, offset: u64) -> u8 {
        let mut b = [0u8; 1];
        d.image.read_at(&mut b, offset).unwrap();
        b[0]
    }

    /// The layer below an open disk's top is taken out of its chain while
    /// the disks are closed (the rebase needs the top's lock): the disks
    /// read the same afterwards and take writes; a failing job leaves them
    /// open on their images too, and its error is the answer.
    #[test]
    fn open_disks_are_closed_around_a_job_and_read_the_same() {
        let dir = std::env::temp_dir().join(format!("hv-reopen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (base, mid, top, other) = (
            dir.join("base.qcow2"),
            dir.join("mid.qcow2"),
            dir.join("top.qcow2"),
            dir.join("other.qcow2"),
        );
        image(&base, None);
        image(&other, None);
        {
            let b = open_disk(&base, &disk_config(&base)).unwrap();
            b.write_at(&[0xb0], 0).unwrap();
            b.flush().unwrap();
        }
        image(&mid, Some(&base));
        {
            let m = open_disk(&mid, &disk_config(&mid)).unwrap();
            m.write_at(&[0x11], 65536).unwrap();
            m.flush().unwrap();
        }
        image(&top, Some(&mid));
        let disks = [disk(&top), disk(&other)];
        disks[0].image.write_at(&[0x22], 131072).unwrap();
        disks[1].image.write_at(&[0x33], 0).unwrap();
        // The top is open for writing: a rebase from outside is refused.
        let mut quiet = |_: u64, _: u64| {};
        let base_name = base.display().to_string();
        assert!(block::tools::rebase_past_backing(
            &top,
            Some(&base_name),
            Some(block::Format::Qcow2),
            &mut quiet
        )
        .is_err());

        let (t, b) = (top.clone(), base_name.clone());
        let job = DiskJob::new(move || {
            let mut quiet = |_: u64, _: u64| {};
            block::tools::rebase_past_backing(&t, Some(&b), Some(block::Format::Qcow2), &mut quiet)
                .map_err(|e| e.to_string())
        });
        run_closed(&disks, &job).unwrap();
        assert_eq!(
            block::tools::backing_of(&top).unwrap().unwrap().0,
            base_name
        );
        std::fs::remove_file(&mid).unwrap();
        assert_eq!(
            [
                read(&disks[0], 0),
                read(&disks[0], 65536),
                read(&disks[0], 131072)
            ],
            [0xb0, 0x11, 0x22]
        );
        assert_eq!(read(&disks[1], 0), 0x33);
        disks[0].image.write_at(&[0x44], 4096).unwrap();
        assert_eq!(read(&disks[0], 4096), 0x44);

        let failing = DiskJob::new(|| Err("no space left".to_string()));
        assert_eq!(
            run_closed(&disks, &failing),
            Err("no space left".to_string())
        );
        assert_eq!(read(&disks[0], 65536), 0x11);
        disks[1].image.write_at(&[0x55], 0).unwrap();
        assert_eq!(read(&disks[1], 0), 0x55);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn disk_config(path: &std::path::Path) -> DiskConfig {
        DiskConfig {
            path: path.to_path_buf(),
            readonly: false,
            cache: block::CacheMode::default(),
            format: Some(block::Format::Qcow2),
            iops: None,
            bps: None,
        }
    }
}
