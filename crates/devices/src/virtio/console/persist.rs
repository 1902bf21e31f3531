//! virtio-console's saved state: the host input not yet delivered to the
//! guest. (What the guest transmitted went to the output at once.)

use serde::{Deserialize, Serialize};

use super::{Console, INPUT_LIMIT};
use crate::virtio::VirtioStateError;

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
pub struct ConsoleState {
    /// Input bytes waiting for the guest's receive buffers.
    #[serde(default)]
    pub pending_input: Vec<u8>,
}

impl Console {
    pub(super) fn state(&self) -> ConsoleState {
        let bytes = self.input.bytes.lock().unwrap_or_else(|e| e.into_inner());
        ConsoleState {
            pending_input: bytes.iter().copied().collect(),
        }
    }

    /// Replaces the pending input with the saved one (at most
    /// [`INPUT_LIMIT`] bytes, as the device never holds more).
    pub(super) fn restore(&mut self, saved: &ConsoleState) -> Result<(), VirtioStateError> {
        if saved.pending_input.len() > INPUT_LIMIT {
            return Err(VirtioStateError::Invalid(format!(
                "{} bytes of console input pending, more than the {INPUT_LIMIT} a console holds",
                saved.pending_input.len()
            )));
        }
        let mut bytes = self.input.bytes.lock().unwrap_or_else(|e| e.into_inner());
        bytes.clear();
        bytes.extend(&saved.pending_input);
        drop(bytes);
        let _ = self.input.ready.write(1);
        Ok(())
    }
}
