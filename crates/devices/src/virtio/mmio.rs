//! The virtio-mmio transport (version 2, virtio 1.x "modern" devices): a
//! 4 KiB register block per device, announced to Linux on the kernel
//! command line (`virtio_mmio.device=4K@ADDR:IRQ`). The registers decode
//! into [`VirtioCommon`], which holds everything the driver negotiates;
//! the saved state is the common one ([`persist`]).

use std::sync::Arc;

use memory::GuestMemoryMmap;
use virtio_queue::QueueT;

use super::common::{Ring, TransportError, VirtioCommon};
use super::{Interrupt, VirtioDevice};
use crate::BusDevice;

/// The size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// The offset of QueueNotify, where the VMM places an ioeventfd per queue
/// (data = queue index).
pub const NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5253_5648; // "HVSR"
const CONFIG_SPACE: u64 = 0x100;

/// Kept for callers of the transport's old error name.
pub type MmioError = TransportError;

/// One virtio device behind its MMIO register block.
pub struct MmioTransport {
    common: VirtioCommon,
}

impl MmioTransport {
    /// Wraps `device`; `interrupt` raises its interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, MmioError> {
        Ok(MmioTransport {
            common: VirtioCommon::new(device, mem, interrupt)?,
        })
    }

    fn read_register(&self, offset: u64) -> u32 {
        let c = &self.common;
        let queue = c.queue();
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => c.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => c.device_features_word(),
            0x034 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x044 => queue.map_or(0, |q| u32::from(q.ready())),
            0x060 => c.interrupt.status(),
            0x070 => c.status,
            0x0fc => c.config_generation,
            _ => {
                tracing::debug!(offset, "read of an unknown virtio-mmio register");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let c = &mut self.common;
        match offset {
            0x014 => c.device_features_select = value,
            0x020 => c.ack_features_word(value),
            0x024 => c.driver_features_select = value,
            0x030 => c.queue_select = value,
            0x038 => c.set_queue_size(value),
            0x044 => c.set_queue_ready(value == 1),
            0x050 => c.notify(value),
            0x064 => c.interrupt.acknowledge(value),
            0x070 => c.set_status(value),
            0x080 | 0x084 => c.set_queue_ring(Ring::Desc, offset & 4 != 0, value),
            0x090 | 0x094 => c.set_queue_ring(Ring::Avail, offset & 4 != 0, value),
            0x0a0 | 0x0a4 => c.set_queue_ring(Ring::Used, offset & 4 != 0, value),
            _ => tracing::debug!(
                offset,
                value,
                "write to an unknown or read-only virtio-mmio register"
            ),
        }
    }
}

/// The negotiation, sleep/wake and saved state are the common ones
/// (`device()`, `sleep()`, `wake()`, `is_asleep()`, `queue_events()` — the
/// VMM registers them as ioeventfds at [`NOTIFY_OFFSET`] —, `status()`,
/// `save_state()`, `restore()`).
impl std::ops::Deref for MmioTransport {
    type Target = VirtioCommon;
    fn deref(&self) -> &VirtioCommon {
        &self.common
    }
}

impl std::ops::DerefMut for MmioTransport {
    fn deref_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.common.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        data.fill(0);
        if data.len() == 4 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.common.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        } else {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio register write of the wrong width ignored"
            );
        }
    }
}

pub mod persist {
    //! The virtio-mmio transport's saved state: the common transport
    //! state ([`crate::virtio::common::persist`]); the MMIO registers hold
    //! nothing else.

    pub use crate::virtio::common::persist::{
        TransportStateError as MmioStateError, VirtioTransportState as MmioTransportState,
    };
}

#[cfg(test)]
mod tests;
