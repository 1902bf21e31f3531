//! The virtio-mmio transport (version 2, virtio 1.x "modern" devices): a
//! 4 KiB register block per device, announced to Linux on the kernel
//! command line (`virtio_mmio.device=4K@ADDR:IRQ`).
//!
//! For a pause or a snapshot the transport puts its device to
//! [`sleep`](MmioTransport::sleep) (the worker stops and hands the queues,
//! with their ring positions, back here) and [`wake`](MmioTransport::wake)s
//! it after; its state (registers, queues, the device's own) is saved and
//! restored in [`persist`].

use std::sync::Arc;

use memory::GuestMemoryMmap;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateError, Activation, Interrupt, VirtioDevice, WorkerError, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::BusDevice;

/// The size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// The offset of QueueNotify, where the VMM places an ioeventfd per queue
/// (data = queue index).
pub const NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5253_5648; // "HVSR"
const CONFIG_SPACE: u64 = 0x100;

/// One virtio device behind its MMIO register block.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    /// Bumped when the device's config changes (it never does yet).
    config_generation: u32,
    activated: bool,
    /// Whether the device's worker runs (see [`Quiesce`]).
    quiesce: Quiesce,
    /// A queue setting the device cannot use (a size that is out of range,
    /// not a power of two or above the maximum; a misaligned ring): the
    /// next DRIVER_OK fails with NEEDS_RESET instead of running with a
    /// value the driver did not write.
    bad_queue_setup: Option<String>,
}

/// Where an activated device is between [`MmioTransport::sleep`] and
/// [`MmioTransport::wake`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quiesce {
    /// Running (or not activated).
    Awake,
    /// Told to sleep, but its worker did not stop in time.
    Stopping,
    /// Stopped; `queues` hold the ring positions.
    Asleep,
}

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("invalid queue size {0}")]
    QueueSize(u16),
    #[error("cannot create a queue event")]
    Event(#[source] std::io::Error),
}

impl MmioTransport {
    /// Wraps `device`; `interrupt` raises its interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, MmioError> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for &size in device.queue_max_sizes() {
            queues.push(Queue::new(size).map_err(|_| MmioError::QueueSize(size))?);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK).map_err(MmioError::Event)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_events,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            quiesce: Quiesce::Awake,
            bad_queue_setup: None,
        })
    }

    /// The device behind this transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Quiesces the device: stops its worker and keeps the queues it hands
    /// back (with their ring positions). After `Ok`, no thread of this
    /// device touches guest memory until [`wake`](Self::wake). Nothing to
    /// do for a device that is not activated or asleep already. A worker
    /// stuck in its backend makes this fail after the bounded stop; the
    /// worker has been told to stop, and `sleep` or `wake` called again
    /// collect it once it has.
    pub fn sleep(&mut self) -> Result<(), WorkerError> {
        if !self.activated || self.quiesce == Quiesce::Asleep {
            return Ok(());
        }
        self.quiesce = Quiesce::Stopping;
        if let Some(queues) = self.device.sleep()? {
            if queues.len() == self.queues.len() {
                self.queues = queues;
            } else {
                tracing::warn!(
                    device = self.device.name(),
                    "the device handed back {} queues of {}",
                    queues.len(),
                    self.queues.len()
                );
            }
        }
        self.quiesce = Quiesce::Asleep;
        Ok(())
    }

    /// Starts a sleeping device again with its queues (a device whose
    /// sleep failed is collected first). Nothing to do for a device that
    /// is not asleep. If the device cannot start, it is marked
    /// NEEDS_RESET for the driver, as a failed activation is.
    pub fn wake(&mut self) -> Result<(), ActivateError> {
        if self.quiesce == Quiesce::Stopping {
            self.sleep().map_err(ActivateError::Worker)?;
        }
        if self.quiesce != Quiesce::Asleep {
            return Ok(());
        }
        self.quiesce = Quiesce::Awake;
        let result = self
            .activation()
            .map_err(ActivateError::Event)
            .and_then(|a| self.device.wake(a));
        if let Err(e) = &result {
            self.needs_reset(&e.to_string());
        }
        result
    }

    /// Whether the device is asleep (its state can be saved).
    pub fn is_asleep(&self) -> bool {
        self.quiesce == Quiesce::Asleep
    }

    /// The events that a notification of each queue should fire; the VMM
    /// registers them as ioeventfds at [`NOTIFY_OFFSET`].
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device status register (virtio status bits).
    pub fn status(&self) -> u32 {
        self.status
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.activated {
            // The driver must not reconfigure live queues.
            return None;
        }
        let index = usize::try_from(self.queue_select).ok()?;
        self.queues.get_mut(index)
    }

    /// Records a queue setting the device refused.
    fn refuse_queue_setup(&mut self, why: String) {
        tracing::debug!(device = self.device.name(), "virtio-mmio: {why}");
        self.bad_queue_setup.get_or_insert(why);
    }

    /// QueueNum: a size the queue can have, or refused.
    fn set_queue_size(&mut self, value: u32) {
        let select = self.queue_select;
        let Some(q) = self.selected_queue() else {
            return;
        };
        let max = q.max_size();
        let fits = u16::try_from(value)
            .ok()
            .is_some_and(|size| q.try_set_size(size).is_ok());
        if !fits {
            self.refuse_queue_setup(format!(
                "queue {select}: size {value:#x} refused (a power of two up to {max})"
            ));
        }
    }

    /// One half of a ring address register (`offset & 4` says which).
    fn set_queue_address(&mut self, offset: u64, value: u32) {
        let select = self.queue_select;
        let Some(q) = self.selected_queue() else {
            return;
        };
        let ring = offset & !4;
        let old = match ring {
            0x080 => q.desc_table(),
            0x090 => q.avail_ring(),
            _ => q.used_ring(),
        };
        let new = if offset & 4 == 0 {
            (old & !0xffff_ffff) | u64::from(value)
        } else {
            (old & 0xffff_ffff) | (u64::from(value) << 32)
        };
        let addr = vm_memory::GuestAddress(new);
        let set = match ring {
            0x080 => q.try_set_desc_table_address(addr),
            0x090 => q.try_set_avail_ring_address(addr),
            _ => q.try_set_used_ring_address(addr),
        };
        // The low half is written first: only a misaligned low half
        // makes the address misaligned.
        if set.is_err() {
            self.refuse_queue_setup(format!(
                "queue {select}: misaligned ring address {new:#x} refused"
            ));
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        self.quiesce = Quiesce::Awake;
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.status = 0;
        self.bad_queue_setup = None;
        self.interrupt.acknowledge(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value > 0xff {
            // The status is 8 bits wide; no bit above them means anything.
            tracing::debug!(value, "virtio status beyond 8 bits ignored");
            return;
        }
        // The driver only ever adds bits (or writes 0 to reset).
        if value & self.status != self.status {
            tracing::warn!(
                old = self.status,
                new = value,
                "virtio driver cleared status bits; ignored"
            );
            return;
        }
        let added = value & !self.status;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.offered_features();
            if self.acked_features & !offered != 0
                || self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0
            {
                // Leaving FEATURES_OK clear tells the driver we refuse.
                self.status = value & !VIRTIO_CONFIG_S_FEATURES_OK;
                return;
            }
        }
        self.status = value;
        let ready = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && value & ready == ready && !self.activated {
            self.activate();
        }
    }

    /// What activating (or waking) the device hands it: copies of the
    /// queues (the transport keeps its own for register reads, reset and
    /// saving) and the events their notifications fire.
    fn activation(&self) -> std::io::Result<Activation> {
        let queues = self
            .queues
            .iter()
            .zip(&self.queue_events)
            .map(|(q, e)| {
                let mut queue = Queue::try_from(q.state()).map_err(std::io::Error::other)?;
                queue.set_event_idx(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
                Ok((queue, e.try_clone()?))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Activation {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues,
            acked_features: self.acked_features,
        })
    }

    fn activate(&mut self) {
        let valid = self
            .queues
            .iter()
            .all(|q| q.ready() && q.is_valid(&self.mem));
        let result = if let Some(why) = &self.bad_queue_setup {
            Err(why.clone())
        } else if valid {
            match self.activation() {
                Ok(a) => self.device.activate(a).map_err(|e| e.to_string()),
                Err(e) => Err(format!("cannot share a queue event: {e}")),
            }
        } else {
            Err("a queue is not ready or lies outside guest memory".to_string())
        };
        match result {
            Ok(()) => self.activated = true,
            Err(why) => self.needs_reset(&why),
        }
    }

    /// Tells the driver the device cannot go on.
    fn needs_reset(&mut self, why: &str) {
        tracing::warn!(
            device = self.device.name(),
            "virtio device needs reset: {why}"
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt.signal_config();
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = usize::try_from(self.queue_select)
            .ok()
            .and_then(|i| self.queues.get(i));
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_select {
                0 => low_half(self.offered_features()),
                1 => high_half(self.offered_features()),
                _ => 0,
            },
            0x034 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x044 => queue.map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => {
                tracing::debug!(offset, "read of an unknown virtio-mmio register");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let driver_setup = self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset {
            0x014 => self.device_features_select = value,
            0x020 if driver_setup => {
                let v = u64::from(value);
                match self.driver_features_select {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | v,
                    1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
            0x024 => self.driver_features_select = value,
            0x030 => self.queue_select = value,
            0x038 => self.set_queue_size(value),
            0x044 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            0x050 => {
                // Normally caught by an ioeventfd; this is the slow path.
                let index = usize::try_from(value).ok();
                if let Some(evt) = index.and_then(|i| self.queue_events.get(i)) {
                    let _ = evt.write(1);
                }
            }
            0x064 => self.interrupt.acknowledge(value),
            0x070 => self.set_status(value),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => self.set_queue_address(offset, value),
            _ => tracing::debug!(
                offset,
                value,
                "write to an unknown or read-only virtio-mmio register"
            ),
        }
    }
}

/// Bits 0..32 of a 64-bit register pair.
fn low_half(value: u64) -> u32 {
    u32::try_from(value & 0xffff_ffff).unwrap_or(u32::MAX)
}

/// Bits 32..64 of a 64-bit register pair.
fn high_half(value: u64) -> u32 {
    u32::try_from(value >> 32).unwrap_or(u32::MAX)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        data.fill(0);
        if data.len() == 4 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.status & VIRTIO_CONFIG_S_FAILED == 0 {
                self.device.write_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        } else {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio register write of the wrong width ignored"
            );
        }
    }
}

pub mod persist;

#[cfg(test)]
mod tests;
