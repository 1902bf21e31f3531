//! The Intel MultiProcessor Specification (1.4) table: how a guest without
//! ACPI finds its CPUs, IOAPIC and interrupt routing. Written by hand: it is
//! a few fixed-layout records, and no rust-vmm crate provides it.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_START, EBDA_END, IOAPIC_START, MPTABLE_START};
use crate::{ArchError, GuestMemoryMmap, Result};

/// IOAPIC input pins routed in the table (the in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MPC_HEADER_SIZE: usize = 44;
const CPU_ENTRY_SIZE: usize = 20;
const SMALL_ENTRY_SIZE: usize = 8;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_sub(*b))
}

/// The most vCPUs whose table fits below [`EBDA_END`].
pub fn max_cpus() -> u32 {
    let fixed = 16 + MPC_HEADER_SIZE + SMALL_ENTRY_SIZE * (2 + usize::from(IOAPIC_PINS) + 2);
    let room = (EBDA_END - MPTABLE_START) as usize - fixed;
    // APIC IDs are 8 bits and one is the IOAPIC's.
    ((room / CPU_ENTRY_SIZE) as u32).min(254)
}

/// Builds the floating pointer and configuration table for `cpus` vCPUs
/// (APIC IDs 0..cpus), to be placed at [`MPTABLE_START`].
pub fn build(cpus: u32) -> Result<Vec<u8>> {
    if cpus == 0 || cpus > max_cpus() {
        return Err(ArchError::TooManyCpus {
            count: cpus,
            max: max_cpus(),
        });
    }
    let ioapic_id = cpus as u8;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = if id == 0 { 0x3 } else { 0x1 }; // enabled, bootstrap
        entries.extend_from_slice(&[0, id as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 2;
    for irq in 0..IOAPIC_PINS {
        // I/O interrupt: INT, conforming polarity/trigger, ISA bus irq -> pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT to LINT0 of the BSP, NMI to LINT1 of all.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_START as u32 + 16;
    let length = (MPC_HEADER_SIZE + entries.len()) as u16;
    let mut table = Vec::with_capacity(usize::from(length));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"HOSTVISR");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended length, checksum
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 16 bytes, rev 1.4
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    Ok(mpf)
}

/// Writes the MP table for `cpus` vCPUs into guest memory.
pub fn setup(mem: &GuestMemoryMmap, cpus: u32) -> Result<()> {
    let bytes = build(cpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|_| ArchError::GuestMemory {
            addr: MPTABLE_START,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn floating_pointer_and_table_checksums() {
        let t = build(2).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[0..16]), 0);
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()),
            MPTABLE_START as u32 + 16
        );
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([table[4], table[5]]));
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
    }

    #[test]
    fn one_processor_entry_per_vcpu() {
        for cpus in [1u32, 2, 8] {
            let t = build(cpus).unwrap();
            let table = &t[16..];
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(u32::from(count), cpus + 2 + u32::from(IOAPIC_PINS) + 2);
            let mut off = MPC_HEADER_SIZE;
            let mut ids = vec![];
            while off < table.len() {
                match table[off] {
                    0 => {
                        ids.push((table[off + 1], table[off + 3]));
                        off += CPU_ENTRY_SIZE;
                    }
                    2 => {
                        assert_eq!(u32::from(table[off + 1]), cpus, "IOAPIC id after CPUs");
                        off += SMALL_ENTRY_SIZE;
                    }
                    1 | 3 | 4 => off += SMALL_ENTRY_SIZE,
                    other => panic!("bad entry type {other}"),
                }
            }
            assert_eq!(off, table.len());
            let expected: Vec<_> = (0..cpus as u8)
                .map(|i| (i, if i == 0 { 3 } else { 1 }))
                .collect();
            assert_eq!(ids, expected);
        }
    }

    #[test]
    fn too_many_or_zero_cpus_are_refused() {
        assert!(max_cpus() >= 64);
        assert!(build(max_cpus()).is_ok());
        assert!(build(max_cpus()).unwrap().len() as u64 <= EBDA_END - MPTABLE_START);
        assert!(matches!(
            build(max_cpus() + 1),
            Err(ArchError::TooManyCpus { .. })
        ));
        assert!(build(0).is_err());
    }
}
