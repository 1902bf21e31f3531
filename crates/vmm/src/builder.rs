//! Device wiring, in one place: the PC's legacy devices on the port bus,
//! virtio devices behind virtio-mmio windows (address, interrupt line,
//! irqfd, ioeventfds, the `virtio_mmio.device=` announcements), and the
//! devices a [`VmConfig`] asks for.

use std::io::Write;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use arch::layout;
use devices::cmos::{Cmos, CMOS_PORT, CMOS_PORT_LEN};
use devices::debug_exit::{DebugExit, DEBUG_EXIT_PORT};
use devices::i8042::{COMMAND_PORT, DATA_PORT, I8042};
use devices::serial::{SerialArgs, SerialDevice, COM1_IRQ, COM1_PORT, UART_PORT_LEN};
use devices::virtio::mmio::persist::MmioTransportState;
use devices::virtio::mmio::{MmioTransport, MMIO_WINDOW, NOTIFY_OFFSET};
use devices::virtio::pci::{PciVectors, VirtioPciState, VirtioPciTransport};
use devices::virtio::{Interrupt, VirtioDevice};
use devices::{Bus, PlatformRequest, PlatformRequestSink};
use hypervisor::{GuestMemoryMmap, Vm};
use snapshot::Persist;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{DiskConfig, NetMode, VmConfig};
use crate::error::VmmError;
use crate::event::VmmEvent;
use crate::panic_watch::{PanicNote, PanicWatch};
use crate::request::DeviceInfo;
use crate::snapshot::LegacyStates;

/// The interrupt line of the first virtio device; the next ones follow.
/// (0-4 are the PIT, keyboard, cascade and COM ports.)
pub const VIRTIO_FIRST_IRQ: u32 = 5;

/// Virtio devices, in the order the guest sees them.
pub type DeviceList = Vec<Box<dyn VirtioDevice>>;

/// The virtio devices that `config` asks for, in the order the guest sees
/// them: disks (the first is `/dev/vda`), the entropy device, vsock, then
/// the NICs with the addresses in `macs`, then the shared directories. (A virtio console is added by
/// [`crate::Machine::add_virtio_console`], since it becomes the console.)
pub fn configured_devices(
    config: &VmConfig,
    macs: &[net::MacAddr],
) -> Result<(DeviceList, Vec<DiskHandle>), VmmError> {
    let mut list: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let mut disks = Vec::new();
    for disk in &config.disks {
        // The format is settled once, before the guest runs: later layers
        // (snapshot overlays) take it from here, never from probing an
        // image the guest has written to.
        let mut disk = disk.clone();
        if disk.format.is_none() {
            disk.format = Some(block::probe(&disk.path)?);
        }
        let image = Arc::new(block::switchable::Switchable::new(open_disk(
            &disk.path, &disk,
        )?));
        list.push(Box::new(
            devices::virtio::block::Block::new(image.clone()).with_rate_limit(disk.rate_limit()),
        ));
        disks.push(DiskHandle {
            image,
            config: disk,
        });
    }
    if config.rng {
        list.push(Box::new(devices::virtio::rng::Rng::new()));
    }
    if let Some(vsock) = &config.vsock {
        let mut device =
            devices::virtio::vsock::Vsock::new(u64::from(vsock.cid), &vsock.socket_path())?;
        device.set_pool(&vsock.pool);
        list.push(Box::new(device));
    }
    for (nic, &mac) in config.nets.iter().zip(macs) {
        let backend: Box<dyn net::Backend> = match &nic.mode {
            NetMode::Nat { hostfwd } => Box::new(net::nat::Nat::start(&net::nat::NatConfig {
                hostfwd: hostfwd.clone(),
                restricted: false,
            })?),
            NetMode::Tap { ifname } => Box::new(net::tap::Tap::open(ifname)?),
            NetMode::Internal { name } => Box::new(net::switch::Switch::join(name, mac)?),
        };
        list.push(Box::new(
            devices::virtio::net::Net::new(mac, backend).with_rate_limit(nic.rate_limit()),
        ));
    }
    for share in &config.shares {
        list.push(Box::new(share_device(share)?));
    }
    Ok((list, disks))
}

/// The virtio-fs device serving `share`.
fn share_device(
    share: &crate::config::ShareConfig,
) -> Result<devices::virtio::fs::VirtioFs, VmmError> {
    use devices::virtio::fs::{Cache, ShareOptions};
    share.validate()?;
    let cache = match share.cache {
        crate::config::ShareCache::Auto => Cache::Auto,
        crate::config::ShareCache::Always => Cache::Always,
        crate::config::ShareCache::Never => Cache::Never,
    };
    let opts = ShareOptions {
        readonly: share.readonly,
        cache,
        default_owner: share.owner.unwrap_or((0, 0)),
    };
    Ok(devices::virtio::fs::VirtioFs::new(
        &share.tag,
        &share.path,
        opts,
    )?)
}

/// Opens the image at `path` as `disk` says.
pub(crate) fn open_disk(
    path: &std::path::Path,
    disk: &DiskConfig,
) -> Result<Arc<dyn block::DiskImage>, block::BlockError> {
    block::open_image(
        path,
        block::OpenOptions {
            read_only: disk.readonly,
            cache: disk.cache,
            format: disk.format,
        },
    )
}

/// A disk of the machine: the device's image, which a snapshot switches
/// onto a new overlay, and its configuration (the path it is on now).
#[derive(Debug)]
pub struct DiskHandle {
    pub image: Arc<block::switchable::Switchable>,
    pub config: DiskConfig,
}

impl DiskHandle {
    /// Creates a qcow2 overlay at `overlay` backed by the disk's image and
    /// moves the disk onto it (the device must be asleep). On failure the
    /// disk stays on its image and no overlay is left behind.
    pub fn switch_to_overlay(&mut self, overlay: &std::path::Path) -> Result<(), String> {
        let current = std::fs::canonicalize(&self.config.path)
            .map_err(|e| format!("{}: {e}", self.config.path.display()))?;
        let config = self.config.clone();
        let made = std::cell::Cell::new(false);
        let result = self.image.switch(
            || {
                let format = config.format.unwrap_or(block::Format::Raw);
                block::tools::create_overlay(overlay, &current, format)
                    .map_err(std::io::Error::other)?;
                made.set(true);
                let mut on_overlay = config.clone();
                on_overlay.format = Some(block::Format::Qcow2);
                open_disk(overlay, &on_overlay).map_err(std::io::Error::other)
            },
            || open_disk(&current, &config).map_err(std::io::Error::other),
        );
        match result {
            Ok(()) => {
                self.config.path = overlay.to_path_buf();
                self.config.format = Some(block::Format::Qcow2);
                Ok(())
            }
            Err(e) => {
                if made.get() {
                    let _ = std::fs::remove_file(overlay);
                }
                Err(format!(
                    "cannot move {} onto the overlay {}: {e}",
                    current.display(),
                    overlay.display()
                ))
            }
        }
    }
}

/// A virtio device as the status report shows it.
struct MmioSlot {
    name: &'static str,
    base: u64,
    irq: u32,
    interrupt: Arc<Interrupt>,
    transport: Carrier,
}

/// The transport that carries a device.
enum Carrier {
    Mmio(Arc<Mutex<MmioTransport>>),
    Pci(Arc<Mutex<VirtioPciTransport>>),
}

impl Carrier {
    fn sleep(&self) -> Result<(), devices::virtio::WorkerError> {
        match self {
            Carrier::Mmio(t) => lock(t).sleep(),
            Carrier::Pci(t) => lock(t).sleep(),
        }
    }

    fn wake(&self) -> Result<(), devices::virtio::ActivateError> {
        match self {
            Carrier::Mmio(t) => lock(t).wake(),
            Carrier::Pci(t) => lock(t).wake(),
        }
    }
}

fn lock<T>(t: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where a `pc` machine puts its virtio-pci functions: slots on bus 0
/// from 00:01.0 and BARs from the bottom of the 32-bit PCI window.
pub(crate) struct PciPlacement {
    pub root: Arc<Mutex<devices::pci::PciRoot>>,
    /// The 32-bit window the BARs decode in.
    pub window: Arc<Mutex<crate::pci_window::PciWindow>>,
    pub vm: Arc<dyn Vm>,
    pub msi: Arc<dyn devices::pci::msix::MsiTarget>,
    /// The INTx line of each slot's pin A (`_PRT`'s swizzle).
    pub intx_gsi: [u32; 4],
}

/// The saved states of the machine's virtio transports, by kind.
pub(crate) struct TransportStates {
    pub mmio: Vec<MmioTransportState>,
    pub pci: Vec<VirtioPciState>,
}

/// The machine's virtio devices: on `microvm` each gets the next 4 KiB
/// virtio-mmio window from [`layout::DEVICE_MMIO_START`] and the next
/// interrupt line from [`VIRTIO_FIRST_IRQ`]; on `pc` each is a virtio-pci
/// function ([`VirtioMmio::use_pci`]).
#[derive(Default)]
pub struct VirtioMmio {
    slots: Vec<MmioSlot>,
    pci: Option<PciPlacement>,
}

impl VirtioMmio {
    /// Devices added from now on are PCI functions.
    pub(crate) fn use_pci(&mut self, placement: PciPlacement) {
        self.pci = Some(placement);
    }

    /// Puts `device` behind its transport: an irqfd for its interrupt
    /// line and an ioeventfd per queue notification, so that a guest kick
    /// wakes its worker without a VMM exit.
    pub fn add(
        &mut self,
        vm: &dyn Vm,
        mem: &GuestMemoryMmap,
        bus: &Bus,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), VmmError> {
        if self.pci.is_some() {
            return self.add_pci(vm, mem, device);
        }
        let irq = u32::try_from(self.slots.len())
            .ok()
            .and_then(|index| VIRTIO_FIRST_IRQ.checked_add(index))
            .filter(|&irq| irq < u32::from(arch::mptable::IOAPIC_PINS))
            .ok_or(VmmError::TooManyDevices)?;
        let base = layout::DEVICE_MMIO_START + u64::from(irq - VIRTIO_FIRST_IRQ) * MMIO_WINDOW;
        let line = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&line, irq)?;
        let interrupt = Arc::new(Interrupt::new(line));
        let name = device.name();
        let transport = MmioTransport::new(device, mem.clone(), interrupt.clone())
            .map_err(|e| VmmError::Virtio(e.to_string()))?;
        for (queue, event) in (0u32..).zip(transport.queue_events()) {
            vm.register_mmio_ioevent(event, base + NOTIFY_OFFSET, queue)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(transport.clone(), base, MMIO_WINDOW)?;
        self.slots.push(MmioSlot {
            name,
            base,
            irq,
            interrupt,
            transport: Carrier::Mmio(transport),
        });
        Ok(())
    }

    /// A virtio-pci function in the next slot, its BAR placed by the VMM
    /// (firmware may move it; see docs/architecture.md), MSI-X vectors
    /// sent with KVM's MSI injection, INTx on the slot's line.
    fn add_pci(
        &mut self,
        vm: &dyn Vm,
        mem: &GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), VmmError> {
        use devices::virtio::pci::{
            SharedPciTransport, BAR_SIZE, NOTIFY_MULTIPLIER, NOTIFY_OFFSET as PCI_NOTIFY,
        };
        let Some(pci) = &self.pci else {
            return Err(VmmError::TooManyDevices);
        };
        // Slot 0 is the host bridge; 31 slots on bus 0.
        let slot = u8::try_from(self.slots.len() + 1)
            .ok()
            .filter(|&s| s < 32)
            .ok_or(VmmError::TooManyDevices)?;
        let base = layout::PCI_MMIO32_START + u64::from(slot - 1) * BAR_SIZE;
        let irq = pci.intx_gsi[usize::from(slot % 4)];
        let line = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&line, irq)?;
        let vectors = Arc::new(
            PciVectors::new(device.queue_max_sizes().len(), pci.msi.clone())
                .map_err(|e| VmmError::Virtio(e.to_string()))?,
        );
        let interrupt = VirtioPciTransport::interrupt(line, &vectors);
        let name = device.name();
        let mut transport =
            VirtioPciTransport::new(device, mem.clone(), interrupt.clone(), vectors)
                .map_err(|e| VmmError::Virtio(e.to_string()))?;
        transport.set_bar_address(base);
        for (queue, event) in (0u64..).zip(transport.queue_events()) {
            let at = base + PCI_NOTIFY + queue * u64::from(NOTIFY_MULTIPLIER);
            vm.register_mmio_notify(event, at)?;
        }
        let events = transport
            .queue_events()
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(VmmError::EventFd)?;
        let transport = Arc::new(Mutex::new(transport));
        lock(&pci.window).add(transport.clone());
        let follow = crate::pci_window::notify_follower(pci.vm.clone(), events, base);
        lock(&pci.root)
            .add_function(
                slot << 3,
                Box::new(SharedPciTransport::new(transport.clone()).on_bar_moved(follow)),
            )
            .map_err(|e| VmmError::Virtio(e.to_string()))?;
        self.slots.push(MmioSlot {
            name,
            base,
            irq,
            interrupt,
            transport: Carrier::Pci(transport),
        });
        Ok(())
    }

    /// Puts every device to sleep: their workers stop and hand their
    /// queues back, and nothing of theirs touches guest memory until
    /// [`VirtioMmio::wake_all`]. On an error the ones already asleep are
    /// woken again.
    pub fn sleep_all(&self) -> Result<(), String> {
        for (i, slot) in self.slots.iter().enumerate() {
            if let Err(e) = slot.transport.sleep() {
                let _ = self.wake_first(i);
                return Err(format!("the {} device cannot sleep: {e}", slot.name));
            }
        }
        Ok(())
    }

    fn wake_first(&self, n: usize) -> Result<(), String> {
        let mut first_error = None;
        for slot in self.slots.iter().take(n) {
            if let Err(e) = slot.transport.wake() {
                tracing::error!("the {} device cannot wake: {e}", slot.name);
                first_error.get_or_insert(format!("the {} device cannot wake: {e}", slot.name));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Wakes every device put to sleep by [`VirtioMmio::sleep_all`].
    pub fn wake_all(&self) -> Result<(), String> {
        self.wake_first(self.slots.len())
    }

    /// Every transport's state with its device's (all asleep).
    pub(crate) fn save_all(&self) -> Result<TransportStates, String> {
        let mut states = TransportStates {
            mmio: Vec::new(),
            pci: Vec::new(),
        };
        for slot in &self.slots {
            let failed = |e: &dyn std::fmt::Display| format!("the {} device: {e}", slot.name);
            match &slot.transport {
                Carrier::Mmio(t) => states
                    .mmio
                    .push(lock(t).save_state().map_err(|e| failed(&e))?),
                Carrier::Pci(t) => states
                    .pci
                    .push(lock(t).save_state().map_err(|e| failed(&e))?),
            }
        }
        Ok(states)
    }

    /// Restores saved transport states into this machine's (new) devices,
    /// in order; running devices start running.
    pub(crate) fn restore_all(
        &self,
        mmio: &[MmioTransportState],
        pci: &[VirtioPciState],
    ) -> Result<(), String> {
        let (mut m, mut p) = (mmio.iter(), pci.iter());
        let count = mmio.len() + pci.len();
        if count != self.slots.len() {
            return Err(format!(
                "the snapshot has {count} virtio devices, the VM {}",
                self.slots.len()
            ));
        }
        for slot in &self.slots {
            let missing = || format!("the snapshot has no state for the {} device", slot.name);
            match &slot.transport {
                Carrier::Mmio(t) => lock(t)
                    .restore(m.next().ok_or_else(missing)?)
                    .map_err(|e| crate::error::error_chain(&e))?,
                Carrier::Pci(t) => lock(t)
                    .restore(p.next().ok_or_else(missing)?)
                    .map_err(|e| crate::error::error_chain(&e))?,
            }
        }
        Ok(())
    }

    /// The `virtio_mmio.device=4K@ADDR:IRQ` arguments that tell Linux
    /// where the MMIO devices are (PCI functions are found by probing).
    pub fn cmdline(&self) -> impl Iterator<Item = String> + '_ {
        self.slots
            .iter()
            .filter(|s| matches!(s.transport, Carrier::Mmio(_)))
            .map(|s| format!("virtio_mmio.device=4K@{:#x}:{}", s.base, s.irq))
    }

    /// The devices as `GET /vm` lists them.
    pub fn info(&self) -> Vec<DeviceInfo> {
        self.slots
            .iter()
            .map(|s| DeviceInfo {
                kind: s.name.to_string(),
                mmio_base: s.base,
                irq: s.irq,
                interrupts: s.interrupt.raised(),
            })
            .collect()
    }
}

/// The legacy devices' handles the machine keeps (the UART for the
/// console, all of them for snapshots).
pub(crate) struct LegacyDevices {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub input_space: Arc<EventFd>,
    pub panic_note: PanicNote,
    pub i8042: Arc<Mutex<I8042>>,
    pub cmos: Arc<Mutex<Cmos>>,
    pub pci: Arc<Mutex<devices::pci::PciRoot>>,
    /// The ACPI PM block (`pc` machines).
    pub acpi_pm: Option<Arc<Mutex<devices::acpi_pm::AcpiPm>>>,
}

impl LegacyDevices {
    pub fn save(&self) -> LegacyStates {
        LegacyStates {
            serial: lock(&self.serial).save(),
            i8042: lock(&self.i8042).save(),
            cmos: lock(&self.cmos).save(),
            pci: lock(&self.pci).save(),
            acpi_pm: self.acpi_pm.as_ref().map(|pm| lock(pm).save()),
        }
    }
}

fn refused(device: &str) -> impl FnOnce(String) -> VmmError + '_ {
    move |why| {
        VmmError::Snapshot(crate::snapshot::SnapshotError::Restore(format!(
            "{device}: {why}"
        )))
    }
}

/// Puts the PC's legacy devices on the port bus: the COM1 UART (IRQ 4
/// through an irqfd; output watched for kernel panics), the i8042 reset
/// line, the CMOS RTC, the debug-exit port and the PCI root (an empty bus 0
/// behind its host bridge).
///
/// With `saved`, each device starts from its state in a snapshot.
pub(crate) fn add_legacy_devices(
    vm: &dyn Vm,
    pio: &Bus,
    events: &Sender<VmmEvent>,
    serial_out: Box<dyn Write + Send>,
    saved: Option<&LegacyStates>,
) -> Result<LegacyDevices, VmmError> {
    let sink: PlatformRequestSink = {
        let tx = events.clone();
        Arc::new(move |r: PlatformRequest| {
            let _ = tx.send(VmmEvent::Platform(r));
        })
    };
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    vm.register_irqfd(&irq, COM1_IRQ)?;
    let input_space = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?);
    let panic_note = PanicNote::default();
    let watched = Box::new(PanicWatch::new(serial_out, panic_note.clone()));
    let serial = match saved {
        None => SerialDevice::new(irq, watched, input_space.clone()),
        Some(s) => SerialDevice::restore(
            SerialArgs {
                irq,
                out: watched,
                input_space: input_space.clone(),
            },
            &s.serial,
        )
        .map_err(|e| refused("the serial port")(e.to_string()))?,
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(serial.clone(), COM1_PORT, UART_PORT_LEN)?;
    let i8042 = match saved {
        None => I8042::new(sink.clone()),
        Some(s) => I8042::restore(sink.clone(), &s.i8042)
            .map_err(|e| refused("the i8042")(e.to_string()))?,
    };
    let i8042 = Arc::new(Mutex::new(i8042));
    pio.insert(i8042.clone(), DATA_PORT, 1)?;
    pio.insert(i8042.clone(), COMMAND_PORT, 1)?;
    let cmos = match saved {
        None => Cmos::default(),
        Some(s) => Cmos::restore(Box::new(devices::cmos::host_clock), &s.cmos)
            .map_err(|e| refused("the CMOS")(e.to_string()))?,
    };
    let cmos = Arc::new(Mutex::new(cmos));
    pio.insert(cmos.clone(), CMOS_PORT, CMOS_PORT_LEN)?;
    let debug_exit = Arc::new(Mutex::new(DebugExit::new(sink)));
    pio.insert(debug_exit, DEBUG_EXIT_PORT, 1)?;
    // PCI configuration mechanism #1 with a host bridge: guest kernels with
    // PCI support probe for it (and call its absence fatal).
    let pci = match saved {
        None => devices::pci::PciRoot::new(),
        Some(s) => devices::pci::PciRoot::restore((), &s.pci)
            .map_err(|e| refused("the PCI root")(e.to_string()))?,
    };
    let pci = Arc::new(Mutex::new(pci));
    pio.insert(
        pci.clone(),
        devices::pci::CONFIG_ADDRESS_PORT,
        devices::pci::CONFIG_PORTS_LEN,
    )?;
    Ok(LegacyDevices {
        serial,
        input_space,
        panic_note,
        i8042,
        cmos,
        pci,
        acpi_pm: None,
    })
}
