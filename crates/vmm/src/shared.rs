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
    /// A job for every parked vCPU (saving its state for a snapshot):
    /// its number, and the answers so far.
    job: Option<(u64, GateJob)>,
    answers: Vec<GateAnswer>,
    jobs_issued: u64,
}

/// Work that parked vCPU threads do on their own vCPU (each vCPU is owned
/// by its thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateJob {
    /// Read the vCPU's whole state.
    SaveState,
}

/// A vCPU's answer to a [`GateJob`].
#[derive(Debug)]
pub struct GateAnswer {
    pub vcpu: u32,
    pub state: Result<Box<hypervisor::VcpuState>, String>,
}

impl PauseGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by a vCPU thread between guest entries: blocks while the VM
    /// is paused (and not stopping).
    /// While parked, the thread carries out each job posted with
    /// [`PauseGate::run_job`] through `work`.
    pub fn park_if_paused(&self, stop: &AtomicBool, work: &mut dyn FnMut(GateJob) -> GateAnswer) {
        let mut s = self.lock();
        if !s.paused {
            return;
        }
        s.parked += 1;
        self.changed.notify_all();
        // Jobs posted before this thread parked are not its to do.
        let mut done = s.jobs_issued;
        while s.paused && !stop.load(Ordering::Acquire) {
            if let Some((number, job)) = s.job {
                if number > done {
                    done = number;
                    let answer = work(job);
                    s.answers.push(answer);
                    self.changed.notify_all();
                    continue;
                }
            }
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

    /// Has each of the `n` parked vCPUs carry out `job`; their answers,
    /// or None if they did not all answer within `timeout`. Call only with
    /// every vCPU parked (after [`PauseGate::wait_parked`]).
    pub fn run_job(&self, job: GateJob, n: usize, timeout: Duration) -> Option<Vec<GateAnswer>> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        s.jobs_issued += 1;
        s.job = Some((s.jobs_issued, job));
        s.answers.clear();
        self.changed.notify_all();
        while s.answers.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                s.job = None;
                return None;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.job = None;
        Some(std::mem::take(&mut s.answers))
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

    fn no_job(_: GateJob) -> GateAnswer {
        panic!("no job was posted")
    }

    /// Parked vCPUs each carry out a posted job once, and the poster gets
    /// every answer.
    #[test]
    fn parked_vcpus_carry_out_jobs() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        gate.close();
        let threads: Vec<_> = (0..2u32)
            .map(|id| {
                let (gate, stop) = (gate.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut count = 0;
                    gate.park_if_paused(&stop, &mut |_| {
                        count += 1;
                        GateAnswer {
                            vcpu: id,
                            state: Err(format!("job {count}")),
                        }
                    });
                    count
                })
            })
            .collect();
        assert!(gate.wait_parked(2, Duration::from_secs(5)));
        for round in 1..=2 {
            let mut answers = gate
                .run_job(GateJob::SaveState, 2, Duration::from_secs(5))
                .unwrap();
            answers.sort_by_key(|a| a.vcpu);
            assert_eq!(answers.iter().map(|a| a.vcpu).collect::<Vec<_>>(), [0, 1]);
            for a in answers {
                assert_eq!(a.state.unwrap_err(), format!("job {round}"));
            }
        }
        // Three answers from two vCPUs never come.
        assert!(gate
            .run_job(GateJob::SaveState, 3, Duration::from_millis(100))
            .is_none());
        gate.open();
        for t in threads {
            assert_eq!(t.join().unwrap(), 3);
        }
    }

    #[test]
    fn the_gate_parks_vcpus_until_it_opens() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        gate.close();
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (gate, stop) = (gate.clone(), stop.clone());
                std::thread::spawn(move || gate.park_if_paused(&stop, &mut no_job))
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
        let t = std::thread::spawn(move || g.park_if_paused(&s, &mut no_job));
        assert!(gate.wait_parked(1, Duration::from_secs(5)));
        stop.store(true, Ordering::Release);
        gate.wake();
        t.join().unwrap_or_else(|_| panic!("vCPU thread panicked"));
        assert!(!gate.wait_parked(1, Duration::from_millis(10)));
    }
}
