//! The vCPU thread: an explicit state machine around `KVM_RUN`, with exits
//! classified by the pure [`handle_exit`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::Bus;
use hypervisor::assist;
use hypervisor::{EmulationFailure, GuestMemoryMmap, Vcpu, VmExit};

use crate::event::VmmEvent;
use crate::shared::{GateAnswer, GateJob, PauseGate};
pub use crate::shared::{VcpuStats, VcpuStop};

/// What the run loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitAction {
    /// Enter the guest again.
    Resume,
    /// A kick: look at the control state before resuming.
    CheckControl,
    /// Try to complete the failed instruction in the VMM.
    Assist(EmulationFailure),
    /// Leave the loop.
    Stop(VcpuStop),
}

/// Classifies one exit, dispatching port and MMIO accesses to the buses.
/// Pure but for the buses, so it is tested with hand-built exits.
pub fn handle_exit(exit: VmExit<'_>, pio: &Bus, mmio: &Bus, stats: &VcpuStats) -> ExitAction {
    stats.exits.fetch_add(1, Ordering::Relaxed);
    let unhandled = |handled: bool, what: &str, addr: u64| {
        if !handled {
            stats.unhandled_accesses.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("{what} {addr:#x}: no device there");
        }
        ExitAction::Resume
    };
    match exit {
        VmExit::IoIn { port, data } => {
            stats.pio_exits.fetch_add(1, Ordering::Relaxed);
            unhandled(pio.read(u64::from(port), data), "port read", port.into())
        }
        VmExit::IoOut { port, data } => {
            stats.pio_exits.fetch_add(1, Ordering::Relaxed);
            unhandled(pio.write(u64::from(port), data), "port write", port.into())
        }
        VmExit::MmioRead { addr, data } => {
            stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
            unhandled(mmio.read(addr, data), "MMIO read", addr)
        }
        VmExit::MmioWrite { addr, data } => {
            stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
            unhandled(mmio.write(addr, data), "MMIO write", addr)
        }
        // With the LAPIC in the kernel, HLT is handled there; an exit for
        // it only means "run again".
        VmExit::Halt => ExitAction::Resume,
        VmExit::Interrupted => ExitAction::CheckControl,
        VmExit::Shutdown => ExitAction::Stop(VcpuStop::TripleFault),
        VmExit::SystemEvent(event) => ExitAction::Stop(VcpuStop::SystemEvent(event)),
        VmExit::EmulationFailure(failure) => ExitAction::Assist(failure),
        VmExit::InternalError { suberror, data } => ExitAction::Stop(VcpuStop::InternalError(
            format!("KVM internal error {suberror} (data {data:x?})"),
        )),
        VmExit::FailEntry { reason } => ExitAction::Stop(VcpuStop::InternalError(format!(
            "KVM could not enter the guest (hardware reason {reason:#x})"
        ))),
        VmExit::Unsupported(reason) => ExitAction::Stop(VcpuStop::InternalError(format!(
            "unexpected KVM exit {reason}"
        ))),
    }
}

/// The lifecycle of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// Entering and running the guest.
    Running,
    /// Told to stop; leaving the loop.
    Stopping,
    /// Out of the loop.
    Exited,
}

/// What the VMM shares with one vCPU thread.
pub struct VcpuContext {
    pub pio: Bus,
    pub mmio: Bus,
    pub mem: GuestMemoryMmap,
    pub stats: Arc<VcpuStats>,
    pub stop: Arc<AtomicBool>,
    /// Where the thread waits while the VM is paused.
    pub pause: Arc<PauseGate>,
    pub events: Sender<VmmEvent>,
    /// When the VMM process started, for the first-entry timing log.
    pub started: std::time::Instant,
}

/// Runs `vcpu` until it stops; reports why to the VMM.
pub fn run(mut vcpu: Box<dyn Vcpu>, ctx: VcpuContext) {
    let id = vcpu.id();
    vcpu.arm_kick();
    let mut state = VcpuState::Running;
    let mut first_entry = true;
    let mut reason = VcpuStop::Requested;
    while state == VcpuState::Running {
        if ctx.pause.is_closed() {
            park(vcpu.as_mut(), &ctx);
        }
        if ctx.stop.load(Ordering::Acquire) {
            state = VcpuState::Stopping;
            continue;
        }
        if first_entry {
            tracing::info!(target: "hostvisor::timing", vcpu = id,
                "first KVM_RUN at {:.3} ms", ctx.started.elapsed().as_secs_f64() * 1e3);
            first_entry = false;
        }
        let action = match vcpu.run() {
            Ok(exit) => handle_exit(exit, &ctx.pio, &ctx.mmio, &ctx.stats),
            Err(e) => ExitAction::Stop(VcpuStop::InternalError(crate::error::error_chain(&e))),
        };
        match action {
            ExitAction::Resume => {}
            ExitAction::CheckControl => vcpu.clear_kick(),
            ExitAction::Assist(failure) => {
                if let Err(stop) = assist_instruction(vcpu.as_mut(), &ctx, &failure) {
                    reason = stop;
                    state = VcpuState::Stopping;
                }
            }
            ExitAction::Stop(stop) => {
                reason = stop;
                state = VcpuState::Stopping;
            }
        }
    }
    vcpu.disarm_kick();
    state = VcpuState::Exited;
    let rip = vcpu.regs().ok().map(|r| r.rip);
    tracing::debug!(vcpu = id, ?state, ?reason, "vCPU loop ended");
    let _ = ctx.events.send(VmmEvent::VcpuStopped { id, reason, rip });
}

/// Waits out a pause. The guest's TSC is put back to where it was when
/// the vCPU stopped (as the kvmclock is by the VMM), so a guest timing with
/// the TSC does not see the pause either. KVM keeps the vCPUs' TSCs in
/// step when they are written with values this close together.
fn park(vcpu: &mut dyn Vcpu, ctx: &VcpuContext) {
    const MSR_IA32_TSC: u32 = 0x10;
    let mut tsc = [hypervisor::MsrEntry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }];
    let saved = vcpu.get_msrs(&mut tsc).is_ok();
    let id = vcpu.id();
    ctx.pause.park_if_paused(&ctx.stop, &mut |job| match job {
        GateJob::SaveState => GateAnswer {
            vcpu: id,
            state: save_parked(vcpu),
        },
    });
    if saved && !ctx.stop.load(Ordering::Acquire) {
        if let Err(e) = vcpu.set_msrs(&tsc) {
            tracing::warn!(
                vcpu = vcpu.id(),
                "cannot restore the TSC after a pause: {e}"
            );
        }
    }
}

/// The state of a parked vCPU. KVM finishes the instruction of the last
/// exit (an IN's data into RAX, RIP past it) only at the next KVM_RUN, so
/// that is done first, without entering the guest; the kick it leaves
/// makes the next run return at once, which the loop clears.
fn save_parked(vcpu: &mut dyn Vcpu) -> Result<Box<hypervisor::VcpuState>, String> {
    match vcpu.complete_pending_io() {
        Ok(VmExit::Interrupted) => {}
        Ok(other) => {
            return Err(format!(
                "the vCPU did not settle before saving (exit {other:?})"
            ))
        }
        Err(e) => return Err(crate::error::error_chain(&e)),
    }
    vcpu.save_state()
        .map(Box::new)
        .map_err(|e| crate::error::error_chain(&e))
}

fn assist_instruction(
    vcpu: &mut dyn Vcpu,
    ctx: &VcpuContext,
    failure: &EmulationFailure,
) -> Result<(), VcpuStop> {
    match assist::complete(vcpu, &ctx.mem, failure) {
        Ok(kind) => {
            ctx.stats.assists[kind.index()].fetch_add(1, Ordering::Relaxed);
            tracing::debug!(vcpu = vcpu.id(), "assisted {}", kind.name());
            Ok(())
        }
        Err(e) => {
            let rip = vcpu.regs().map_or(0, |r| r.rip);
            Err(VcpuStop::EmulationFailure {
                rip,
                bytes: failure.insn_bytes.clone().unwrap_or_default(),
                reason: crate::error::error_chain(&e),
            })
        }
    }
}

/// A running vCPU thread.
pub struct VcpuHandle {
    pub id: u32,
    pub thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Interrupts the guest so the thread looks at its stop flag.
    pub fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        // SAFETY: the pthread_t belongs to a thread that has not been
        // joined (we hold its JoinHandle), so it is valid; the kick signal
        // has a handler installed before any vCPU thread starts.
        unsafe {
            libc::pthread_kill(self.thread.as_pthread_t(), hypervisor::kick_signal());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::SystemEvent;
    use std::sync::Mutex;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl devices::BusDevice for Echo {
        fn read(&mut self, _: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0] + 1);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.0.push((base + offset, data.to_vec()));
        }
    }

    fn buses() -> (Bus, Bus, Arc<Mutex<Echo>>) {
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        let pio = Bus::new();
        pio.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mmio = Bus::new();
        mmio.insert(dev.clone(), 0xd000_0000, 0x1000).unwrap();
        (pio, mmio, dev)
    }

    #[test]
    fn port_and_mmio_exits_reach_the_buses() {
        let (pio, mmio, dev) = buses();
        let stats = VcpuStats::default();
        let mut data = [0u8; 1];
        let action = handle_exit(
            VmExit::IoIn {
                port: 0x3fd,
                data: &mut data,
            },
            &pio,
            &mmio,
            &stats,
        );
        assert_eq!((action, data), (ExitAction::Resume, [6]));
        handle_exit(
            VmExit::IoOut {
                port: 0x3f8,
                data: b"A",
            },
            &pio,
            &mmio,
            &stats,
        );
        let mut wide = [0u8; 4];
        handle_exit(
            VmExit::MmioRead {
                addr: 0xd000_0010,
                data: &mut wide,
            },
            &pio,
            &mmio,
            &stats,
        );
        assert_eq!(wide, [0x11; 4]);
        handle_exit(
            VmExit::MmioWrite {
                addr: 0xd000_0004,
                data: &[1, 2],
            },
            &pio,
            &mmio,
            &stats,
        );
        assert_eq!(
            dev.lock().unwrap().0,
            vec![(0x3f8, b"A".to_vec()), (0xd000_0004, vec![1, 2])]
        );
        assert_eq!(stats.pio_exits.load(Ordering::Relaxed), 2);
        assert_eq!(stats.mmio_exits.load(Ordering::Relaxed), 2);
        assert_eq!(stats.unhandled_accesses.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn accesses_nobody_claims_read_as_ones_and_are_counted() {
        let (pio, mmio, _) = buses();
        let stats = VcpuStats::default();
        let mut data = [0u8; 2];
        let action = handle_exit(
            VmExit::IoIn {
                port: 0xcf8,
                data: &mut data,
            },
            &pio,
            &mmio,
            &stats,
        );
        assert_eq!((action, data), (ExitAction::Resume, [0xff, 0xff]));
        handle_exit(
            VmExit::MmioWrite {
                addr: 0x1234,
                data: &[0],
            },
            &pio,
            &mmio,
            &stats,
        );
        assert_eq!(stats.unhandled_accesses.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn guest_ending_exits_stop_the_loop() {
        let (pio, mmio, _) = buses();
        let stats = VcpuStats::default();
        let h = |exit| handle_exit(exit, &pio, &mmio, &stats);
        assert_eq!(h(VmExit::Shutdown), ExitAction::Stop(VcpuStop::TripleFault));
        assert_eq!(
            h(VmExit::SystemEvent(SystemEvent::Reset)),
            ExitAction::Stop(VcpuStop::SystemEvent(SystemEvent::Reset))
        );
        assert!(matches!(
            h(VmExit::InternalError {
                suberror: 3,
                data: vec![]
            }),
            ExitAction::Stop(VcpuStop::InternalError(_))
        ));
        assert!(matches!(
            h(VmExit::FailEntry { reason: 7 }),
            ExitAction::Stop(_)
        ));
        assert!(matches!(h(VmExit::Unsupported(99)), ExitAction::Stop(_)));
        assert_eq!(h(VmExit::Halt), ExitAction::Resume);
        assert_eq!(h(VmExit::Interrupted), ExitAction::CheckControl);
        let failure = EmulationFailure {
            insn_bytes: Some(vec![0xcc]),
        };
        assert_eq!(
            h(VmExit::EmulationFailure(failure.clone())),
            ExitAction::Assist(failure)
        );
        assert_eq!(stats.exits.load(Ordering::Relaxed), 8);
    }
}
