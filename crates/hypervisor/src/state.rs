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
//! halted, waiting for SIPI), the debug registers, and the TSC frequency.
//!
//! The MSRs saved are those KVM reports as saveable (`KVM_GET_MSR_INDEX_LIST`)
//! plus a few it does not always list (the TSC, kvmclock's system-time and
//! wall-clock MSRs, the MTRRs), minus the x2APIC range (the LAPIC page
//! carries those registers). Any of them that the vCPU refuses to read
//! (a feature the guest's CPUID does not have) is left out of the state.
//!
//! # Restore order
//! The caller first sets the vCPU's CPUID (it decides which MSRs and XSAVE
//! components exist), then [`crate::Vcpu::restore_state`] writes, in order:
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
}

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
        Ok(())
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
        }
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
