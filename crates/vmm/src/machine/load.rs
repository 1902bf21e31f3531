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

    /// Maps a firmware image as the ROM that ends at 4 GiB (also for a
    /// restored VM: the ROM is not part of guest RAM, so not of its
    /// snapshot). Returns the image.
    pub fn map_firmware(&mut self, image: &std::path::Path) -> Result<Vec<u8>, VmmError> {
        use vm_memory::GuestMemoryBackend;
        let data = crate::firmware::read_image(image)?;
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        let rom = vm_memory::mmap::MmapRegion::new(data.len())
            .map_err(|e| VmmError::Firmware(format!("cannot map the ROM: {e}")))?;
        // SAFETY: `rom` is a fresh private mapping of exactly `data.len()`
        // bytes, which nothing else references yet.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), rom.as_ptr(), data.len()) };
        let slot = u32::try_from(self.mem.num_regions())
            .map_err(|_| VmmError::Firmware("too many memory slots".into()))?;
        let base = crate::firmware::rom_base(len);
        let host = rom.as_ptr() as u64;
        let region = vm_memory::GuestRegionMmap::new(rom, vm_memory::GuestAddress(base))
            .ok_or_else(|| VmmError::Firmware("the ROM does not fit below 4 GiB".into()))?;
        let with_rom = self
            .mem
            .insert_region(Arc::new(region))
            .map_err(|e| VmmError::Firmware(format!("cannot place the ROM: {e}")))?;
        // SAFETY: the ROM's mapping belongs to `with_rom`, which the
        // Machine keeps (and the vCPU threads clone) for as long as the VM
        // runs.
        unsafe { self.vm.map_memory(slot, base, len, host) }?;
        self.with_rom = Some(with_rom);
        Ok(data)
    }

    /// Boots through firmware (a `pc` machine): maps `image` (see
    /// [`crate::firmware`]), hands it the machine through fw_cfg and the
    /// CMOS, and puts every vCPU in its reset state.
    pub fn load_firmware(
        &mut self,
        image: &std::path::Path,
        kernel: Option<crate::firmware::KernelForFirmware<'_>>,
    ) -> Result<(), VmmError> {
        if self.legacy.acpi_pm.is_none() {
            return Err(VmmError::Firmware(
                "boots need a pc machine (--machine pc)".into(),
            ));
        }
        let data = self.map_firmware(image)?;
        crate::firmware::copy_low(&self.mem, &data)?;
        let below_4g = self.memory.min(arch::layout::MMIO_HOLE_START);
        let above_4g = self.memory - below_4g;
        let cpus = u8::try_from(self.cpus).unwrap_or(u8::MAX);
        self.legacy
            .cmos
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .set_machine_size(below_4g, above_4g, cpus);
        let tables = arch::acpi::AcpiTables::build(&crate::pc::acpi_config(self.cpus)?)
            .map_err(|e| VmmError::Acpi(e.to_string()))?;
        let mut fw = crate::firmware::fw_cfg(
            self.mem.clone(),
            &crate::firmware::FirmwareInfo {
                cpus: self.cpus,
                below_4g,
                above_4g,
                acpi: &tables,
            },
        )?;
        if let Some(k) = kernel {
            crate::firmware::linuxboot::add_kernel(
                &mut fw, k.kernel, k.initrd, k.cmdline, below_4g,
            )?;
        }
        self.pio.insert(
            Arc::new(std::sync::Mutex::new(fw)),
            devices::fw_cfg::FW_CFG_PORT,
            devices::fw_cfg::FW_CFG_PORT_LEN,
        )?;
        crate::pc::add_debug_console(&self.pio)?;
        for vcpu in &mut self.vcpus {
            let sregs = arch::regs::reset_sregs(&vcpu.sregs()?);
            vcpu.set_sregs(&sregs)?;
            vcpu.set_regs(&arch::regs::reset_regs())?;
        }
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
