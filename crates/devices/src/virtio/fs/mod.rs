//! virtio-fs: a host directory shared with the guest, served in a device
//! thread by fuse-backend-rs's passthrough file system (crosvm's design:
//! no daemon, works without root, guest RAM needs no memfd).
//!
//! Queue 0 is the high-priority queue (FORGET, INTERRUPT), queue 1 the one
//! request queue; both are served by one worker, one request at a time.
//! Requests reach the FUSE server through [`bridge`] (fuse-backend-rs pins
//! older vm-memory/virtio-queue versions); what the server may do on the
//! host is [`sharefs`]'s business.
//!
//! Nothing FUSE-level crosses a snapshot: the server's inodes and open
//! handles are host file descriptors of the process that took it. A
//! restored device serves the share's root again, but every node ID and
//! handle the guest got before the snapshot is unknown to it (requests on
//! them fail with EBADF): the guest must mount the share again.

pub mod bridge;
pub mod persist;
pub mod sharefs;

use std::sync::Arc;

/// fuse-backend-rs's FUSE server (request decoding and dispatch).
pub use fuse_backend_rs::api::server::Server as FuseServer;
use fuse_backend_rs::api::server::Server;
use memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};

use self::bridge::{Bridge, Buffer, MAX_DESCRIPTORS};
pub use self::persist::FsState;
pub use self::sharefs::{Cache, ShareFs, ShareOptions};
use super::persist::OwnState;
use super::worker::{stop_worker, WorkerError, WorkerThread};
use super::{
    ActivateError, Activation, Interrupt, VirtioDevice, VirtioDeviceState, VirtioStateError,
};

/// VIRTIO_ID_FS.
pub const DEVICE_ID: u32 = 26;
/// The longest tag (the config space's `tag[36]`).
pub const TAG_MAX: usize = 36;
const QUEUE_SIZE: u16 = 1024;
const NUM_REQUEST_QUEUES: u32 = 1;

/// Why a share cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("the share tag {0:?} is empty, longer than {TAG_MAX} bytes or has a NUL")]
    Tag(String),
    #[error("cannot serve {path}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A virtio-fs device serving one host directory.
pub struct VirtioFs {
    tag: String,
    server: Arc<Server<ShareFs>>,
    worker: Option<WorkerThread<Vec<Queue>>>,
}

impl std::fmt::Debug for VirtioFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioFs")
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

/// Checks a tag as the config space carries it.
pub fn check_tag(tag: &str) -> Result<(), FsError> {
    if tag.is_empty() || tag.len() > TAG_MAX || tag.contains('\0') {
        return Err(FsError::Tag(tag.to_string()));
    }
    Ok(())
}

/// The FUSE server for the share at `root` (the device's, and the fuzz
/// target's).
pub fn share_server(
    root: &std::path::Path,
    opts: ShareOptions,
) -> Result<Arc<Server<ShareFs>>, FsError> {
    let fs = ShareFs::new(root, opts).map_err(|source| FsError::Open {
        path: root.to_path_buf(),
        source,
    })?;
    Ok(Arc::new(Server::new(fs)))
}

impl VirtioFs {
    /// Serves `root` under `tag`.
    pub fn new(tag: &str, root: &std::path::Path, opts: ShareOptions) -> Result<Self, FsError> {
        check_tag(tag)?;
        Ok(VirtioFs {
            tag: tag.to_string(),
            server: share_server(root, opts)?,
            worker: None,
        })
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    fn config(&self) -> [u8; 40] {
        let mut c = [0u8; 40];
        c[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        c[36..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        c
    }
}

/// The buffers of one request, in order; `None` when it has more than
/// the bridge takes.
fn buffers_of<M>(chain: virtio_queue::DescriptorChain<M>) -> Option<Vec<Buffer>>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut out = Vec::new();
    for d in chain {
        if out.len() >= usize::from(MAX_DESCRIPTORS) {
            return None;
        }
        out.push(Buffer {
            addr: d.addr().0,
            len: d.len(),
            write: d.is_write_only(),
        });
    }
    Some(out)
}

/// Serves every available request of `queue`. A request the server
/// cannot decode, or whose buffers are unusable (outside RAM, too many),
/// completes with no reply bytes (the guest's driver fails it).
pub fn process_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    bridge: &mut Bridge,
    server: &Arc<Server<ShareFs>>,
    interrupt: &Interrupt,
) {
    let mut used_any = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let written = match buffers_of(chain) {
            None => {
                tracing::debug!("virtio-fs: a request with too many buffers");
                0
            }
            Some(buffers) => bridge.handle(mem, &buffers, server).unwrap_or_else(|e| {
                tracing::debug!("virtio-fs: request failed: {e}");
                0
            }),
        };
        if let Err(e) = queue.add_used(mem, head, super::len_u32(written)) {
            tracing::warn!("virtio-fs cannot return a buffer: {e}");
            break;
        }
        used_any = true;
    }
    if used_any && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used();
    }
}

impl VirtioDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn name(&self) -> &'static str {
        "fs"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let (mem, interrupt, [(hiprio, hi_evt), (request, req_evt)]) = a.take_queues::<2>()?;
        let mut bridge = Bridge::new(&mem)
            .map_err(|e| ActivateError::Thread(std::io::Error::other(e.to_string())))?;
        let server = self.server.clone();
        let worker = WorkerThread::start(
            "virtio-fs",
            vec![hi_evt, req_evt],
            vec![hiprio, request],
            move |queues: &mut Vec<Queue>, i| {
                if let Some(q) = queues.get_mut(i) {
                    process_queue(q, &mem, &mut bridge, &server, &interrupt);
                }
            },
        )
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, WorkerError> {
        stop_worker(&mut self.worker)
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Fs(self.state())
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioStateError> {
        let s = FsState::own(state, self.name(), self.worker.is_some())?;
        self.restore(s)
    }
}

#[cfg(test)]
// Test lengths, indices and byte patterns are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests;
