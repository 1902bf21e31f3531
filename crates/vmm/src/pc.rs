//! The `pc` machine's platform, beside the legacy devices both machines
//! have: PCI configuration through ECAM as well as the ports, virtio
//! devices as virtio-pci functions whose MSI-X messages KVM injects, the
//! ACPI PM block (power button, S5, reset register, SCI), and ACPI tables
//! that describe it all — placed in guest RAM for a direct kernel boot.
//!
//! The `microvm` machine has none of this: virtio-mmio and no ACPI, the
//! fast path.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use arch::acpi::{AcpiConfig, AcpiTables, PciHost, PmBlock, SerialPort};
use arch::layout;
use devices::acpi_pm::{self, AcpiPm};
use devices::pci::msix::{MsiMessage, MsiTarget};
use devices::pci::PciRoot;
use devices::serial::{COM1_IRQ, COM1_PORT};
use devices::{Bus, PlatformRequest, PlatformRequestSink};
use hypervisor::{GuestMemoryMmap, Vm};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::builder::PciPlacement;
use crate::error::VmmError;
use crate::event::VmmEvent;

/// The SCI's ISA interrupt (level-triggered, active high, as the MADT's
/// override says).
pub const SCI_IRQ: u8 = 9;
/// The GSIs of the four PCI INTx lines (`_PRT`): above the ISA IRQs.
pub const INTX_GSI: [u32; 4] = [16, 17, 18, 19];
/// The I/O port window for PCI BARs (none are placed there yet).
const PCI_IO: (u16, u16) = (0xc000, 0xffff);

/// MSI-X messages go to KVM's in-kernel LAPICs.
struct KvmMsi(Arc<dyn Vm>);

impl MsiTarget for KvmMsi {
    fn send(&self, msg: MsiMessage) {
        if let Err(e) = self.0.signal_msi(msg.addr, msg.data) {
            tracing::warn!("cannot send an MSI ({:#x}, {:#x}): {e}", msg.addr, msg.data);
        }
    }
}

/// Adds the `pc` devices: ECAM over the PCI root the legacy devices made,
/// and the ACPI PM block. Returns the block and where virtio-pci
/// functions go.
/// With `saved`, the PM block starts from its state in a snapshot.
pub(crate) fn add_devices(
    vm: &Arc<dyn Vm>,
    pio: &Bus,
    mmio: &Bus,
    pci: &Arc<Mutex<PciRoot>>,
    events: &Sender<VmmEvent>,
    saved: Option<&acpi_pm::AcpiPmState>,
) -> Result<(Arc<Mutex<AcpiPm>>, PciPlacement), VmmError> {
    {
        let mut root = pci
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *root = std::mem::take(&mut *root).with_ecam(layout::PCI_ECAM_START);
    }
    mmio.insert(pci.clone(), layout::PCI_ECAM_START, layout::PCI_ECAM_SIZE)?;

    let sink: PlatformRequestSink = {
        let tx = events.clone();
        Arc::new(move |r: PlatformRequest| {
            let _ = tx.send(VmmEvent::Platform(r));
        })
    };
    let sci = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    vm.register_irqfd(&sci, u32::from(SCI_IRQ))?;
    let pm = match saved {
        None => AcpiPm::new(sci, sink),
        Some(state) => {
            use snapshot::Persist;
            AcpiPm::restore(
                acpi_pm::AcpiPmArgs {
                    sci,
                    requests: sink,
                },
                state,
            )
            .map_err(|e| {
                VmmError::Snapshot(crate::snapshot::SnapshotError::Restore(format!(
                    "the ACPI PM block: {e}"
                )))
            })?
        }
    };
    let pm = Arc::new(Mutex::new(pm));
    pio.insert(pm.clone(), acpi_pm::PM_BASE, acpi_pm::PM_LEN)?;
    let window = Arc::new(Mutex::new(crate::pci_window::PciWindow::default()));
    mmio.insert(
        window.clone(),
        crate::pci_window::WINDOW_START,
        crate::pci_window::WINDOW_LEN,
    )?;
    let placement = PciPlacement {
        root: pci.clone(),
        window,
        vm: vm.clone(),
        msi: Arc::new(KvmMsi(vm.clone())),
        intx_gsi: INTX_GSI,
    };
    Ok((pm, placement))
}

/// The port firmware writes its log to (QEMU's "debugcon"; SeaBIOS and
/// OVMF use it).
pub const DEBUG_CONSOLE_PORT: u64 = 0x402;

/// Firmware's log, line by line into hostvisor's own log (target
/// `hostvisor::firmware`, shown with `HOSTVISOR_LOG=hostvisor::firmware=info`).
#[derive(Default)]
struct DebugConsole {
    line: Vec<u8>,
}

/// The longest line kept (a guest writing without newlines must not grow
/// the buffer without bound).
const DEBUG_LINE_MAX: usize = 4096;

impl devices::BusDevice for DebugConsole {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Reads return 0xe9 when the port exists (QEMU's convention).
        data.fill(0xe9);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        for &b in data {
            if b == b'\n' || self.line.len() >= DEBUG_LINE_MAX {
                let text = String::from_utf8_lossy(&self.line);
                tracing::info!(target: "hostvisor::firmware", "{}", text.trim_end());
                self.line.clear();
            }
            if b != b'\n' {
                self.line.push(b);
            }
        }
    }
}

/// Puts the debug console on the port bus.
pub(crate) fn add_debug_console(pio: &Bus) -> Result<(), VmmError> {
    pio.insert(
        Arc::new(Mutex::new(DebugConsole::default())),
        DEBUG_CONSOLE_PORT,
        1,
    )?;
    Ok(())
}

/// The PM block as the FADT describes it.
pub fn pm_block() -> PmBlock {
    let port = |offset: u64| u16::try_from(acpi_pm::PM_BASE + offset).unwrap_or(0);
    PmBlock {
        pm1_evt: port(acpi_pm::PM1_EVT),
        pm1_evt_len: acpi_pm::PM1_EVT_LEN,
        pm1_cnt: port(acpi_pm::PM1_CNT),
        pm1_cnt_len: acpi_pm::PM1_CNT_LEN,
        pm_tmr: port(acpi_pm::PM_TMR),
        pm_tmr_len: acpi_pm::PM_TMR_LEN,
        gpe0: port(acpi_pm::GPE0),
        gpe0_len: acpi_pm::GPE0_LEN,
        reset: port(acpi_pm::RESET),
        reset_value: acpi_pm::RESET_VALUE,
        slp_typ_s5: u8::try_from(acpi_pm::SLP_TYP_S5).unwrap_or(5),
        sci_irq: SCI_IRQ,
    }
}

/// What the `pc` machine's ACPI tables describe.
pub fn acpi_config(cpus: u32) -> Result<AcpiConfig, VmmError> {
    let cpus = u8::try_from(cpus).map_err(|_| {
        VmmError::Acpi(format!("{cpus} vCPUs do not fit the MADT's 8-bit APIC IDs"))
    })?;
    Ok(AcpiConfig {
        cpus,
        pm: pm_block(),
        serial: vec![SerialPort {
            port: u16::try_from(COM1_PORT).unwrap_or(0x3f8),
            irq: u8::try_from(COM1_IRQ).unwrap_or(4),
        }],
        pci: Some(PciHost {
            ecam_base: layout::PCI_ECAM_START,
            last_bus: 0,
            io: PCI_IO,
            mmio32: (
                u32::try_from(layout::PCI_MMIO32_START).unwrap_or(0),
                u32::try_from(layout::PCI_MMIO32_END).unwrap_or(0),
            ),
            mmio64: None,
            intx_gsi: INTX_GSI,
        }),
        virtio_mmio: Vec::new(),
    })
}

/// Writes the ACPI tables for a direct kernel boot: the RSDP at
/// [`layout::ACPI_RSDP_START`] (where Linux scans, and what boot_params
/// points at), the tables after it. Returns the RSDP's address.
pub(crate) fn write_acpi_tables(mem: &GuestMemoryMmap, cpus: u32) -> Result<u64, VmmError> {
    let tables =
        AcpiTables::build(&acpi_config(cpus)?).map_err(|e| VmmError::Acpi(e.to_string()))?;
    let (rsdp, blob) = tables.placed(layout::ACPI_TABLES_START);
    let room = layout::EBDA_END - layout::ACPI_TABLES_START;
    if u64::try_from(blob.len()).unwrap_or(u64::MAX) > room {
        return Err(VmmError::Acpi(format!(
            "the tables take {} bytes; {room} fit below 1 MiB",
            blob.len()
        )));
    }
    let write = |bytes: &[u8], at: u64| {
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(|e| VmmError::GuestMemory(e.to_string()))
    };
    write(&rsdp, layout::ACPI_RSDP_START)?;
    write(&blob, layout::ACPI_TABLES_START)?;
    Ok(layout::ACPI_RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables a `pc` machine writes parse from the RSDP in guest RAM,
    /// and name this machine's PM ports and PCI windows.
    #[test]
    fn direct_boot_tables_are_found_where_linux_looks() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = write_acpi_tables(&mem, 2).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let mut head = [0u8; 36];
        mem.read_slice(&mut head, GuestAddress(rsdp)).unwrap();
        let sum = head[..20].iter().fold(0u8, |a, &b| a.wrapping_add(b));
        assert_eq!(sum, 0, "RSDP checksum");
        let xsdt = u64::from_le_bytes(head[24..32].try_into().unwrap());
        assert!((layout::ACPI_TABLES_START..layout::EBDA_END).contains(&xsdt));
        let mut xs = [0u8; 4];
        mem.read_slice(&mut xs, GuestAddress(xsdt)).unwrap();
        assert_eq!(&xs, b"XSDT");
        assert_eq!(pm_block().reset, 0x610);
        assert_eq!(pm_block().pm1_cnt, 0x604);
    }

    #[test]
    fn too_many_cpus_for_the_madt_is_a_clear_error() {
        let e = acpi_config(300).unwrap_err().to_string();
        assert!(e.contains("300 vCPUs"), "{e}");
    }
}
