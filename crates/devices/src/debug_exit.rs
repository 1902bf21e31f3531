//! A debug-exit port for test guests (QEMU's isa-debug-exit port number):
//! writing a value ends the VM with that status — 0 reports success,
//! anything else a failure such as a panic.

use serde::{Deserialize, Serialize};
use snapshot::Persist;

use crate::{BusDevice, PlatformRequest, PlatformRequestSink};

pub const DEBUG_EXIT_PORT: u64 = 0xf4;

pub struct DebugExit {
    requests: PlatformRequestSink,
}

impl DebugExit {
    pub fn new(requests: PlatformRequestSink) -> Self {
        DebugExit { requests }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        (self.requests)(PlatformRequest::DebugExit(u32::from_le_bytes(bytes)));
    }
}

/// The port is stateless: each write is an exit request on its own.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
pub struct DebugExitState {}

impl Persist for DebugExit {
    type State = DebugExitState;
    /// Where exit requests go.
    type Args = PlatformRequestSink;
    type Error = std::convert::Infallible;

    fn save(&self) -> DebugExitState {
        DebugExitState {}
    }

    fn restore(requests: PlatformRequestSink, _: &DebugExitState) -> Result<Self, Self::Error> {
        Ok(DebugExit::new(requests))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn writes_of_any_width_become_exit_codes() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let mut dev = DebugExit::new(Arc::new(move |r| sink.lock().unwrap().push(r)));
        dev.write(DEBUG_EXIT_PORT, 0, &[0]);
        dev.write(DEBUG_EXIT_PORT, 0, &[0x34, 0x12]);
        dev.write(DEBUG_EXIT_PORT, 0, &[1, 0, 0, 0x80]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                PlatformRequest::DebugExit(0),
                PlatformRequest::DebugExit(0x1234),
                PlatformRequest::DebugExit(0x8000_0001)
            ]
        );
    }

    /// Stateless: the state is empty, and the restored port still exits.
    #[test]
    fn state_round_trips() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let saved = DebugExit::new(Arc::new(|_| {})).save();
        let mut restored =
            DebugExit::restore(Arc::new(move |r| sink.lock().unwrap().push(r)), &saved).unwrap();
        assert_eq!(
            crate::test_util::json(&restored.save()),
            crate::test_util::json(&saved)
        );
        restored.write(DEBUG_EXIT_PORT, 0, &[3]);
        assert_eq!(*seen.lock().unwrap(), vec![PlatformRequest::DebugExit(3)]);
    }
}
