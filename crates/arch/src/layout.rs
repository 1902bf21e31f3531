//! The guest-physical memory map.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BIOS data (Linux reserves the first page)
//! 0x0000_0500  boot GDT                    0x0000_0520  boot IDT
//! 0x0000_7000  boot_params ("zero page")   0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, then PDPT and four page directories (identity map
//!              of the first 4 GiB with 2 MiB pages)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP floating pointer and MP table (reserved to 1 MiB)
//! 0x000e_0000  ACPI RSDP and tables (`pc` direct boot)
//! 0x0010_0000  kernel (a bzImage here; an ELF vmlinux at its own address)
//! ...          initrd at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole: devices, IOAPIC, LAPIC, KVM's TSS
//! 0xd000_0000  virtio-mmio windows (`microvm`)
//! 0xd800_0000  PCI ECAM, bus 0 (`pc`)
//! 0xe000_0000  the 32-bit PCI BAR window (`pc`)
//! 4 GiB        RAM above the hole, if any
//! ```

pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// Linux's x86 COMMAND_LINE_SIZE, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The MP floating pointer sits in the second region Linux scans (the
/// last KiB of base memory), so it is found at once.
pub const MPTABLE_START: u64 = 0x9fc00;
pub const EBDA_END: u64 = 0x10_0000;
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// Where the MMIO devices of the VMM go (virtio-mmio and the like).
pub const DEVICE_MMIO_START: u64 = 0xd000_0000;
/// The `pc` machine's PCI: ECAM for bus 0 (1 MiB), and the 32-bit window
/// its BARs are placed in, up to the IOAPIC — where SeaBIOS places them
/// on a host bridge it does not know.
pub const PCI_ECAM_START: u64 = 0xd800_0000;
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
pub const PCI_MMIO32_START: u64 = 0xe000_0000;
pub const PCI_MMIO32_END: u64 = IOAPIC_START - 1;
/// ACPI tables of a directly booted `pc` machine: the RSDP where Linux
/// scans for it, the tables after it (all in the reserved area below
/// 1 MiB).
pub const ACPI_RSDP_START: u64 = 0xe_0000;
pub const ACPI_TABLES_START: u64 = 0xe_1000;
/// The lowest RAM size hostvisor boots with.
pub const MIN_MEMORY: u64 = 16 << 20;

/// The guest RAM ranges `(start, size)` for `size` bytes of RAM: below the
/// MMIO hole, and the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(MMIO_HOLE_START), vec![(0, MMIO_HOLE_START)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_HOLE_START), (1 << 32, (4 << 30) - MMIO_HOLE_START)]
        );
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let areas = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 8),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x4000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, EBDA_END - MPTABLE_START),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
        const {
            assert!(
                BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000
            )
        };
    }
}
