//! MSI-X: the capability in configuration space, the vector table and the
//! pending-bit array a PCI function exposes in a BAR, and delivery of a
//! vector's message — or its pending bit while the vector is masked.
//!
//! Where a message goes is the VMM's business ([`MsiTarget`]: KVM's MSI
//! injection or an irqfd route); this module is the PCI side only. The
//! table is guest memory-mapped registers: every access is bounds-checked
//! and only the bits the specification makes writable change.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The capability ID.
pub const CAP_ID: u8 = 0x11;
/// A table entry's size.
pub const ENTRY_SIZE: usize = 16;
/// The most vectors a function can have.
pub const MAX_VECTORS: u16 = 2048;

/// Message Control bits.
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector Control: the entry is masked (bit 0 of its first byte).
const ENTRY_MASKED: u32 = 1;
const ENTRY_MASKED_BYTE: u8 = 1;

/// An MSI message: written to `addr`, it interrupts a CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// Where a function's messages go.
pub trait MsiTarget: Send + Sync {
    fn send(&self, msg: MsiMessage);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsixError {
    #[error("an MSI-X function has 1 to {MAX_VECTORS} vectors, not {0}")]
    Vectors(u16),
    #[error(
        "a saved MSI-X table has {got} bytes and {pending} pending bits, for {vectors} vectors"
    )]
    State {
        got: usize,
        pending: usize,
        vectors: u16,
    },
}

/// A function's MSI-X vectors.
pub struct Msix {
    /// The table as the guest sees it: `ENTRY_SIZE` bytes per vector.
    table: Vec<u8>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    target: Arc<dyn MsiTarget>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.vectors())
            .field("enabled", &self.enabled())
            .finish_non_exhaustive()
    }
}

impl Msix {
    /// `vectors` vectors, all masked (as after reset).
    pub fn new(vectors: u16, target: Arc<dyn MsiTarget>) -> Result<Self, MsixError> {
        if vectors == 0 || vectors > MAX_VECTORS {
            return Err(MsixError::Vectors(vectors));
        }
        let n = usize::from(vectors);
        let mut table = vec![0u8; n * ENTRY_SIZE];
        for entry in table.chunks_exact_mut(ENTRY_SIZE) {
            entry[12..16].copy_from_slice(&ENTRY_MASKED.to_le_bytes());
        }
        Ok(Msix {
            table,
            pending: vec![false; n],
            enabled: false,
            function_masked: false,
            target,
        })
    }

    pub fn vectors(&self) -> u16 {
        // At most MAX_VECTORS entries.
        u16::try_from(self.pending.len()).unwrap_or(MAX_VECTORS)
    }

    /// The table's size in its BAR.
    pub fn table_len(&self) -> usize {
        self.table.len()
    }

    /// The pending-bit array's size in its BAR (whole 64-bit words).
    pub fn pba_len(&self) -> usize {
        self.pending.len().div_ceil(64) * 8
    }

    /// The capability's body (after its ID and next pointer) and which of
    /// its bits the guest may write: Message Control (enable and function
    /// mask), the table's and the PBA's BAR and offset.
    pub fn capability(
        &self,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> ([u8; 10], [u8; 10]) {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(self.vectors() - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(table_bar & 7)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(pba_bar & 7)).to_le_bytes());
        let mut writable = [0u8; 10];
        writable[0..2].copy_from_slice(&(CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes());
        (body, writable)
    }

    /// The guest wrote Message Control (the capability's register as
    /// configuration space now holds it).
    pub fn set_control(&mut self, control: u16) {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.deliver_pending();
    }

    /// MSI-X is on: the function signals with messages, not INTx.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Signals `vector`: its message goes out, or its pending bit is set
    /// while it is masked. A vector out of range is ignored (a device's
    /// queue may name any vector the guest gave it).
    pub fn notify(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.pending.len() || !self.enabled {
            return;
        }
        if self.function_masked || self.entry_masked(v) {
            self.pending[v] = true;
        } else {
            self.target.send(self.message(v));
        }
    }

    fn entry_masked(&self, v: usize) -> bool {
        self.word(v * ENTRY_SIZE + 12) & ENTRY_MASKED != 0
    }

    fn message(&self, v: usize) -> MsiMessage {
        let at = v * ENTRY_SIZE;
        MsiMessage {
            addr: u64::from(self.word(at)) | (u64::from(self.word(at + 4)) << 32),
            data: self.word(at + 8),
        }
    }

    fn word(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.table[at..at + 4]);
        u32::from_le_bytes(b)
    }

    fn deliver_pending(&mut self) {
        if !self.enabled || self.function_masked {
            return;
        }
        for v in 0..self.pending.len() {
            if self.pending[v] && !self.entry_masked(v) {
                self.pending[v] = false;
                self.target.send(self.message(v));
            }
        }
    }

    /// A read of the table at `offset` in its BAR (bytes outside read 0).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| self.table.get(o.checked_add(i)?))
                .copied()
                .unwrap_or(0);
        }
    }

    /// A write to the table: address and data are plain storage; of
    /// Vector Control only the mask bit is writable. Unmasking a vector
    /// with its pending bit set sends it.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        let mut touched = None;
        for (i, &b) in data.iter().enumerate() {
            let Some(at) = start.checked_add(i).filter(|&a| a < self.table.len()) else {
                break;
            };
            let mask = match at % ENTRY_SIZE {
                12 => ENTRY_MASKED_BYTE,
                13..=15 => 0,
                _ => 0xff,
            };
            self.table[at] = (self.table[at] & !mask) | (b & mask);
            let v = at / ENTRY_SIZE;
            touched = Some(touched.map_or((v, v), |(first, _)| (first, v)));
        }
        // A write may span two entries: each one unmasked sends what it
        // held pending.
        if let Some((first, last)) = touched {
            for v in first..=last {
                if self.pending[v] && !self.entry_masked(v) && self.enabled && !self.function_masked
                {
                    self.pending[v] = false;
                    self.target.send(self.message(v));
                }
            }
        }
    }

    /// A read of the pending-bit array (read-only to the guest).
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .filter(|&byte| byte < self.pba_len());
            *b = byte.map_or(0, |byte| {
                (0..8).fold(0u8, |acc, bit| {
                    let pending = self.pending.get(byte * 8 + bit).copied().unwrap_or(false);
                    acc | (u8::from(pending) << bit)
                })
            });
        }
    }

    pub fn state(&self) -> MsixState {
        MsixState {
            table: self.table.clone(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Takes a saved table into a function with as many vectors (the
    /// reserved Vector Control bits stay clear); pending vectors that are
    /// deliverable go out.
    pub fn restore(&mut self, s: &MsixState) -> Result<(), MsixError> {
        if s.table.len() != self.table.len() || s.pending.len() != self.pending.len() {
            return Err(MsixError::State {
                got: s.table.len(),
                pending: s.pending.len(),
                vectors: self.vectors(),
            });
        }
        self.table.copy_from_slice(&s.table);
        for entry in self.table.chunks_exact_mut(ENTRY_SIZE) {
            entry[12] &= ENTRY_MASKED_BYTE;
            entry[13..16].fill(0);
        }
        self.pending.copy_from_slice(&s.pending);
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        self.deliver_pending();
        Ok(())
    }
}

/// MSI-X as saved.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct MsixState {
    pub table: Vec<u8>,
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub function_masked: bool,
}

#[cfg(test)]
mod tests;
