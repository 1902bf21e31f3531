//! Loading what a machine boots, and making it a `pc`: a Linux kernel
//! with its initrd, command line, MP table (and, on `pc`, ACPI tables), or
//! raw code for test guests.

use std::sync::Arc;

use arch::layout::ZERO_PAGE_START;
use vm_memory::{Bytes, GuestAddress};

use super::Machine;
use crate::error::VmmError;
use crate::request::ControlError;

impl Machine {
    /// Makes this machine a `pc` (call it before adding devices): PCI
    /// through ECAM too, the ACPI PM block, and virtio devices as
    /// virtio-pci functions from now on. With `saved`, the PM block takes
    /// its state from a snapshot.
    pub fn make_pc(
        &mut self,
        saved: Option<&devices::acpi_pm::AcpiPmState>,
    ) -> Result<(), VmmError> {
        let vm: Arc<dyn hypervisor::Vm> = self.vm.clone();
        let (pm, placement) = crate::pc::add_devices(
            &vm,
            &self.pio,
            &self.mmio,
            &self.legacy.pci,
            &self.events.0,
            saved,
        )?;
        self.legacy.acpi_pm = Some(pm);
        self.virtio.use_pci(placement);
        Ok(())
    }

    /// Presses the ACPI power button (`pc` machines).
    pub(crate) fn press_power_button(
        &self,
    ) -> Result<Option<crate::request::VmStatus>, ControlError> {
        match &self.legacy.acpi_pm {
            Some(pm) => {
                pm.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .press_power_button();
                Ok(None)
            }
            None => Err(ControlError::Conflict(
                "this VM has no ACPI power button (it is a microvm machine)".into(),
            )),
        }
    }

    /// Loads a Linux kernel (ELF vmlinux or bzImage), optional initrd and
    /// command line (with the virtio devices' announcements appended), the
    /// MP table, and points every vCPU at the entry.
    pub fn load_linux(
        &mut self,
        kernel: &std::path::Path,
        initrd: Option<&std::path::Path>,
        cmdline: &str,
    ) -> Result<(), VmmError> {
        let cmdline = std::iter::once(cmdline.to_string())
            .chain(self.virtio.cmdline())
            .collect::<Vec<_>>()
            .join(" ");
        let rsdp = if self.legacy.acpi_pm.is_some() {
            Some(crate::pc::write_acpi_tables(&self.mem, self.cpus)?)
        } else {
            None
        };
        let cmdline = cmdline.as_str();
        let loaded = arch::boot::load_kernel(&self.mem, kernel)?;
        let initrd = initrd
            .map(|path| arch::boot::load_initrd(&self.mem, path, &loaded, self.memory))
            .transpose()?;
        arch::boot::write_cmdline(&self.mem, cmdline)?;
        let mut params = arch::boot::boot_params(&loaded, cmdline.len(), initrd, self.memory);
        if let Some(rsdp) = rsdp {
            params.acpi_rsdp_addr = rsdp;
        }
        arch::boot::write_boot_params(&self.mem, &params)?;
        arch::mptable::setup(&self.mem, self.cpus)?;
        tracing::debug!(entry = format_args!("{:#x}", loaded.entry), format = ?loaded.format, "kernel loaded");
        self.set_entry(loaded.entry, ZERO_PAGE_START)
    }

    /// Copies raw 64-bit code into guest memory at `addr` and points every
    /// vCPU there (RSI = `rsi`). Used for firmware-less test guests.
    pub fn load_code(&mut self, addr: u64, code: &[u8], rsi: u64) -> Result<(), VmmError> {
        self.mem
            .write_slice(code, GuestAddress(addr))
            .map_err(|e| VmmError::GuestMemory(e.to_string()))?;
        self.set_entry(addr, rsi)
    }

    fn set_entry(&mut self, entry: u64, rsi: u64) -> Result<(), VmmError> {
        let regs = arch::regs::boot_regs(entry, rsi);
        for vcpu in &mut self.vcpus {
            vcpu.set_regs(&regs)?;
        }
        Ok(())
    }
}
