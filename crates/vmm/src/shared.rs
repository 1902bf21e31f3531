//! What the VMM's threads share about the vCPUs: the gate they wait at
//! while the VM is paused, their counters, and why one stopped. (Below
//! both the vCPU loop and the control side, which read and set them.)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use hypervisor::assist::AssistKind;
use hypervisor::SystemEvent;

/// Why a vCPU stopped for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The VMM asked it to stop.
    Requested,
    /// The guest triple-faulted.
    TripleFault,
    /// The guest asked the platform for a power event.
    SystemEvent(SystemEvent),
    /// The accelerator failed an instruction and no assist completed it.
    EmulationFailure {
        rip: u64,
        bytes: Vec<u8>,
        reason: String,
    },
    /// Another accelerator error.
    InternalError(String),
}

/// Counters of one VM's vCPUs.
#[derive(Debug, Default)]
pub struct VcpuStats {
    pub exits: AtomicU64,
    pub pio_exits: AtomicU64,
    pub mmio_exits: AtomicU64,
    pub unhandled_accesses: AtomicU64,
    pub assists: [AtomicU64; AssistKind::ALL.len()],
}

impl VcpuStats {
    /// `(name, count)` of every assist that happened.
    pub fn assist_counts(&self) -> Vec<(&'static str, u64)> {
        AssistKind::ALL
            .iter()
            .map(|k| (k.name(), self.assists[k.index()].load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
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
    use std::sync::Arc;

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
}
