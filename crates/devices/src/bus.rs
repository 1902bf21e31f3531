//! Address-range dispatch for port I/O and MMIO.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a [`Bus`]. `base` is the start of the range that matched
/// (a device may sit on several ranges) and `offset` the distance from it.
pub trait BusDevice: Send {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps a device at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("bus range at {0:#x} is empty or wraps around")]
    BadRange(u64),
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each served by a device.
/// Cloning yields another handle to the same bus.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: Arc<RwLock<BTreeMap<u64, Entry>>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        f.debug_list()
            .entries(ranges.iter().map(|(b, e)| (*b, e.len)))
            .finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `base..base+len`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::BadRange(base));
        }
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        let before = ranges.range(..base + len).next_back();
        if let Some((&other, entry)) = before {
            if other + entry.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (&base, entry) = ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then(|| (base, entry.device.clone()))
    }

    /// Dispatches a read; returns false (leaving `data` as all ones, what
    /// an empty bus reads as) when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((base, device)) => {
                let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
                device.read(base, addr - base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((base, device)) => {
                let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
                device.write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            data.fill((base + offset).to_le_bytes()[0]);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.writes.push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x10, 4).unwrap();
        bus.insert(dev.clone(), 0x40, 1).unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x13, &mut b));
        assert_eq!(b, [0x13, 0x13]);
        assert!(bus.write(0x40, &[7]));
        assert!(bus.write(0x11, &[1, 2]));
        assert_eq!(
            dev.lock().unwrap().writes,
            vec![(0x40, 0, vec![7]), (0x10, 1, vec![1, 2])]
        );
    }

    #[test]
    fn unclaimed_reads_are_all_ones() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x10, 4)
            .unwrap();
        let mut b = [0u8; 4];
        assert!(!bus.read(0x14, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.read(0xf, &mut b));
        assert!(!bus.write(0x0, &[1]));
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev(), 0x10, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x1f, 2),
            Err(BusError::Overlap {
                base: 0x1f,
                len: 2,
                other: 0x10
            })
        );
        assert!(bus.insert(dev(), 0x8, 0x9).is_err());
        assert!(bus.insert(dev(), 0x8, 0x8).is_ok());
        assert!(bus.insert(dev(), 0x20, 1).is_ok());
        assert_eq!(bus.insert(dev(), 0x30, 0), Err(BusError::BadRange(0x30)));
        assert_eq!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::BadRange(u64::MAX))
        );
    }
}
