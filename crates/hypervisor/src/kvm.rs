//! The KVM backend, on `kvm-ioctls`.

mod persist;

use std::cell::Cell;
use std::path::Path;
use std::sync::{Arc, Once};

use kvm_bindings::{
    kvm_pit_config, kvm_run, kvm_userspace_memory_region, Msrs, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::errno;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::{
    CpuId, CpuState, EmulationFailure, FpuState, HostProfile, Hypervisor, HypervisorError,
    LapicState, MsrEntry, Result, SpecialRegisters, StandardRegisters, SystemEvent, Vcpu,
    VcpuState, Vm, VmExit, VmState, XsaveState,
};
use persist::StateSupport;

/// Where KVM's TSS (three pages) and identity-map page live: just below the
/// 4 GiB boundary, inside the MMIO hole, away from RAM and devices.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

fn ioctl_err(op: &'static str) -> impl FnOnce(errno::Error) -> HypervisorError {
    move |source| HypervisorError::Ioctl { op, source }
}

/// The KVM accelerator (`/dev/kvm`).
#[derive(Debug)]
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    pub const DEVICE: &'static str = "/dev/kvm";

    /// Opens `/dev/kvm` and checks that it offers what hostvisor needs.
    pub fn new() -> Result<Self> {
        let kvm = open()?;
        let version = kvm.get_api_version();
        if version != API_VERSION {
            return Err(HypervisorError::ApiVersion(version));
        }
        if let Some(name) = missing_capabilities(&kvm).first() {
            return Err(HypervisorError::MissingCapability(name));
        }
        Ok(Self { kvm })
    }
}

/// The only KVM API version there has ever been.
const API_VERSION: i32 = 12;

/// The capabilities hostvisor cannot do without.
const REQUIRED_CAPABILITIES: [(Cap, &str); 7] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

fn open() -> Result<Kvm> {
    Kvm::new().map_err(|source| HypervisorError::OpenDevice {
        path: KvmHypervisor::DEVICE.to_string(),
        source,
    })
}

fn missing_capabilities(kvm: &Kvm) -> Vec<&'static str> {
    REQUIRED_CAPABILITIES
        .iter()
        .filter(|(cap, _)| !kvm.check_extension(*cap))
        .map(|&(_, name)| name)
        .collect()
}

/// What `/dev/kvm` offers, for a host check (`hostvisor doctor`).
#[derive(Debug, Clone)]
pub struct KvmReport {
    pub api_version: i32,
    /// How many of the required capabilities there are.
    pub required_capabilities: usize,
    /// The required capabilities this KVM lacks.
    pub missing_capabilities: Vec<&'static str>,
    pub max_vcpus: usize,
    pub profile: HostProfile,
}

/// Opens `/dev/kvm` and reports what it offers, without refusing a KVM
/// that lacks something (the report says what).
pub fn probe() -> Result<KvmReport> {
    let kvm = open()?;
    Ok(KvmReport {
        api_version: kvm.get_api_version(),
        required_capabilities: REQUIRED_CAPABILITIES.len(),
        missing_capabilities: missing_capabilities(&kvm),
        max_vcpus: kvm.get_max_vcpus(),
        profile: host_profile(),
    })
}

fn host_profile() -> HostProfile {
    HostProfile {
        // PVM ("Pagetable-based Virtual Machine") runs guests without
        // VT-x/AMD-V by emulating their kernel mode; it registers as the
        // kvm_pvm module.
        emulated_cpl0: Path::new("/sys/module/kvm_pvm").exists(),
    }
}

impl Hypervisor for KvmHypervisor {
    fn create_vm(&self) -> Result<Arc<dyn Vm>> {
        let fd = self.kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
        let support = Arc::new(StateSupport::probe(&self.kvm, &fd));
        Ok(Arc::new(KvmVm { fd, support }))
    }

    fn supported_cpuid(&self) -> Result<CpuId> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))
    }

    fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    fn host_profile(&self) -> HostProfile {
        host_profile()
    }
}

/// A KVM VM.
#[derive(Debug)]
pub struct KvmVm {
    fd: VmFd,
    /// What the host can save and restore, shared with the vCPUs.
    support: Arc<StateSupport>,
}

impl Vm for KvmVm {
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees that the host range stays mapped for
        // the VM's lifetime.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))
    }

    fn create_platform_devices(&self) -> Result<()> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(ioctl_err("KVM_SET_TSS_ADDR"))?;
        self.fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(ioctl_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        self.fd
            .create_irq_chip()
            .map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(ioctl_err("KVM_CREATE_PIT2"))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(ioctl_err("KVM_IRQFD"))
    }

    fn register_mmio_ioevent(&self, fd: &EventFd, addr: u64, datamatch: u32) -> Result<()> {
        self.fd
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(ioctl_err("KVM_IOEVENTFD"))
    }

    fn register_mmio_notify(&self, fd: &EventFd, addr: u64) -> Result<()> {
        self.fd
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), kvm_ioctls::NoDatamatch)
            .map_err(ioctl_err("KVM_IOEVENTFD"))
    }

    fn unregister_mmio_notify(&self, fd: &EventFd, addr: u64) -> Result<()> {
        self.fd
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), kvm_ioctls::NoDatamatch)
            .map_err(ioctl_err("KVM_IOEVENTFD"))
    }

    fn signal_msi(&self, addr: u64, data: u32) -> Result<()> {
        let msi = kvm_bindings::kvm_msi {
            // The low and high halves of the 64-bit message address.
            address_lo: u32::try_from(addr & 0xffff_ffff).unwrap_or(0),
            address_hi: u32::try_from(addr >> 32).unwrap_or(0),
            data,
            ..Default::default()
        };
        // KVM_SIGNAL_MSI returns >0 when delivered, 0 when the guest
        // blocked it (masked at the APIC): neither is an error.
        self.fd
            .signal_msi(msi)
            .map(|_| ())
            .map_err(ioctl_err("KVM_SIGNAL_MSI"))
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| match e.errno() {
                libc::EEXIST => HypervisorError::DuplicateVcpu(id),
                _ => HypervisorError::Ioctl {
                    op: "KVM_CREATE_VCPU",
                    source: e,
                },
            })?;
        Ok(Box::new(KvmVcpu {
            fd,
            id,
            support: self.support.clone(),
            cpuid: None,
        }))
    }

    fn clock(&self) -> Result<u64> {
        Ok(self
            .fd
            .get_clock()
            .map_err(ioctl_err("KVM_GET_CLOCK"))?
            .clock)
    }

    fn set_clock(&self, ns: u64) -> Result<()> {
        let data = kvm_bindings::kvm_clock_data {
            clock: ns,
            ..Default::default()
        };
        self.fd.set_clock(&data).map_err(ioctl_err("KVM_SET_CLOCK"))
    }

    fn save_state(&self) -> Result<VmState> {
        persist::save_vm(&self.fd)
    }

    fn restore_state(&self, state: &VmState) -> Result<()> {
        persist::restore_vm(&self.fd, state)
    }
}

/// A KVM vCPU.
#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
    id: u32,
    support: Arc<StateSupport>,
    /// The CPUID last set, which a saved state carries. (It is kept
    /// rather than read back: `KVM_GET_CPUID2` answers with KVM's
    /// runtime view, which on some hosts, the nested PVM KVM among them,
    /// is not what was set.)
    cpuid: Option<Vec<crate::state::CpuidEntry>>,
}

impl CpuState for KvmVcpu {
    fn regs(&self) -> Result<StandardRegisters> {
        self.fd.get_regs().map_err(ioctl_err("KVM_GET_REGS"))
    }
    fn set_regs(&mut self, regs: &StandardRegisters) -> Result<()> {
        self.fd.set_regs(regs).map_err(ioctl_err("KVM_SET_REGS"))
    }
    fn sregs(&self) -> Result<SpecialRegisters> {
        self.fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))
    }
    fn set_sregs(&mut self, sregs: &SpecialRegisters) -> Result<()> {
        self.fd.set_sregs(sregs).map_err(ioctl_err("KVM_SET_SREGS"))
    }
    fn fpu(&self) -> Result<FpuState> {
        self.fd.get_fpu().map_err(ioctl_err("KVM_GET_FPU"))
    }
    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()> {
        self.fd.set_fpu(fpu).map_err(ioctl_err("KVM_SET_FPU"))
    }
    fn xsave(&self) -> Result<XsaveState> {
        self.fd.get_xsave().map_err(ioctl_err("KVM_GET_XSAVE"))
    }
    fn set_xsave(&mut self, xsave: &XsaveState) -> Result<()> {
        // SAFETY: `xsave` is a whole legacy-sized (4 KiB) region, which is
        // what KVM_SET_XSAVE reads; no larger FAM buffer is implied.
        unsafe { self.fd.set_xsave(xsave) }.map_err(ioctl_err("KVM_SET_XSAVE"))
    }
    fn xcr0(&self) -> Result<u64> {
        let xcrs = self.fd.get_xcrs().map_err(ioctl_err("KVM_GET_XCRS"))?;
        let count = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
        Ok(xcrs.xcrs[..count]
            .iter()
            .find(|x| x.xcr == 0)
            .map_or(1, |x| x.value))
    }
}

impl Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn run(&mut self) -> Result<VmExit<'_>> {
        let run_ptr: *const kvm_run = self.fd.get_kvm_run();
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(VmExit::Interrupted)
            }
            Err(e) => return Err(ioctl_err("KVM_RUN")(e)),
        };
        Ok(match exit {
            VcpuExit::IoIn(port, data) => VmExit::IoIn { port, data },
            VcpuExit::IoOut(port, data) => VmExit::IoOut { port, data },
            VcpuExit::MmioRead(addr, data) => VmExit::MmioRead { addr, data },
            VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite { addr, data },
            VcpuExit::Hlt => VmExit::Halt,
            VcpuExit::Shutdown => VmExit::Shutdown,
            VcpuExit::Intr => VmExit::Interrupted,
            VcpuExit::FailEntry(reason, _cpu) => VmExit::FailEntry { reason },
            VcpuExit::SystemEvent(kind, _) => VmExit::SystemEvent(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => SystemEvent::Shutdown,
                KVM_SYSTEM_EVENT_RESET => SystemEvent::Reset,
                KVM_SYSTEM_EVENT_CRASH => SystemEvent::Crash,
                other => SystemEvent::Other(other),
            }),
            VcpuExit::InternalError => {
                // SAFETY: `run_ptr` points into the kvm_run mapping, which
                // lives as long as the vCPU; exit_reason is
                // KVM_EXIT_INTERNAL_ERROR, so `internal` is the live member
                // of the union, and KVM is not running this vCPU now.
                let internal = unsafe { (*run_ptr).__bindgen_anon_1.internal };
                let ndata = (internal.ndata as usize).min(internal.data.len());
                decode_internal_error(internal.suberror, &internal.data[..ndata])
            }
            VcpuExit::Unsupported(reason) => VmExit::Unsupported(reason),
            other => VmExit::Unsupported(exit_number(&other)),
        })
    }

    fn set_cpuid(&mut self, cpuid: &CpuId) -> Result<()> {
        self.fd
            .set_cpuid2(cpuid)
            .map_err(ioctl_err("KVM_SET_CPUID2"))?;
        self.cpuid = Some(
            cpuid
                .as_slice()
                .iter()
                .map(crate::state::CpuidEntry::from_kvm)
                .collect(),
        );
        Ok(())
    }

    fn set_msrs(&mut self, msrs: &[MsrEntry]) -> Result<()> {
        let list = Msrs::from_entries(msrs).map_err(|_| HypervisorError::Ioctl {
            op: "KVM_SET_MSRS",
            source: errno::Error::new(libc::E2BIG),
        })?;
        let written = self.fd.set_msrs(&list).map_err(ioctl_err("KVM_SET_MSRS"))?;
        if written != msrs.len() {
            // KVM stops at the first MSR it refuses.
            return Err(HypervisorError::Ioctl {
                op: "KVM_SET_MSRS",
                source: errno::Error::new(libc::EINVAL),
            });
        }
        Ok(())
    }

    fn get_msrs(&self, msrs: &mut [MsrEntry]) -> Result<()> {
        let mut list = Msrs::from_entries(msrs).map_err(|_| HypervisorError::Ioctl {
            op: "KVM_GET_MSRS",
            source: errno::Error::new(libc::E2BIG),
        })?;
        let read = self
            .fd
            .get_msrs(&mut list)
            .map_err(ioctl_err("KVM_GET_MSRS"))?;
        for (out, got) in msrs.iter_mut().zip(list.as_slice()).take(read) {
            *out = *got;
        }
        Ok(())
    }

    fn lapic(&self) -> Result<LapicState> {
        self.fd.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))
    }

    fn set_lapic(&mut self, lapic: &LapicState) -> Result<()> {
        self.fd.set_lapic(lapic).map_err(ioctl_err("KVM_SET_LAPIC"))
    }

    fn arm_kick(&mut self) {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        KICK_TARGET.with(|target| target.set(run));
    }

    fn clear_kick(&mut self) {
        self.fd.set_kvm_immediate_exit(0);
    }

    fn disarm_kick(&mut self) {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        KICK_TARGET.with(|target| {
            if target.get() == run {
                target.set(std::ptr::null_mut());
            }
        });
    }

    fn complete_pending_io(&mut self) -> Result<VmExit<'_>> {
        // With immediate_exit set, KVM_RUN completes the pending operation
        // and returns EINTR before entering the guest.
        self.fd.set_kvm_immediate_exit(1);
        self.run()
    }

    fn save_state(&self) -> Result<VcpuState> {
        persist::save_vcpu(&self.fd, &self.support, self.cpuid.clone())
    }

    fn restore_state(&mut self, state: &VcpuState) -> Result<()> {
        persist::restore_vcpu(&self.fd, &self.support, state)
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        // The kvm_run mapping goes away with the fd: a kick arriving on this
        // thread afterwards must not write to it. (The handler runs on this
        // same thread, so it sees either the old, still mapped pointer or
        // null.)
        self.disarm_kick();
    }
}

/// Builds the exit for KVM_EXIT_INTERNAL_ERROR. For emulation failures, KVM
/// (5.14 and later) may attach the instruction bytes: `data[0]` holds flags,
/// and then come one byte of length and up to 15 bytes of instruction.
fn decode_internal_error(suberror: u32, data: &[u64]) -> VmExit<'static> {
    if suberror != KVM_INTERNAL_ERROR_EMULATION {
        return VmExit::InternalError {
            suberror,
            data: data.to_vec(),
        };
    }
    let has_bytes = data.first().is_some_and(|flags| {
        flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
    });
    let insn_bytes = has_bytes.then(|| {
        let raw: Vec<u8> = data[1..].iter().flat_map(|w| w.to_le_bytes()).collect();
        let len = raw.first().map_or(0, |&n| usize::from(n)).min(15);
        raw.get(1..1 + len)
            .unwrap_or(&raw[raw.len().min(1)..])
            .to_vec()
    });
    VmExit::EmulationFailure(EmulationFailure {
        insn_bytes: insn_bytes.filter(|b| !b.is_empty()),
    })
}

/// The raw KVM exit number of an exit hostvisor does not handle, for
/// messages.
fn exit_number(exit: &VcpuExit<'_>) -> u32 {
    use kvm_bindings::*;
    match exit {
        VcpuExit::Unknown => KVM_EXIT_UNKNOWN,
        VcpuExit::Exception => KVM_EXIT_EXCEPTION,
        VcpuExit::Hypercall(_) => KVM_EXIT_HYPERCALL,
        VcpuExit::Debug(_) => KVM_EXIT_DEBUG,
        VcpuExit::IrqWindowOpen => KVM_EXIT_IRQ_WINDOW_OPEN,
        VcpuExit::SetTpr => KVM_EXIT_SET_TPR,
        VcpuExit::TprAccess => KVM_EXIT_TPR_ACCESS,
        VcpuExit::Nmi => KVM_EXIT_NMI,
        VcpuExit::IoapicEoi(_) => KVM_EXIT_IOAPIC_EOI,
        VcpuExit::Hyperv => KVM_EXIT_HYPERV,
        VcpuExit::X86Rdmsr(_) => KVM_EXIT_X86_RDMSR,
        VcpuExit::X86Wrmsr(_) => KVM_EXIT_X86_WRMSR,
        VcpuExit::MemoryFault { .. } => KVM_EXIT_MEMORY_FAULT,
        _ => u32::MAX,
    }
}

thread_local! {
    /// The kvm_run of the vCPU that this thread runs, for the kick handler.
    static KICK_TARGET: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

pub(crate) fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work here: one thread-local read (const
    // initialised, so no lazy setup) and one volatile store.
    let target = KICK_TARGET.with(Cell::get);
    if !target.is_null() {
        // SAFETY: `target` was set by `arm_kick` on this thread from the
        // vCPU's kvm_run mapping, which outlives the thread's run loop.
        // Setting immediate_exit makes the current or next KVM_RUN return
        // EINTR at once, which closes the race with a signal that arrives
        // just before KVM_RUN.
        unsafe { std::ptr::addr_of_mut!((*target).immediate_exit).write_volatile(1) };
    }
}

pub(crate) fn install_kick_handler() -> std::result::Result<(), errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), handle_kick));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_error_with_instruction_bytes() {
        // flags = INSTRUCTION_BYTES; then len 1, byte 0xcc.
        let data = [1u64, 0xcc01, 0];
        match decode_internal_error(KVM_INTERNAL_ERROR_EMULATION, &data) {
            VmExit::EmulationFailure(f) => assert_eq!(f.insn_bytes, Some(vec![0xcc])),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn internal_error_bytes_are_bounded_by_the_data() {
        // A length of 15 with only 7 bytes present yields what is present.
        let data = [1u64, 0x0807_0605_0403_0f0f];
        match decode_internal_error(KVM_INTERNAL_ERROR_EMULATION, &data) {
            VmExit::EmulationFailure(f) => {
                assert_eq!(f.insn_bytes.unwrap().len(), 7);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn emulation_failure_without_bytes() {
        match decode_internal_error(KVM_INTERNAL_ERROR_EMULATION, &[0]) {
            VmExit::EmulationFailure(f) => assert_eq!(f.insn_bytes, None),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn other_internal_errors_keep_their_data() {
        match decode_internal_error(3, &[7, 8]) {
            VmExit::InternalError { suberror, data } => {
                assert_eq!(suberror, 3);
                assert_eq!(data, vec![7, 8]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
