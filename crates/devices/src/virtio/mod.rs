//! Virtio devices (virtio 1.x, modern only) and their transport.
//!
//! A device implements [`VirtioDevice`]: it says what it is and offers, has
//! a config space, and is *activated* with guest memory, its queues, the
//! events the guest kicks them with and an [`Interrupt`] — at which point it
//! starts a worker thread. [`reset`](VirtioDevice::reset) stops the worker.
//! The transport ([`mmio::MmioTransport`]) owns everything the driver
//! negotiates before that.
//!
//! Quiescing (crosvm's sleep/wake): [`sleep`](VirtioDevice::sleep) stops
//! the worker and hands its queues back with their ring positions, after
//! which no thread of the device touches guest memory;
//! [`wake`](VirtioDevice::wake) starts it again with them. While asleep a
//! device's state can be read ([`save_state`](VirtioDevice::save_state));
//! a freshly made device takes a saved one
//! ([`restore_state`](VirtioDevice::restore_state)). See [`persist`].

pub mod balloon;
pub mod block;
pub mod common;
pub mod console;
pub mod fs;
pub mod gpu;
pub mod input;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod persist;
pub mod rate_limit;
pub mod rng;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use persist::{VirtioDeviceState, VirtioStateError, VirtqueueState};
pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// The queue type devices hand back when they sleep.
pub use virtio_queue::Queue;
pub use worker::WorkerError;

/// Interrupt status bits (the MMIO InterruptStatus register).
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// Per-queue interrupt vectors, as a transport with MSI-X provides them.
/// Each call returns false when the function is not using its vectors
/// (MSI-X disabled): the interrupt then goes through the status bits and
/// the line.
pub trait VectorSignal: Send + Sync + std::fmt::Debug {
    /// Signals queue `queue`'s vector.
    fn queue(&self, queue: usize) -> bool;
    /// Signals every vector a queue uses (once each).
    fn all_queues(&self) -> bool;
    /// Signals the configuration-change vector.
    fn config(&self) -> bool;
}

/// Raises a device's interrupt. With a line only (virtio-mmio, PCI INTx)
/// it sets a status bit the driver reads and acknowledges and pulses the
/// line (an irqfd); with vectors (virtio-pci MSI-X, once the driver
/// enables it) each queue's own vector fires instead.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    line: EventFd,
    vectors: Option<Arc<dyn VectorSignal>>,
    /// Interrupts raised, for the VM's status.
    raised: std::sync::atomic::AtomicU64,
}

impl Interrupt {
    pub fn new(line: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            line,
            vectors: None,
            raised: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// An interrupt that uses `vectors` when the driver enabled them and
    /// `line` otherwise.
    pub fn with_vectors(line: EventFd, vectors: Arc<dyn VectorSignal>) -> Self {
        Interrupt {
            vectors: Some(vectors),
            ..Interrupt::new(line)
        }
    }

    /// Tells the driver that buffers were used, in some queue (every
    /// queue's vector fires; prefer [`signal_queue`](Self::signal_queue)).
    pub fn signal_used(&self) {
        self.raised.fetch_add(1, Ordering::Relaxed);
        if !self.vectors.as_ref().is_some_and(|v| v.all_queues()) {
            self.signal_line(INT_VRING);
        }
    }

    /// Tells the driver that buffers were used in queue `queue`.
    pub fn signal_queue(&self, queue: usize) {
        self.raised.fetch_add(1, Ordering::Relaxed);
        if !self.vectors.as_ref().is_some_and(|v| v.queue(queue)) {
            self.signal_line(INT_VRING);
        }
    }

    /// Tells the driver that the configuration (or the device status)
    /// changed.
    pub fn signal_config(&self) {
        self.raised.fetch_add(1, Ordering::Relaxed);
        if !self.vectors.as_ref().is_some_and(|v| v.config()) {
            self.signal_line(INT_CONFIG);
        }
    }

    fn signal_line(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.line.write(1) {
            tracing::warn!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// Reads and clears the status bits (virtio-pci's ISR register).
    pub fn take_status(&self) -> u32 {
        self.status.swap(0, Ordering::SeqCst)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// How many interrupts the device has raised.
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }

    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Restores the status bits a snapshot saved (only [`INT_VRING`] and
    /// [`INT_CONFIG`] are kept) and, if any is set, pulses the line: an
    /// interrupt the driver had not yet handled when the snapshot was
    /// taken must not be lost (a spurious one is harmless, the driver
    /// reads the status first).
    pub fn restore_status(&self, bits: u32) {
        let bits = bits & (INT_VRING | INT_CONFIG);
        self.status.store(bits, Ordering::SeqCst);
        if bits != 0 {
            if let Err(e) = self.line.write(1) {
                tracing::warn!("cannot raise a virtio interrupt: {e}");
            }
        }
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, the driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("cannot start the device worker")]
    Thread(#[source] std::io::Error),
    #[error("cannot create an event")]
    Event(#[source] std::io::Error),
    #[error("the device's earlier worker has not stopped")]
    Worker(#[source] WorkerError),
}

/// What activation hands a device.
#[derive(Debug)]
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<Interrupt>,
    /// The queues the driver set up, in order, and the events that fire
    /// when the driver notifies each.
    pub queues: Vec<QueueWithEvent>,
    /// The features the driver accepted.
    pub acked_features: u64,
}

/// A queue and the event its notifications fire.
pub type QueueWithEvent = (Queue, EventFd);

/// What a device's worker needs: memory, interrupt and its `N` queues.
pub type Started<const N: usize> = (GuestMemoryMmap, Arc<Interrupt>, [QueueWithEvent; N]);

impl Activation {
    /// Splits the activation, checking that the driver set up exactly `N`
    /// queues.
    pub fn take_queues<const N: usize>(self) -> Result<Started<N>, ActivateError> {
        let got = self.queues.len();
        let queues = <[QueueWithEvent; N]>::try_from(self.queues)
            .map_err(|_| ActivateError::QueueCount { expected: N, got })?;
        Ok((self.mem, self.interrupt, queues))
    }
}

/// A virtio device behind any transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (4 = entropy, 2 = block, ...).
    fn device_type(&self) -> u32;
    /// A short name for logs and status reports ("block", "net", ...).
    fn name(&self) -> &'static str;
    /// The maximum size of each queue; their number is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers (VIRTIO_F_VERSION_1 is added by the
    /// transport).
    fn features(&self) -> u64 {
        0
    }
    /// Reads from the device-specific config space.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let _ = offset;
    }
    /// Writes to the device-specific config space.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            offset,
            len = data.len(),
            "write to read-only virtio config ignored"
        );
    }
    /// Starts the device.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device's worker (dropping a `WorkerThread` joins it); the
    /// device may be activated again. Whatever a sleeping device kept is
    /// dropped too.
    fn reset(&mut self);

    /// Quiesces the device: stops its worker and hands back its queues, in
    /// order, with their ring positions (next_avail, next_used, event-idx).
    /// Once it returns `Ok`, no thread of the device touches guest memory
    /// until [`wake`](Self::wake). A device that is not activated (or is
    /// asleep already) returns `Ok(None)`. Device-side state that is not a
    /// queue (a frame waiting for receive buffers, open vsock connections)
    /// stays in the device for `wake`. A worker stuck in its backend makes
    /// this fail after the bounded stop ([`worker::STOP_TIMEOUT`]); the
    /// worker has then been told to stop, and a later `sleep` or `wake`
    /// collects it.
    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, WorkerError>;

    /// Starts a sleeping device again with the queues `sleep` handed back
    /// (or restored ones), in `activation` as activation hands them. A
    /// device keeps what it held across the sleep.
    fn wake(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.activate(activation)
    }

    /// The device's own state (what it offers and what it holds between
    /// requests, not the transport's registers or queues). Call it while
    /// the device is asleep or not activated.
    fn save_state(&self) -> VirtioDeviceState;

    /// Takes a saved state into a freshly made, not activated device of
    /// the same type. The state is untrusted: one of another device type
    /// or one this device cannot honour (a disk of another size) is
    /// refused with an error. The transport activates the device
    /// afterwards if the saved one was activated.
    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioStateError>;
}

/// A byte count as the `u32` lengths of the rings and vsock headers
/// carry. Every count handed here is bounded far below 4 GiB by its device
/// (requests, frames and packets are capped at a few MiB at most);
/// saturating rather than wrapping keeps a bug from reporting a tiny
/// length.
pub(crate) fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Reads `data.len()` bytes of `config` at `offset`; bytes beyond it read
/// as zero. For devices whose config is a plain byte image.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
// Test lengths, indices and byte patterns are small constants.
#[allow(clippy::cast_possible_truncation)]
mod snapshot_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_status_is_set_and_acknowledged() {
        let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Interrupt::new(line.try_clone().unwrap());
        irq.signal_used();
        irq.signal_config();
        assert_eq!(irq.status(), INT_VRING | INT_CONFIG);
        assert_eq!(line.read().unwrap(), 2);
        irq.acknowledge(INT_VRING);
        assert_eq!(irq.status(), INT_CONFIG);
    }

    /// Each device names itself (the status report used to map device
    /// IDs to names and called vsock "other").
    #[test]
    fn devices_name_themselves() {
        assert_eq!(rng::Rng::new().name(), "rng");
        let input = std::sync::Arc::new(console::ConsoleInput::new().unwrap());
        assert_eq!(
            console::Console::new(Box::new(std::io::sink()), input).name(),
            "console"
        );
        let dir = std::env::temp_dir().join(format!("hv-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let v = vsock::Vsock::new(3, &dir.join("v.sock")).unwrap();
        assert_eq!((v.name(), v.device_type()), ("vsock", 19));
        drop(v);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&config, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
