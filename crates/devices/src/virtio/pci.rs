//! The virtio-pci transport (virtio 1.x "modern" only): a PCI function
//! whose configuration space carries the virtio vendor capabilities, and
//! one 32-bit memory BAR that holds the common configuration, the ISR, the
//! device's configuration, the queue notification addresses and the MSI-X
//! table and pending bits.
//!
//! The registers decode into [`VirtioCommon`] exactly as virtio-mmio's do,
//! so devices never know which transport carries them. Interrupts: each
//! queue and the configuration change have an MSI-X vector the driver
//! assigns ([`PciVectors`], the [`VectorSignal`] the device's
//! [`Interrupt`] uses once MSI-X is on); before that, INTx through the
//! ISR register and the interrupt line.
//!
//! Written by hand: rust-vmm has no virtio-pci transport (Cloud
//! Hypervisor's and crosvm's are bound to their own device models).

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::common::persist::{TransportStateError, VirtioTransportState};
use super::common::{ring_address, Ring, TransportError, VirtioCommon};
use super::{Interrupt, VectorSignal, VirtioDevice};
use crate::pci::config::{Bar, BarKind, PciConfig, PciConfigState, PciId};
use crate::pci::msix::{self, MsiTarget, Msix, MsixState};
use crate::pci::PciDevice;
use crate::BusDevice;

/// The BAR's size and where each structure sits in it.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
/// Queue `i` is notified by a write at `NOTIFY_OFFSET + i * NOTIFY_MULTIPLIER`.
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_MULTIPLIER: u32 = 4;
const NOTIFY_LEN: u64 = 0x1000;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
const REGION_LEN: u64 = 0x1000;

/// virtio's PCI vendor ID; modern device IDs are 0x1040 + the virtio type.
const VIRTIO_VENDOR: u16 = 0x1af4;
const MODERN_DEVICE_BASE: u16 = 0x1040;
/// The vector value that means "no vector".
pub const NO_VECTOR: u16 = 0xffff;

/// The virtio vendor capability's configuration types.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_VENDOR: u8 = 0x09;

/// Each queue's vector and the configuration vector, and the MSI-X
/// function they are sent through. Shared by the transport (which the
/// guest programs) and the device's [`Interrupt`] (which its worker
/// raises).
#[derive(Debug)]
pub struct PciVectors {
    msix: Mutex<Msix>,
    config: AtomicU16,
    queues: Vec<AtomicU16>,
}

impl PciVectors {
    /// Vectors for `queues` queues: one each and one for configuration
    /// changes, all unassigned.
    pub fn new(queues: usize, target: Arc<dyn MsiTarget>) -> Result<Self, msix::MsixError> {
        let count = u16::try_from(queues + 1).unwrap_or(u16::MAX);
        Ok(PciVectors {
            msix: Mutex::new(Msix::new(count, target)?),
            config: AtomicU16::new(NO_VECTOR),
            queues: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
        })
    }

    fn msix(&self) -> MutexGuard<'_, Msix> {
        // A panic while holding it cannot leave the table half-written in
        // a way that matters more than losing the VM: take it anyway.
        self.msix
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn send(&self, vector: u16) -> bool {
        let mut msix = self.msix();
        if !msix.enabled() {
            return false;
        }
        if vector != NO_VECTOR {
            msix.notify(vector);
        }
        true
    }

    /// A vector the driver may assign, or NO_VECTOR (which the driver
    /// reads back to learn it was refused).
    fn valid(&self, vector: u16) -> u16 {
        if vector < self.msix().vectors() {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn unassign_all(&self) {
        self.config.store(NO_VECTOR, Ordering::SeqCst);
        for q in &self.queues {
            q.store(NO_VECTOR, Ordering::SeqCst);
        }
    }
}

impl VectorSignal for PciVectors {
    fn queue(&self, queue: usize) -> bool {
        let vector = self
            .queues
            .get(queue)
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst));
        self.send(vector)
    }

    fn all_queues(&self) -> bool {
        let mut sent: Vec<u16> = Vec::with_capacity(self.queues.len());
        let mut enabled = true;
        for v in &self.queues {
            let v = v.load(Ordering::SeqCst);
            if !sent.contains(&v) {
                enabled = self.send(v);
                if !enabled {
                    break;
                }
                sent.push(v);
            }
        }
        enabled
    }

    fn config(&self) -> bool {
        self.send(self.config.load(Ordering::SeqCst))
    }
}

/// One virtio device as a PCI function.
pub struct VirtioPciTransport {
    common: VirtioCommon,
    config: PciConfig,
    vectors: Arc<PciVectors>,
    /// Where the MSI-X capability is in configuration space.
    msix_cap: usize,
}

impl std::fmt::Debug for VirtioPciTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciTransport")
            .field("device", &self.common.device().name())
            .finish_non_exhaustive()
    }
}

/// Why a virtio-pci function could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PciTransportError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot lay out the function's configuration space: {0}")]
    Config(#[from] crate::pci::config::PciConfigError),
}

impl VirtioPciTransport {
    /// The interrupt a device behind this transport raises: `line` for
    /// INTx, `vectors` once the driver enables MSI-X.
    pub fn interrupt(line: EventFd, vectors: &Arc<PciVectors>) -> Arc<Interrupt> {
        let signal: Arc<dyn VectorSignal> = vectors.clone();
        Arc::new(Interrupt::with_vectors(line, signal))
    }

    /// Wraps `device`; `interrupt` must come from [`Self::interrupt`] with
    /// the same `vectors` (made for the device's queue count).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        vectors: Arc<PciVectors>,
    ) -> Result<Self, PciTransportError> {
        let device_type = device.device_type();
        let class = match device_type {
            1 => (0x02, 0x00, 0x00), // network controller
            2 => (0x01, 0x00, 0x00), // mass storage (as QEMU's virtio-blk)
            3 => (0x07, 0x80, 0x00), // communication controller, other
            _ => (0xff, 0x00, 0x00),
        };
        let type_id = u16::try_from(device_type).unwrap_or(0x3f);
        let mut config = PciConfig::new(PciId {
            vendor: VIRTIO_VENDOR,
            device: MODERN_DEVICE_BASE.saturating_add(type_id),
            revision: 1,
            class,
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: 0x1100,
        });
        config.set_interrupt_pin(1);
        config.add_bar(
            0,
            Bar {
                kind: BarKind::Memory32,
                size: BAR_SIZE,
            },
        )?;
        for (cfg_type, offset, len) in [
            (CAP_COMMON, COMMON_OFFSET, COMMON_LEN),
            (CAP_ISR, ISR_OFFSET, 4),
            (CAP_DEVICE, DEVICE_OFFSET, DEVICE_LEN),
        ] {
            config.add_capability(CAP_VENDOR, &virtio_cap(cfg_type, offset, len, 16), &[])?;
        }
        let mut notify = virtio_cap(CAP_NOTIFY, NOTIFY_OFFSET, NOTIFY_LEN, 20).to_vec();
        notify.extend_from_slice(&NOTIFY_MULTIPLIER.to_le_bytes());
        config.add_capability(CAP_VENDOR, &notify, &[])?;
        let (body, writable) =
            vectors
                .msix()
                .capability(0, low32(MSIX_TABLE_OFFSET), 0, low32(MSIX_PBA_OFFSET));
        let msix_cap = config.add_capability(msix::CAP_ID, &body, &writable)?;
        Ok(VirtioPciTransport {
            common: VirtioCommon::new(device, mem, interrupt)?,
            config,
            vectors,
            msix_cap,
        })
    }

    /// Where the guest placed the BAR (None while it is not decoding).
    pub fn bar_address(&self) -> Option<u64> {
        self.config.bar_address(0)
    }

    /// Places the BAR (the VMM does, before the guest runs; firmware may
    /// move it).
    pub fn set_bar_address(&mut self, addr: u64) {
        let low = low32(addr) & !0xf;
        self.config
            .write(crate::pci::config::BAR0, &low.to_le_bytes());
        let command = self.config.command() | crate::pci::config::COMMAND_MEMORY;
        self.config
            .write(crate::pci::config::COMMAND, &command.to_le_bytes());
    }

    /// The common configuration structure as the driver reads it.
    fn common_image(&self) -> [u8; 0x38] {
        let c = &self.common;
        let mut img = [0u8; 0x38];
        let queue = c.queue();
        let queue_index = usize::try_from(c.queue_select).ok();
        let queue_vector = queue_index
            .and_then(|i| self.vectors.queues.get(i))
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst));
        put32(&mut img, 0x00, c.device_features_select);
        put32(&mut img, 0x04, c.device_features_word());
        put32(&mut img, 0x08, c.driver_features_select);
        put32(&mut img, 0x0c, c.driver_features_word());
        put16(&mut img, 0x10, self.vectors.config.load(Ordering::SeqCst));
        put16(
            &mut img,
            0x12,
            u16::try_from(c.queues.len()).unwrap_or(u16::MAX),
        );
        img[0x14] = u8::try_from(c.status & 0xff).unwrap_or(0);
        img[0x15] = u8::try_from(c.config_generation & 0xff).unwrap_or(0);
        put16(
            &mut img,
            0x16,
            u16::try_from(c.queue_select).unwrap_or(u16::MAX),
        );
        if let Some(q) = queue {
            put16(&mut img, 0x18, q.size());
            put16(&mut img, 0x1a, queue_vector);
            put16(&mut img, 0x1c, u16::from(q.ready()));
            put16(&mut img, 0x1e, u16::try_from(c.queue_select).unwrap_or(0));
            put64(&mut img, 0x20, ring_address(q, Ring::Desc));
            put64(&mut img, 0x28, ring_address(q, Ring::Avail));
            put64(&mut img, 0x30, ring_address(q, Ring::Used));
        }
        img
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let value = match *data {
            [a] => u64::from(a),
            [a, b] => u64::from(u16::from_le_bytes([a, b])),
            [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
            _ => {
                tracing::debug!(offset, "virtio-pci common config write of an odd width");
                return;
            }
        };
        let v32 = u32::try_from(value).unwrap_or(u32::MAX);
        let v16 = u16::try_from(value).unwrap_or(u16::MAX);
        let c = &mut self.common;
        match (offset, data.len()) {
            (0x00, 4) => c.device_features_select = v32,
            (0x08, 4) => c.driver_features_select = v32,
            (0x0c, 4) => c.ack_features_word(v32),
            (0x10, 2) => self
                .vectors
                .config
                .store(self.vectors.valid(v16), Ordering::SeqCst),
            (0x14, 1) => {
                c.set_status(v32);
                if v32 == 0 {
                    self.vectors.unassign_all();
                }
            }
            (0x16, 2) => c.queue_select = v32,
            (0x18, 2) => c.set_queue_size(v32),
            (0x1a, 2) => {
                let vector = self.vectors.valid(v16);
                // Live queues keep their vector, like their other settings.
                if !c.activated {
                    if let Some(slot) = usize::try_from(c.queue_select)
                        .ok()
                        .and_then(|i| self.vectors.queues.get(i))
                    {
                        slot.store(vector, Ordering::SeqCst);
                    }
                }
            }
            (0x1c, 2) => {
                // Only enabling is defined; writing 0 is not allowed.
                if v16 == 1 {
                    c.set_queue_ready(true);
                }
            }
            (0x20 | 0x24, 4) => c.set_queue_ring(Ring::Desc, offset == 0x24, v32),
            (0x28 | 0x2c, 4) => c.set_queue_ring(Ring::Avail, offset == 0x2c, v32),
            (0x30 | 0x34, 4) => c.set_queue_ring(Ring::Used, offset == 0x34, v32),
            _ => tracing::debug!(
                offset,
                len = data.len(),
                "write to a read-only or unknown virtio-pci common register"
            ),
        }
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => {
                let img = self.common_image();
                copy_from(&img, o - COMMON_OFFSET, data);
            }
            ISR_OFFSET => {
                // Reading the ISR acknowledges it.
                let isr = self.common.interrupt.take_status();
                data[0] = u8::try_from(isr & 0xff).unwrap_or(0);
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o)
                && o + len <= DEVICE_OFFSET + DEVICE_LEN =>
            {
                self.common.read_config(o - DEVICE_OFFSET, data);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + REGION_LEN).contains(&o) => {
                self.vectors.msix().table_read(o - MSIX_TABLE_OFFSET, data);
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + REGION_LEN).contains(&o) => {
                self.vectors.msix().pba_read(o - MSIX_PBA_OFFSET, data);
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.common_write(o - COMMON_OFFSET, data),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o)
                && o + len <= DEVICE_OFFSET + DEVICE_LEN =>
            {
                self.common.write_config(o - DEVICE_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_LEN).contains(&o) => {
                // The slow path; ioeventfds normally catch these.
                let index = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER);
                self.common.notify(u32::try_from(index).unwrap_or(u32::MAX));
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + REGION_LEN).contains(&o) => {
                self.vectors.msix().table_write(o - MSIX_TABLE_OFFSET, data);
            }
            _ => tracing::debug!(offset, "write to a read-only virtio-pci region"),
        }
    }
}

/// The negotiation and sleep/wake are the common ones (`device()`,
/// `sleep()`, `wake()`, `is_asleep()`, `queue_events()` — the VMM registers
/// them as ioeventfds at the BAR's [`NOTIFY_OFFSET`] + index ×
/// [`NOTIFY_MULTIPLIER`] —, `status()`); the saved state is this
/// transport's own ([`VirtioPciTransport::save_state`]).
impl std::ops::Deref for VirtioPciTransport {
    type Target = VirtioCommon;
    fn deref(&self) -> &VirtioCommon {
        &self.common
    }
}

impl std::ops::DerefMut for VirtioPciTransport {
    fn deref_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
}

impl PciDevice for VirtioPciTransport {
    fn config_read(&self, offset: u8, data: &mut [u8]) {
        self.config.read(usize::from(offset), data);
    }

    fn config_write(&mut self, offset: u8, data: &[u8]) {
        self.config.write(usize::from(offset), data);
        let control = self.msix_cap + 2;
        let start = usize::from(offset);
        if start < control + 2 && start + data.len() > control {
            let mut b = [0u8; 2];
            self.config.read(control, &mut b);
            self.vectors.msix().set_control(u16::from_le_bytes(b));
        }
    }
}

impl BusDevice for VirtioPciTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.bar_read(offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.bar_write(offset, data);
    }
}

/// Told where a function's BAR now decodes (None: nowhere) when the
/// guest moves it or turns its decoding off.
pub type BarMoved = Box<dyn FnMut(Option<u64>) + Send>;

/// A transport shared between the PCI root (configuration space) and the
/// memory bus (its BAR), telling the VMM when the guest (firmware
/// assigning resources, an OS reassigning them) moves the BAR.
pub struct SharedPciTransport {
    transport: Arc<Mutex<VirtioPciTransport>>,
    on_bar_moved: Option<BarMoved>,
}

impl std::fmt::Debug for SharedPciTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedPciTransport").finish_non_exhaustive()
    }
}

impl SharedPciTransport {
    pub fn new(transport: Arc<Mutex<VirtioPciTransport>>) -> Self {
        SharedPciTransport {
            transport,
            on_bar_moved: None,
        }
    }

    /// Calls `f` with the BAR's new address whenever it changes.
    pub fn on_bar_moved(mut self, f: BarMoved) -> Self {
        self.on_bar_moved = Some(f);
        self
    }

    fn lock(&self) -> MutexGuard<'_, VirtioPciTransport> {
        self.transport
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl PciDevice for SharedPciTransport {
    fn config_read(&self, offset: u8, data: &mut [u8]) {
        self.lock().config_read(offset, data);
    }

    fn config_write(&mut self, offset: u8, data: &[u8]) {
        let (before, after) = {
            let mut t = self.lock();
            let before = t.bar_address();
            t.config_write(offset, data);
            (before, t.bar_address())
        };
        if before != after {
            if let Some(f) = &mut self.on_bar_moved {
                f(after);
            }
        }
    }
}

/// A virtio-pci function's saved state: the common transport state plus
/// its configuration space, MSI-X table and vector assignments.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
pub struct VirtioPciState {
    pub common: VirtioTransportState,
    pub config: PciConfigState,
    pub msix: MsixState,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
}

/// Why a virtio-pci function's state cannot be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum PciStateError {
    #[error(transparent)]
    Common(#[from] TransportStateError),
    #[error("the saved configuration space does not fit this function: {0}")]
    Config(String),
    #[error("the saved MSI-X table does not fit this function: {0}")]
    Msix(#[from] msix::MsixError),
    #[error("the state assigns vectors to {saved} queues; the device has {actual}")]
    Vectors { saved: usize, actual: usize },
}

impl VirtioPciTransport {
    /// The function's state; the device must be asleep if it runs.
    pub fn save_state(&self) -> Result<VirtioPciState, PciStateError> {
        Ok(VirtioPciState {
            common: self.common.save_state()?,
            config: self.config.state(),
            msix: self.vectors.msix().state(),
            config_vector: self.vectors.config.load(Ordering::SeqCst),
            queue_vectors: self
                .vectors
                .queues
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect(),
        })
    }

    /// Restores into a new function (see [`VirtioCommon::restore`]); every
    /// part is checked before the device starts.
    pub fn restore(&mut self, state: &VirtioPciState) -> Result<(), PciStateError> {
        if state.queue_vectors.len() != self.vectors.queues.len() {
            return Err(PciStateError::Vectors {
                saved: state.queue_vectors.len(),
                actual: self.vectors.queues.len(),
            });
        }
        let mut config = self.config.clone();
        config
            .restore(&state.config)
            .map_err(|e| PciStateError::Config(e.to_string()))?;
        self.vectors.msix().restore(&state.msix)?;
        self.vectors
            .config
            .store(self.vectors.valid(state.config_vector), Ordering::SeqCst);
        for (slot, &v) in self.vectors.queues.iter().zip(&state.queue_vectors) {
            slot.store(self.vectors.valid(v), Ordering::SeqCst);
        }
        self.config = config;
        self.common.restore(&state.common)?;
        Ok(())
    }
}

/// A virtio vendor capability's body (after its ID and next pointer):
/// cap_len, cfg_type, bar, id, padding, offset, length.
fn virtio_cap(cfg_type: u8, offset: u64, len: u64, cap_len: u8) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0] = cap_len;
    b[1] = cfg_type;
    b[2] = 0; // BAR 0
    b[6..10].copy_from_slice(&low32(offset).to_le_bytes());
    b[10..14].copy_from_slice(&low32(len).to_le_bytes());
    b
}

fn low32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap_or(0)
}

fn put16(img: &mut [u8], at: usize, v: u16) {
    img[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(img: &mut [u8], at: usize, v: u32) {
    img[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(img: &mut [u8], at: usize, v: u64) {
    img[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Copies `data.len()` bytes of `img` at `offset`; bytes past it read 0.
fn copy_from(img: &[u8], offset: u64, data: &mut [u8]) {
    super::read_config_bytes(img, offset, data);
}

#[cfg(test)]
mod tests;
