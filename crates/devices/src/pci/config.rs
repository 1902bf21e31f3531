//! A PCI endpoint's configuration space (header type 0): what each
//! register lets the guest write, BARs with the sizing protocol, and a
//! capability list. virtio-pci and every later PCI device keep their
//! configuration space in a [`PciConfig`].
//!
//! The guest is hostile: every write goes through a per-byte mask of the
//! bits it may change (read-only bits keep their value), so no write can
//! change a device's identity, a BAR's size or type, or the capability
//! chain.

use serde::{Deserialize, Serialize};

/// Standard header registers.
pub const VENDOR_ID: usize = 0x00;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

/// Command register bits.
pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_SERR: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status: the capability list exists.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// Status: the function's INTx is asserted (read-only).
pub const STATUS_INTERRUPT: u16 = 1 << 3;

/// The configuration space's size (no extended space).
pub const CONFIG_SIZE: usize = 256;
/// Capabilities start after the standard header.
const FIRST_CAP: usize = 0x40;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    Io,
    Memory32,
    /// A 64-bit memory BAR (it takes the next BAR slot too).
    Memory64 {
        prefetchable: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bar {
    pub kind: BarKind,
    pub size: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciConfigError {
    #[error("BAR {0} does not exist or is taken")]
    BarSlot(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 (memory) or 4 (I/O) bytes, or too large for its kind")]
    BarSize(u64),
    #[error("no room for a {0}-byte capability in configuration space")]
    NoRoom(usize),
}

/// A function's 256-byte configuration space.
#[derive(Clone, Debug)]
pub struct PciConfig {
    regs: [u8; CONFIG_SIZE],
    /// The bits of each byte the guest may write.
    writable: [u8; CONFIG_SIZE],
    bars: [Option<Bar>; 6],
    /// BAR slots in use (a 64-bit BAR takes two).
    taken: [bool; 6],
    /// Where the next capability goes, and the previous one's next
    /// pointer (the list's head at first).
    next_cap: usize,
    last_link: usize,
}

/// The identity of a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciId {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Base class, subclass, programming interface.
    pub class: (u8, u8, u8),
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

impl PciConfig {
    pub fn new(id: PciId) -> Self {
        let mut c = PciConfig {
            regs: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            bars: [None; 6],
            taken: [false; 6],
            next_cap: FIRST_CAP,
            last_link: CAPABILITIES_POINTER,
        };
        c.put16(VENDOR_ID, id.vendor);
        c.put16(VENDOR_ID + 2, id.device);
        c.regs[0x08] = id.revision;
        c.regs[0x09] = id.class.2;
        c.regs[0x0a] = id.class.1;
        c.regs[0x0b] = id.class.0;
        c.put16(SUBSYSTEM_VENDOR_ID, id.subsystem_vendor);
        c.put16(SUBSYSTEM_VENDOR_ID + 2, id.subsystem);
        let command = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_SERR;
        c.writable_bits(COMMAND, &(command | COMMAND_INTX_DISABLE).to_le_bytes());
        // Cache line size and latency timer: plain storage.
        c.writable_bits(0x0c, &[0xff, 0xff]);
        c.writable_bits(INTERRUPT_LINE, &[0xff]);
        c
    }

    /// The function raises INTx on `pin` (1 = INTA … 4 = INTD).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.regs[INTERRUPT_PIN] = pin;
    }

    /// Declares BAR `index` (`size` bytes, a power of two).
    pub fn add_bar(&mut self, index: usize, bar: Bar) -> Result<(), PciConfigError> {
        let slots = if matches!(bar.kind, BarKind::Memory64 { .. }) {
            2
        } else {
            1
        };
        if index + slots > 6 || self.taken[index..index + slots].iter().any(|&t| t) {
            return Err(PciConfigError::BarSlot(index));
        }
        let min = if bar.kind == BarKind::Io { 4 } else { 16 };
        let max = match bar.kind {
            BarKind::Io => 1 << 16,
            BarKind::Memory32 => 1 << 31,
            BarKind::Memory64 { .. } => 1 << 63,
        };
        if !bar.size.is_power_of_two() || bar.size < min || bar.size > max {
            return Err(PciConfigError::BarSize(bar.size));
        }
        let reg = BAR0 + 4 * index;
        let (type_bits, low_mask): (u32, u32) = match bar.kind {
            BarKind::Io => (0b01, !0b11),
            BarKind::Memory32 => (0b0000, !0b1111),
            BarKind::Memory64 { prefetchable } => {
                (0b0100 | (u32::from(prefetchable) << 3), !0b1111)
            }
        };
        // The address bits at or above the size are writable; the rest
        // read as zero, so writing all ones reads back the size.
        let [l0, l1, l2, l3, h0, h1, h2, h3] = (!(bar.size - 1)).to_le_bytes();
        let low = u32::from_le_bytes([l0, l1, l2, l3]) & low_mask;
        self.put32(reg, type_bits);
        self.writable_bits(reg, &low.to_le_bytes());
        if slots == 2 {
            self.writable_bits(reg + 4, &[h0, h1, h2, h3]);
        }
        self.bars[index] = Some(bar);
        self.taken[index..index + slots].fill(true);
        Ok(())
    }

    /// Appends a capability: `body` after its ID and next-pointer bytes,
    /// with `writable` masks for the body's bytes (shorter masks leave the
    /// rest read-only). Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, PciConfigError> {
        let len = 2 + body.len();
        let at = self.next_cap;
        if at + len > CONFIG_SIZE {
            return Err(PciConfigError::NoRoom(len));
        }
        self.regs[at] = id;
        self.regs[at + 1] = 0;
        self.regs[at + 2..at + len].copy_from_slice(body);
        let n = writable.len().min(body.len());
        self.writable[at + 2..at + 2 + n].copy_from_slice(&writable[..n]);
        // `at` is below 256 (checked above).
        self.regs[self.last_link] = u8::try_from(at).unwrap_or(0);
        self.last_link = at + 1;
        self.next_cap = (at + len).next_multiple_of(4);
        let status = self.get16(STATUS) | STATUS_CAP_LIST;
        self.put16(STATUS, status);
        Ok(at)
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the space read 0.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.regs.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// Writes `data` at `offset` through the writable masks.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let at = offset + i;
            if at >= CONFIG_SIZE {
                break;
            }
            let mask = self.writable[at];
            self.regs[at] = (self.regs[at] & !mask) | (b & mask);
        }
    }

    pub fn command(&self) -> u16 {
        self.get16(COMMAND)
    }

    /// Sets or clears the read-only interrupt-status bit (a device's INTx
    /// level, which the guest sees in the status register).
    pub fn set_interrupt_status(&mut self, asserted: bool) {
        let status = self.get16(STATUS) & !STATUS_INTERRUPT;
        let bit = if asserted { STATUS_INTERRUPT } else { 0 };
        self.put16(STATUS, status | bit);
    }

    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// Where BAR `index` is programmed, when its decoding is on (the
    /// command register's I/O or memory bit) and the address is not the
    /// sizing value. None for an unprogrammed or disabled BAR.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        let reg = BAR0 + 4 * index;
        let low = u64::from(self.get32(reg));
        let (addr, decoding) = match bar.kind {
            BarKind::Io => (low & !0b11, self.command() & COMMAND_IO != 0),
            BarKind::Memory32 => (low & !0b1111, self.command() & COMMAND_MEMORY != 0),
            BarKind::Memory64 { .. } => {
                let high = u64::from(self.get32(reg + 4));
                (
                    (high << 32) | (low & !0b1111),
                    self.command() & COMMAND_MEMORY != 0,
                )
            }
        };
        // An address of 0 is "not placed"; one whose range would wrap is
        // the guest's sizing value, not a placement.
        (decoding && addr != 0 && addr.checked_add(bar.size).is_some()).then_some(addr)
    }

    fn writable_bits(&mut self, at: usize, mask: &[u8]) {
        self.writable[at..at + mask.len()].copy_from_slice(mask);
    }

    fn get16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.regs[at], self.regs[at + 1]])
    }

    fn get32(&self, at: usize) -> u32 {
        u32::from_le_bytes([
            self.regs[at],
            self.regs[at + 1],
            self.regs[at + 2],
            self.regs[at + 3],
        ])
    }

    fn put16(&mut self, at: usize, v: u16) {
        self.regs[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(&mut self, at: usize, v: u32) {
        self.regs[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// The saved registers (the guest's writes; identity, BARs and masks
    /// come from the device's construction).
    pub fn state(&self) -> PciConfigState {
        PciConfigState {
            regs: self.regs.to_vec(),
        }
    }

    /// Takes saved registers into a function built the same way: only the
    /// bits the guest could have written are taken, so a state cannot
    /// change what the device is.
    pub fn restore(&mut self, s: &PciConfigState) -> Result<(), PciConfigStateError> {
        if s.regs.len() != CONFIG_SIZE {
            return Err(PciConfigStateError(s.regs.len()));
        }
        for (at, &b) in s.regs.iter().enumerate() {
            let mask = self.writable[at];
            self.regs[at] = (self.regs[at] & !mask) | (b & mask);
        }
        // The device's interrupt level is its own to set again.
        let status = u16::from_le_bytes([s.regs[STATUS], s.regs[STATUS + 1]]);
        let level = status & STATUS_INTERRUPT != 0;
        self.set_interrupt_status(level);
        Ok(())
    }
}

/// A function's configuration registers as saved.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct PciConfigState {
    pub regs: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a saved PCI configuration space has {0} bytes, not 256")]
pub struct PciConfigStateError(pub usize);

#[cfg(test)]
mod tests;
