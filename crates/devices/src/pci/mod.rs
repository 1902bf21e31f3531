//! The PCI root: configuration mechanism #1 (I/O ports 0xCF8–0xCFF) over
//! bus 0, with a host bridge at 00:00.0.
//!
//! It is what a PC's chipset offers before any PCI device exists: Linux
//! probes mechanism #1 at boot and, finding neither it nor a host bridge,
//! prints "PCI: Fatal: No config space access function found" — on every
//! boot of a guest whose kernel has PCI support. With this root the probe
//! succeeds and finds a bus with nothing on it but the bridge. Devices
//! (virtio-pci) join it through [`PciDevice`].
//!
//! Written by hand: the rust-vmm crates have no PCI configuration space
//! (Cloud Hypervisor's and crosvm's live inside those VMMs), and this part
//! is a few registers.

pub mod config;
pub mod msix;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use snapshot::Persist;

use crate::BusDevice;

/// The address port (4 bytes) and the data window (4 bytes).
pub const CONFIG_ADDRESS_PORT: u64 = 0xcf8;
pub const CONFIG_PORTS_LEN: u64 = 8;

/// Bit 31 of CONFIG_ADDRESS: the access goes to configuration space.
const ENABLE: u32 = 1 << 31;

/// A function's configuration space, as a PCI device on bus 0 offers it.
pub trait PciDevice: Send {
    /// Reads `data.len()` (1, 2 or 4) bytes at `offset`, which is aligned
    /// to that size and below 256.
    fn config_read(&self, offset: u8, data: &mut [u8]);
    /// Writes likewise; a device ignores writes to read-only registers.
    fn config_write(&mut self, offset: u8, data: &[u8]);
}

/// The host bridge: class 06/00, no BARs, nothing writable.
#[derive(Debug)]
pub struct HostBridge {
    config: [u8; 64],
}

impl HostBridge {
    /// Intel's vendor ID with the device ID Cloud Hypervisor also gives its
    /// virtual host bridge; guests need only the class to be a host bridge.
    const VENDOR: u16 = 0x8086;
    const DEVICE: u16 = 0x0d57;

    pub fn new() -> Self {
        let mut config = [0u8; 64];
        config[0..2].copy_from_slice(&Self::VENDOR.to_le_bytes());
        config[2..4].copy_from_slice(&Self::DEVICE.to_le_bytes());
        // Class code 06/00/00: bridge, host bridge.
        config[0x0b] = 0x06;
        // Header type 0, single function.
        config[0x0e] = 0;
        HostBridge { config }
    }
}

impl HostBridge {
    /// A bridge with a saved configuration space.
    pub fn with_config(config: [u8; 64]) -> Self {
        HostBridge { config }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&self, offset: u8, data: &mut [u8]) {
        let start = usize::from(offset);
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(start + i).copied().unwrap_or(0);
        }
    }

    fn config_write(&mut self, _offset: u8, _data: &[u8]) {}
}

/// Bus 0's functions by device/function number, and the address register.
pub struct PciRoot {
    address: u32,
    functions: BTreeMap<u8, Box<dyn PciDevice>>,
    /// Where the ECAM (MMCONFIG) window starts, when the machine maps one
    /// (the root is then on the MMIO bus too, at that base).
    ecam_base: Option<u64>,
}

/// The ECAM window of bus 0 only: 32 devices × 8 functions × 4 KiB.
pub const ECAM_BUS_LEN: u64 = 1 << 20;

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot")
            .field("address", &self.address)
            .field("functions", &self.functions.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PciRoot {
    /// A bus with the host bridge at 00:00.0.
    pub fn new() -> Self {
        let mut functions: BTreeMap<u8, Box<dyn PciDevice>> = BTreeMap::new();
        functions.insert(0, Box::new(HostBridge::new()));
        PciRoot {
            address: 0,
            functions,
            ecam_base: None,
        }
    }

    /// Also answers configuration accesses through an ECAM window at
    /// `base` (bus 0's [`ECAM_BUS_LEN`] bytes), which the VMM maps on the
    /// MMIO bus to this same root.
    pub fn with_ecam(mut self, base: u64) -> Self {
        self.ecam_base = Some(base);
        self
    }

    /// Adds a function at `devfn` (device << 3 | function); a taken slot
    /// is refused.
    pub fn add_function(&mut self, devfn: u8, f: Box<dyn PciDevice>) -> Result<(), PciSlotTaken> {
        if self.functions.contains_key(&devfn) {
            return Err(PciSlotTaken(devfn));
        }
        self.functions.insert(devfn, f);
        Ok(())
    }

    /// An ECAM access at `offset` in the window: bus 0 only, registers
    /// below 256 (no extended space, which reads as all ones — "none" to
    /// an OS), naturally aligned 1, 2 or 4 bytes.
    fn ecam_target(offset: u64, len: usize) -> Option<(u8, u8)> {
        if offset >= ECAM_BUS_LEN || !matches!(len, 1 | 2 | 4) || !offset.is_multiple_of(len as u64)
        {
            return None;
        }
        let devfn = u8::try_from(offset >> 12).ok()?;
        let reg = u8::try_from(offset & 0xfff).ok()?;
        Some((devfn, reg))
    }

    /// The function the address register selects and the register offset
    /// of an access of `len` bytes at data port byte `port_offset` (0–3);
    /// None when nothing is selected or the access is not a naturally
    /// aligned 1, 2 or 4 bytes.
    fn selected(&self, port_offset: u8, len: usize) -> Option<(u8, u8)> {
        if self.address & ENABLE == 0 {
            return None;
        }
        let bus = (self.address >> 16) & 0xff;
        if bus != 0 {
            return None;
        }
        let devfn = u8::try_from((self.address >> 8) & 0xff).ok()?;
        let offset = u8::try_from(self.address & 0xfc).ok()? | port_offset;
        let aligned = matches!(len, 1 | 2 | 4) && usize::from(offset) % len == 0;
        aligned.then_some((devfn, offset))
    }

    fn data_read(&self, port_offset: u8, data: &mut [u8]) {
        data.fill(0xff);
        let Some((devfn, offset)) = self.selected(port_offset, data.len()) else {
            return;
        };
        if let Some(f) = self.functions.get(&devfn) {
            f.config_read(offset, data);
        }
    }

    fn data_write(&mut self, port_offset: u8, data: &[u8]) {
        let Some((devfn, offset)) = self.selected(port_offset, data.len()) else {
            return;
        };
        if let Some(f) = self.functions.get_mut(&devfn) {
            f.config_write(offset, data);
        }
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

/// A PCI slot that already holds a function.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("PCI slot {:02x}.{} is taken", .0 >> 3, .0 & 7)]
pub struct PciSlotTaken(pub u8);

impl BusDevice for PciRoot {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        if Some(base) == self.ecam_base {
            data.fill(0xff);
            if let Some((devfn, reg)) = Self::ecam_target(offset, data.len()) {
                if let Some(f) = self.functions.get(&devfn) {
                    f.config_read(reg, data);
                }
            }
            return;
        }
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (4..=7, _) => {
                // In range by the match arm.
                let port_offset = u8::try_from(offset - 4).unwrap_or(0);
                self.data_read(port_offset, data);
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        if Some(base) == self.ecam_base {
            if let Some((devfn, reg)) = Self::ecam_target(offset, data.len()) {
                if let Some(f) = self.functions.get_mut(&devfn) {
                    f.config_write(reg, data);
                }
            }
            return;
        }
        match (offset, data.len()) {
            (0, 4) => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                // The two lowest bits are reserved and read as zero.
                self.address = u32::from_le_bytes(b) & !0b11;
            }
            (4..=7, _) => {
                let port_offset = u8::try_from(offset - 4).unwrap_or(0);
                self.data_write(port_offset, data);
            }
            // Byte writes to 0xCF8–0xCFB are mechanism #2's or a probe's
            // (Linux writes 0xCFB first); they do not change the address.
            _ => {}
        }
    }
}

/// The PCI root's state: the address register and the host bridge's
/// configuration space (read-only to the guest, saved so that a restored
/// guest finds the bridge it probed).
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct PciRootState {
    /// CONFIG_ADDRESS as the guest last wrote it.
    pub address: u32,
    /// The 64 bytes of 00:00.0's header.
    pub host_bridge: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum PciStateError {
    #[error("the host bridge's saved config space has {0} bytes, not 64")]
    BridgeConfig(usize),
    #[error("CONFIG_ADDRESS {0:#x} has its reserved low bits set")]
    Address(u32),
}

impl PciRoot {
    /// Takes a saved state in place (the root already on the bus);
    /// nothing changes if it is refused.
    pub fn restore_state(&mut self, state: &PciRootState) -> Result<(), PciStateError> {
        let config = <[u8; 64]>::try_from(state.host_bridge.as_slice())
            .map_err(|_| PciStateError::BridgeConfig(state.host_bridge.len()))?;
        if state.address & 0b11 != 0 {
            return Err(PciStateError::Address(state.address));
        }
        self.functions
            .insert(0, Box::new(HostBridge::with_config(config)));
        self.address = state.address;
        Ok(())
    }
}

impl Persist for PciRoot {
    type State = PciRootState;
    type Args = ();
    type Error = PciStateError;

    fn save(&self) -> PciRootState {
        let mut host_bridge = vec![0u8; 64];
        if let Some(bridge) = self.functions.get(&0) {
            for (i, word) in host_bridge.chunks_exact_mut(4).enumerate() {
                // i < 16: the offset fits a byte.
                bridge.config_read(u8::try_from(i * 4).unwrap_or(0), word);
            }
        }
        PciRootState {
            address: self.address,
            host_bridge,
        }
    }

    fn restore((): (), state: &PciRootState) -> Result<Self, PciStateError> {
        let mut root = PciRoot::new();
        root.restore_state(state)?;
        Ok(root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(root: &mut PciRoot, devfn: u8, reg: u8) -> u32 {
        let addr = ENABLE | (u32::from(devfn) << 8) | u32::from(reg);
        root.write(CONFIG_ADDRESS_PORT, 0, &addr.to_le_bytes());
        let mut v = [0u8; 4];
        root.read(CONFIG_ADDRESS_PORT, 4, &mut v);
        u32::from_le_bytes(v)
    }

    #[test]
    fn linux_type1_probe_finds_the_host_bridge() {
        let mut root = PciRoot::new();
        // pci_check_type1: a byte to 0xCFB, then the address reads back.
        root.write(CONFIG_ADDRESS_PORT, 3, &[1]);
        root.write(CONFIG_ADDRESS_PORT, 0, &0x8000_0000u32.to_le_bytes());
        let mut v = [0u8; 4];
        root.read(CONFIG_ADDRESS_PORT, 0, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0x8000_0000);
        // pci_sanity_check: the class word at 0x0a of 00:00.0 is 0x0600.
        root.write(CONFIG_ADDRESS_PORT, 0, &(ENABLE | 0x08).to_le_bytes());
        let mut class = [0u8; 2];
        root.read(CONFIG_ADDRESS_PORT, 6, &mut class);
        assert_eq!(u16::from_le_bytes(class), 0x0600);
        assert_eq!(read32(&mut root, 0, 0), 0x0d57_8086);
    }

    #[test]
    fn empty_slots_other_buses_and_disabled_accesses_read_all_ones() {
        let mut root = PciRoot::new();
        assert_eq!(read32(&mut root, 8, 0), 0xffff_ffff);
        // Bus 1.
        root.write(CONFIG_ADDRESS_PORT, 0, &(ENABLE | 1 << 16).to_le_bytes());
        let mut v = [0u8; 4];
        root.read(CONFIG_ADDRESS_PORT, 4, &mut v);
        assert_eq!(v, [0xff; 4]);
        // Enable bit clear.
        root.write(CONFIG_ADDRESS_PORT, 0, &0u32.to_le_bytes());
        root.read(CONFIG_ADDRESS_PORT, 4, &mut v);
        assert_eq!(v, [0xff; 4]);
    }

    #[test]
    fn hostile_accesses_neither_panic_nor_change_the_bridge() {
        let mut root = PciRoot::new();
        root.write(CONFIG_ADDRESS_PORT, 0, &(ENABLE | 0xfc).to_le_bytes());
        for len in [1usize, 2, 3, 4, 8] {
            for off in 0..8u64 {
                let mut buf = vec![0u8; len];
                root.read(CONFIG_ADDRESS_PORT, off, &mut buf);
                root.write(CONFIG_ADDRESS_PORT, off, &vec![0xaa; len]);
            }
        }
        // Misaligned data reads return all ones.
        root.write(CONFIG_ADDRESS_PORT, 0, &ENABLE.to_le_bytes());
        let mut w = [0u8; 2];
        root.read(CONFIG_ADDRESS_PORT, 5, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        // Writes to the bridge's registers are ignored.
        root.write(CONFIG_ADDRESS_PORT, 4, &0u32.to_le_bytes());
        assert_eq!(read32(&mut root, 0, 0), 0x0d57_8086);
    }

    #[test]
    fn state_round_trips_with_the_address_and_the_bridge() {
        let mut root = PciRoot::new();
        // The guest selected 00:00.0 register 0x08 before the snapshot.
        root.write(CONFIG_ADDRESS_PORT, 0, &(ENABLE | 0x08).to_le_bytes());
        let saved = root.save();
        assert_eq!(&saved.host_bridge[..4], &[0x86, 0x80, 0x57, 0x0d]);
        let json = crate::test_util::json(&saved);
        let mut restored = PciRoot::restore((), &saved).unwrap();
        assert_eq!(crate::test_util::json(&restored.save()), json);
        // A data read without writing the address again reads the class.
        let mut class = [0u8; 2];
        restored.read(CONFIG_ADDRESS_PORT, 6, &mut class);
        assert_eq!(u16::from_le_bytes(class), 0x0600);
    }

    #[test]
    fn hostile_states_are_refused() {
        let saved = PciRoot::new().save();
        let short = PciRootState {
            host_bridge: vec![0; 63],
            ..saved.clone()
        };
        assert!(PciRoot::restore((), &short).is_err());
        let reserved = PciRootState {
            address: ENABLE | 1,
            ..saved
        };
        assert!(PciRoot::restore((), &reserved).is_err());
    }

    /// A function that records writes, for the ECAM tests.
    type Writes = std::sync::Arc<std::sync::Mutex<Vec<(u8, Vec<u8>)>>>;
    struct Probe(Writes);

    impl PciDevice for Probe {
        fn config_read(&self, offset: u8, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = offset.wrapping_add(u8::try_from(i).unwrap_or(0));
            }
        }

        fn config_write(&mut self, offset: u8, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn ecam_reaches_the_same_functions_as_the_ports() {
        const ECAM: u64 = 0xe000_0000;
        let writes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut root = PciRoot::new().with_ecam(ECAM);
        root.add_function(3 << 3, Box::new(Probe(writes.clone())))
            .unwrap();
        assert_eq!(
            root.add_function(0, Box::new(HostBridge::new())),
            Err(PciSlotTaken(0))
        );
        let mut v = [0u8; 4];
        root.read(ECAM, 0, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0x0d57_8086, "00:00.0 by ECAM");
        root.read(ECAM, (3 << 15) | 0x10, &mut v);
        assert_eq!(v, [0x10, 0x11, 0x12, 0x13]);
        assert_eq!(
            read32(&mut root, 3 << 3, 0x10),
            0x1312_1110,
            "the same by 0xCF8"
        );
        root.write(ECAM, (3 << 15) | 0x3c, &[9]);
        assert_eq!(*writes.lock().unwrap(), vec![(0x3c, vec![9])]);
        // Extended registers, empty slots, misaligned or wide accesses,
        // other buses: all ones, nothing written.
        for (off, len) in [
            ((3 << 15) | 0x100, 4),
            (4 << 15, 4),
            ((3 << 15) | 0x11, 2),
            ((3 << 15) | 0x10, 8),
            (ECAM_BUS_LEN, 4),
            (u64::MAX - 3, 4),
        ] {
            let mut buf = vec![0u8; len];
            root.read(ECAM, off, &mut buf);
            assert!(buf.iter().all(|&b| b == 0xff), "{off:#x}+{len}");
            root.write(ECAM, off, &buf);
        }
        assert_eq!(writes.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_root_on_the_bus_takes_a_state_in_place() {
        let mut src = PciRoot::new();
        src.write(CONFIG_ADDRESS_PORT, 0, &(ENABLE | 0x08).to_le_bytes());
        let saved = src.save();
        let mut dev = PciRoot::new();
        dev.restore_state(&saved).unwrap();
        assert_eq!(
            crate::test_util::json(&dev.save()),
            crate::test_util::json(&saved)
        );
    }
}
