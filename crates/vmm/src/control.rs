//! Controlling a running VM from another thread (the API server): pause,
//! resume, kill, and a status snapshot. Requests travel to the VMM's
//! control loop as [`crate::VmmEvent::Control`] and are answered there, so
//! the loop stays the only place that changes the VM's state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::console::{ConsoleTarget, DeliverError};
use crate::vcpu::VcpuStats;
use crate::VmmEvent;

/// What a controller can ask of a running VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlRequest {
    /// Stop the vCPUs (and the guest's clock) until `Resume`.
    Pause,
    Resume,
    /// End the VM now, as a power cut would.
    Kill,
    /// A status snapshot.
    Info,
}

/// The VM's run state as controllers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
}

/// vCPU exit counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VcpuCounters {
    pub exits: u64,
    pub pio_exits: u64,
    pub mmio_exits: u64,
    pub unhandled_accesses: u64,
    /// Instructions hostvisor completed for KVM, by kind.
    pub assists: std::collections::BTreeMap<String, u64>,
}

impl VcpuCounters {
    pub fn from_stats(stats: &VcpuStats) -> Self {
        VcpuCounters {
            exits: stats.exits.load(Ordering::Relaxed),
            pio_exits: stats.pio_exits.load(Ordering::Relaxed),
            mmio_exits: stats.mmio_exits.load(Ordering::Relaxed),
            unhandled_accesses: stats.unhandled_accesses.load(Ordering::Relaxed),
            assists: stats
                .assist_counts()
                .into_iter()
                .map(|(name, n)| (name.to_string(), n))
                .collect(),
        }
    }
}

/// A device as `GET /vm` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// virtio device type: block, console, rng.
    pub kind: String,
    pub mmio_base: u64,
    pub irq: u32,
    /// Interrupts the device has raised.
    pub interrupts: u64,
}

/// The status snapshot answering [`ControlRequest::Info`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VmStatus {
    pub state: RunState,
    /// Since this boot of the machine (a restart resets it).
    pub uptime_ms: u64,
    /// Time spent paused during this boot.
    pub paused_ms: u64,
    pub vcpus: u32,
    pub memory: u64,
    pub counters: VcpuCounters,
    pub devices: Vec<DeviceInfo>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The request does not fit the VM's state (pausing a paused VM).
    #[error("{0}")]
    Conflict(String),
    /// The VM is not running (between a reset and the next boot, or gone).
    #[error("the VM is not running")]
    NotRunning,
    #[error("{0}")]
    Failed(String),
    /// The guest did not do its part in time (it does not read its
    /// console, or is paused).
    #[error("{0}")]
    Timeout(String),
}

/// How long console input from a controller waits for the guest to take
/// it.
pub const CONSOLE_INPUT_TIMEOUT: Duration = Duration::from_secs(5);

pub type ControlReply = Result<Option<VmStatus>, ControlError>;

/// A handle on whichever machine is running for a VM (a restart on reset
/// makes a new one).
#[derive(Clone, Default)]
pub struct VmControl {
    current: Arc<Mutex<Option<Sender<VmmEvent>>>>,
    console: Arc<Mutex<Option<ConsoleTarget>>>,
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
        sender
            .send(VmmEvent::Control(request, tx))
            .map_err(|_| ControlError::NotRunning)?;
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| ControlError::NotRunning)?
    }
}

/// Where vCPU threads wait while the VM is paused.
#[derive(Debug, Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    paused: bool,
    parked: usize,
}

impl PauseGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by a vCPU thread between guest entries: blocks while the VM
    /// is paused (and not stopping).
    pub fn park_if_paused(&self, stop: &AtomicBool) {
        let mut s = self.lock();
        if !s.paused {
            return;
        }
        s.parked += 1;
        self.changed.notify_all();
        while s.paused && !stop.load(Ordering::Acquire) {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked -= 1;
        self.changed.notify_all();
    }

    /// Whether the gate is closed (a pause is under way).
    pub fn is_closed(&self) -> bool {
        self.lock().paused
    }

    /// Closes the gate; vCPUs park at their next exit (kick them).
    pub fn close(&self) {
        self.lock().paused = true;
    }

    /// Waits until `n` vCPUs are parked; false on timeout.
    pub fn wait_parked(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while s.parked < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Opens the gate and wakes the parked vCPUs.
    pub fn open(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }

    /// Wakes parked vCPUs so they see a stop request.
    pub fn wake(&self) {
        let _guard = self.lock();
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_parks_vcpus_until_it_opens() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        gate.close();
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (gate, stop) = (gate.clone(), stop.clone());
                std::thread::spawn(move || gate.park_if_paused(&stop))
            })
            .collect();
        assert!(gate.wait_parked(3, Duration::from_secs(5)));
        assert!(threads.iter().all(|t| !t.is_finished()));
        gate.open();
        for t in threads {
            t.join().unwrap_or_else(|_| panic!("vCPU thread panicked"));
        }
        // A stop request also releases parked vCPUs.
        gate.close();
        let (g, s) = (gate.clone(), stop.clone());
        let t = std::thread::spawn(move || g.park_if_paused(&s));
        assert!(gate.wait_parked(1, Duration::from_secs(5)));
        stop.store(true, Ordering::Release);
        gate.wake();
        t.join().unwrap_or_else(|_| panic!("vCPU thread panicked"));
        assert!(!gate.wait_parked(1, Duration::from_millis(10)));
    }

    #[test]
    fn requests_without_a_machine_say_so() {
        let control = VmControl::new();
        assert_eq!(
            control.request(ControlRequest::Info),
            Err(ControlError::NotRunning)
        );
    }
}
