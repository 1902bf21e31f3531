//! virtio-vsock: stream sockets between guest programs and host programs,
//! the host side exposed as Unix sockets (see [`muxer`]).

pub mod connection;
pub mod muxer;
pub mod packet;
pub mod persist;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

use virtio_queue::Queue;

use super::persist::OwnState;
use super::worker::{stop_worker, WorkerError, WorkerThread};
use super::{
    read_config_bytes, ActivateError, Activation, VirtioDevice, VirtioDeviceState, VirtioStateError,
};
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
    worker: Option<WorkerThread<Muxer>>,
    /// A sleeping device's muxer (without its queues): the connections
    /// survive a pause.
    sleeping: Option<Muxer>,
    /// Restored from a snapshot: the next activation tells the guest its
    /// connections are gone (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET).
    reset_on_activate: bool,
    /// Guest ports whose connections the muxer opens ahead of time.
    pool: Vec<u32>,
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
            sleeping: None,
            reset_on_activate: false,
            pool: Vec::new(),
        })
    }

    /// Keeps a connection to each of `ports` (at most
    /// [`MAX_POOL_PORTS`](muxer::MAX_POOL_PORTS)) open ahead of time, so a
    /// host program's `CONNECT` there is answered at once (see
    /// `muxer::pool`). Takes effect at the next activation.
    pub fn set_pool(&mut self, ports: &[u32]) {
        self.pool = ports.to_vec();
    }

    pub fn stats(&self) -> Arc<VsockStats> {
        self.stats.clone()
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.worker = None;
        self.sleeping = None;
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
        // A new driver: connections of an earlier one are gone.
        self.sleeping = None;
        self.start(a)
    }

    fn reset(&mut self) {
        // Dropping the muxer closes every connection's host socket.
        self.worker = None;
        self.sleeping = None;
    }

    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, WorkerError> {
        let Some(mut muxer) = stop_worker(&mut self.worker)? else {
            return Ok(None);
        };
        let queues = muxer.detach();
        self.sleeping = Some(muxer);
        Ok(Some(queues))
    }

    fn wake(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.start(a)
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Vsock(self.state())
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioStateError> {
        let s = persist::VsockState::own(state, self.name(), self.worker.is_some())?;
        self.restore(s)
    }
}

impl Vsock {
    /// Runs the muxer — a sleeping one with its connections, or a new one —
    /// on `a`'s queues.
    fn start(&mut self, a: Activation) -> Result<(), ActivateError> {
        let (mem, interrupt, [(rx, rx_evt), (tx, tx_evt), (events, ev_evt)]) =
            a.take_queues::<3>()?;
        let guest = Guest {
            mem,
            interrupt,
            rx,
            tx,
            events,
        };
        let mut muxer = match self.sleeping.take() {
            Some(mut muxer) => {
                muxer.attach(guest);
                muxer
            }
            None => {
                let listener = self.listener.try_clone().map_err(ActivateError::Event)?;
                Muxer::new(
                    self.guest_cid,
                    &self.path,
                    listener,
                    guest,
                    self.stats.clone(),
                )
                .map_err(ActivateError::Event)
                .map(|mut m| {
                    m.set_pool(&self.pool);
                    m
                })?
            }
        };
        if std::mem::take(&mut self.reset_on_activate) {
            muxer.request_transport_reset();
        }
        let worker = WorkerThread::spawn("virtio-vsock", move |kill| {
            if let Err(e) = muxer.run(&[rx_evt, tx_evt, ev_evt], &kill) {
                tracing::error!("virtio-vsock worker stopped: {e}");
            }
            muxer
        })
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }
}

#[cfg(test)]
// Test lengths, indices and byte patterns are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests;
