//! Initial vCPU state for entering a 64-bit kernel: GDT, identity page
//! tables, control registers, general registers, FPU, MSRs and LAPIC.

use hypervisor::x86::{CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME};
use hypervisor::{
    DescriptorTable, FpuState, LapicState, MsrEntry, SegmentRegister, SpecialRegisters,
    StandardRegisters,
};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::{ArchError, GuestMemoryMmap, Result};

/// GDT selectors of the Linux 64-bit boot protocol (__BOOT_CS, __BOOT_DS).
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
pub const BOOT_TSS: u16 = 0x20;

/// Encodes a segment descriptor from access flags (`flags` holds the
/// access byte in bits 0..8 and the granularity nibble in bits 12..16).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (u64::from(base & 0xff00_0000) << 32)
        | (u64::from(flags & 0xf0ff) << 40)
        | (u64::from(limit & 0x000f_0000) << 32)
        | (u64::from(base & 0x00ff_ffff) << 16)
        | u64::from(limit & 0xffff)
}

/// Decodes a descriptor into the register form the hypervisor loads.
pub fn segment_from_gdt(entry: u64, selector: u16) -> SegmentRegister {
    let field = |shift: u32, bits: u32| ((entry >> shift) & ((1 << bits) - 1)) as u8;
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = field(55, 1);
    SegmentRegister {
        base,
        limit: if g == 1 {
            ((raw_limit << 12) | 0xfff) as u32
        } else {
            raw_limit as u32
        },
        selector,
        type_: field(40, 4),
        present: field(47, 1),
        dpl: field(45, 2),
        db: field(54, 1),
        s: field(44, 1),
        l: field(53, 1),
        g,
        avl: field(52, 1),
        unusable: u8::from(field(47, 1) == 0),
        padding: 0,
    }
}

/// The boot GDT: null, null, 64-bit code (0x10), data (0x18), TSS (0x20).
pub fn boot_gdt() -> [u64; 5] {
    [
        0,
        0,
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

fn write<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, val: T, addr: u64) -> Result<()> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|_| ArchError::GuestMemory { addr })
}

/// Writes identity page tables for the first 4 GiB (2 MiB pages) and
/// returns CR3.
pub fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<u64> {
    write(mem, PDPTE_START | 0x03, PML4_START)?;
    for dir in 0..4u64 {
        let pd = PDE_START + dir * 0x1000;
        write(mem, pd | 0x03, PDPTE_START + dir * 8)?;
        for i in 0..512u64 {
            let phys = (dir << 30) | (i << 21);
            write(mem, phys | 0x83, pd + i * 8)?;
        }
    }
    Ok(PML4_START)
}

/// Writes the boot GDT, an empty IDT and the identity page tables into
/// guest memory, for [`long_mode_sregs`].
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<()> {
    for (i, entry) in boot_gdt().iter().enumerate() {
        write(mem, *entry, BOOT_GDT_START + 8 * i as u64)?;
    }
    write(mem, 0u64, BOOT_IDT_START)?;
    write_identity_page_tables(mem)?;
    Ok(())
}

/// `base` (a vCPU's own special registers, which keep per-vCPU fields such
/// as the APIC base) switched to 64-bit mode on the tables that
/// [`write_boot_tables`] wrote.
pub fn long_mode_sregs(base: &SpecialRegisters) -> SpecialRegisters {
    let gdt = boot_gdt();
    let mut sregs = *base;
    let code = segment_from_gdt(gdt[2], BOOT_CS);
    let data = segment_from_gdt(gdt[3], BOOT_DS);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[4], BOOT_TSS);
    sregs.gdt = DescriptorTable {
        base: BOOT_GDT_START,
        limit: (std::mem::size_of_val(&gdt) - 1) as u16,
        ..Default::default()
    };
    sregs.idt = DescriptorTable {
        base: BOOT_IDT_START,
        limit: 7,
        ..Default::default()
    };
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// The special registers of an x86 CPU after reset (real mode, executing
/// from CS base 0xffff0000, so the first instruction is the firmware's at
/// 0xfffffff0): what firmware starts from.
pub fn reset_sregs(base: &SpecialRegisters) -> SpecialRegisters {
    let segment = |selector: u16, base: u64, type_: u8| SegmentRegister {
        base,
        limit: 0xffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let mut sregs = *base;
    // Code: execute/read, accessed. Data: read/write, accessed.
    sregs.cs = segment(0xf000, 0xffff_0000, 0xb);
    let data = segment(0, 0, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.ldt = SegmentRegister {
        s: 0,
        type_: 0x2,
        ..data
    };
    sregs.tr = SegmentRegister {
        s: 0,
        type_: 0x3,
        ..data
    };
    sregs.gdt = DescriptorTable {
        base: 0,
        limit: 0xffff,
        ..Default::default()
    };
    sregs.idt = sregs.gdt;
    sregs.cr0 = CR0_ET | (1 << 29) | (1 << 30); // ET, NW, CD
    sregs.cr2 = 0;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// The general registers after reset: IP 0xfff0 (with [`reset_sregs`]'s CS,
/// the reset vector), RDX the CPU's family/model/stepping.
pub fn reset_regs() -> StandardRegisters {
    StandardRegisters {
        rflags: 0x2,
        rip: 0xfff0,
        rdx: 0x600,
        ..Default::default()
    }
}

/// General registers at a 64-bit kernel entry point: RSI points at
/// boot_params, as the Linux 64-bit boot protocol wants.
pub fn boot_regs(entry: u64, boot_params: u64) -> StandardRegisters {
    StandardRegisters {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: boot_params,
        ..Default::default()
    }
}

/// The FPU after FNINIT, with SSE exceptions masked.
pub fn boot_fpu() -> FpuState {
    FpuState {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MSR values at boot: system-call MSRs cleared, fast strings enabled, and
/// MTRRs on with write-back as the default memory type (without it, guest
/// RAM would be uncached on hosts that honour guest MTRRs).
pub fn boot_msrs() -> Vec<MsrEntry> {
    let msr = |index, data| MsrEntry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, 1),
        msr(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(lapic: &LapicState, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut LapicState, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *byte as i8;
    }
}

/// Wires LINT0 to the PIC (ExtINT) and LINT1 to NMI, as firmware does.
pub fn configure_lint(lapic: &mut LapicState) {
    let set_mode = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, set_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, set_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn gdt_entries_round_trip() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), BOOT_CS);
        assert_eq!(
            (code.l, code.db, code.g, code.present, code.type_),
            (1, 0, 1, 1, 0xb)
        );
        assert_eq!(
            (code.limit, code.base, code.dpl, code.s),
            (0xffff_ffff, 0, 0, 1)
        );
        let data = segment_from_gdt(gdt_entry(0xc093, 0x1234_5678, 0xfffff), BOOT_DS);
        assert_eq!(
            (data.l, data.db, data.type_, data.base),
            (0, 1, 3, 0x1234_5678)
        );
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        let tss = segment_from_gdt(0, 0);
        assert_eq!(tss.unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let mem = memory();
        let cr3 = write_identity_page_tables(&mem).unwrap();
        assert_eq!(cr3, PML4_START);
        let read = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).unwrap();
        assert_eq!(read(PML4_START), PDPTE_START | 3);
        for dir in 0..4 {
            assert_eq!(read(PDPTE_START + dir * 8), (PDE_START + dir * 0x1000) | 3);
        }
        // Last 2 MiB page below 4 GiB maps to itself, huge, present, writable.
        assert_eq!(read(PDE_START + 3 * 0x1000 + 511 * 8), 0xffe0_0000 | 0x83);
        assert_eq!(read(PDE_START + 8), 0x20_0000 | 0x83);
        // Nothing beyond the fourth PDPT entry.
        assert_eq!(read(PDPTE_START + 4 * 8), 0);
    }

    #[test]
    fn long_mode_registers() {
        let mem = memory();
        write_boot_tables(&mem).unwrap();
        let base = SpecialRegisters {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        let sregs = long_mode_sregs(&base);
        assert_eq!(sregs.apic_base, 0xfee0_0900, "per-vCPU fields kept");
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(sregs.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
        assert_eq!((sregs.cs.selector, sregs.cs.l), (BOOT_CS, 1));
        assert_eq!((sregs.ss.selector, sregs.ds.selector), (BOOT_DS, BOOT_DS));
        assert_eq!(sregs.gdt.base, BOOT_GDT_START);
        assert_eq!(sregs.gdt.limit, 39);
        let gdt2: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 16)).unwrap();
        assert_eq!(gdt2, 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn boot_registers_follow_the_64_bit_protocol() {
        let regs = boot_regs(0x100_0000, ZERO_PAGE_START);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rflags),
            (0x100_0000, ZERO_PAGE_START, 2)
        );
        assert_eq!(boot_fpu().fcw, 0x37f);
        assert!(boot_msrs()
            .iter()
            .any(|m| m.index == MSR_MTRR_DEF_TYPE && m.data == 0x806));
    }

    #[test]
    fn lint_pins() {
        let mut lapic = LapicState::default();
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0000);
        configure_lint(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT1), 0x0000_0400);
    }
}
