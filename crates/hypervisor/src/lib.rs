//! The hypervisor abstraction of hostvisor.
//!
//! [`Hypervisor`], [`Vm`] and [`Vcpu`] hide the accelerator from the rest of
//! the VMM. Today there is one backend, KVM ([`kvm`]), and this crate is the
//! only place in the workspace that issues KVM ioctls. Register and CPUID
//! state is exchanged in the x86 layouts that `kvm-bindings` defines: they are
//! plain data, and a later software-emulation backend can fill them too.
//!
//! [`assist`] completes instructions that an accelerator failed to emulate
//! (see its documentation); it only needs [`CpuState`] and guest memory, so it
//! is the seed of that software backend.

#![cfg(target_arch = "x86_64")]

pub mod assist;
pub mod kvm;
pub mod state;
pub mod x86;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use kvm_bindings::{
    kvm_cpuid_entry2 as CpuIdEntry, kvm_dtable as DescriptorTable, kvm_fpu as FpuState,
    kvm_lapic_state as LapicState, kvm_msr_entry as MsrEntry, kvm_regs as StandardRegisters,
    kvm_segment as SegmentRegister, kvm_sregs as SpecialRegisters, kvm_xsave as XsaveState, CpuId,
};

pub use memory::GuestMemoryMmap;
pub use state::{VcpuState, VmState};

/// Errors of the hypervisor layer. Each names the operation that failed; the
/// OS error is the source.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot open {path}")]
    OpenDevice {
        path: String,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    #[error("the KVM API version is {0}, hostvisor needs 12")]
    ApiVersion(i32),
    #[error("KVM lacks the required capability {0}")]
    MissingCapability(&'static str),
    #[error("KVM operation {op} failed")]
    Ioctl {
        op: &'static str,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    #[error("vCPU {0} was already created")]
    DuplicateVcpu(u32),
    /// A saved vCPU or VM state that cannot be restored (it was edited or
    /// damaged, or KVM refused one of its values).
    #[error("invalid saved state: {0}")]
    InvalidState(String),
    /// A saved state holds a part this host's KVM cannot load.
    #[error("the saved state has {0}, which this host's KVM cannot restore")]
    UnsupportedState(&'static str),
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// What a host's accelerator can and cannot do, as far as it matters to how a
/// guest should be configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostProfile {
    /// Guest kernel code (CPL0) is emulated instruction by instruction
    /// instead of running natively, as with the PVM ("kvm_pvm") nested
    /// backend. Such hosts need guest command-line workarounds and are slow
    /// at anything the guest kernel does.
    pub emulated_cpl0: bool,
}

/// An accelerator that can create VMs.
pub trait Hypervisor: Send + Sync {
    /// Creates a VM with no memory and no vCPUs.
    fn create_vm(&self) -> Result<Arc<dyn Vm>>;
    /// The CPUID leaves this accelerator can virtualize.
    fn supported_cpuid(&self) -> Result<CpuId>;
    /// The largest number of vCPUs one VM may have.
    fn max_vcpus(&self) -> usize;
    /// Facts about the host that shape guest configuration.
    fn host_profile(&self) -> HostProfile;
}

/// One virtual machine: memory slots, interrupt controllers, vCPUs.
pub trait Vm: Send + Sync + std::fmt::Debug {
    /// Maps `size` bytes of host memory at `host_addr` into the guest at
    /// `guest_addr`.
    ///
    /// # Safety
    /// The host range must stay mapped, readable and writable for as long as
    /// the VM exists.
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()>;
    /// Creates the platform interrupt controllers and timers (x86: PIC,
    /// IOAPIC, LAPICs and PIT in the kernel).
    fn create_platform_devices(&self) -> Result<()>;
    /// Makes a write to `fd` raise interrupt line `gsi`.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()>;
    /// Makes a 32-bit guest write of `datamatch` to MMIO address `addr`
    /// signal `fd` in the kernel, without an exit to the VMM.
    fn register_mmio_ioevent(&self, fd: &EventFd, addr: u64, datamatch: u32) -> Result<()>;
    /// Makes any guest write to MMIO address `addr` (whatever its width
    /// and value) signal `fd` in the kernel: virtio-pci's per-queue
    /// notification addresses.
    fn register_mmio_notify(&self, fd: &EventFd, addr: u64) -> Result<()>;
    /// Undoes [`Vm::register_mmio_notify`] (the guest moved the address).
    fn unregister_mmio_notify(&self, fd: &EventFd, addr: u64) -> Result<()>;
    /// Sends a message-signalled interrupt (the address and data an MSI
    /// or MSI-X table entry holds) to the guest's local APICs.
    fn signal_msi(&self, addr: u64, data: u32) -> Result<()>;
    /// Creates vCPU `id` (also its initial APIC ID).
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
    /// The guest's paravirtual clock (kvmclock) in nanoseconds.
    fn clock(&self) -> Result<u64>;
    /// Sets the guest's paravirtual clock: restoring the value read at a
    /// pause makes the guest's time stand still while it is paused.
    fn set_clock(&self, ns: u64) -> Result<()>;
    /// Reads the state of the in-kernel devices (PICs, IOAPIC, PIT) and
    /// the clock, for a snapshot. The vCPUs should be paused.
    fn save_state(&self) -> Result<VmState>;
    /// Loads a state read by [`Vm::save_state`], possibly in another
    /// process. Call it after [`Vm::create_platform_devices`]. The state
    /// is untrusted: a malformed one is an error (see [`state`]).
    fn restore_state(&self, state: &VmState) -> Result<()>;
}

/// Architectural state that the VMM reads and writes between runs. This is
/// all the instruction assists need, so they can be tested without an
/// accelerator.
pub trait CpuState {
    fn regs(&self) -> Result<StandardRegisters>;
    fn set_regs(&mut self, regs: &StandardRegisters) -> Result<()>;
    fn sregs(&self) -> Result<SpecialRegisters>;
    fn set_sregs(&mut self, sregs: &SpecialRegisters) -> Result<()>;
    fn fpu(&self) -> Result<FpuState>;
    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()>;
    fn xsave(&self) -> Result<XsaveState>;
    fn set_xsave(&mut self, xsave: &XsaveState) -> Result<()>;
    /// Reads the XCR0 register (the enabled XSAVE features).
    fn xcr0(&self) -> Result<u64>;
}

/// A virtual CPU. Owned by one thread, which calls [`Vcpu::run`].
pub trait Vcpu: CpuState + Send {
    /// This vCPU's index.
    fn id(&self) -> u32;
    /// Runs the guest until it needs the VMM.
    fn run(&mut self) -> Result<VmExit<'_>>;
    fn set_cpuid(&mut self, cpuid: &CpuId) -> Result<()>;
    fn set_msrs(&mut self, msrs: &[MsrEntry]) -> Result<()>;
    /// Reads the MSRs whose indices `msrs` holds, filling in their data.
    fn get_msrs(&self, msrs: &mut [MsrEntry]) -> Result<()>;
    fn lapic(&self) -> Result<LapicState>;
    fn set_lapic(&mut self, lapic: &LapicState) -> Result<()>;
    /// Arms [`kick`] for this vCPU on the calling thread: after this, a
    /// kick signal sent to the thread makes `run` return
    /// [`VmExit::Interrupted`] promptly, even if it arrives just before the
    /// guest is entered. Call once, from the thread that runs the vCPU.
    fn arm_kick(&mut self);
    /// Clears a kick that made [`Vcpu::run`] return [`VmExit::Interrupted`].
    fn clear_kick(&mut self);
    /// Undoes [`Vcpu::arm_kick`] on the calling thread, before the vCPU
    /// goes away; later kicks to the thread do nothing.
    fn disarm_kick(&mut self);
    /// Completes the instruction of the last exit without running any
    /// further guest instruction. KVM finishes an I/O or MMIO exit's
    /// instruction (stores an IN's or MMIO read's data, advances RIP) only
    /// on the next KVM_RUN, so a vCPU saved between an exit and its next
    /// run would lose or repeat that instruction: call this before
    /// [`Vcpu::save_state`] unless the vCPU last stopped with
    /// [`VmExit::Interrupted`]. It returns `Interrupted` once nothing is
    /// pending; any other exit (the next round of a string I/O) is handled
    /// as usual and this is called again. Like a kick, it leaves the vCPU
    /// kicked: call [`Vcpu::clear_kick`] before running it again.
    fn complete_pending_io(&mut self) -> Result<VmExit<'_>>;
    /// Reads everything this vCPU needs to continue elsewhere (see
    /// [`state`]). Call it between runs (the vCPU paused, not inside
    /// [`Vcpu::run`]).
    fn save_state(&self) -> Result<VcpuState>;
    /// Loads a state read by [`Vcpu::save_state`], in the order the
    /// [`state`] module describes. Set the CPUID first (the same CPUID as
    /// the saved vCPU had): it decides which MSRs and XSAVE components
    /// exist. The state is untrusted: a malformed one, or one KVM refuses,
    /// is an error, never a panic. Parts the host cannot load are refused
    /// ([`HypervisorError::UnsupportedState`]), except the debug registers
    /// and a TSC frequency the host cannot set, which are skipped with a
    /// warning. Validation happens before any ioctl, so a malformed state
    /// leaves the vCPU untouched; a part KVM refuses midway leaves it
    /// partly restored, and the VM should be discarded.
    fn restore_state(&mut self, state: &VcpuState) -> Result<()>;
}

/// Why a vCPU stopped running the guest. Port and MMIO exits borrow the
/// vCPU's exchange buffer: for reads, the handler fills `data`.
#[derive(Debug)]
pub enum VmExit<'a> {
    IoIn {
        port: u16,
        data: &'a mut [u8],
    },
    IoOut {
        port: u16,
        data: &'a [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    /// The guest executed HLT (only when the LAPIC is not in the kernel).
    Halt,
    /// The guest triple-faulted.
    Shutdown,
    /// The guest asked the platform (PSCI, or a Hyper-V crash MSR) for a
    /// power event.
    SystemEvent(SystemEvent),
    /// The accelerator could not emulate an instruction.
    EmulationFailure(EmulationFailure),
    /// Another internal accelerator error.
    InternalError {
        suberror: u32,
        data: Vec<u64>,
    },
    /// Entering the guest failed.
    FailEntry {
        reason: u64,
    },
    /// A signal (a kick) interrupted the run.
    Interrupted,
    /// Anything else, by its raw exit number.
    Unsupported(u32),
}

/// The platform event of [`VmExit::SystemEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEvent {
    Shutdown,
    Reset,
    Crash,
    Other(u32),
}

/// An instruction the accelerator failed to emulate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EmulationFailure {
    /// The instruction's bytes as the accelerator fetched them, if it said.
    pub insn_bytes: Option<Vec<u8>>,
}

/// The signal used to kick vCPU threads out of the guest.
pub fn kick_signal() -> i32 {
    kvm::kick_signal()
}

/// Installs the process-wide handler of [`kick_signal`]. Idempotent.
pub fn install_kick_handler() -> std::result::Result<(), vmm_sys_util::errno::Error> {
    kvm::install_kick_handler()
}
