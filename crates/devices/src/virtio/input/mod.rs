//! virtio-input (virtio 1.2, 5.8): a keyboard or a tablet (absolute
//! pointer). The host queues Linux input events through an
//! [`InputHandle`]; the device's worker copies them, one event per
//! buffer, into the buffers the guest posts on its event queue. What the
//! guest sends on its status queue (LED states of the keyboard) is read,
//! checked and dropped.
//!
//! Queues: 0 = eventq (device → driver), 1 = statusq (driver → device).

pub mod config;
pub mod events;
pub mod persist;

use std::sync::Arc;

use memory::GuestMemoryMmap;
use virtio_bindings::virtio_ids::VIRTIO_ID_INPUT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::persist::OwnState;
use super::worker::{stop_worker, WorkerError, WorkerThread};
use super::{
    ActivateError, Activation, Interrupt, VirtioDevice, VirtioDeviceState, VirtioStateError,
};
use config::InputConfig;
pub use config::InputKind;
use events::{EventQueue, EV_LED};
pub use events::{InputError, InputEvent, InputHandle, EVENT_LIMIT};

const QUEUE_SIZE: u16 = 64;
const EVENTQ: usize = 0;
const STATUSQ: usize = 1;
/// The worker's third event: the host queued input.
const HOST_INPUT: usize = 2;
/// Bytes of one event.
const EVENT_SIZE: usize = 8;

/// A virtio keyboard or tablet.
pub struct Input {
    kind: InputKind,
    config: InputConfig,
    select: u8,
    subsel: u8,
    queue: Arc<EventQueue>,
    /// The worker owns the event and status queues.
    worker: Option<WorkerThread<[Queue; 2]>>,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Input")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Input {
    /// A device of `kind` and the handle that feeds it.
    pub fn new(kind: InputKind) -> std::io::Result<(Self, InputHandle)> {
        let queue = Arc::new(EventQueue::new()?);
        let handle = InputHandle {
            queue: queue.clone(),
        };
        let device = Input {
            kind,
            config: InputConfig::new(kind),
            select: config::CFG_UNSET,
            subsel: 0,
            queue,
            worker: None,
        };
        Ok((device, handle))
    }

    pub fn kind(&self) -> InputKind {
        self.kind
    }

    /// Another handle feeding this device.
    pub fn handle(&self) -> InputHandle {
        InputHandle {
            queue: self.queue.clone(),
        }
    }
}

/// Moves queued events into the guest's event buffers, one event per
/// buffer, in order. A buffer the device cannot use (device-readable,
/// shorter than an event, outside guest RAM) is returned with length 0 and
/// the event waits for the next one. Events stay queued while the guest
/// posts no buffers.
pub fn fill_events(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    pending: &mut std::collections::VecDeque<InputEvent>,
    interrupt: &Interrupt,
) {
    let mut used_any = false;
    while let Some(&event) = pending.front() {
        let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let written = match chain.next() {
            Some(d) if d.is_write_only() && d.len() as usize >= EVENT_SIZE => mem
                .write_slice(&event.to_bytes(), GuestAddress(d.addr().0))
                .is_ok(),
            _ => false,
        };
        if written {
            pending.pop_front();
        } else {
            tracing::debug!("virtio-input event buffer unusable; returned empty");
        }
        let len = if written {
            super::len_u32(EVENT_SIZE)
        } else {
            0
        };
        if let Err(e) = queue.add_used(mem, head, len) {
            tracing::warn!("virtio-input cannot return a buffer: {e}");
            break;
        }
        used_any = true;
    }
    if used_any && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_queue(EVENTQ);
    }
}

/// Reads and drops what the guest sent on the status queue. Each buffer
/// should hold one device-readable event; LED states are what a keyboard
/// driver sends. Anything else is logged and dropped the same way.
pub fn drain_status(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
    let mut used_any = false;
    while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut bytes = [0u8; EVENT_SIZE];
        let event = match chain.next() {
            Some(d) if !d.is_write_only() && d.len() as usize == EVENT_SIZE => mem
                .read_slice(&mut bytes, GuestAddress(d.addr().0))
                .ok()
                .map(|()| InputEvent::from_bytes(bytes)),
            _ => None,
        };
        match event {
            Some(e) if e.kind == EV_LED => tracing::trace!(led = e.code, on = e.value, "LED"),
            Some(e) => tracing::debug!(?e, "virtio-input status event ignored"),
            None => tracing::debug!("malformed virtio-input status buffer dropped"),
        }
        if let Err(e) = queue.add_used(mem, head, 0) {
            tracing::warn!("virtio-input cannot return a status buffer: {e}");
            break;
        }
        used_any = true;
    }
    if used_any && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_queue(STATUSQ);
    }
}

impl VirtioDevice for Input {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_INPUT
    }
    fn name(&self) -> &'static str {
        "input"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let image = self.config.image(self.select, self.subsel);
        super::read_config_bytes(&image, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `select` (byte 0) and `subsel` (byte 1) are writable.
        for (i, &b) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(0) => self.select = b,
                Some(1) => self.subsel = b,
                _ => tracing::debug!(offset, "write to read-only virtio-input config ignored"),
            }
        }
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let (mem, interrupt, [(eventq, event_evt), (statusq, status_evt)]) =
            a.take_queues::<2>()?;
        let ready = self.queue.ready.try_clone().map_err(ActivateError::Event)?;
        let pending = self.queue.clone();
        let events = vec![event_evt, status_evt, ready];
        let worker = WorkerThread::start(
            "virtio-input",
            events,
            [eventq, statusq],
            move |[eventq, statusq], i| match i {
                STATUSQ => drain_status(statusq, &mem, &interrupt),
                // Buffers were posted, or the host queued input.
                EVENTQ | HOST_INPUT => {
                    fill_events(eventq, &mem, &mut pending.lock(), &interrupt);
                }
                _ => {}
            },
        )
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        // Input queued before the driver was ready (or while asleep).
        let _ = self.queue.ready.write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        self.select = config::CFG_UNSET;
        self.subsel = 0;
    }

    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, WorkerError> {
        // Input queued while asleep waits; waking looks at it again.
        Ok(stop_worker(&mut self.worker)?.map(Vec::from))
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Input(self.state())
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioStateError> {
        let s = persist::InputState::own(state, self.name(), self.worker.is_some())?;
        self.restore(s)
    }
}

#[cfg(test)]
// Test lengths, indices and byte patterns are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests;
