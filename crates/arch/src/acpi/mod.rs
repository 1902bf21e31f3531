//! The ACPI tables of the `pc` machine: RSDP, XSDT, FADT (with the FACS),
//! MADT, MCFG and a DSDT in AML, built with rust-vmm's `acpi_tables`.
//!
//! The tables are laid out in one blob whose pointers (XSDT entries, the
//! FADT's FACS and DSDT, the RSDP's XSDT) hold offsets into that blob, with
//! a list of those pointer fields and of the checksums to fix. Two
//! consumers place them:
//! - direct boot: [`AcpiTables::placed`] adds the blob's guest address to
//!   every pointer and fixes every checksum (the RSDP goes where an OS
//!   scans for it, in 0xE0000..0xFFFFF);
//! - firmware: the blob and the RSDP become fw_cfg files and the pointer
//!   and checksum lists become the table-loader script (`ADD_POINTER`,
//!   `ADD_CHECKSUM`), which SeaBIOS and OVMF run where they put the files.
//!
//! The machine described is fixed-hardware ACPI (the PM block of
//! `devices::acpi_pm`), which every x86 OS supports, with a fixed power
//! button, S5 and a reset register.

mod dsdt;

use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::{facs::FACS, mcfg::MCFG, rsdp::Rsdp, xsdt::XSDT, Aml, AmlSink};
use zerocopy::{Immutable, IntoBytes};

pub use dsdt::{PciHost, VirtioMmio};

const OEM_ID: [u8; 6] = *b"HSTVSR";
const OEM_TABLE_ID: [u8; 8] = *b"HOSTVISR";
const OEM_REVISION: u32 = 1;

/// Where the local APICs and the IOAPIC are (the x86 defaults).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;

/// The PM block the FADT describes: its ports, as `devices::acpi_pm`
/// lays them out (the VMM passes them, arch does not depend on devices).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmBlock {
    pub pm1_evt: u16,
    pub pm1_evt_len: u8,
    pub pm1_cnt: u16,
    pub pm1_cnt_len: u8,
    pub pm_tmr: u16,
    pub pm_tmr_len: u8,
    pub gpe0: u16,
    pub gpe0_len: u8,
    pub reset: u16,
    pub reset_value: u8,
    /// The SLP_TYP value of S5 (the DSDT's `\_S5`).
    pub slp_typ_s5: u8,
    /// The SCI's ISA IRQ (level-triggered, active high).
    pub sci_irq: u8,
}

/// A legacy serial port the DSDT lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SerialPort {
    pub port: u16,
    pub irq: u8,
}

/// What the tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    pub cpus: u8,
    pub pm: PmBlock,
    pub serial: Vec<SerialPort>,
    pub pci: Option<PciHost>,
    pub virtio_mmio: Vec<VirtioMmio>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("ACPI tables: {0} vCPUs do not fit the MADT's 8-bit APIC IDs")]
    TooManyCpus(u8),
}

/// A pointer field holding an offset into the table blob, to which the
/// blob's address is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pointer {
    /// The field is in the RSDP (else in the blob).
    pub in_rsdp: bool,
    pub offset: u32,
    pub size: u8,
}

/// A checksum byte at `offset` making `start..start + len` sum to zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checksum {
    pub in_rsdp: bool,
    pub offset: u32,
    pub start: u32,
    pub len: u32,
}

/// The built tables, not yet placed.
#[derive(Clone, Debug)]
pub struct AcpiTables {
    rsdp: Vec<u8>,
    blob: Vec<u8>,
    pointers: Vec<Pointer>,
    checksums: Vec<Checksum>,
}

/// The FADT's pointer fields (ACPI 6.5, table 5.9).
const FADT_FIRMWARE_CTRL: u32 = 36;
const FADT_DSDT: u32 = 40;
const FADT_X_DSDT: u32 = 140;
/// IAPC_BOOT_ARCH: legacy devices, an 8042, no VGA, no ASPM control.
const IAPC_BOOT_ARCH: u16 = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 4);
/// MADT flags: PCAT_COMPAT (8259 PICs present).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_FLAGS: usize = 40;

impl AcpiTables {
    pub fn build(cfg: &AcpiConfig) -> Result<Self, AcpiError> {
        if cfg.cpus == 0 || cfg.cpus > 254 {
            return Err(AcpiError::TooManyCpus(cfg.cpus));
        }
        let mut t = AcpiTables {
            rsdp: Vec::new(),
            blob: Vec::new(),
            pointers: Vec::new(),
            checksums: Vec::new(),
        };
        // The FACS first: it must be 64-byte aligned, and the blob is.
        let facs = t.add(&bytes(&FACS::new()), false);
        let dsdt = t.add(&dsdt::build(cfg), true);

        let pm = cfg.pm;
        let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
            .preferred_pm_profile(PmProfile::Desktop)
            .flag(Flags::Wbinvd)
            .flag(Flags::ProcC1)
            // No fixed sleep button (the power button is fixed: its flag
            // stays clear).
            .flag(Flags::SlpButton)
            .flag(Flags::TmrValExt)
            .flag(Flags::ResetRegSup);
        fadt.firmware_ctrl = facs.into();
        fadt.dsdt = dsdt.into();
        fadt.x_dsdt = u64::from(dsdt).into();
        fadt.sci_int = u16::from(pm.sci_irq).into();
        fadt.pm1a_evt_blk = u32::from(pm.pm1_evt).into();
        fadt.pm1_evt_len = pm.pm1_evt_len;
        fadt.pm1a_cnt_blk = u32::from(pm.pm1_cnt).into();
        fadt.pm1_cnt_len = pm.pm1_cnt_len;
        fadt.pm_tmr_blk = u32::from(pm.pm_tmr).into();
        fadt.pm_tmr_len = pm.pm_tmr_len;
        fadt.gpe0_blk = u32::from(pm.gpe0).into();
        fadt.gpe0_blk_len = pm.gpe0_len;
        fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
        // The CMOS century register (devices::cmos).
        fadt.century = 0x32;
        fadt.reset_reg = GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(pm.reset),
        );
        fadt.reset_value = pm.reset_value;
        let fadt = t.add(&bytes(&fadt.finalize()), true);
        t.pointer(false, fadt + FADT_FIRMWARE_CTRL, 4);
        t.pointer(false, fadt + FADT_DSDT, 4);
        t.pointer(false, fadt + FADT_X_DSDT, 8);

        let madt = t.add(&madt(cfg), true);
        let mut entries = vec![fadt, madt];
        if let Some(pci) = &cfg.pci {
            let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
            mcfg.add_ecam(pci.ecam_base, 0, 0, pci.last_bus);
            entries.push(t.add(&bytes(&mcfg), true));
        }

        let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        for &e in &entries {
            xsdt.add_entry(u64::from(e));
        }
        let xsdt = t.add(&bytes(&xsdt), true);
        for i in 0..entries.len() as u32 {
            t.pointer(false, xsdt + 36 + 8 * i, 8);
        }

        t.rsdp = bytes(&Rsdp::new(OEM_ID, u64::from(xsdt)));
        t.pointer(true, 24, 8);
        t.checksums.push(Checksum {
            in_rsdp: true,
            offset: 8,
            start: 0,
            len: 20,
        });
        t.checksums.push(Checksum {
            in_rsdp: true,
            offset: 32,
            start: 0,
            len: 36,
        });
        Ok(t)
    }

    /// Appends a table at an 8-byte boundary, with its checksum (byte 9)
    /// to fix if `checksummed`; returns its offset.
    fn add(&mut self, table: &[u8], checksummed: bool) -> u32 {
        let at = self.blob.len().next_multiple_of(8);
        self.blob.resize(at, 0);
        self.blob.extend_from_slice(table);
        // Tables are kilobytes; the blob's offsets fit 32 bits.
        let at = u32::try_from(at).unwrap_or(u32::MAX);
        if checksummed {
            self.checksums.push(Checksum {
                in_rsdp: false,
                offset: at + 9,
                start: at,
                len: u32::try_from(table.len()).unwrap_or(u32::MAX),
            });
        }
        at
    }

    fn pointer(&mut self, in_rsdp: bool, offset: u32, size: u8) {
        self.pointers.push(Pointer {
            in_rsdp,
            offset,
            size,
        });
    }

    /// The RSDP, its XSDT pointer an offset into [`Self::blob`].
    pub fn rsdp(&self) -> &[u8] {
        &self.rsdp
    }

    /// Every other table, pointers as offsets into this blob.
    pub fn blob(&self) -> &[u8] {
        &self.blob
    }

    pub fn pointers(&self) -> &[Pointer] {
        &self.pointers
    }

    /// In the order a loader must fix them (the tables', then the RSDP's).
    pub fn checksums(&self) -> &[Checksum] {
        &self.checksums
    }

    /// The RSDP and the blob with the blob at guest address `blob_addr`:
    /// every pointer patched, every checksum fixed.
    pub fn placed(&self, blob_addr: u64) -> (Vec<u8>, Vec<u8>) {
        let (mut rsdp, mut blob) = (self.rsdp.clone(), self.blob.clone());
        for p in &self.pointers {
            let target = if p.in_rsdp { &mut rsdp } else { &mut blob };
            let (at, n) = (p.offset as usize, usize::from(p.size));
            let mut v = [0u8; 8];
            v[..n].copy_from_slice(&target[at..at + n]);
            let value = u64::from_le_bytes(v).wrapping_add(blob_addr);
            target[at..at + n].copy_from_slice(&value.to_le_bytes()[..n]);
        }
        for c in &self.checksums {
            let target = if c.in_rsdp { &mut rsdp } else { &mut blob };
            target[c.offset as usize] = 0;
            let range = &target[c.start as usize..(c.start + c.len) as usize];
            let sum = range.iter().fold(0u8, |a, &b| a.wrapping_add(b));
            target[c.offset as usize] = sum.wrapping_neg();
        }
        (rsdp, blob)
    }
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// An MADT interrupt source override (type 2), which `acpi_tables` does
/// not have.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: zerocopy::little_endian::U32,
    flags: zerocopy::little_endian::U16,
}

impl InterruptOverride {
    /// `flags`: polarity bits 0–1 (1 high, 3 low), trigger bits 2–3 (1
    /// edge, 3 level).
    fn new(source: u8, gsi: u32, flags: u16) -> Self {
        InterruptOverride {
            kind: 2,
            length: 10,
            bus: 0,
            source,
            gsi: gsi.into(),
            flags: flags.into(),
        }
    }
}

impl Aml for InterruptOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// The local APIC NMI entry (type 4): LINT1 of every processor is NMI.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LapicNmi {
    kind: u8,
    length: u8,
    uid: u8,
    flags: zerocopy::little_endian::U16,
    lint: u8,
}

impl Aml for LapicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for cpu in 0..cfg.cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    // The IOAPIC's ID follows the CPUs' (as the MP table has it).
    madt.add_structure(IoApic::new(cfg.cpus, IOAPIC_ADDR, 0));
    // The PIT's IRQ 0 is the IOAPIC's pin 2; the SCI is level, high.
    madt.add_structure(InterruptOverride::new(0, 2, 0));
    madt.add_structure(InterruptOverride::new(
        cfg.pm.sci_irq,
        u32::from(cfg.pm.sci_irq),
        0b1101,
    ));
    madt.add_structure(LapicNmi {
        kind: 4,
        length: 6,
        uid: 0xff,
        flags: 0.into(),
        lint: 1,
    });
    let mut v = bytes(&madt);
    // acpi_tables leaves the flags zero; the checksum is fixed on placing.
    v[MADT_FLAGS..MADT_FLAGS + 4].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    v
}

#[cfg(test)]
mod tests;
