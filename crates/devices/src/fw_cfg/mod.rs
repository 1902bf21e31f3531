//! QEMU's firmware configuration interface (fw_cfg), the device side: how
//! SeaBIOS and OVMF learn what the machine is (ACPI tables, the e820 map,
//! boot order, a kernel and initrd to boot) on the `pc` machine.
//!
//! The interface (QEMU's `docs/specs/fw_cfg.rst`) is a set of items, each
//! a byte string behind a 16-bit key; named items ("files") are listed in
//! a directory item. On x86 it is three I/O port registers: a selector
//! (0x510, 16 bits, picks an item and rewinds it), a data port (0x511,
//! reads the selected item a byte at a time) and a DMA address register
//! (0x514, two big-endian 32-bit halves; writing the low half starts a
//! transfer described by a `FWCfgDmaAccess` in guest memory).
//!
//! Written here rather than taken from a crate: the crates.io fw_cfg
//! crates are guest-side readers, and the VMMs that have a device side
//! (crosvm, Cloud Hypervisor) keep it inside their own device trees.
//!
//! The guest is hostile: every DMA descriptor is read from guest memory and
//! checked; a transfer that touches memory outside the guest's RAM, or
//! writes an item that is not writable, ends with the descriptor's error
//! bit set and changes nothing else of the device. A read past an item's
//! end yields zeros (as QEMU's), written in bounded chunks, so a guest
//! asking for 4 GiB costs no host allocation.

pub mod loader;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use snapshot::Persist;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use memory::GuestMemoryMmap;

use crate::BusDevice;

/// The selector register's port; the data port is the next one and the
/// DMA address register starts 4 ports on.
pub const FW_CFG_PORT: u64 = 0x510;
/// The ports the device covers: selector (2), data (1), a gap, DMA (8).
pub const FW_CFG_PORT_LEN: u64 = 0x0c;

const DATA_OFFSET: u64 = 1;
const DMA_OFFSET: u64 = 4;

/// What reading the DMA register gives: "QEMU CFG", big-endian.
const DMA_SIGNATURE: [u8; 8] = *b"QEMU CFG";

/// The well-known item keys (QEMU's `FW_CFG_*`).
pub mod key {
    pub const SIGNATURE: u16 = 0x00;
    pub const ID: u16 = 0x01;
    pub const UUID: u16 = 0x02;
    pub const RAM_SIZE: u16 = 0x03;
    pub const NOGRAPHIC: u16 = 0x04;
    pub const NB_CPUS: u16 = 0x05;
    pub const MACHINE_ID: u16 = 0x06;
    pub const KERNEL_ADDR: u16 = 0x07;
    pub const KERNEL_SIZE: u16 = 0x08;
    pub const KERNEL_CMDLINE: u16 = 0x09;
    pub const INITRD_ADDR: u16 = 0x0a;
    pub const INITRD_SIZE: u16 = 0x0b;
    pub const BOOT_DEVICE: u16 = 0x0c;
    pub const NUMA: u16 = 0x0d;
    pub const BOOT_MENU: u16 = 0x0e;
    pub const MAX_CPUS: u16 = 0x0f;
    pub const KERNEL_ENTRY: u16 = 0x10;
    pub const KERNEL_DATA: u16 = 0x11;
    pub const INITRD_DATA: u16 = 0x12;
    pub const CMDLINE_ADDR: u16 = 0x13;
    pub const CMDLINE_SIZE: u16 = 0x14;
    pub const CMDLINE_DATA: u16 = 0x15;
    pub const SETUP_ADDR: u16 = 0x16;
    pub const SETUP_SIZE: u16 = 0x17;
    pub const SETUP_DATA: u16 = 0x18;
    pub const FILE_DIR: u16 = 0x19;
    /// The first key given to a file.
    pub const FILE_FIRST: u16 = 0x20;
    /// x86's own items.
    pub const E820_TABLE: u16 = 0x8003;
}

/// How many files the directory holds at most (QEMU's default is 32; the
/// firmware's own limits are larger).
pub const MAX_FILES: usize = MAX_FILES_U16 as usize;
const MAX_FILES_U16: u16 = 0x100;
/// A file name's room in a directory entry, its NUL included.
pub const FILE_NAME_LEN: usize = 56;
/// The largest item: fw_cfg sizes are 32-bit.
const MAX_ITEM: usize = u32::MAX as usize;

/// `ID` bits: the port interface, and DMA.
const FEATURE_TRADITIONAL: u32 = 1 << 0;
const FEATURE_DMA: u32 = 1 << 1;

/// `FWCfgDmaAccess.control` bits.
const DMA_CTL_ERROR: u32 = 0x01;
const DMA_CTL_READ: u32 = 0x02;
const DMA_CTL_SKIP: u32 = 0x04;
const DMA_CTL_SELECT: u32 = 0x08;
const DMA_CTL_WRITE: u32 = 0x10;

/// Zeros for reads past an item's end are written this much at a time.
const ZERO_CHUNK: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    #[error("fw_cfg file name {0:?} is empty or longer than 55 bytes")]
    BadName(String),
    #[error("fw_cfg file {0:?} is added twice")]
    Duplicate(String),
    #[error("fw_cfg holds at most {MAX_FILES} files")]
    TooManyFiles,
    #[error("fw_cfg item of {0} bytes is larger than 4 GiB")]
    TooLarge(usize),
    #[error("fw_cfg key {0:#x} is reserved for the device itself")]
    Reserved(u16),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Item {
    data: Vec<u8>,
    /// The guest may write it by DMA (within its size).
    writable: bool,
}

/// The fw_cfg device: its items, and where the guest is reading.
pub struct FwCfg {
    items: BTreeMap<u16, Item>,
    /// File names in the order they were added, with their keys.
    files: Vec<(String, u16)>,
    mem: GuestMemoryMmap,
    selector: u16,
    offset: u32,
    /// The DMA register's high half, waiting for the low half.
    dma_high: u32,
}

impl FwCfg {
    /// A device with the signature, the feature bits and an empty
    /// directory; DMA transfers move data to and from `mem`.
    pub fn new(mem: GuestMemoryMmap) -> Self {
        let mut items = BTreeMap::new();
        let item = |data: Vec<u8>| Item {
            data,
            writable: false,
        };
        items.insert(key::SIGNATURE, item(b"QEMU".to_vec()));
        let id = FEATURE_TRADITIONAL | FEATURE_DMA;
        items.insert(key::ID, item(id.to_le_bytes().to_vec()));
        items.insert(key::FILE_DIR, item(0u32.to_be_bytes().to_vec()));
        FwCfg {
            items,
            files: Vec::new(),
            mem,
            selector: 0,
            offset: 0,
            dma_high: 0,
        }
    }

    /// Sets a numbered item (`key::RAM_SIZE`, `key::NB_CPUS`, ...). The
    /// signature, feature bits, directory and file keys are the device's.
    pub fn set_item(&mut self, key: u16, data: Vec<u8>) -> Result<(), FwCfgError> {
        if matches!(key, key::SIGNATURE | key::ID | key::FILE_DIR)
            || (key::FILE_FIRST..key::FILE_FIRST + MAX_FILES_U16).contains(&key)
        {
            return Err(FwCfgError::Reserved(key));
        }
        check_size(&data)?;
        self.items.insert(
            key,
            Item {
                data,
                writable: false,
            },
        );
        Ok(())
    }

    /// Adds a named file, listed in the directory; `writable` files may be
    /// written by the guest through DMA (within their size), as the ACPI
    /// table loader's `WRITE_POINTER` targets are. Returns its key.
    pub fn add_file(
        &mut self,
        name: &str,
        data: Vec<u8>,
        writable: bool,
    ) -> Result<u16, FwCfgError> {
        if name.is_empty() || name.len() >= FILE_NAME_LEN || name.contains('\0') {
            return Err(FwCfgError::BadName(name.to_string()));
        }
        if self.files.iter().any(|(n, _)| n == name) {
            return Err(FwCfgError::Duplicate(name.to_string()));
        }
        if self.files.len() >= MAX_FILES {
            return Err(FwCfgError::TooManyFiles);
        }
        check_size(&data)?;
        let count = u16::try_from(self.files.len()).map_err(|_| FwCfgError::TooManyFiles)?;
        let key = key::FILE_FIRST + count;
        self.items.insert(key, Item { data, writable });
        self.files.push((name.to_string(), key));
        self.rebuild_dir();
        Ok(key)
    }

    /// A file's current contents (what the guest wrote to a writable one).
    pub fn file(&self, name: &str) -> Option<&[u8]> {
        let (_, key) = self.files.iter().find(|(n, _)| n == name)?;
        self.items.get(key).map(|i| i.data.as_slice())
    }

    /// The directory: a big-endian count, then for each file its size
    /// (BE32), key (BE16), two reserved bytes and its NUL-padded name —
    /// sorted by name, as the firmware expects.
    fn rebuild_dir(&mut self) {
        let mut files: Vec<&(String, u16)> = self.files.iter().collect();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        let mut dir = Vec::with_capacity(4 + files.len() * 64);
        let count = u32::try_from(files.len()).unwrap_or(u32::MAX);
        dir.extend_from_slice(&count.to_be_bytes());
        for (name, key) in files {
            let size = self.items.get(key).map_or(0, |i| i.data.len());
            // Sizes were checked to fit 32 bits when the item was set.
            let size = u32::try_from(size).unwrap_or(u32::MAX);
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut field = [0u8; FILE_NAME_LEN];
            field[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&field);
        }
        self.items.insert(
            key::FILE_DIR,
            Item {
                data: dir,
                writable: false,
            },
        );
    }

    fn select(&mut self, selector: u16) {
        self.selector = selector;
        self.offset = 0;
    }

    /// The selected item's next byte; 0 past its end or for a key with no
    /// item.
    fn next_byte(&mut self) -> u8 {
        let byte = self
            .items
            .get(&self.selector)
            .and_then(|i| i.data.get(self.offset as usize).copied())
            .unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
        byte
    }

    /// Runs the DMA transfer whose descriptor is at `addr`, and writes its
    /// outcome into the descriptor's control field.
    fn dma(&mut self, addr: u64) {
        let mut desc = [0u8; 16];
        if self.mem.read_slice(&mut desc, GuestAddress(addr)).is_err() {
            // No descriptor to report to.
            return;
        }
        let word = |i: usize| u32::from_be_bytes([desc[i], desc[i + 1], desc[i + 2], desc[i + 3]]);
        let control = word(0);
        let length = word(4);
        let target = u64::from_be_bytes([
            desc[8], desc[9], desc[10], desc[11], desc[12], desc[13], desc[14], desc[15],
        ]);
        let status = match self.transfer(control, length, target) {
            Ok(()) => 0,
            Err(()) => DMA_CTL_ERROR,
        };
        // A descriptor that was readable is writable guest RAM too; if it
        // is not, the guest sees its own bad address.
        let _ = self
            .mem
            .write_slice(&status.to_be_bytes(), GuestAddress(addr));
    }

    fn transfer(&mut self, control: u32, length: u32, target: u64) -> Result<(), ()> {
        if control & DMA_CTL_SELECT != 0 {
            // The key is the control word's top half.
            let [hi, lo, _, _] = control.to_be_bytes();
            self.select(u16::from_be_bytes([hi, lo]));
        }
        let ops = control & (DMA_CTL_READ | DMA_CTL_SKIP | DMA_CTL_WRITE);
        if ops == 0 {
            return Ok(());
        }
        if ops & DMA_CTL_READ != 0 {
            self.dma_read(length, target)?;
        } else if ops & DMA_CTL_WRITE != 0 {
            self.dma_write(length, target)?;
        }
        // SKIP alone, or after the transfer: the offset moves on.
        self.offset = self.offset.saturating_add(length);
        Ok(())
    }

    /// Copies `length` bytes of the item from the current offset to guest
    /// memory, zeros past its end. The offset moves only if all of it went.
    fn dma_read(&mut self, length: u32, target: u64) -> Result<(), ()> {
        target.checked_add(u64::from(length)).ok_or(())?;
        if length > 0 && !self.mem.check_range(GuestAddress(target), length as usize) {
            return Err(());
        }
        let data: &[u8] = self
            .items
            .get(&self.selector)
            .map(|i| i.data.as_slice())
            .unwrap_or(&[]);
        let start = (self.offset as usize).min(data.len());
        let have = (data.len() - start).min(length as usize);
        self.mem
            .write_slice(&data[start..start + have], GuestAddress(target))
            .map_err(|_| ())?;
        let zeros = [0u8; ZERO_CHUNK];
        let mut done = have;
        while done < length as usize {
            let n = (length as usize - done).min(ZERO_CHUNK);
            self.mem
                .write_slice(&zeros[..n], GuestAddress(target + done as u64))
                .map_err(|_| ())?;
            done += n;
        }
        Ok(())
    }

    /// Copies `length` bytes from guest memory into a writable item at the
    /// current offset; the whole write must fit the item.
    fn dma_write(&mut self, length: u32, target: u64) -> Result<(), ()> {
        let offset = self.offset as usize;
        let item = self.items.get_mut(&self.selector).ok_or(())?;
        let end = offset.checked_add(length as usize).ok_or(())?;
        if !item.writable || end > item.data.len() {
            return Err(());
        }
        self.mem
            .read_slice(&mut item.data[offset..end], GuestAddress(target))
            .map_err(|_| ())
    }
}

fn check_size(data: &[u8]) -> Result<(), FwCfgError> {
    if data.len() > MAX_ITEM {
        return Err(FwCfgError::TooLarge(data.len()));
    }
    Ok(())
}

impl BusDevice for FwCfg {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match offset {
            DATA_OFFSET => {
                for b in data.iter_mut() {
                    *b = self.next_byte();
                }
            }
            o if (DMA_OFFSET..DMA_OFFSET + 8).contains(&o) => {
                let start = usize::try_from(o - DMA_OFFSET).unwrap_or(usize::MAX);
                for (i, b) in data.iter_mut().enumerate() {
                    *b = DMA_SIGNATURE.get(start + i).copied().unwrap_or(0);
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            // The selector is little-endian, as the port write's value.
            (0, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            (DMA_OFFSET, 4) => {
                self.dma_high = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
            }
            (o, 4) if o == DMA_OFFSET + 4 => {
                let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let addr = (u64::from(self.dma_high) << 32) | u64::from(low);
                self.dma_high = 0;
                self.dma(addr);
            }
            // Writes through the data port are obsolete (QEMU ignores
            // them too); other widths and offsets do nothing.
            _ => {}
        }
    }
}

/// Where the guest is in its reading, and what it wrote into writable
/// files. The items themselves come from the machine's configuration and
/// are built again on restore; the state says which files it expects, so
/// a restore into a differently configured device is refused.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
pub struct FwCfgState {
    pub selector: u16,
    pub offset: u32,
    pub dma_high: u32,
    /// Every file's name, in the order added.
    pub files: Vec<String>,
    /// The writable files' contents, by name.
    pub written: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgStateError {
    #[error("the snapshot's fw_cfg files {saved:?} differ from this machine's {ours:?}")]
    Files {
        saved: Vec<String>,
        ours: Vec<String>,
    },
    #[error("the snapshot's fw_cfg file {0:?} is not a writable file of this size here")]
    Written(String),
}

impl Persist for FwCfg {
    type State = FwCfgState;
    /// The device as the machine's configuration builds it.
    type Args = FwCfg;
    type Error = FwCfgStateError;

    fn save(&self) -> FwCfgState {
        let written = self
            .files
            .iter()
            .filter_map(|(name, key)| {
                let item = self.items.get(key)?;
                item.writable.then(|| (name.clone(), item.data.clone()))
            })
            .collect();
        FwCfgState {
            selector: self.selector,
            offset: self.offset,
            dma_high: self.dma_high,
            files: self.files.iter().map(|(n, _)| n.clone()).collect(),
            written,
        }
    }

    fn restore(mut dev: FwCfg, s: &FwCfgState) -> Result<Self, FwCfgStateError> {
        let ours: Vec<String> = dev.files.iter().map(|(n, _)| n.clone()).collect();
        if ours != s.files {
            return Err(FwCfgStateError::Files {
                saved: s.files.clone(),
                ours,
            });
        }
        for (name, data) in &s.written {
            let key = dev
                .files
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, k)| *k)
                .ok_or_else(|| FwCfgStateError::Written(name.clone()))?;
            match dev.items.get_mut(&key) {
                Some(item) if item.writable && item.data.len() == data.len() => {
                    item.data.copy_from_slice(data);
                }
                _ => return Err(FwCfgStateError::Written(name.clone())),
            }
        }
        dev.selector = s.selector;
        dev.offset = s.offset;
        dev.dma_high = s.dma_high;
        Ok(dev)
    }
}

#[cfg(test)]
mod tests;
