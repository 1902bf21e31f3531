//! Devices of hostvisor guests and the buses that route guest accesses to
//! them. Nothing here knows about KVM: devices see reads and writes at
//! offsets, raise interrupts through [`EventFd`]s, and ask the VMM for
//! platform actions (reset, exit) through a [`PlatformRequestSink`].
//!
//! [`EventFd`]: vmm_sys_util::eventfd::EventFd

#![warn(clippy::cast_possible_truncation)]

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod debug_exit;
pub mod fw_cfg;
pub mod i8042;
pub mod pci;
pub mod serial;
pub mod virtio;

#[cfg(test)]
pub(crate) mod test_util;

use std::sync::Arc;

pub use bus::{Bus, BusDevice, BusError};

/// Something a device asks of the machine as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformRequest {
    /// The guest reset the machine (keyboard controller pulse, `reboot=k`,
    /// the ACPI reset register).
    Reset,
    /// The guest powered the machine off (ACPI S5).
    PowerOff,
    /// A test guest wrote `code` to the debug-exit port: 0 means success,
    /// anything else a failure the guest reports (such as a panic).
    DebugExit(u32),
}

/// Where devices send [`PlatformRequest`]s. Called on vCPU threads.
pub type PlatformRequestSink = Arc<dyn Fn(PlatformRequest) + Send + Sync>;
