//! One VM instance: memory, platform devices and vCPUs, assembled in steps
//! so that `run` boots Linux and tests can boot a few bytes of code.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arch::cpuid::{CpuFeature, CpuidPolicy};
use arch::layout;
use devices::virtio::console::{Console, ConsoleInput};
use devices::virtio::VirtioDevice;
use devices::{Bus, PlatformRequest};
use hypervisor::{GuestMemoryMmap, Hypervisor, SystemEvent, Vcpu, Vm};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::builder::{add_legacy_devices, DiskHandle, LegacyDevices, VirtioMmio};
use crate::console_input::{ConsoleTarget, StdinConsole};
use crate::control::VmControl;
use crate::error::VmmError;
use crate::event::VmmEvent;
use crate::outcome::VmOutcome;
use crate::panic_watch::{PanicNote, PanicWatch};
use crate::persist::{Described, SaveContext};
use crate::request::{ControlError, ControlRequest, RunState, VcpuCounters, VmStatus};
use crate::shared::{PauseGate, VcpuStats, VcpuStop};
use crate::snapshot::{RestoreSpec, SnapshotError, SnapshotRequest, VmSnapshot};
use crate::vcpu::{self, VcpuContext, VcpuHandle};

pub use crate::builder::VIRTIO_FIRST_IRQ;

mod load;

/// The shape of a machine, independent of what it boots.
pub struct MachineSpec {
    pub cpus: u32,
    pub memory: u64,
    /// Guest RAM's backing, preallocation, locking and KSM.
    pub memory_options: memory::MemoryOptions,
    pub hidden_features: Vec<CpuFeature>,
    /// Where the UART's output goes.
    pub serial_out: Box<dyn Write + Send>,
}

/// A VM ready to boot.
pub struct Machine {
    /// The VM (kept for its lifetime: the vCPUs and memory slots belong to it).
    vm: Arc<dyn Vm>,
    mem: GuestMemoryMmap,
    pio: Bus,
    mmio: Bus,
    vcpus: Vec<Box<dyn Vcpu>>,
    console: ConsoleTarget,
    /// Set when the machine stops (vCPUs leave their loop, console input
    /// is refused).
    stop: Arc<AtomicBool>,
    events: (Sender<VmmEvent>, Receiver<VmmEvent>),
    stats: Arc<VcpuStats>,
    memory: u64,
    panic_note: PanicNote,
    /// The legacy devices' handles, for snapshots.
    legacy: LegacyDevices,
    /// The virtio devices.
    virtio: VirtioMmio,
    cpus: u32,
    /// The configuration the machine was built from (a snapshot records
    /// it); None for machines built by hand (tests).
    described: Option<Described>,
    /// The disks, which a snapshot moves onto new overlays.
    disks: std::sync::Mutex<Vec<DiskHandle>>,
    /// Guest RAM and the firmware ROM below 4 GiB (firmware boots): what
    /// the vCPUs see, so instruction assists reach operands in the ROM.
    /// Devices and snapshots see RAM only (`mem`).
    with_rom: Option<GuestMemoryMmap>,
    /// The balloon's host side, when the VM has one.
    balloon: Option<devices::virtio::balloon::BalloonHandle>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vcpus", &self.vcpus.len())
            .field("memory", &self.memory)
            .finish()
    }
}

/// The highest vCPU count this host and platform allow, and why.
pub fn max_cpus(hv: &dyn Hypervisor) -> (u32, &'static str) {
    let host = host_cpus();
    let kvm = u32::try_from(hv.max_vcpus()).unwrap_or(u32::MAX);
    let mp = arch::mptable::max_cpus();
    [
        (host, "the host's CPU count"),
        (kvm, "KVM's vCPU limit"),
        (mp, "the MP table's limit"),
    ]
    .into_iter()
    .min_by_key(|(n, _)| *n)
    .unwrap_or((1, "the host's CPU count"))
}

/// How many CPUs this process may run on: its affinity mask, one
/// syscall. (`std::thread::available_parallelism` also reads the cgroup
/// files and the mount table to find a CPU quota: 0.1 ms of every VM start
/// and restore on the development host, for a limit that is about time
/// shares, not about how many vCPUs can run at once.)
fn host_cpus() -> u32 {
    // SAFETY: `cpu_set_t` is a plain bit array; all zeros is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `set`, which outlives the call.
    let got = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    match got {
        // More CPUs than a `cpu_set_t` holds (EINVAL), or no answer.
        // SAFETY: `set` is an initialised `cpu_set_t`, filled by the call.
        0 => u32::try_from(unsafe { libc::CPU_COUNT(&set) })
            .unwrap_or(1)
            .max(1),
        _ => std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
    }
}

impl Machine {
    /// Creates the VM, its RAM, platform devices and vCPUs (with CPUID,
    /// MSRs, FPU, LAPIC and 64-bit mode set up), but loads nothing.
    pub fn new(hv: &dyn Hypervisor, spec: MachineSpec) -> Result<Machine, VmmError> {
        Self::build(hv, spec, None)
    }

    /// Creates a machine for restoring a snapshot: as [`Machine::new`],
    /// but guest RAM is the snapshot's memory file mapped copy-on-write,
    /// and nothing is written into it. [`Machine::restore_state`] then
    /// puts the saved state in.
    pub fn for_restore(
        hv: &dyn Hypervisor,
        spec: MachineSpec,
        from: &RestoreSpec,
        snap: &VmSnapshot,
    ) -> Result<Machine, VmmError> {
        Self::build(hv, spec, Some((from, snap)))
    }

    fn build(
        hv: &dyn Hypervisor,
        spec: MachineSpec,
        restore: Option<(&RestoreSpec, &VmSnapshot)>,
    ) -> Result<Machine, VmmError> {
        let (max, why) = max_cpus(hv);
        if spec.cpus == 0 {
            return Err(VmmError::NoCpus);
        }
        if spec.cpus > max {
            return Err(VmmError::TooManyCpus {
                requested: spec.cpus,
                max,
                why,
            });
        }
        if spec.memory < layout::MIN_MEMORY {
            return Err(VmmError::MemoryTooSmall(spec.memory));
        }

        let ranges = layout::ram_ranges(spec.memory)
            .into_iter()
            .map(|(start, size)| {
                usize::try_from(size)
                    .map(|size| (GuestAddress(start), size))
                    .map_err(|_| {
                        VmmError::GuestMemory(format!("{size} bytes do not fit the address space"))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mem = match restore {
            // RAM first: a host short of huge pages or locked memory
            // fails before any VM exists.
            None => memory::create(
                &ranges,
                &spec.memory_options,
                &memory::prealloc::stderr_progress(),
            )?,
            Some((from, _)) => snapshot::memory::map(
                &from.dir.join(crate::snapshot::MEMORY_FILE),
                &ranges,
                from.load,
            )
            .map_err(|e| VmmError::Snapshot(e.into()))?,
        };
        let vm = hv.create_vm()?;
        for (slot, region) in (0u32..).zip(mem.iter()) {
            // SAFETY: the regions belong to `mem`, which the Machine keeps
            // (and the vCPU threads clone) for as long as the VM runs.
            unsafe {
                vm.map_memory(
                    slot,
                    region.start_addr().0,
                    region.len(),
                    region.as_ptr() as u64,
                )
            }?;
        }
        vm.create_platform_devices()?;

        let events = channel();
        let pio = Bus::new();
        let legacy = add_legacy_devices(
            vm.as_ref(),
            &pio,
            &events.0,
            spec.serial_out,
            restore.map(|(_, snap)| &snap.devices.legacy),
        )?;

        // A restored vCPU gets the CPUID it had; otherwise (a boot, or a
        // snapshot from before the CPUID was saved) the policy makes one
        // from what the host supports.
        let saved_cpuid = match restore {
            Some((_, snap)) => snap
                .vcpus
                .iter()
                .map(|v| v.saved_cpuid())
                .collect::<Result<Option<Vec<_>>, _>>()?,
            None => None,
        };
        let cpuids = match saved_cpuid {
            Some(saved) => saved,
            None => {
                let supported = hv.supported_cpuid()?;
                let policy = CpuidPolicy {
                    cpu_count: spec.cpus,
                    hidden: spec.hidden_features,
                };
                (0..spec.cpus)
                    .map(|id| policy.apply(&supported, id))
                    .collect()
            }
        };
        if restore.is_none() {
            arch::regs::write_boot_tables(&mem)?;
        }
        let mut vcpus = Vec::with_capacity(spec.cpus as usize);
        for (id, cpuid) in (0..spec.cpus).zip(&cpuids) {
            let mut vcpu = vm.create_vcpu(id)?;
            vcpu.set_cpuid(cpuid)?;
            // A restored vCPU gets all of this from its saved state.
            if restore.is_none() {
                vcpu.set_msrs(&arch::regs::boot_msrs())?;
                vcpu.set_fpu(&arch::regs::boot_fpu())?;
                let sregs = arch::regs::long_mode_sregs(&vcpu.sregs()?);
                vcpu.set_sregs(&sregs)?;
                let mut lapic = vcpu.lapic()?;
                arch::regs::configure_lint(&mut lapic);
                vcpu.set_lapic(&lapic)?;
            }
            vcpus.push(vcpu);
        }
        let stop = Arc::new(AtomicBool::new(false));
        Ok(Machine {
            vm,
            mem,
            pio,
            mmio: Bus::new(),
            vcpus,
            console: ConsoleTarget::uart(
                legacy.serial.clone(),
                legacy.input_space.clone(),
                stop.clone(),
            ),
            stop,
            events,
            stats: Arc::new(VcpuStats::default()),
            memory: spec.memory,
            panic_note: legacy.panic_note.clone(),
            legacy,
            virtio: VirtioMmio::default(),
            cpus: spec.cpus,
            described: None,
            disks: std::sync::Mutex::new(Vec::new()),
            with_rom: None,
            balloon: None,
        })
    }

    /// Hands the machine its disks' handles (made with their devices by
    /// [`crate::builder::configured_devices`]), which snapshots switch
    /// onto overlays.
    pub fn attach_disks(&mut self, disks: Vec<DiskHandle>) {
        self.disks
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(disks);
    }

    /// Records the configuration (and NIC addresses) the machine was built
    /// from, which snapshots of it carry.
    pub fn describe(&mut self, config: crate::config::VmConfig, macs: Vec<net::MacAddr>) {
        self.described = Some(Described { config, macs });
    }

    /// Puts a snapshot's state into a machine made with
    /// [`Machine::for_restore`] and the same devices: the VM's, every
    /// vCPU's and every device's. Run it next.
    pub fn restore_state(&mut self, snap: &VmSnapshot) -> Result<(), VmmError> {
        let ranges = crate::persist::memory_ranges(&self.mem);
        if ranges != snap.memory_ranges {
            return Err(VmmError::Snapshot(SnapshotError::Mismatch(
                "guest RAM is laid out differently".into(),
            )));
        }
        crate::persist::restore(self.vm.as_ref(), &mut self.vcpus, &self.virtio, snap)
            .map_err(VmmError::Snapshot)
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn pio_bus(&self) -> &Bus {
        &self.pio
    }

    pub fn mmio_bus(&self) -> &Bus {
        &self.mmio
    }

    pub fn stats(&self) -> Arc<VcpuStats> {
        self.stats.clone()
    }

    /// Adds a virtio device behind a virtio-mmio window: the next 4 KiB
    /// window and interrupt line, an irqfd for its interrupt, and an
    /// ioeventfd per queue at QueueNotify (see [`VirtioMmio::add`]).
    /// Linux learns of it from the command line [`Machine::load_linux`]
    /// writes.
    pub fn add_virtio_device(&mut self, device: Box<dyn VirtioDevice>) -> Result<(), VmmError> {
        self.virtio
            .add(self.vm.as_ref(), &self.mem, &self.mmio, device)
    }

    /// Adds a virtio-balloon (see [`crate::config::BalloonConfig`]), whose
    /// host side the VM's controllers reach.
    pub fn add_balloon(&mut self, config: &crate::config::BalloonConfig) -> Result<(), VmmError> {
        let (device, handle) =
            devices::virtio::balloon::Balloon::new(config.options(), self.memory)
                .map_err(VmmError::EventFd)?;
        self.add_virtio_device(Box::new(device))?;
        self.balloon = Some(handle);
        Ok(())
    }

    /// Makes a virtio-console port the console: what the guest writes to
    /// `hvc0` goes to `output` (watched for kernel panics), and console
    /// input goes to the port instead of the UART.
    pub fn add_virtio_console(&mut self, output: Box<dyn Write + Send>) -> Result<(), VmmError> {
        let input = Arc::new(ConsoleInput::new().map_err(VmmError::EventFd)?);
        let watched = Box::new(PanicWatch::new(output, self.panic_note.clone()));
        self.add_virtio_device(Box::new(Console::new(watched, input.clone())))?;
        self.console = ConsoleTarget::virtio(input, self.stop.clone());
        Ok(())
    }

    /// Runs the guest until it powers off, resets, crashes, or the user
    /// ends it, with console input from stdin when `interactive`. With
    /// `control`, another thread can pause, resume, kill and inspect it.
    pub fn run(
        self,
        interactive: bool,
        started: Instant,
        control: Option<&VmControl>,
    ) -> Result<VmOutcome, VmmError> {
        let stdin = if interactive {
            Some(StdinConsole::start().map_err(VmmError::Thread)?)
        } else {
            None
        };
        let ended = self.run_with(RunOptions {
            started,
            control,
            stdin: stdin.as_ref(),
        })?;
        Ok(ended.outcome)
    }

    /// Runs the guest until it ends (see [`Machine::run`]); the end says
    /// whether every thread of the machine stopped in time.
    pub fn run_with(mut self, options: RunOptions<'_>) -> Result<RunEnd, VmmError> {
        let RunOptions {
            started,
            control,
            stdin,
        } = options;
        hypervisor::install_kick_handler().map_err(|e| VmmError::Signal(e.to_string()))?;
        let (tx, rx) = std::mem::replace(&mut self.events, channel());
        let stop = self.stop.clone();
        let gate = Arc::new(PauseGate::default());
        // Setup is over: give back the code and buffers only it needed.
        match memory::overhead::release_startup_memory() {
            Ok(r) => tracing::debug!("released {} KiB of setup-only pages", r.file_kib),
            Err(e) => tracing::debug!("could not release setup-only pages: {e}"),
        }
        // Code that runs later maps back in: released again now and then,
        // measured from now (no vCPU has run yet).
        let mut trimmer = memory::overhead::Trimmer::new();
        // Requests are taken before any vCPU runs: one that comes once
        // the guest has started (it may be quick) finds the machine. They
        // wait in the channel until the loop below serves them.
        if let Some(stdin) = stdin {
            stdin.attach(self.console.clone(), tx.clone());
        }
        if let Some(control) = control {
            control.attach(tx.clone(), self.console.clone());
            control.attach_balloon(self.balloon.clone());
        }
        seccomp::apply(seccomp::ThreadKind::Control);
        let mut handles = Vec::new();
        for vcpu in std::mem::take(&mut self.vcpus) {
            let id = vcpu.id();
            let ctx = VcpuContext {
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                mem: self.with_rom.clone().unwrap_or_else(|| self.mem.clone()),
                stats: self.stats.clone(),
                stop: stop.clone(),
                pause: gate.clone(),
                events: tx.clone(),
                started,
            };
            let builder = std::thread::Builder::new().name(format!("vcpu{id}"));
            let thread = seccomp::spawn(builder, move || {
                seccomp::apply(seccomp::ThreadKind::Vcpu);
                vcpu::run(vcpu, ctx)
            });
            match thread {
                Ok(thread) => handles.push(VcpuHandle { id, thread }),
                Err(e) => {
                    stop.store(true, Ordering::Release);
                    for h in &handles {
                        h.kick();
                    }
                    return Err(VmmError::Thread(e));
                }
            }
        }
        drop(tx);

        let booted = Instant::now();
        let mut paused: Option<(u64, Instant)> = None;
        let mut paused_total = std::time::Duration::ZERO;
        let mut running = handles.len();
        let mut next_trim = Instant::now() + memory::overhead::Trimmer::PERIOD;
        let outcome = loop {
            let now = Instant::now();
            if now >= next_trim {
                if let Some(r) = trimmer.tick() {
                    tracing::trace!("released {} KiB of file pages", r.file_kib);
                }
                next_trim = now + memory::overhead::Trimmer::PERIOD;
            }
            let event = match rx.recv_timeout(next_trim.saturating_duration_since(now)) {
                Ok(event) => event,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    break VmOutcome::Crashed("every vCPU thread ended without a reason".into());
                }
            };
            match event {
                VmmEvent::Platform(PlatformRequest::Reset) => break VmOutcome::Reset,
                VmmEvent::Platform(PlatformRequest::PowerOff) => break VmOutcome::PoweredOff,
                VmmEvent::Platform(PlatformRequest::DebugExit(code)) => break VmOutcome::DebugExit(code),
                VmmEvent::ConsoleExit => break VmOutcome::Terminated,
                VmmEvent::Control(request, reply) => {
                    let answer = match request {
                        ControlRequest::Pause if paused.is_some() => {
                            Err(ControlError::Conflict("the VM is already paused".into()))
                        }
                        ControlRequest::Pause => {
                            // The guest's clock stands still while paused,
                            // and nothing changes its RAM.
                            self.quiesce(&gate, &handles, running).map(|clock| {
                                paused = Some((clock, Instant::now()));
                                None
                            })
                        }
                        ControlRequest::Resume => match paused.take() {
                            None => Err(ControlError::Conflict("the VM is not paused".into())),
                            Some((clock, since)) => {
                                if let Err(e) = self.virtio.wake_all() {
                                    tracing::error!("resuming: {e}");
                                }
                                if let Err(e) = self.vm.set_clock(clock) {
                                    tracing::warn!("cannot restore the guest clock: {e}");
                                }
                                paused_total += since.elapsed();
                                gate.open();
                                Ok(None)
                            }
                        },
                        ControlRequest::Snapshot(request) => self.snapshot(
                            &request,
                            &gate,
                            &handles,
                            running,
                            paused.map(|(clock, _)| clock),
                        ),
                        ControlRequest::WithDisksClosed(job) => self.with_disks_closed(
                            &job,
                            &gate,
                            &handles,
                            running,
                            paused.is_some(),
                        ),
                        ControlRequest::PowerButton => self.press_power_button(),
                        ControlRequest::Kill => {
                            let _ = reply.send(Ok(None));
                            break VmOutcome::Killed;
                        }
                        ControlRequest::Info => {
                            let paused_now = paused.map_or(std::time::Duration::ZERO, |(_, t)| t.elapsed());
                            Ok(Some(VmStatus {
                                state: if paused.is_some() { RunState::Paused } else { RunState::Running },
                                uptime_ms: millis(booted.elapsed()),
                                paused_ms: millis(paused_total + paused_now),
                                vcpus: self.cpus,
                                memory: self.memory,
                                counters: VcpuCounters::from_stats(&self.stats),
                                devices: self.virtio.info(),
                                balloon: self.balloon.as_ref().map(|b| b.status()),
                            }))
                        }
                    };
                    let _ = reply.send(answer);
                }
                VmmEvent::VcpuStopped { id, reason, rip } => match reason {
                    VcpuStop::Requested => {
                        running -= 1;
                        if running == 0 {
                            break VmOutcome::Terminated;
                        }
                    }
                    VcpuStop::TripleFault => {
                        break VmOutcome::Crashed(format!("vCPU {id} triple-faulted{}", at(rip)))
                    }
                    VcpuStop::SystemEvent(SystemEvent::Reset) => break VmOutcome::Reset,
                    VcpuStop::SystemEvent(SystemEvent::Shutdown) => break VmOutcome::PoweredOff,
                    VcpuStop::SystemEvent(other) => {
                        break VmOutcome::Crashed(format!("vCPU {id} reported {other:?}"))
                    }
                    VcpuStop::EmulationFailure { rip, bytes, reason } => {
                        break VmOutcome::Crashed(format!(
                            "vCPU {id}: KVM could not emulate the instruction at RIP {rip:#x} (bytes {}): {reason}",
                            if bytes.is_empty() { "unknown".to_string() } else { hypervisor::assist::hex(&bytes) }
                        ))
                    }
                    VcpuStop::InternalError(msg) => {
                        break VmOutcome::Crashed(format!("vCPU {id}: {msg}{}", at(rip)))
                    }
                },
            }
        };
        if let Some(control) = control {
            control.detach();
        }
        if let Some(stdin) = stdin {
            stdin.detach();
        }
        stop.store(true, Ordering::Release);
        gate.wake();
        let mut stuck = stop_vcpus(handles, VCPU_STOP_TIMEOUT);
        // The devices go with the last references to the buses: their
        // workers are stopped (each within its own bound) on a thread of
        // their own, so that the whole teardown has one deadline.
        let teardown = (self.pio, self.mmio, self.vm, self.mem);
        if !drop_within(teardown, DEVICE_STOP_TIMEOUT) {
            stuck.push("device workers".to_string());
        }
        if !stuck.is_empty() {
            tracing::warn!(
                "left behind, still running: {}; the process should exit",
                stuck.join(", ")
            );
        }
        // A reset right after a kernel panic is the panic's reboot.
        let panic = self
            .panic_note
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let outcome = match (outcome, panic) {
            (VmOutcome::Reset, Some(message)) => VmOutcome::Crashed(message),
            (outcome, _) => outcome,
        };
        Ok(RunEnd { outcome, stuck })
    }
}

impl Machine {
    /// Takes a snapshot of the running machine: pauses it unless
    /// `paused_clock` says it is paused, saves, and resumes it (the guest
    /// sees a pause only). The vCPUs are parked at `gate`.
    fn snapshot(
        &self,
        request: &SnapshotRequest,
        gate: &PauseGate,
        handles: &[VcpuHandle],
        running: usize,
        paused_clock: Option<u64>,
    ) -> Result<Option<VmStatus>, ControlError> {
        let started = Instant::now();
        let clock = match paused_clock {
            Some(clock) => clock,
            None => self.park_vcpus(gate, handles, running)?,
        };
        let ctx = SaveContext {
            vm: self.vm.as_ref(),
            mem: &self.mem,
            legacy: &self.legacy,
            virtio: &self.virtio,
            described: self.described.as_ref(),
            disks: &self.disks,
            gate,
            vcpus: running,
            clock,
        };
        // A paused VM's devices are asleep and stay so.
        let result = crate::persist::save(&ctx, request, paused_clock.is_none());
        if paused_clock.is_none() {
            if let Err(e) = self.vm.set_clock(clock) {
                tracing::warn!("cannot restore the guest clock: {e}");
            }
            gate.open();
        }
        tracing::info!(target: "hostvisor::timing", "snapshot {} in {:.1} ms",
            if result.is_ok() { "taken" } else { "failed" },
            started.elapsed().as_secs_f64() * 1e3);
        match result {
            Ok(()) => Ok(None),
            Err(
                e @ (SnapshotError::DirNotEmpty(_)
                | SnapshotError::NeedsOverlays(_)
                | SnapshotError::OverlayCount { .. }),
            ) => Err(ControlError::Conflict(crate::error::error_chain(&e))),
            Err(e) => Err(ControlError::Failed(crate::error::error_chain(&e))),
        }
    }
}

impl Machine {
    /// Stops the `running` vCPUs at `gate`; returns the guest clock as
    /// they stopped (set back on resume, so the guest sees no gap).
    fn park_vcpus(
        &self,
        gate: &PauseGate,
        handles: &[VcpuHandle],
        running: usize,
    ) -> Result<u64, ControlError> {
        gate.close();
        for h in handles {
            h.kick();
        }
        if !gate.wait_parked(running, Duration::from_secs(10)) {
            gate.open();
            return Err(ControlError::Failed("the vCPUs did not stop".into()));
        }
        Ok(self.vm.clock().unwrap_or(0))
    }

    /// [`Self::park_vcpus`], then every device asleep: nothing changes
    /// guest RAM until they wake. A device stuck in its backend fails it
    /// (the vCPUs run again): no pause that would let it write guest RAM.
    fn quiesce(
        &self,
        gate: &PauseGate,
        handles: &[VcpuHandle],
        running: usize,
    ) -> Result<u64, ControlError> {
        let clock = self.park_vcpus(gate, handles, running)?;
        if let Err(e) = self.virtio.sleep_all() {
            gate.open();
            return Err(ControlError::Failed(e));
        }
        Ok(clock)
    }

    /// Runs `job` with every disk closed (see [`crate::reopen`]): pauses
    /// the vCPUs and puts the devices to sleep unless the VM is paused
    /// (then they are already), and resumes afterwards.
    fn with_disks_closed(
        &self,
        job: &crate::reopen::DiskJob,
        gate: &PauseGate,
        handles: &[VcpuHandle],
        running: usize,
        paused: bool,
    ) -> Result<Option<VmStatus>, ControlError> {
        let clock = if paused {
            None
        } else {
            Some(self.quiesce(gate, handles, running)?)
        };
        let result = {
            let disks = self
                .disks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            crate::reopen::run_closed(&disks, job)
        };
        if let Some(clock) = clock {
            if let Err(e) = self.virtio.wake_all() {
                tracing::error!("resuming: {e}");
            }
            if let Err(e) = self.vm.set_clock(clock) {
                tracing::warn!("cannot restore the guest clock: {e}");
            }
            gate.open();
        }
        result.map(|()| None).map_err(ControlError::Failed)
    }
}

/// How long the vCPUs get to leave their loops once told to stop. A vCPU
/// can be held up by a device: a reset waits up to
/// [`devices::virtio::worker::STOP_TIMEOUT`] for the device's worker.
pub const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the devices get to stop their workers at teardown.
pub const DEVICE_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// What [`Machine::run_with`] needs besides the machine.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions<'a> {
    /// When the process started, for timing logs.
    pub started: Instant,
    /// A handle through which another thread controls the VM.
    pub control: Option<&'a VmControl>,
    /// The console input thread to attach to this machine.
    pub stdin: Option<&'a StdinConsole>,
}

/// How a machine's run ended.
#[derive(Debug)]
pub struct RunEnd {
    pub outcome: VmOutcome,
    /// Threads that did not stop in time (a vCPU blocked writing console
    /// output nobody reads, a device worker stuck in its backend). They
    /// are left running; the process should exit rather than boot again.
    pub stuck: Vec<String>,
}

/// Kicks the (already told to stop) vCPUs and joins them, waiting until
/// `timeout` at most; the names of those left running.
fn stop_vcpus(handles: Vec<VcpuHandle>, timeout: Duration) -> Vec<String> {
    for h in &handles {
        h.kick();
    }
    let deadline = Instant::now() + timeout;
    let mut waiting = handles;
    while !waiting.is_empty() && Instant::now() < deadline {
        let (done, rest): (Vec<_>, Vec<_>) =
            waiting.into_iter().partition(|h| h.thread.is_finished());
        for h in done {
            let _ = h.thread.join();
        }
        waiting = rest;
        if !waiting.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Dropping a JoinHandle detaches its thread.
    waiting
        .into_iter()
        .map(|h| format!("vCPU {}", h.id))
        .collect()
}

/// Drops `value` on a thread of its own and waits for that at most
/// `timeout`; false if the drop is still going on.
fn drop_within<T: Send + 'static>(value: T, timeout: Duration) -> bool {
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("teardown".into())
        .spawn(move || {
            drop(value);
            let _ = done.send(());
        });
    match spawned {
        Ok(_) => finished.recv_timeout(timeout).is_ok(),
        // No thread to spare: drop it here.
        Err(_) => true,
    }
}

/// Milliseconds (u64 milliseconds last 584 million years).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn at(rip: Option<u64>) -> String {
    rip.map_or_else(String::new, |rip| format!(" at RIP {rip:#x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The affinity mask counts at least the CPUs std finds (which may
    /// also apply a cgroup quota), and never zero.
    #[test]
    fn host_cpus_come_from_the_affinity_mask() {
        let std_count = std::thread::available_parallelism().map_or(1, |n| n.get());
        let ours = host_cpus() as usize;
        assert!(ours >= 1 && ours >= std_count, "{ours} < {std_count}");
    }
}
