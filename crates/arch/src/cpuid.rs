//! The CPUID the guest sees: the accelerator's supported leaves, with the
//! topology of this VM, the hypervisor bit, and features hidden on request.

use std::fmt;
use std::str::FromStr;

use hypervisor::{CpuId, CpuIdEntry};

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// A feature the user may hide from the guest, with the CPUID bits that
/// announce it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CpuFeature {
    name: &'static str,
    bits: &'static [(u32, u32, Reg, u32)],
}

const KVM_LEAF: u32 = 0x4000_0001;

/// Features that can be hidden by name (`leaf, subleaf, register, bit`).
pub const FEATURES: &[CpuFeature] = &[
    CpuFeature {
        name: "cx16",
        bits: &[(1, 0, Reg::Ecx, 13)],
    },
    CpuFeature {
        name: "popcnt",
        bits: &[(1, 0, Reg::Ecx, 23)],
    },
    CpuFeature {
        name: "x2apic",
        bits: &[(1, 0, Reg::Ecx, 21)],
    },
    CpuFeature {
        name: "tsc-deadline",
        bits: &[(1, 0, Reg::Ecx, 24)],
    },
    CpuFeature {
        // Hiding XSAVE hides everything whose state it manages.
        name: "xsave",
        bits: &[
            (1, 0, Reg::Ecx, 26),
            (1, 0, Reg::Ecx, 27),
            (1, 0, Reg::Ecx, 28),
            (1, 0, Reg::Ecx, 12),
            (7, 0, Reg::Ebx, 5),
            (7, 0, Reg::Ebx, 16),
            (7, 0, Reg::Ebx, 17),
            (7, 0, Reg::Ebx, 28),
            (7, 0, Reg::Ebx, 30),
            (7, 0, Reg::Ebx, 31),
        ],
    },
    CpuFeature {
        name: "avx",
        bits: &[(1, 0, Reg::Ecx, 28), (7, 0, Reg::Ebx, 5)],
    },
    CpuFeature {
        name: "rdrand",
        bits: &[(1, 0, Reg::Ecx, 30)],
    },
    CpuFeature {
        name: "smep",
        bits: &[(7, 0, Reg::Ebx, 7)],
    },
    CpuFeature {
        name: "erms",
        bits: &[(7, 0, Reg::Ebx, 9)],
    },
    CpuFeature {
        name: "smap",
        bits: &[(7, 0, Reg::Ebx, 20)],
    },
    CpuFeature {
        name: "fsrm",
        bits: &[(7, 0, Reg::Edx, 4)],
    },
    CpuFeature {
        name: "pdpe1gb",
        bits: &[(0x8000_0001, 0, Reg::Edx, 26)],
    },
    // KVM paravirtual features (leaf 0x4000_0001 EAX).
    CpuFeature {
        name: "kvmclock",
        bits: &[(KVM_LEAF, 0, Reg::Eax, 0), (KVM_LEAF, 0, Reg::Eax, 3)],
    },
    CpuFeature {
        name: "pv-eoi",
        bits: &[(KVM_LEAF, 0, Reg::Eax, 6)],
    },
    CpuFeature {
        name: "pv-unhalt",
        bits: &[(KVM_LEAF, 0, Reg::Eax, 7)],
    },
    CpuFeature {
        name: "pv-tlb-flush",
        bits: &[(KVM_LEAF, 0, Reg::Eax, 9)],
    },
    CpuFeature {
        name: "pv-send-ipi",
        bits: &[(KVM_LEAF, 0, Reg::Eax, 11)],
    },
    CpuFeature {
        name: "pv-sched-yield",
        bits: &[(KVM_LEAF, 0, Reg::Eax, 13)],
    },
];

impl CpuFeature {
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl fmt::Display for CpuFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// An unknown feature name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown CPU feature `{0}` (known: {list})", list = FEATURES.iter().map(|f| f.name).collect::<Vec<_>>().join(", "))]
pub struct UnknownFeature(pub String);

impl FromStr for CpuFeature {
    type Err = UnknownFeature;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FEATURES
            .iter()
            .find(|f| f.name == s)
            .copied()
            .ok_or_else(|| UnknownFeature(s.to_string()))
    }
}

/// What to change in the accelerator's CPUID for one VM.
#[derive(Debug, Clone, Default)]
pub struct CpuidPolicy {
    pub cpu_count: u32,
    pub hidden: Vec<CpuFeature>,
}

fn reg_mut(entry: &mut CpuIdEntry, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

/// The number of APIC-ID bits needed for `count` logical CPUs.
fn id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

impl CpuidPolicy {
    /// The CPUID of vCPU `id`, derived from the accelerator's `supported`.
    pub fn apply(&self, supported: &CpuId, id: u32) -> CpuId {
        let count = self.cpu_count.max(1);
        let mut out = supported.clone();
        let hides_xsave = self.hidden.iter().any(|f| f.name == "xsave");
        for entry in out.as_mut_slice() {
            match entry.function {
                1 => {
                    // Initial APIC ID, logical processor count, HTT.
                    entry.ebx = (entry.ebx & 0x0000_ffff) | (id << 24) | ((count & 0xff) << 16);
                    if count > 1 {
                        entry.edx |= 1 << 28;
                    }
                    entry.ecx |= 1 << 31; // running under a hypervisor
                }
                4 => {
                    // Deterministic cache parameters: one core per vCPU.
                    let cache_level = (entry.eax >> 5) & 0x7;
                    let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                    entry.eax = (entry.eax & 0x3fff)
                        | ((count - 1).min(63) << 26)
                        | (sharing.min(0xfff) << 14);
                }
                0xb | 0x1f => {
                    // Extended topology: level 0 SMT (one thread per core),
                    // level 1 cores (all vCPUs in one package).
                    entry.edx = id;
                    match entry.index {
                        0 => {
                            entry.eax = 0;
                            entry.ebx = 1;
                            entry.ecx = 1 << 8;
                        }
                        1 => {
                            entry.eax = id_bits(count);
                            entry.ebx = count;
                            entry.ecx = (2 << 8) | 1;
                        }
                        n => {
                            entry.eax = 0;
                            entry.ebx = 0;
                            entry.ecx = n;
                        }
                    }
                }
                0xd if hides_xsave => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = 0;
                    entry.edx = 0;
                }
                0x8000_0008 => {
                    // AMD: number of cores - 1 and the APIC-ID size.
                    entry.ecx =
                        (entry.ecx & !0xf0ff) | (count - 1).min(0xff) | (id_bits(count) << 12);
                }
                _ => {}
            }
            for feature in &self.hidden {
                for &(leaf, subleaf, reg, bit) in feature.bits {
                    if entry.function == leaf && entry.index == subleaf {
                        *reg_mut(entry, reg) &= !(1 << bit);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> CpuIdEntry {
        CpuIdEntry {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn supported() -> CpuId {
        CpuId::from_entries(&[
            entry(
                1,
                0,
                [
                    0x906ea,
                    0x0010_0800,
                    0x7ffa_3203 | (1 << 13) | (1 << 26),
                    0x0f8b_fbff,
                ],
            ),
            entry(4, 0, [0x121, 0, 0, 0]),
            entry(4, 3, [0x163, 0, 0, 0]),
            entry(7, 0, [0, (1 << 9) | (1 << 20) | (1 << 5), 0, 1 << 4]),
            entry(0xb, 0, [1, 2, 0x100, 7]),
            entry(0xb, 1, [4, 8, 0x201, 7]),
            entry(0xd, 0, [7, 0x340, 0x340, 0]),
            entry(KVM_LEAF, 0, [0x1_ffff, 0, 0, 0]),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> CpuIdEntry {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn topology_follows_the_vcpu() {
        let policy = CpuidPolicy {
            cpu_count: 2,
            hidden: vec![],
        };
        let c = policy.apply(&supported(), 1);
        let leaf1 = find(&c, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 1, "initial APIC ID");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 2, "logical processors");
        assert_eq!(leaf1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(leaf1.edx & (1 << 28), 0, "HTT");
        assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");
        assert_eq!(find(&c, 0xb, 0).edx, 1);
        assert_eq!((find(&c, 0xb, 1).eax, find(&c, 0xb, 1).ebx), (1, 2));
        assert_eq!(find(&c, 4, 0).eax >> 26, 1);
        assert_eq!((find(&c, 4, 3).eax >> 14) & 0xfff, 1, "L3 shared by both");
        assert_eq!((find(&c, 4, 0).eax >> 14) & 0xfff, 0, "L1 private");
    }

    #[test]
    fn one_cpu_has_no_htt() {
        let c = CpuidPolicy {
            cpu_count: 1,
            hidden: vec![],
        }
        .apply(&supported(), 0);
        assert_eq!(find(&c, 1, 0).edx & (1 << 28), 0);
        assert_eq!(find(&c, 1, 0).ebx >> 24, 0);
    }

    #[test]
    fn hidden_features_are_cleared() {
        let hidden = ["cx16", "erms", "fsrm", "pv-send-ipi"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let c = CpuidPolicy {
            cpu_count: 1,
            hidden,
        }
        .apply(&supported(), 0);
        assert_eq!(find(&c, 1, 0).ecx & (1 << 13), 0);
        assert_ne!(find(&c, 1, 0).ecx & (1 << 26), 0, "xsave untouched");
        assert_eq!(find(&c, 7, 0).ebx & (1 << 9), 0);
        assert_ne!(find(&c, 7, 0).ebx & (1 << 20), 0, "smap untouched");
        assert_eq!(find(&c, 7, 0).edx & (1 << 4), 0);
        assert_eq!(find(&c, KVM_LEAF, 0).eax, 0x1_ffff & !(1 << 11));
    }

    #[test]
    fn hiding_xsave_hides_avx_and_leaf_d() {
        let c = CpuidPolicy {
            cpu_count: 1,
            hidden: vec!["xsave".parse().unwrap()],
        }
        .apply(&supported(), 0);
        assert_eq!(find(&c, 1, 0).ecx & ((1 << 26) | (1 << 27) | (1 << 28)), 0);
        assert_eq!(find(&c, 7, 0).ebx & (1 << 5), 0);
        assert_eq!(find(&c, 0xd, 0).eax, 0);
    }

    #[test]
    fn unknown_feature_names_are_refused() {
        let err = "cx17".parse::<CpuFeature>().unwrap_err();
        assert!(err.to_string().contains("cx16"), "{err}");
    }
}
