//! The DSDT: the machine's devices in AML — `\_S5` for soft-off, the
//! serial ports, the PCI host bridge (its windows and INTx routing), the
//! ECAM reservation, and virtio-mmio devices where a machine has them.

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Memory32Fixed, Name, Package,
    Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::{sdt::Sdt, Aml, AmlSink};

use super::{AcpiConfig, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// A PCI host bridge (segment 0) as the DSDT and MCFG describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciHost {
    /// The ECAM window's base; it covers buses `0..=last_bus`, 1 MiB each.
    pub ecam_base: u64,
    pub last_bus: u8,
    /// The I/O port window for BARs (inclusive).
    pub io: (u16, u16),
    /// The 32-bit memory window (inclusive).
    pub mmio32: (u32, u32),
    /// The 64-bit memory window above RAM (inclusive), if any.
    pub mmio64: Option<(u64, u64)>,
    /// The GSI each INTx line goes to: slot `s`'s pin `p` (0 = INTA) is
    /// line `(s + p) % 4`, the usual swizzle.
    pub intx_gsi: [u32; 4],
}

/// A virtio-mmio device, listed as `LNRO0005` (Linux's ACPI match).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmio {
    pub addr: u32,
    pub len: u32,
    pub irq: u32,
}

/// The DSDT, revision 2 (64-bit integers).
pub(super) fn build(cfg: &AcpiConfig) -> Vec<u8> {
    let mut aml = Vec::new();
    let slp = cfg.pm.slp_typ_s5;
    Name::new("_S5_".into(), &Package::new(vec![&slp, &slp, &0u8, &0u8])).to_aml_bytes(&mut aml);

    let serial: Vec<Raw> = cfg
        .serial
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let name = format!("COM{}", i + 1);
            let io = IO::new(s.port, s.port, 1, 8);
            let irq = Interrupt::new(true, true, false, false, u32::from(s.irq));
            let crs = ResourceTemplate::new(vec![&io, &irq]);
            let uid = u8::try_from(i + 1).unwrap_or(u8::MAX);
            device(
                &name,
                &[
                    &Name::new("_HID".into(), &EISAName::new("PNP0501")),
                    &Name::new("_UID".into(), &uid),
                    &Name::new("_CRS".into(), &crs),
                ],
            )
        })
        .collect();
    let pci = cfg.pci.as_ref().map(pci_host);
    let virtio: Vec<Raw> = cfg
        .virtio_mmio
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mem = Memory32Fixed::new(true, v.addr, v.len);
            let irq = Interrupt::new(true, true, false, false, v.irq);
            let crs = ResourceTemplate::new(vec![&mem, &irq]);
            let uid = u32::try_from(i).unwrap_or(u32::MAX);
            device(
                &format!("VR{:02X}", i % 256),
                &[
                    &Name::new("_HID".into(), &"LNRO0005"),
                    &Name::new("_UID".into(), &uid),
                    &Name::new("_CCA".into(), &1u8),
                    &Name::new("_CRS".into(), &crs),
                ],
            )
        })
        .collect();

    let mut children: Vec<&dyn Aml> = Vec::new();
    for s in &serial {
        children.push(s);
    }
    if let Some(p) = &pci {
        children.push(p);
    }
    for v in &virtio {
        children.push(v);
    }
    Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut aml);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&aml);
    dsdt.as_slice().to_vec()
}

/// AML already serialized: `acpi_tables` builds trees of borrowed
/// objects, so lists of devices are kept as their bytes.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// A device's AML.
fn device(name: &str, children: &[&dyn Aml]) -> Raw {
    let mut v = Vec::new();
    Device::new(Path::new(name), children.to_vec()).to_aml_bytes(&mut v);
    Raw(v)
}

/// The host bridge and, beside it, the motherboard device that reserves
/// the ECAM window (Linux uses ECAM only when firmware reserves it).
fn pci_host(p: &PciHost) -> Raw {
    let buses = AddressSpace::new_bus_number(0u16, u16::from(p.last_bus));
    let cf8 = IO::new(0xcf8, 0xcf8, 1, 8);
    let io = AddressSpace::new_io(p.io.0, p.io.1, None);
    let mmio32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        p.mmio32.0,
        p.mmio32.1,
        None,
    );
    let mmio64 = p.mmio64.map(|(lo, hi)| {
        AddressSpace::new_memory(AddressSpaceCacheable::NotCacheable, true, lo, hi, None)
    });
    let mut resources: Vec<&dyn Aml> = vec![&buses, &cf8, &io, &mmio32];
    if let Some(m) = &mmio64 {
        resources.push(m);
    }
    let crs = ResourceTemplate::new(resources);

    // _PRT: every slot's four pins, straight to IOAPIC GSIs.
    let entries: Vec<(u32, u8, u32)> = (0u32..32)
        .flat_map(|slot| {
            (0u8..4).map(move |pin| {
                let line = (slot + u32::from(pin)) % 4;
                ((slot << 16) | 0xffff, pin, line)
            })
        })
        .map(|(addr, pin, line)| (addr, pin, p.intx_gsi[line as usize]))
        .collect();
    let packages: Vec<Raw> = entries
        .iter()
        .map(|(addr, pin, gsi)| {
            let mut v = Vec::new();
            Package::new(vec![addr, pin, &0u8, gsi]).to_aml_bytes(&mut v);
            Raw(v)
        })
        .collect();
    let prt: Vec<&dyn Aml> = packages.iter().map(|p| p as &dyn Aml).collect();

    let mut v = device(
        "PCI0",
        &[
            &Name::new("_HID".into(), &EISAName::new("PNP0A08")),
            &Name::new("_CID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_ADR".into(), &0u8),
            &Name::new("_SEG".into(), &0u8),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_BBN".into(), &0u8),
            &Name::new("_CRS".into(), &crs),
            &Name::new("_PRT".into(), &Package::new(prt)),
        ],
    );
    let ecam_len = (u32::from(p.last_bus) + 1) << 20;
    let ecam = u32::try_from(p.ecam_base).unwrap_or(0);
    let window = Memory32Fixed::new(false, ecam, ecam_len);
    let reserve = ResourceTemplate::new(vec![&window]);
    v.0.extend(
        device(
            "MRES",
            &[
                &Name::new("_HID".into(), &EISAName::new("PNP0C02")),
                &Name::new("_UID".into(), &1u8),
                &Name::new("_CRS".into(), &reserve),
            ],
        )
        .0,
    );
    v
}
