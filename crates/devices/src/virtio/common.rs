//! What every virtio transport keeps for its device, whatever carries
//! it: the feature negotiation, the device status, each queue's settings
//! before the driver starts the device, activation, reset, and quiescing
//! (crosvm's sleep/wake). A transport ([`super::mmio`], [`super::pci`])
//! only decodes its own registers into these calls, so a device never
//! knows which transport carries it, and a transport's saved state is
//! this state ([`persist`]) plus the transport's own registers.
//!
//! For a pause or a snapshot the transport puts its device to
//! [`sleep`](VirtioCommon::sleep) (the worker stops and hands the queues,
//! with their ring positions, back here) and [`wake`](VirtioCommon::wake)s
//! it after.

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
/// One virtio device and what its driver negotiated, transport-neutral.
pub struct VirtioCommon {
    pub(crate) device: Box<dyn VirtioDevice>,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) interrupt: Arc<Interrupt>,
    pub(crate) queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    pub(crate) queue_select: u32,
    pub(crate) device_features_select: u32,
    pub(crate) driver_features_select: u32,
    pub(crate) acked_features: u64,
    pub(crate) status: u32,
    /// Bumped when the device's config changes (it never does yet).
    pub(crate) config_generation: u32,
    pub(crate) activated: bool,
    /// Whether the device's worker runs (see [`Quiesce`]).
    quiesce: Quiesce,
    /// A queue setting the device cannot use (a size that is out of range,
    /// not a power of two or above the maximum; a misaligned ring): the
    /// next DRIVER_OK fails with NEEDS_RESET instead of running with a
    /// value the driver did not write.
    pub(crate) bad_queue_setup: Option<String>,
}

/// Where an activated device is between [`VirtioCommon::sleep`] and
/// [`VirtioCommon::wake`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Quiesce {
    /// Running (or not activated).
    Awake,
    /// Told to sleep, but its worker did not stop in time.
    Stopping,
    /// Stopped; `queues` hold the ring positions.
    Asleep,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid queue size {0}")]
    QueueSize(u16),
    #[error("cannot create a queue event")]
    Event(#[source] std::io::Error),
}

impl VirtioCommon {
    /// Wraps `device`; `interrupt` raises its interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, TransportError> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for &size in device.queue_max_sizes() {
            queues.push(Queue::new(size).map_err(|_| TransportError::QueueSize(size))?);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::Event)?);
        }
        Ok(VirtioCommon {
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
    /// registers them as ioeventfds where the transport takes notifications.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device status register (virtio status bits).
    pub fn status(&self) -> u32 {
        self.status
    }

    pub(crate) fn offered_features(&self) -> u64 {
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
        tracing::debug!(device = self.device.name(), "virtio: {why}");
        self.bad_queue_setup.get_or_insert(why);
    }

    /// QueueNum: a size the queue can have, or refused.
    pub(crate) fn set_queue_size(&mut self, value: u32) {
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

    /// One 32-bit half of a ring address of the selected queue.
    pub(crate) fn set_queue_ring(&mut self, ring: Ring, high: bool, value: u32) {
        let select = self.queue_select;
        let Some(q) = self.selected_queue() else {
            return;
        };
        let old = ring_address(q, ring);
        let new = if high {
            (old & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (old & !0xffff_ffff) | u64::from(value)
        };
        let addr = vm_memory::GuestAddress(new);
        let set = match ring {
            Ring::Desc => q.try_set_desc_table_address(addr),
            Ring::Avail => q.try_set_avail_ring_address(addr),
            Ring::Used => q.try_set_used_ring_address(addr),
        };
        // The low half is written first: only a misaligned low half
        // makes the address misaligned.
        if set.is_err() {
            self.refuse_queue_setup(format!(
                "queue {select}: misaligned ring address {new:#x} refused"
            ));
        }
    }

    /// The queue the driver selected, for reading its settings.
    pub(crate) fn queue(&self) -> Option<&Queue> {
        usize::try_from(self.queue_select)
            .ok()
            .and_then(|i| self.queues.get(i))
    }

    /// The selected queue's ready bit (a running device's queues stay).
    pub(crate) fn set_queue_ready(&mut self, ready: bool) {
        if let Some(q) = self.selected_queue() {
            q.set_ready(ready);
        }
    }

    /// A word of the features the device offers (`select` 0 = bits 0..32).
    pub(crate) fn device_features_word(&self) -> u32 {
        word(self.offered_features(), self.device_features_select)
    }

    /// A word of the features the driver acked.
    pub(crate) fn driver_features_word(&self) -> u32 {
        word(self.acked_features, self.driver_features_select)
    }

    /// The driver acks a word of features; only before DRIVER_OK.
    pub(crate) fn ack_features_word(&mut self, value: u32) {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            return;
        }
        let v = u64::from(value);
        match self.driver_features_select {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | v,
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (v << 32),
            _ => {}
        }
    }

    /// The slow path of a queue notification (normally an ioeventfd
    /// catches it).
    pub(crate) fn notify(&self, index: u32) {
        let index = usize::try_from(index).ok();
        if let Some(evt) = index.and_then(|i| self.queue_events.get(i)) {
            let _ = evt.write(1);
        }
    }

    /// Reads the device's config space; a failed device's reads still work.
    pub(crate) fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.device.read_config(offset, data);
    }

    /// Writes the device's config space unless the driver gave up on it.
    pub(crate) fn write_config(&mut self, offset: u64, data: &[u8]) {
        if self.status & VIRTIO_CONFIG_S_FAILED == 0 {
            self.device.write_config(offset, data);
        }
    }

    pub(crate) fn reset(&mut self) {
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

    pub(crate) fn set_status(&mut self, value: u32) {
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
    pub(crate) fn activation(&self) -> std::io::Result<Activation> {
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
    pub(crate) fn needs_reset(&mut self, why: &str) {
        tracing::warn!(
            device = self.device.name(),
            "virtio device needs reset: {why}"
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt.signal_config();
    }
}

/// A queue's three rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ring {
    Desc,
    Avail,
    Used,
}

/// The guest address of one of a queue's rings.
pub(crate) fn ring_address(q: &Queue, ring: Ring) -> u64 {
    match ring {
        Ring::Desc => q.desc_table(),
        Ring::Avail => q.avail_ring(),
        Ring::Used => q.used_ring(),
    }
}

/// Word `select` (0 = bits 0..32, 1 = bits 32..64) of a 64-bit register
/// pair; others read as zero.
pub(crate) fn word(value: u64, select: u32) -> u32 {
    let half = match select {
        0 => value & 0xffff_ffff,
        1 => value >> 32,
        _ => 0,
    };
    u32::try_from(half).unwrap_or(u32::MAX)
}

pub mod persist;
