//! The part of an i8042 keyboard controller that guests use without a
//! keyboard: the status port reads "nothing pending", and command 0xFE
//! (pulse the reset line) resets the machine — how Linux reboots with
//! `reboot=k`.

use serde::{Deserialize, Serialize};
use snapshot::Persist;

use crate::{BusDevice, PlatformRequest, PlatformRequestSink};

/// The data port.
pub const DATA_PORT: u64 = 0x60;
/// The status (read) and command (write) port.
pub const COMMAND_PORT: u64 = 0x64;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    requests: PlatformRequestSink,
}

impl I8042 {
    pub fn new(requests: PlatformRequestSink) -> Self {
        I8042 { requests }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty; data: nothing.
        data.fill(0);
    }

    fn write(&mut self, base: u64, _offset: u64, data: &[u8]) {
        if base == COMMAND_PORT && data.first() == Some(&CMD_RESET_CPU) {
            (self.requests)(PlatformRequest::Reset);
        }
    }
}

/// The controller keeps no state: its status always reads "nothing
/// pending" and the only command acted on is the reset pulse.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
pub struct I8042State {}

impl Persist for I8042 {
    type State = I8042State;
    /// Where the reset request goes.
    type Args = PlatformRequestSink;
    type Error = std::convert::Infallible;

    fn save(&self) -> I8042State {
        I8042State {}
    }

    fn restore(requests: PlatformRequestSink, _: &I8042State) -> Result<Self, Self::Error> {
        Ok(I8042::new(requests))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn reset_command_requests_a_reset() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let mut dev = I8042::new(Arc::new(move |r| sink.lock().unwrap().push(r)));
        let mut status = [0xffu8];
        dev.read(COMMAND_PORT, 0, &mut status);
        assert_eq!(status, [0], "kb_wait() must see an empty input buffer");
        dev.write(COMMAND_PORT, 0, &[0xd1]);
        dev.write(DATA_PORT, 0, &[0xfe]);
        assert!(seen.lock().unwrap().is_empty());
        dev.write(COMMAND_PORT, 0, &[0xfe]);
        assert_eq!(*seen.lock().unwrap(), vec![PlatformRequest::Reset]);
    }

    /// Stateless: the state is empty, and the restored controller still
    /// resets the machine.
    #[test]
    fn state_round_trips() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let dev = I8042::new(Arc::new(|_| {}));
        let saved = dev.save();
        let mut restored =
            I8042::restore(Arc::new(move |r| sink.lock().unwrap().push(r)), &saved).unwrap();
        assert_eq!(
            crate::test_util::json(&restored.save()),
            crate::test_util::json(&saved)
        );
        restored.write(COMMAND_PORT, 0, &[0xfe]);
        assert_eq!(*seen.lock().unwrap(), vec![PlatformRequest::Reset]);
    }
}
