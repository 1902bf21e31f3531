//! Controlling a running VM from another thread (the API server): pause,
//! resume, kill, a status snapshot and console input. Requests travel to
//! the VMM's control loop as [`crate::VmmEvent::Control`] and are answered
//! there, so the loop stays the only place that changes the VM's state.

use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::virtio::balloon::{BalloonHandle, BalloonStatus};

use crate::console_input::{ConsoleTarget, DeliverError};
use crate::event::VmmEvent;
pub use crate::request::{
    ControlError, ControlReply, ControlRequest, DeviceInfo, RunState, VcpuCounters, VmStatus,
};

/// How long console input from a controller waits for the guest to take
/// it.
pub const CONSOLE_INPUT_TIMEOUT: Duration = Duration::from_secs(5);

/// A handle on whichever machine is running for a VM (a restart on reset
/// makes a new one).
#[derive(Clone, Default)]
pub struct VmControl {
    current: Arc<Mutex<Option<Sender<VmmEvent>>>>,
    console: Arc<Mutex<Option<ConsoleTarget>>>,
    balloon: Arc<Mutex<Option<BalloonHandle>>>,
}

impl std::fmt::Debug for VmControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmControl").finish_non_exhaustive()
    }
}

impl VmControl {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn attach(&self, events: Sender<VmmEvent>, console: ConsoleTarget) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(events);
        *self.console.lock().unwrap_or_else(|e| e.into_inner()) = Some(console);
    }

    pub(crate) fn detach(&self) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.console.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.attach_balloon(None);
    }

    /// The running machine's balloon (a restart makes a new one).
    pub(crate) fn attach_balloon(&self, balloon: Option<BalloonHandle>) {
        *self.balloon.lock().unwrap_or_else(|e| e.into_inner()) = balloon;
    }

    fn balloon(&self) -> Result<BalloonHandle, ControlError> {
        if self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            return Err(ControlError::NotRunning);
        }
        self.balloon
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| ControlError::Conflict("the VM has no balloon device".into()))
    }

    /// Asks the guest to balloon to `bytes` (on the caller's thread: the
    /// device takes it from there; the guest follows in its own time).
    pub fn balloon_set(&self, bytes: u64) -> Result<(), ControlError> {
        self.balloon()?
            .set_target(bytes)
            .map_err(|e| ControlError::Conflict(e.to_string()))
    }

    /// The balloon's figures; with `fresh`, after asking the guest for new
    /// statistics and waiting that long at most for them.
    pub fn balloon_status(&self, fresh: Option<Duration>) -> Result<BalloonStatus, ControlError> {
        let b = self.balloon()?;
        Ok(match fresh {
            Some(wait) => b.fresh_status(wait),
            None => b.status(),
        })
    }

    /// Types `bytes` on the guest's console (on the caller's thread: it
    /// waits while the console device is full, at most
    /// [`CONSOLE_INPUT_TIMEOUT`], and not after the VM stops).
    pub fn console_input(&self, bytes: &[u8]) -> Result<(), ControlError> {
        self.console_input_within(bytes, CONSOLE_INPUT_TIMEOUT)
    }

    /// [`console_input`](Self::console_input) with its own deadline.
    pub fn console_input_within(
        &self,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<(), ControlError> {
        let target = self
            .console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(ControlError::NotRunning)?;
        target.deliver(bytes, timeout).map_err(|e| match e {
            DeliverError::Closed => ControlError::NotRunning,
            e @ DeliverError::Timeout { .. } => ControlError::Timeout(format!(
                "{e}: the guest is paused or not reading its console"
            )),
        })
    }

    /// Sends `request` to the VM and waits for the answer.
    pub fn request(&self, request: ControlRequest) -> ControlReply {
        let sender = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(ControlError::NotRunning)?;
        let (tx, rx) = mpsc::channel();
        let timeout = request.timeout();
        sender
            .send(VmmEvent::Control(request, tx))
            .map_err(|_| ControlError::NotRunning)?;
        rx.recv_timeout(timeout)
            .map_err(|_| ControlError::NotRunning)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_without_a_machine_say_so() {
        let control = VmControl::new();
        assert_eq!(
            control.request(ControlRequest::Info),
            Err(ControlError::NotRunning)
        );
    }
}
