//! virtio-vsock: stream sockets between guest programs and host programs,
//! the host side exposed as Unix sockets (see [`muxer`]).

pub mod connection;
pub mod muxer;
pub mod packet;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

use super::worker::WorkerThread;
use super::{read_config_bytes, ActivateError, Activation, VirtioDevice};
use muxer::{Guest, Muxer, VsockStats};

/// rx, tx, event.
const QUEUE_SIZES: [u16; 3] = [256, 256, 16];

/// The lowest CID a guest can have (0–2 are the hypervisor, local and the
/// host).
pub const MIN_GUEST_CID: u64 = 3;

/// Why a vsock device cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (use 3 or above, below 2^32 - 1)")]
    Cid(u64),
    #[error("{0}: a program is listening on this socket already")]
    InUse(PathBuf),
    #[error("{path}: cannot listen")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    stats: Arc<VsockStats>,
    worker: Option<WorkerThread>,
}

impl Vsock {
    /// A device for the guest `guest_cid` whose host side listens at
    /// `path`. A socket file left there by a process that is gone is
    /// replaced; one that is still served is not.
    pub fn new(guest_cid: u64, path: &Path) -> Result<Self, VsockError> {
        if !(MIN_GUEST_CID..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::Cid(guest_cid));
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(VsockError::InUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|source| VsockError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Vsock {
            guest_cid,
            path: path.to_path_buf(),
            listener,
            stats: Arc::default(),
            worker: None,
        })
    }

    pub fn stats(&self) -> Arc<VsockStats> {
        self.stats.clone()
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.worker = None;
        let _ = std::fs::remove_file(&self.path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }
    fn name(&self) -> &'static str {
        "vsock"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let (mem, interrupt, [(rx, rx_evt), (tx, tx_evt), (_, ev_evt)]) = a.take_queues::<3>()?;
        let listener = self.listener.try_clone().map_err(ActivateError::Event)?;
        let guest = Guest {
            mem,
            interrupt,
            rx,
            tx,
        };
        let muxer = Muxer::new(
            self.guest_cid,
            &self.path,
            listener,
            guest,
            self.stats.clone(),
        )
        .map_err(ActivateError::Event)?;
        let worker = WorkerThread::spawn("virtio-vsock", move |kill| {
            muxer.run([rx_evt, tx_evt, ev_evt], kill)
        })
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the muxer closes every connection's host socket.
        self.worker = None;
    }
}

#[cfg(test)]
// Test lengths, indices and byte patterns are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests;
