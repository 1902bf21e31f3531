//! virtio-input's saved state: its kind, the config selection the driver
//! made, and the events not yet delivered to the guest.

use serde::{Deserialize, Serialize};

use super::events::{InputEvent, EVENT_LIMIT};
use super::{Input, InputKind};
use crate::virtio::VirtioStateError;

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct InputState {
    pub kind: InputKind,
    #[serde(default)]
    pub select: u8,
    #[serde(default)]
    pub subsel: u8,
    /// Events waiting for the guest's buffers: (type, code, value).
    #[serde(default)]
    pub pending: Vec<(u16, u16, u32)>,
}

impl Input {
    pub(super) fn state(&self) -> InputState {
        InputState {
            kind: self.kind,
            select: self.select,
            subsel: self.subsel,
            pending: self
                .queue
                .lock()
                .iter()
                .map(|e| (e.kind, e.code, e.value))
                .collect(),
        }
    }

    /// Takes a saved state of a device of the same kind, with no more
    /// pending events than a device holds.
    pub(super) fn restore(&mut self, saved: &InputState) -> Result<(), VirtioStateError> {
        if saved.kind != self.kind {
            return Err(VirtioStateError::Invalid(format!(
                "a saved {:?} restored into a {:?}",
                saved.kind, self.kind
            )));
        }
        if saved.pending.len() > EVENT_LIMIT {
            return Err(VirtioStateError::Invalid(format!(
                "{} input events pending, more than the {EVENT_LIMIT} a device holds",
                saved.pending.len()
            )));
        }
        self.select = saved.select;
        self.subsel = saved.subsel;
        let mut pending = self.queue.lock();
        pending.clear();
        pending.extend(
            saved
                .pending
                .iter()
                .map(|&(kind, code, value)| InputEvent::new(kind, code, value)),
        );
        drop(pending);
        let _ = self.queue.ready.write(1);
        Ok(())
    }
}
