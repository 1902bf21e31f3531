//! virtio-gpu (device type 16), 2D only: the guest draws into resources
//! (images in host memory backed by guest pages), copies them to the host
//! (TRANSFER_TO_HOST_2D) and says what changed (RESOURCE_FLUSH); the
//! device keeps a host frame per scanout and hands each flushed
//! rectangle to a [`DisplaySink`]. An idle guest costs nothing: there is
//! no polling, only the guest's commands move pixels.
//!
//! Queues: control (every command, each answered; fences are answered at
//! once, as every command completes before its response) and cursor
//! (UPDATE_CURSOR, MOVE_CURSOR; not answered). Offered:
//! `VIRTIO_GPU_F_EDID` (GET_EDID gives an EDID 1.4 block whose preferred
//! mode is the scanout's size). Not offered: 3D (virgl, capsets: 0),
//! blob resources, resource UUIDs, context init; their commands get
//! ERR_UNSPEC.
//!
//! The host side ([`GpuHandle`]) reads frames (screenshots) and asks for
//! another display size ([`GpuHandle::request_resize`]): the device sets
//! VIRTIO_GPU_EVENT_DISPLAY in `events_read` and raises a configuration
//! interrupt, and the guest's driver reads GET_DISPLAY_INFO again and
//! offers the new mode to its users.
//!
//! Every value from the guest is checked: resource ids, formats and
//! sizes (at most [`resources::MAX_DIM`] a side and
//! [`resources::MAX_RESOURCE_BYTES`] each; all the guest makes the
//! device hold at most [`backend::MAX_HOST_BYTES`], else
//! ERR_OUT_OF_MEMORY), rectangles (64-bit arithmetic, within their
//! resource), backing lists (at most [`protocol::MAX_BACKING_ENTRIES`],
//! each entry in guest RAM, long enough for each transfer), scanout ids
//! and request lengths.

pub mod backend;
pub mod display;
pub mod edid;
pub mod persist;
pub mod protocol;
pub mod queue;
pub mod resources;

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_ids::VIRTIO_ID_GPU;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::worker::{stop_worker, WorkerError, WorkerThread};
use super::{ActivateError, Activation, VirtioDevice, VirtioDeviceState, VirtioStateError};
pub use backend::GpuBackend;
pub use display::{Cursor, DisplaySink, Frame, NullSink};
pub use protocol::Rect;
use protocol::{MAX_SCANOUTS, VIRTIO_GPU_F_EDID};
use queue::{process_queue, GpuQueue};

const QUEUE_SIZE: u16 = 256;
/// The config space: events_read, events_clear, num_scanouts,
/// num_capsets (le32 each).
const CONFIG_LEN: usize = 16;

/// What a virtio-gpu offers, as the VM's configuration says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuOptions {
    /// Each scanout's preferred size at start (1 to 16 scanouts, each
    /// side 32 to 4095 pixels).
    pub displays: Vec<(u32, u32)>,
    /// Offer GET_EDID.
    pub edid: bool,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            displays: vec![(1280, 800)],
            edid: true,
        }
    }
}

impl GpuOptions {
    pub fn features(&self) -> u64 {
        if self.edid {
            1 << VIRTIO_GPU_F_EDID
        } else {
            0
        }
    }
}

/// Why the host's request was refused.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("a virtio-gpu has 1 to {MAX_SCANOUTS} scanouts, not {0}")]
    Scanouts(usize),
    #[error("scanout {scanout} does not exist (the device has {count})")]
    NoScanout { scanout: u32, count: u32 },
    #[error("a display of {width}x{height} is not offered (each side 32 to 4095 pixels)")]
    Mode { width: u32, height: u32 },
    #[error("cannot create the device's command event")]
    Event(#[source] std::io::Error),
}

/// What the device, its worker and the host side share.
struct Shared {
    backend: Mutex<GpuBackend>,
    /// Wakes the worker: a configuration interrupt is due, or restored
    /// resources wait to be read.
    command: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, GpuBackend> {
        self.backend.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The host's side of a virtio-gpu: resize requests and frames.
#[derive(Clone)]
pub struct GpuHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for GpuHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuHandle").finish_non_exhaustive()
    }
}

impl GpuHandle {
    /// The number of scanouts.
    pub fn num_scanouts(&self) -> u32 {
        self.shared.lock().num_scanouts()
    }

    /// Asks the guest to use a `width`×`height` display on `scanout`: the
    /// mode becomes the scanout's preferred one and the guest is told
    /// (display event, configuration interrupt — at once if the device
    /// runs, else when it starts). The guest decides whether to follow.
    pub fn request_resize(&self, scanout: u32, width: u32, height: u32) -> Result<(), GpuError> {
        if !backend::valid_mode(width, height) {
            return Err(GpuError::Mode { width, height });
        }
        let mut b = self.shared.lock();
        let count = b.num_scanouts();
        let ok = usize::try_from(scanout).is_ok_and(|i| b.set_mode(i, width, height));
        drop(b);
        if !ok {
            return Err(GpuError::NoScanout { scanout, count });
        }
        let _ = self.shared.command.write(1);
        Ok(())
    }

    /// The preferred size of `scanout`.
    pub fn mode(&self, scanout: u32) -> Option<(u32, u32)> {
        let b = self.shared.lock();
        b.scanouts
            .get(usize::try_from(scanout).ok()?)
            .map(|s| s.mode)
    }

    /// A copy of what `scanout` shows (as of the guest's last flush);
    /// `None` when it is off.
    pub fn frame(&self, scanout: u32) -> Option<Frame> {
        self.shared.lock().frame(usize::try_from(scanout).ok()?)
    }

    /// The pointer as the guest last set it.
    pub fn cursor(&self) -> Cursor {
        self.shared.lock().cursor.clone()
    }

    /// The host memory the guest's resources take now.
    pub fn host_bytes(&self) -> usize {
        self.shared.lock().host_bytes()
    }
}

/// What the worker owns and hands back when it stops.
#[derive(Debug)]
struct GpuQueues {
    control: Queue,
    cursor: Queue,
}

/// A virtio-gpu device.
pub struct Gpu {
    options: GpuOptions,
    shared: Arc<Shared>,
    worker: Option<WorkerThread<GpuQueues>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Gpu {
    /// A device showing its scanouts to `sink`, and its host side.
    pub fn new(
        options: GpuOptions,
        sink: Arc<dyn DisplaySink>,
    ) -> Result<(Self, GpuHandle), GpuError> {
        let n = options.displays.len();
        if n == 0 || n > MAX_SCANOUTS {
            return Err(GpuError::Scanouts(n));
        }
        if let Some(&(width, height)) = options
            .displays
            .iter()
            .find(|(w, h)| !backend::valid_mode(*w, *h))
        {
            return Err(GpuError::Mode { width, height });
        }
        let shared = Arc::new(Shared {
            backend: Mutex::new(GpuBackend::new(&options.displays, sink)),
            command: EventFd::new(libc::EFD_NONBLOCK).map_err(GpuError::Event)?,
        });
        let handle = GpuHandle {
            shared: shared.clone(),
        };
        Ok((
            Gpu {
                options,
                shared,
                worker: None,
            },
            handle,
        ))
    }

    fn config_image(&self) -> [u8; CONFIG_LEN] {
        let b = self.shared.lock();
        let mut c = [0u8; CONFIG_LEN];
        c[0..4].copy_from_slice(&b.events_read.to_le_bytes());
        c[8..12].copy_from_slice(&b.num_scanouts().to_le_bytes());
        c
    }
}

impl VirtioDevice for Gpu {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_GPU
    }
    fn name(&self) -> &'static str {
        "gpu"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        self.options.features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_image(), offset, data);
    }

    /// Only `events_clear` (bytes 4..8) is the driver's to write: the
    /// bits it writes leave `events_read`.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(data.len())?))
            .filter(|r| r.start >= 4 && r.end <= 8);
        let Some(range) = range else {
            tracing::debug!(offset, len = data.len(), "gpu config write ignored");
            return;
        };
        let mut clear = [0u8; 4];
        clear[range.start - 4..range.end - 4].copy_from_slice(data);
        self.shared.lock().events_read &= !u32::from_le_bytes(clear);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let (mem, interrupt, [(control, control_evt), (cursor, cursor_evt)]) =
            a.take_queues::<2>()?;
        let command = self
            .shared
            .command
            .try_clone()
            .map_err(ActivateError::Event)?;
        // Work from before the worker (re)started: kicks, a resize, a
        // restore's reload.
        for e in [&control_evt, &cursor_evt, &command] {
            let _ = e.write(1);
        }
        let shared = self.shared.clone();
        let queues = GpuQueues { control, cursor };
        let worker = WorkerThread::start(
            "virtio-gpu",
            vec![control_evt, cursor_evt, command],
            queues,
            move |q, i| {
                let b = &shared.backend;
                match i {
                    0 => process_queue(GpuQueue::Control, &mut q.control, &mem, &interrupt, b),
                    1 => process_queue(GpuQueue::Cursor, &mut q.cursor, &mem, &interrupt, b),
                    _ => {
                        let mut b = shared.lock();
                        b.reload(&mem);
                        let config = std::mem::take(&mut b.config_pending);
                        drop(b);
                        if config {
                            interrupt.signal_config();
                        }
                    }
                }
            },
        )
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        self.shared.lock().reset();
    }

    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, WorkerError> {
        Ok(stop_worker(&mut self.worker)?.map(|q| vec![q.control, q.cursor]))
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Gpu(self.state())
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioStateError> {
        use super::persist::OwnState;
        let s = persist::GpuState::own(state, self.name(), self.worker.is_some())?;
        self.restore(s)
    }
}

#[cfg(test)]
// Test lengths, indices and byte patterns are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests;
