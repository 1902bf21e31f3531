//! Saving and restoring vCPU and VM state with KVM's ioctls (what is saved,
//! and in which order it is restored, is described in [`crate::state`]).
//!
//! What the host's KVM can exchange is probed once per VM
//! ([`StateSupport::probe`]). A part the host lacks degrades explicitly:
//! saving leaves it out of the state (`None`, or an empty list) and logs
//! it; restoring a state that has it is refused, except for the debug
//! registers and a TSC frequency the host cannot set, which are skipped
//! with a warning.
//!
//! On the nested PVM KVM (`kvm_pvm`) of the development host, everything
//! probed works — XSAVE (4 KiB, `KVM_CAP_XSAVE2` = 4096), XCRs, debug
//! registers, vCPU events, MP state, LAPIC, irqchips, PIT2, the clock and
//! all 41 MSRs of `KVM_GET_MSR_INDEX_LIST` plus the TSC, kvmclock and
//! MTRR extras — with two exceptions, both about the TSC:
//! - it does not report `KVM_CAP_TSC_CONTROL` (TSC scaling): a state saved
//!   at another TSC frequency restores there with a warning, the guest's
//!   TSC running at the host's rate;
//! - it accepts writes of `IA32_TSC` and ignores them (its guests read the
//!   host's TSC): the restored guest's TSC is the host's, not the saved
//!   one, and restoring warns so ([`check_tsc`]). The guest's kvmclock is
//!   restored (`KVM_SET_CLOCK`), so Linux guests keep their time.

use kvm_bindings::{
    kvm_ioapic_state, kvm_ioapic_state__bindgen_ty_1, kvm_irqchip, kvm_irqchip__bindgen_ty_1,
    kvm_mp_state, kvm_msr_entry, kvm_xcr, kvm_xcrs, kvm_xsave, Msrs, Xsave, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmm_sys_util::errno;
use zerocopy::{FromBytes, IntoBytes};

use super::ioctl_err;
use crate::state::{
    msr_restore_rank, CpuidEntry, FpuContext, IoapicState, LegacyFpu, Msr, PicState, Xcr,
    IOAPIC_PINS, MSR_IA32_TSC, MSR_IA32_TSC_ADJUST, MSR_IA32_TSC_DEADLINE, MSR_KVM_SYSTEM_TIME_NEW,
    MSR_KVM_WALL_CLOCK_NEW, XSAVE_MIN_WORDS,
};
use crate::{HypervisorError, Result, VcpuState, VmState};

/// MSRs worth trying beyond `KVM_GET_MSR_INDEX_LIST`, which does not list
/// them on every kernel: the TSC and its companions, kvmclock (current
/// and legacy), PAT and the MTRRs (default type, fixed ranges, eight
/// variable pairs). Those a vCPU cannot read are dropped when saving.
const EXTRA_MSRS: &[u32] = &[
    MSR_IA32_TSC,
    MSR_IA32_TSC_ADJUST,
    MSR_IA32_TSC_DEADLINE,
    0x11,
    0x12,
    MSR_KVM_WALL_CLOCK_NEW,
    MSR_KVM_SYSTEM_TIME_NEW,
    0x277,
    0x2ff,
    0x250,
    0x258,
    0x259,
    0x268,
    0x269,
    0x26a,
    0x26b,
    0x26c,
    0x26d,
    0x26e,
    0x26f,
];
/// Variable-range MTRRs: PHYSBASE0/PHYSMASK0 .. PHYSBASE7/PHYSMASK7.
const MTRR_VARIABLE: std::ops::RangeInclusive<u32> = 0x200..=0x20f;
/// x2APIC registers: the LAPIC page carries them, and reading them fails
/// unless the LAPIC is in x2APIC mode.
const X2APIC_MSRS: std::ops::RangeInclusive<u32> = 0x800..=0x8ff;

/// What this host's KVM can save and restore, probed once per VM.
#[derive(Debug)]
pub(super) struct StateSupport {
    /// Size of the XSAVE area KVM exchanges, in bytes; 0 without XSAVE.
    xsave_bytes: usize,
    xcrs: bool,
    debugregs: bool,
    vcpu_events: bool,
    get_tsc_khz: bool,
    tsc_control: bool,
    /// MSRs to try to save, in restore order.
    msrs: Vec<u32>,
}

impl StateSupport {
    pub(super) fn probe(kvm: &Kvm, vm: &VmFd) -> Self {
        let xsave_bytes = if vm.check_extension(Cap::Xsave) {
            let xsave2 = usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
            xsave2.max(std::mem::size_of::<kvm_xsave>())
        } else {
            0
        };
        let listed = match kvm.get_msr_index_list() {
            Ok(list) => list.as_slice().to_vec(),
            Err(e) => {
                tracing::warn!("KVM_GET_MSR_INDEX_LIST failed ({e}): saving only the usual MSRs");
                Vec::new()
            }
        };
        let support = StateSupport {
            xsave_bytes,
            xcrs: vm.check_extension(Cap::Xcrs),
            debugregs: vm.check_extension(Cap::Debugregs),
            vcpu_events: vm.check_extension(Cap::VcpuEvents),
            get_tsc_khz: vm.check_extension(Cap::GetTscKhz),
            tsc_control: vm.check_extension(Cap::TscControl),
            msrs: msr_candidates(&listed),
        };
        tracing::debug!(?support, "KVM state support");
        support
    }
}

/// The MSRs to try to save: KVM's list plus [`EXTRA_MSRS`] and the
/// variable MTRRs, without the x2APIC range and duplicates, in restore
/// order.
fn msr_candidates(listed: &[u32]) -> Vec<u32> {
    let mut all: Vec<u32> = listed
        .iter()
        .copied()
        .chain(EXTRA_MSRS.iter().copied())
        .chain(MTRR_VARIABLE)
        .filter(|i| !X2APIC_MSRS.contains(i))
        .collect();
    all.sort_by_key(|&i| msr_restore_rank(i));
    all.dedup();
    all
}

fn invalid(what: String) -> HypervisorError {
    HypervisorError::InvalidState(what)
}

fn fam_error(op: &'static str) -> impl FnOnce(vmm_sys_util::fam::Error) -> HypervisorError {
    move |_| HypervisorError::Ioctl {
        op,
        source: errno::Error::new(libc::E2BIG),
    }
}

/// Reads vCPU `fd`'s state; `cpuid` is the CPUID it was given.
pub(super) fn save_vcpu(
    fd: &VcpuFd,
    support: &StateSupport,
    cpuid: Option<Vec<CpuidEntry>>,
) -> Result<VcpuState> {
    // The MP state first: reading it makes KVM process a pending INIT or
    // SIPI, which changes the registers and the LAPIC read after it.
    let mp_state = fd
        .get_mp_state()
        .map_err(ioctl_err("KVM_GET_MP_STATE"))?
        .mp_state;
    let regs = fd.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
    let fpu = save_fpu(fd, support)?;
    let xcrs = if support.xcrs {
        let xcrs = fd.get_xcrs().map_err(ioctl_err("KVM_GET_XCRS"))?;
        let count = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
        xcrs.xcrs[..count]
            .iter()
            .map(|x| Xcr {
                index: x.xcr,
                value: x.value,
            })
            .collect()
    } else {
        Vec::new()
    };
    let debug_regs = if support.debugregs {
        Some(
            fd.get_debug_regs()
                .map_err(ioctl_err("KVM_GET_DEBUGREGS"))?,
        )
    } else {
        None
    };
    let lapic = fd.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))?;
    let msrs = save_msrs(fd, &support.msrs)?;
    let events = if support.vcpu_events {
        Some(
            fd.get_vcpu_events()
                .map_err(ioctl_err("KVM_GET_VCPU_EVENTS"))?,
        )
    } else {
        None
    };
    let tsc_khz = if support.get_tsc_khz {
        fd.get_tsc_khz()
            .map_err(|e| tracing::debug!("KVM_GET_TSC_KHZ failed ({e}): not saved"))
            .ok()
    } else {
        None
    };
    Ok(VcpuState {
        regs,
        sregs,
        fpu,
        xcrs,
        msrs,
        lapic,
        events,
        mp_state,
        debug_regs,
        tsc_khz,
        cpuid,
    })
}

fn save_fpu(fd: &VcpuFd, support: &StateSupport) -> Result<FpuContext> {
    if support.xsave_bytes == 0 {
        let fpu = fd.get_fpu().map_err(ioctl_err("KVM_GET_FPU"))?;
        return Ok(FpuContext::Legacy(LegacyFpu::from_kvm(&fpu)));
    }
    if support.xsave_bytes <= std::mem::size_of::<kvm_xsave>() {
        let xsave = fd.get_xsave().map_err(ioctl_err("KVM_GET_XSAVE"))?;
        return Ok(FpuContext::Xsave(xsave.region.to_vec()));
    }
    let mut xsave = Xsave::new(extra_words(support)).map_err(fam_error("KVM_GET_XSAVE2"))?;
    // SAFETY: `xsave` holds the 4 KiB region plus the extra words that
    // make up the size KVM_CAP_XSAVE2 reported, which is all KVM writes.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(ioctl_err("KVM_GET_XSAVE2"))?;
    let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(xsave.as_slice());
    Ok(FpuContext::Xsave(words))
}

/// The XSAVE words beyond the legacy 4 KiB region that this host's KVM
/// exchanges.
fn extra_words(support: &StateSupport) -> usize {
    support
        .xsave_bytes
        .saturating_sub(std::mem::size_of::<kvm_xsave>())
        .div_ceil(4)
}

/// Reads every candidate MSR the vCPU lets us read. KVM_GET_MSRS stops at
/// the first MSR it refuses; that one is left out and reading goes on
/// after it.
fn save_msrs(fd: &VcpuFd, candidates: &[u32]) -> Result<Vec<Msr>> {
    let mut saved = Vec::with_capacity(candidates.len());
    let mut rest = candidates;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut list = Msrs::from_entries(&entries).map_err(fam_error("KVM_GET_MSRS"))?;
        let read = fd.get_msrs(&mut list).map_err(ioctl_err("KVM_GET_MSRS"))?;
        saved.extend(
            list.as_slice()[..read.min(batch.len())]
                .iter()
                .map(|e| Msr {
                    index: e.index,
                    data: e.data,
                }),
        );
        if read < batch.len() {
            tracing::debug!(
                "MSR {:#x} is not readable on this vCPU: not saved",
                batch[read]
            );
            rest = &rest[read + 1..];
        } else {
            rest = &rest[batch.len()..];
        }
    }
    Ok(saved)
}

pub(super) fn restore_vcpu(fd: &VcpuFd, support: &StateSupport, state: &VcpuState) -> Result<()> {
    state.validate()?;
    restore_tsc_khz(fd, support, state.tsc_khz)?;
    fd.set_mp_state(kvm_mp_state {
        mp_state: state.mp_state,
    })
    .map_err(ioctl_err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs)
        .map_err(ioctl_err("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs)
        .map_err(ioctl_err("KVM_SET_SREGS"))?;
    restore_fpu(fd, support, &state.fpu)?;
    if !state.xcrs.is_empty() {
        if !support.xcrs {
            return Err(HypervisorError::UnsupportedState(
                "extended control registers",
            ));
        }
        let mut xcrs = kvm_xcrs {
            nr_xcrs: state.xcrs.len() as u32,
            ..Default::default()
        };
        for (slot, x) in xcrs.xcrs.iter_mut().zip(&state.xcrs) {
            *slot = kvm_xcr {
                xcr: x.index,
                value: x.value,
                ..Default::default()
            };
        }
        fd.set_xcrs(&xcrs).map_err(ioctl_err("KVM_SET_XCRS"))?;
    }
    match &state.debug_regs {
        Some(regs) if support.debugregs => fd
            .set_debug_regs(regs)
            .map_err(ioctl_err("KVM_SET_DEBUGREGS"))?,
        Some(_) => tracing::warn!(
            "this host's KVM cannot set debug registers: the restored vCPU starts without \
             hardware breakpoints"
        ),
        None => {}
    }
    fd.set_lapic(&state.lapic)
        .map_err(ioctl_err("KVM_SET_LAPIC"))?;
    restore_msrs(fd, &state.msrs_in_restore_order())?;
    check_tsc(fd, state);
    if let Some(events) = &state.events {
        if !support.vcpu_events {
            return Err(HypervisorError::UnsupportedState("pending vCPU events"));
        }
        fd.set_vcpu_events(events)
            .map_err(ioctl_err("KVM_SET_VCPU_EVENTS"))?;
    }
    Ok(())
}

/// Sets the saved TSC frequency where it differs from this vCPU's and the
/// host can scale the TSC; elsewhere the guest keeps the host's rate
/// (kvmclock still tells it the right time) and a warning says so.
fn restore_tsc_khz(fd: &VcpuFd, support: &StateSupport, khz: Option<u32>) -> Result<()> {
    let Some(khz) = khz else { return Ok(()) };
    let current = if support.get_tsc_khz {
        fd.get_tsc_khz().ok()
    } else {
        None
    };
    if current == Some(khz) {
        return Ok(());
    }
    if !support.tsc_control {
        tracing::warn!(
            "the snapshot's TSC ran at {khz} kHz, this host's at {current:?} kHz, and its KVM \
             cannot scale the TSC: the guest's TSC now runs at the host's rate"
        );
        return Ok(());
    }
    fd.set_tsc_khz(khz).map_err(ioctl_err("KVM_SET_TSC_KHZ"))
}

fn restore_fpu(fd: &VcpuFd, support: &StateSupport, fpu: &FpuContext) -> Result<()> {
    let words = match fpu {
        FpuContext::Legacy(fpu) => {
            return fd.set_fpu(&fpu.to_kvm()?).map_err(ioctl_err("KVM_SET_FPU"));
        }
        FpuContext::Xsave(words) => words,
    };
    if support.xsave_bytes == 0 {
        return Err(HypervisorError::UnsupportedState("an XSAVE area"));
    }
    let host_words = XSAVE_MIN_WORDS + extra_words(support);
    if words.len() < XSAVE_MIN_WORDS || words.len() > host_words {
        return Err(invalid(format!(
            "the XSAVE area is {} bytes; this host's KVM takes {} to {} bytes",
            words.len() * 4,
            XSAVE_MIN_WORDS * 4,
            host_words * 4
        )));
    }
    let (legacy, extra) = words.split_at(XSAVE_MIN_WORDS);
    // A shorter area than the host's (saved where fewer components
    // existed) is padded with zeros: components beyond it are absent from
    // its XSTATE_BV, so they load in their initial state.
    if host_words == XSAVE_MIN_WORDS {
        let mut xsave = kvm_xsave::default();
        xsave.region.copy_from_slice(legacy);
        // SAFETY: this host's KVM exchanges a 4 KiB area
        // (KVM_CAP_XSAVE2 ≤ 4096), all of which `xsave` holds.
        return unsafe { fd.set_xsave(&xsave) }.map_err(ioctl_err("KVM_SET_XSAVE"));
    }
    let mut xsave = Xsave::new(extra_words(support)).map_err(fam_error("KVM_SET_XSAVE"))?;
    // SAFETY: only the fixed region is written; the length of the flexible
    // part is not changed.
    unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(legacy);
    xsave.as_mut_slice()[..extra.len()].copy_from_slice(extra);
    // SAFETY: `xsave` was allocated with the size KVM_CAP_XSAVE2 reported,
    // which is all KVM reads.
    unsafe { fd.set_xsave2(&xsave) }.map_err(ioctl_err("KVM_SET_XSAVE"))
}

/// Warns when the TSC did not take the saved value: some KVMs accept a
/// TSC write and ignore it (PVM, whose guests read the host's TSC
/// directly). The guest then sees its TSC jump; its kvmclock, restored
/// separately, still keeps its time right.
fn check_tsc(fd: &VcpuFd, state: &VcpuState) {
    let Some(saved) = state.msrs.iter().find(|m| m.index == MSR_IA32_TSC) else {
        return;
    };
    let mut tsc = [kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }];
    let Ok(mut list) = Msrs::from_entries(&tsc) else {
        return;
    };
    if fd.get_msrs(&mut list) != Ok(1) {
        return;
    }
    tsc[0] = list.as_slice()[0];
    // A second of TSC ticks: what restoring may take, generously.
    let second = u64::from(state.tsc_khz.unwrap_or(1_000_000)) * 1000;
    if tsc[0].data.abs_diff(saved.data) > second {
        tracing::warn!(
            "this host's KVM did not set the TSC ({:#x} instead of {:#x}): the guest's TSC \
             jumps across the restore",
            tsc[0].data,
            saved.data
        );
    }
}

/// Writes `msrs` in the order given; KVM stops at the first MSR it
/// refuses, which makes the restore fail with that MSR named.
fn restore_msrs(fd: &VcpuFd, msrs: &[Msr]) -> Result<()> {
    for batch in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries).map_err(fam_error("KVM_SET_MSRS"))?;
        let written = fd.set_msrs(&list).map_err(ioctl_err("KVM_SET_MSRS"))?;
        if let Some(refused) = batch.get(written) {
            return Err(invalid(format!(
                "KVM refused the value {:#x} of MSR {:#x}",
                refused.data, refused.index
            )));
        }
    }
    Ok(())
}

fn get_irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(ioctl_err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

fn save_pic(fd: &VmFd, chip_id: u32) -> Result<PicState> {
    let chip = get_irqchip(fd, chip_id)?;
    PicState::read_from_prefix(chip.chip.as_bytes())
        .map(|(pic, _)| pic)
        .map_err(|_| invalid("the PIC state does not fit the irqchip union".to_string()))
}

fn save_ioapic(fd: &VmFd) -> Result<IoapicState> {
    let chip = get_irqchip(fd, KVM_IRQCHIP_IOAPIC)?;
    let (ioapic, _) = kvm_ioapic_state::read_from_prefix(chip.chip.as_bytes())
        .map_err(|_| invalid("the IOAPIC state does not fit the irqchip union".to_string()))?;
    Ok(IoapicState {
        base_address: ioapic.base_address,
        ioregsel: ioapic.ioregsel,
        id: ioapic.id,
        irr: ioapic.irr,
        redirection: ioapic
            .redirtbl
            .iter()
            .map(|entry| zerocopy::transmute!(*entry))
            .collect(),
    })
}

pub(super) fn save_vm(fd: &VmFd) -> Result<VmState> {
    Ok(VmState {
        pic_master: save_pic(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: save_pic(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: save_ioapic(fd)?,
        pit: fd.get_pit2().map_err(ioctl_err("KVM_GET_PIT2"))?,
        clock_ns: fd.get_clock().map_err(ioctl_err("KVM_GET_CLOCK"))?.clock,
    })
}

pub(super) fn restore_vm(fd: &VmFd, state: &VmState) -> Result<()> {
    state.validate()?;
    for (chip_id, pic) in [
        (KVM_IRQCHIP_PIC_MASTER, state.pic_master),
        (KVM_IRQCHIP_PIC_SLAVE, state.pic_slave),
    ] {
        let chip = kvm_irqchip {
            chip_id,
            chip: kvm_irqchip__bindgen_ty_1 { pic },
            ..Default::default()
        };
        fd.set_irqchip(&chip)
            .map_err(ioctl_err("KVM_SET_IRQCHIP"))?;
    }
    let mut redirtbl = [kvm_ioapic_state__bindgen_ty_1 { bits: 0 }; IOAPIC_PINS];
    for (slot, &bits) in redirtbl.iter_mut().zip(&state.ioapic.redirection) {
        *slot = kvm_ioapic_state__bindgen_ty_1 { bits };
    }
    let ioapic = kvm_ioapic_state {
        base_address: state.ioapic.base_address,
        ioregsel: state.ioapic.ioregsel,
        id: state.ioapic.id,
        irr: state.ioapic.irr,
        pad: 0,
        redirtbl,
    };
    let chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        chip: kvm_irqchip__bindgen_ty_1 { ioapic },
        ..Default::default()
    };
    fd.set_irqchip(&chip)
        .map_err(ioctl_err("KVM_SET_IRQCHIP"))?;
    fd.set_pit2(&state.pit).map_err(ioctl_err("KVM_SET_PIT2"))?;
    // The clock alone (flags 0): the guest's time resumes where it was
    // saved, as after a pause.
    let clock = kvm_bindings::kvm_clock_data {
        clock: state.clock_ns,
        ..Default::default()
    };
    fd.set_clock(&clock).map_err(ioctl_err("KVM_SET_CLOCK"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_candidates_are_ordered_deduplicated_and_skip_x2apic() {
        let c = msr_candidates(&[0x6e0, 0x10, 0x802, 0x174, 0x3b, 0x174]);
        assert_eq!(&c[..2], &[MSR_IA32_TSC_ADJUST, MSR_IA32_TSC]);
        assert_eq!(c.last(), Some(&MSR_IA32_TSC_DEADLINE));
        assert!(!c.contains(&0x802));
        assert_eq!(c.iter().filter(|&&i| i == 0x174).count(), 1);
        assert!(c.contains(&MSR_KVM_SYSTEM_TIME_NEW) && c.contains(&0x20f));
    }
}
