//! The saved state of a vCPU ([`VcpuState`]) and of a VM's in-kernel
//! devices ([`VmState`]), for snapshots: everything a running guest needs
//! to continue in another VM, in another process, on another host of the
//! same kind.
//!
//! # What a vCPU state holds
//! General registers, special registers (segments, control registers,
//! EFER, APIC base), the FPU/SSE/AVX context (the XSAVE area, or the legacy
//! FPU image on a host without XSAVE), the extended control registers
//! (XCR0), the MSRs, the local APIC's register page, pending events
//! (exceptions, interrupts, NMI, SMI), the multiprocessing state (running,
//! halted, waiting for SIPI), the debug registers, the TSC frequency, and
//! the CPUID the vCPU was given (so a restore sets it again without asking
//! the host what it supports).
//!
//! The MSRs saved are those KVM reports as saveable (`KVM_GET_MSR_INDEX_LIST`)
//! plus a few it does not always list (the TSC, kvmclock's system-time and
//! wall-clock MSRs, the MTRRs), minus the x2APIC range (the LAPIC page
//! carries those registers). Any of them that the vCPU refuses to read
//! (a feature the guest's CPUID does not have) is left out of the state.
//!
//! # Restore order
//! The caller first sets the vCPU's CPUID (it decides which MSRs and XSAVE
//! components exist: the saved one, [`VcpuState::saved_cpuid`]), then [`crate::Vcpu::restore_state`] writes, in order:
//! the TSC frequency (before the TSC MSR, whose value it scales), the MP
//! state, regs, sregs (which set the APIC base and so the LAPIC's mode,
//! hence before the LAPIC), the XSAVE area or FPU, XCRs, debug registers,
//! the LAPIC, the MSRs (after the LAPIC: a TSC-deadline write only arms
//! the timer if the LAPIC's timer is already in TSC-deadline mode; within
//! the MSRs, TSC_ADJUST then TSC come first and TSC_DEADLINE last, as the
//! deadline is compared against the TSC), and last the pending events
//! (nothing written after them may clear an injected exception or
//! interrupt). On the VM side, [`crate::Vm::restore_state`] runs after
//! [`crate::Vm::create_platform_devices`].
//!
//! # Encoding
//! The KVM structs (regs, sregs, LAPIC, events, debug registers, PIC, PIT)
//! are encoded as their exact bytes (the kernel's stable ABI layout); a
//! blob of any other length is refused when the state is decoded, instead
//! of being silently padded or cut. The rest (MSRs, XCRs, the XSAVE area,
//! the IOAPIC) is plain serde data. A restored state is untrusted input:
//! [`VcpuState::validate`] and [`VmState::validate`] check what can be
//! checked without the host, and KVM refuses what the host cannot load;
//! both end in an error, never a panic.

use serde::{Deserialize, Serialize};

pub use kvm_bindings::{
    kvm_debugregs as DebugRegisters, kvm_pic_state as PicState, kvm_pit_state2 as PitState,
    kvm_vcpu_events as VcpuEvents,
};

use crate::{FpuState, HypervisorError, LapicState, Result, SpecialRegisters, StandardRegisters};

/// The most MSRs a vCPU state may carry (KVM lists a few dozen to a few
/// hundred).
pub const MAX_MSRS: usize = 2048;
/// The most XCRs KVM exchanges.
pub const MAX_XCRS: usize = kvm_bindings::KVM_MAX_XCRS as usize;
/// The smallest XSAVE area KVM exchanges (the legacy `kvm_xsave`), in
/// 32-bit words.
pub const XSAVE_MIN_WORDS: usize = 1024;
/// The largest XSAVE area a state may carry, in 32-bit words (64 KiB; with
/// every component Intel defines today, AMX included, it is about 11 KiB).
pub const XSAVE_MAX_WORDS: usize = 16 * 1024;
/// The IOAPIC's redirection table entries.
pub const IOAPIC_PINS: usize = 24;

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_TSC_ADJUST: u32 = 0x3b;
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// kvmclock's wall-clock MSR (the current one; 0x11 is the legacy one).
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// kvmclock's system-time MSR (the current one; 0x12 is the legacy one).
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// Everything a vCPU needs to continue elsewhere. See the [module
/// documentation](self) for what is in it and the order of restoring.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
pub struct VcpuState {
    #[serde(with = "raw")]
    pub regs: StandardRegisters,
    #[serde(with = "raw")]
    pub sregs: SpecialRegisters,
    pub fpu: FpuContext,
    /// The extended control registers; empty on a host without
    /// `KVM_CAP_XCRS`.
    #[serde(default)]
    pub xcrs: Vec<Xcr>,
    /// In restore order (see [`msr_restore_rank`]).
    pub msrs: Vec<Msr>,
    #[serde(with = "raw")]
    pub lapic: LapicState,
    /// Pending and injected exceptions, interrupts, NMI and SMI; `None`
    /// on a host without `KVM_CAP_VCPU_EVENTS`.
    #[serde(with = "raw_option", default)]
    pub events: Option<VcpuEvents>,
    /// `KVM_MP_STATE_*` (x86: 0 runnable, 1 uninitialized, 2 INIT
    /// received, 3 halted, 4 SIPI received).
    pub mp_state: u32,
    /// `None` on a host without `KVM_CAP_DEBUGREGS`.
    #[serde(with = "raw_option", default)]
    pub debug_regs: Option<DebugRegisters>,
    /// The guest's TSC frequency; `None` where KVM cannot tell it.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
    /// The CPUID the vCPU was given (`KVM_SET_CPUID2`), which a restore sets
    /// again instead of asking the host what it supports
    /// (`KVM_GET_SUPPORTED_CPUID`, ~1 ms on a nested KVM) and applying the
    /// boot-time policy; `None` in snapshots made before it was saved.
    #[serde(default)]
    pub cpuid: Option<Vec<CpuidEntry>>,
}

/// One CPUID leaf (and subleaf) as KVM exchanges it.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// `KVM_CPUID_FLAG_*` (bit 0: the subleaf index is significant).
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl CpuidEntry {
    pub fn from_kvm(e: &crate::CpuIdEntry) -> Self {
        CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }

    pub fn to_kvm(self) -> crate::CpuIdEntry {
        crate::CpuIdEntry {
            function: self.function,
            index: self.index,
            flags: self.flags,
            eax: self.eax,
            ebx: self.ebx,
            ecx: self.ecx,
            edx: self.edx,
            ..Default::default()
        }
    }
}

/// The most CPUID entries a vCPU state may carry: what KVM accepts.
pub const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;

/// The floating-point and vector register context.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum FpuContext {
    /// The XSAVE area as KVM exchanges it (`KVM_GET_XSAVE`/`XSAVE2`):
    /// 32-bit words, at least [`XSAVE_MIN_WORDS`].
    Xsave(Vec<u32>),
    /// The legacy x87/SSE image (`KVM_GET_FPU`), on hosts without XSAVE.
    Legacy(LegacyFpu),
}

/// The x87/SSE registers of `KVM_GET_FPU`.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct LegacyFpu {
    /// ST0..ST7, 16 bytes each (80 bits used).
    pub fpr: Vec<[u8; 16]>,
    pub fcw: u16,
    pub fsw: u16,
    /// The abridged tag word.
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    /// XMM0..XMM15.
    pub xmm: Vec<[u8; 16]>,
    pub mxcsr: u32,
}

/// One model-specific register.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
pub struct Msr {
    pub index: u32,
    pub data: u64,
}

/// One extended control register (XCR0 is the enabled XSAVE features).
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
pub struct Xcr {
    pub index: u32,
    pub value: u64,
}

/// The VM's in-kernel devices and clock: the two 8259 PICs, the IOAPIC,
/// the PIT, and the paravirtual clock.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
pub struct VmState {
    #[serde(with = "raw")]
    pub pic_master: PicState,
    #[serde(with = "raw")]
    pub pic_slave: PicState,
    pub ioapic: IoapicState,
    #[serde(with = "raw")]
    pub pit: PitState,
    /// The kvmclock at the save, in nanoseconds. Restoring sets it back,
    /// so the guest's clocks resume where they stopped (the time the VM
    /// spent saved does not pass for it; the guest agent steps the wall
    /// clock afterwards).
    pub clock_ns: u64,
}

/// The in-kernel IOAPIC.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct IoapicState {
    pub base_address: u64,
    pub ioregsel: u32,
    pub id: u32,
    pub irr: u32,
    /// The redirection table, [`IOAPIC_PINS`] raw 64-bit entries.
    pub redirection: Vec<u64>,
}

fn invalid(what: String) -> HypervisorError {
    HypervisorError::InvalidState(what)
}

impl VcpuState {
    /// Checks what can be checked without the host: sizes, counts, value
    /// ranges, duplicates. KVM checks the rest when restoring.
    pub fn validate(&self) -> Result<()> {
        match &self.fpu {
            FpuContext::Xsave(words) => {
                if !(XSAVE_MIN_WORDS..=XSAVE_MAX_WORDS).contains(&words.len()) {
                    return Err(invalid(format!(
                        "the XSAVE area is {} bytes; it must be {} to {} bytes",
                        words.len() * 4,
                        XSAVE_MIN_WORDS * 4,
                        XSAVE_MAX_WORDS * 4
                    )));
                }
            }
            FpuContext::Legacy(fpu) => {
                fpu.to_kvm()?;
            }
        }
        if self.xcrs.len() > MAX_XCRS {
            return Err(invalid(format!(
                "{} XCRs, at most {MAX_XCRS} exist",
                self.xcrs.len()
            )));
        }
        if has_duplicates(self.xcrs.iter().map(|x| x.index)) {
            return Err(invalid("an XCR appears twice".to_string()));
        }
        if self.msrs.len() > MAX_MSRS {
            return Err(invalid(format!(
                "{} MSRs, at most {MAX_MSRS} are accepted",
                self.msrs.len()
            )));
        }
        if has_duplicates(self.msrs.iter().map(|m| m.index)) {
            return Err(invalid("an MSR appears twice".to_string()));
        }
        if self.mp_state > kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED {
            return Err(invalid(format!(
                "MP state {} is not an x86 state (0 to {})",
                self.mp_state,
                kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED
            )));
        }
        if self.tsc_khz == Some(0) {
            return Err(invalid("a TSC frequency of 0 kHz".to_string()));
        }
        if let Some(cpuid) = &self.cpuid {
            validate_cpuid(cpuid)?;
        }
        Ok(())
    }

    /// The saved CPUID in KVM's form, to set on the restored vCPU before
    /// [`crate::Vcpu::restore_state`]; `None` when the state has none (an
    /// older snapshot: the caller builds one as at boot). Checked: at most
    /// [`MAX_CPUID_ENTRIES`] entries, no leaf twice, and the CPU vendor
    /// of leaf 0 is this host's (a guest moved to another vendor's CPU
    /// would run with the wrong instructions for it).
    pub fn saved_cpuid(&self) -> Result<Option<crate::CpuId>> {
        let Some(entries) = &self.cpuid else {
            return Ok(None);
        };
        validate_cpuid(entries)?;
        let host = host_vendor();
        match entries.iter().find(|e| e.function == 0) {
            Some(leaf0) if vendor(leaf0) == host => {}
            Some(leaf0) => {
                return Err(invalid(format!(
                    "the snapshot's CPU vendor is {:?}, this host's is {:?}",
                    String::from_utf8_lossy(&vendor(leaf0)),
                    String::from_utf8_lossy(&host)
                )))
            }
            None => return Err(invalid("the saved CPUID has no leaf 0".to_string())),
        }
        let kvm: Vec<crate::CpuIdEntry> = entries.iter().map(|e| e.to_kvm()).collect();
        crate::CpuId::from_entries(&kvm)
            .map(Some)
            .map_err(|_| invalid(format!("{} CPUID entries", entries.len())))
    }

    /// The MSRs in the order they must be written (see
    /// [`msr_restore_rank`]), whatever order the state lists them in.
    pub fn msrs_in_restore_order(&self) -> Vec<Msr> {
        let mut msrs = self.msrs.clone();
        msrs.sort_by_key(|m| msr_restore_rank(m.index));
        msrs
    }
}

impl VmState {
    /// Checks what can be checked without the host.
    pub fn validate(&self) -> Result<()> {
        if self.ioapic.redirection.len() != IOAPIC_PINS {
            return Err(invalid(format!(
                "the IOAPIC has {} redirection entries instead of {IOAPIC_PINS}",
                self.ioapic.redirection.len()
            )));
        }
        Ok(())
    }
}

/// Where an MSR goes in restore order (smaller first): TSC_ADJUST, then
/// the TSC, then every other MSR in index order, then TSC_DEADLINE, which
/// is a point in TSC time and arms the LAPIC timer as it is written.
pub fn msr_restore_rank(index: u32) -> (u8, u32) {
    match index {
        MSR_IA32_TSC_ADJUST => (0, index),
        MSR_IA32_TSC => (1, index),
        MSR_IA32_TSC_DEADLINE => (3, index),
        _ => (2, index),
    }
}

fn validate_cpuid(entries: &[CpuidEntry]) -> Result<()> {
    if entries.is_empty() || entries.len() > MAX_CPUID_ENTRIES {
        return Err(invalid(format!(
            "{} CPUID entries; there must be 1 to {MAX_CPUID_ENTRIES}",
            entries.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    if entries.iter().any(|e| !seen.insert((e.function, e.index))) {
        return Err(invalid("a CPUID leaf appears twice".to_string()));
    }
    Ok(())
}

/// The vendor string of a CPUID leaf 0 ("GenuineIntel", "AuthenticAMD").
fn vendor(leaf0: &CpuidEntry) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    v[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    v
}

/// This CPU's vendor string, from the CPUID instruction.
fn host_vendor() -> [u8; 12] {
    let leaf0 = std::arch::x86_64::__cpuid(0);
    vendor(&CpuidEntry {
        function: 0,
        index: 0,
        flags: 0,
        eax: leaf0.eax,
        ebx: leaf0.ebx,
        ecx: leaf0.ecx,
        edx: leaf0.edx,
    })
}

fn has_duplicates(indices: impl Iterator<Item = u32>) -> bool {
    let mut seen = std::collections::HashSet::new();
    indices.into_iter().any(|i| !seen.insert(i))
}

impl LegacyFpu {
    pub fn from_kvm(fpu: &FpuState) -> Self {
        LegacyFpu {
            fpr: fpu.fpr.to_vec(),
            fcw: fpu.fcw,
            fsw: fpu.fsw,
            ftwx: fpu.ftwx,
            last_opcode: fpu.last_opcode,
            last_ip: fpu.last_ip,
            last_dp: fpu.last_dp,
            xmm: fpu.xmm.to_vec(),
            mxcsr: fpu.mxcsr,
        }
    }

    /// The KVM form; an error if a register file has the wrong length.
    pub fn to_kvm(&self) -> Result<FpuState> {
        let fpr = self.fpr.as_slice().try_into().map_err(|_| {
            invalid(format!(
                "the FPU state has {} x87 registers instead of 8",
                self.fpr.len()
            ))
        })?;
        let xmm = self.xmm.as_slice().try_into().map_err(|_| {
            invalid(format!(
                "the FPU state has {} XMM registers instead of 16",
                self.xmm.len()
            ))
        })?;
        Ok(FpuState {
            fpr,
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            xmm,
            mxcsr: self.mxcsr,
            ..Default::default()
        })
    }
}

/// A KVM struct as exactly its bytes: decoding refuses any other length.
struct Raw<T>(T);

impl<T: zerocopy::IntoBytes + zerocopy::Immutable> Serialize for Raw<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0.as_bytes())
    }
}

impl<'de, T: zerocopy::FromBytes> Deserialize<'de> for Raw<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let want = std::mem::size_of::<T>();
        let bytes = d.deserialize_bytes(ExactBytes(want))?;
        T::read_from_bytes(&bytes)
            .map(Raw)
            .map_err(|_| serde::de::Error::invalid_length(bytes.len(), &ExactBytes(want)))
    }
}

/// Collects a byte string (or a sequence of bytes, as JSON writes one) of
/// exactly `.0` bytes, refusing longer input before allocating for it.
struct ExactBytes(usize);

impl<'de> serde::de::Visitor<'de> for ExactBytes {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} bytes", self.0)
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> std::result::Result<Vec<u8>, E> {
        if v.len() != self.0 {
            return Err(E::invalid_length(v.len(), &self));
        }
        Ok(v.to_vec())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Vec<u8>, A::Error> {
        let mut out = Vec::with_capacity(self.0);
        while let Some(b) = seq.next_element::<u8>()? {
            if out.len() == self.0 {
                return Err(serde::de::Error::invalid_length(self.0 + 1, &self));
            }
            out.push(b);
        }
        if out.len() != self.0 {
            return Err(serde::de::Error::invalid_length(out.len(), &self));
        }
        Ok(out)
    }
}

/// `#[serde(with)]` for a KVM struct stored as its exact bytes.
mod raw {
    use super::Raw;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T, S>(value: &T, s: S) -> Result<S::Ok, S::Error>
    where
        T: zerocopy::IntoBytes + zerocopy::Immutable + Copy,
        S: Serializer,
    {
        Raw(*value).serialize(s)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: zerocopy::FromBytes,
        D: Deserializer<'de>,
    {
        Raw::<T>::deserialize(d).map(|r| r.0)
    }
}

/// `#[serde(with)]` for an optional KVM struct stored as its exact bytes.
mod raw_option {
    use super::Raw;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T, S>(value: &Option<T>, s: S) -> Result<S::Ok, S::Error>
    where
        T: zerocopy::IntoBytes + zerocopy::Immutable + Copy,
        S: Serializer,
    {
        value.map(Raw).serialize(s)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: zerocopy::FromBytes,
        D: Deserializer<'de>,
    {
        Ok(Option::<Raw<T>>::deserialize(d)?.map(|r| r.0))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sample() -> VcpuState {
        VcpuState {
            regs: StandardRegisters {
                rax: 7,
                rip: 0x1000,
                rflags: 2,
                ..Default::default()
            },
            sregs: SpecialRegisters::default(),
            fpu: FpuContext::Xsave(vec![0; XSAVE_MIN_WORDS]),
            xcrs: vec![Xcr { index: 0, value: 1 }],
            msrs: vec![
                Msr {
                    index: MSR_IA32_TSC,
                    data: 5,
                },
                Msr {
                    index: 0x174,
                    data: 0,
                },
            ],
            lapic: LapicState { regs: [0; 1024] },
            events: Some(VcpuEvents::default()),
            mp_state: 0,
            debug_regs: None,
            tsc_khz: Some(2_000_000),
            cpuid: Some(vec![host_leaf0(), leaf(1, 0)]),
        }
    }

    fn leaf(function: u32, index: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            flags: 0,
            eax: 0,
            ebx: 0,
            ecx: 0,
            edx: 0,
        }
    }

    fn host_leaf0() -> CpuidEntry {
        let r = std::arch::x86_64::__cpuid(0);
        CpuidEntry {
            eax: r.eax,
            ebx: r.ebx,
            ecx: r.ecx,
            edx: r.edx,
            ..leaf(0, 0)
        }
    }

    #[test]
    fn a_saved_cpuid_is_checked_before_it_is_used() {
        let state = sample();
        let cpuid = state.saved_cpuid().unwrap().unwrap();
        assert_eq!(cpuid.as_slice().len(), 2);
        assert_eq!(cpuid.as_slice()[0].ebx, host_leaf0().ebx);
        // An older snapshot has none: the caller makes one.
        let older = VcpuState {
            cpuid: None,
            ..sample()
        };
        assert!(older.saved_cpuid().unwrap().is_none());
        older.validate().unwrap();
        // Another vendor's CPU.
        let mut other = sample();
        let other_vendor = if host_vendor() == *b"AuthenticAMD" {
            *b"GenuineIntel"
        } else {
            *b"AuthenticAMD"
        };
        let word = |i: usize| u32::from_le_bytes(other_vendor[i..i + 4].try_into().unwrap());
        if let Some(leaf0) = other.cpuid.as_mut().and_then(|c| c.first_mut()) {
            (leaf0.ebx, leaf0.edx, leaf0.ecx) = (word(0), word(4), word(8));
        }
        let err = other.saved_cpuid().unwrap_err().to_string();
        assert!(err.contains("vendor"), "{err}");
        // No leaf 0.
        let mut headless = sample();
        headless.cpuid = Some(vec![leaf(1, 0)]);
        let err = headless.saved_cpuid().unwrap_err().to_string();
        assert!(err.contains("leaf 0"), "{err}");
    }

    #[test]
    fn a_state_survives_json() {
        let state = sample();
        state.validate().unwrap();
        let json = serde_json::to_string(&state).unwrap();
        let back: VcpuState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
    }

    #[test]
    fn a_kvm_struct_of_the_wrong_length_is_refused() {
        let mut json: serde_json::Value = serde_json::to_value(sample()).unwrap();
        let regs = json["regs"].as_array_mut().unwrap();
        regs.pop();
        let err = serde_json::from_value::<VcpuState>(json.clone()).unwrap_err();
        assert!(err.to_string().contains("144 bytes"), "{err}");
        json["regs"]
            .as_array_mut()
            .unwrap()
            .extend([0.into(), 0.into()]);
        assert!(serde_json::from_value::<VcpuState>(json).is_err());
    }

    #[test]
    fn a_byte_out_of_range_is_refused() {
        let mut json: serde_json::Value = serde_json::to_value(sample()).unwrap();
        json["regs"][0] = 256.into();
        assert!(serde_json::from_value::<VcpuState>(json).is_err());
    }

    #[test]
    fn malformed_states_fail_validation() {
        type Mutation = Box<dyn Fn(&mut VcpuState)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "XSAVE",
                Box::new(|s| s.fpu = FpuContext::Xsave(vec![0; XSAVE_MIN_WORDS - 1])),
            ),
            (
                "XSAVE",
                Box::new(|s| s.fpu = FpuContext::Xsave(vec![0; XSAVE_MAX_WORDS + 1])),
            ),
            (
                "x87",
                Box::new(|s| {
                    let mut fpu = LegacyFpu::from_kvm(&FpuState::default());
                    fpu.fpr.pop();
                    s.fpu = FpuContext::Legacy(fpu);
                }),
            ),
            (
                "XMM",
                Box::new(|s| {
                    let mut fpu = LegacyFpu::from_kvm(&FpuState::default());
                    fpu.xmm.push([0; 16]);
                    s.fpu = FpuContext::Legacy(fpu);
                }),
            ),
            ("MP state", Box::new(|s| s.mp_state = 77)),
            (
                "MSRs",
                Box::new(|s| s.msrs = vec![Msr { index: 1, data: 0 }; MAX_MSRS + 1]),
            ),
            ("twice", Box::new(|s| s.msrs.push(s.msrs[0]))),
            (
                "XCRs",
                Box::new(|s| s.xcrs = vec![Xcr { index: 0, value: 1 }; 17]),
            ),
            ("twice", Box::new(|s| s.xcrs.push(s.xcrs[0]))),
            ("TSC", Box::new(|s| s.tsc_khz = Some(0))),
            ("CPUID entries", Box::new(|s| s.cpuid = Some(Vec::new()))),
            (
                "CPUID entries",
                Box::new(|s| {
                    s.cpuid = Some((0..=MAX_CPUID_ENTRIES as u32).map(|f| leaf(f, 0)).collect())
                }),
            ),
            (
                "CPUID leaf appears twice",
                Box::new(|s| s.cpuid = Some(vec![leaf(0, 0), leaf(7, 1), leaf(7, 1)])),
            ),
        ];
        for (what, mutate) in cases {
            let mut state = sample();
            mutate(&mut state);
            let err = state.validate().unwrap_err();
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn legacy_fpu_round_trips() {
        let mut fpu = FpuState {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.xmm[3][5] = 9;
        fpu.fpr[7][0] = 4;
        assert_eq!(LegacyFpu::from_kvm(&fpu).to_kvm().unwrap(), fpu);
    }

    #[test]
    fn the_tsc_comes_first_and_the_deadline_last() {
        let mut state = sample();
        state.msrs = [0x6e0, 0x174, 0x10, 0x4b56_4d01, 0x3b, 0x11]
            .iter()
            .map(|&index| Msr { index, data: 0 })
            .collect();
        let order: Vec<u32> = state
            .msrs_in_restore_order()
            .iter()
            .map(|m| m.index)
            .collect();
        assert_eq!(order, vec![0x3b, 0x10, 0x11, 0x174, 0x4b56_4d01, 0x6e0]);
    }

    #[test]
    fn an_ioapic_with_the_wrong_pin_count_is_refused() {
        let state = VmState {
            pic_master: PicState::default(),
            pic_slave: PicState::default(),
            ioapic: IoapicState {
                base_address: 0xfec0_0000,
                ioregsel: 0,
                id: 0,
                irr: 0,
                redirection: vec![0; 23],
            },
            pit: PitState::default(),
            clock_ns: 0,
        };
        assert!(state.validate().is_err());
        let json = serde_json::to_string(&state).unwrap();
        let back: VmState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
    }
}
