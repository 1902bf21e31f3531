//! 2D resources: a host copy of the guest's image (as 0xAARRGGBB pixels)
//! and the guest-physical scatter list behind it (its *backing*). The
//! backing is only a list of addresses: every transfer reads it through
//! guest memory again, so no host pointer into guest RAM outlives a
//! request.

use memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::protocol::{MemEntry, Rect};

/// The widest or tallest resource.
pub const MAX_DIM: u32 = 16384;
/// The largest resource, in host bytes (an 8K frame fits).
pub const MAX_RESOURCE_BYTES: usize = 128 << 20;
/// What one backing entry costs the host (the entry and its end offset).
pub const ENTRY_COST: usize = 24;

/// The pixel formats of the protocol (all 32 bits per pixel), named by
/// their bytes in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    B8G8R8A8,
    B8G8R8X8,
    A8R8G8B8,
    X8R8G8B8,
    R8G8B8A8,
    X8B8G8R8,
    A8B8G8R8,
    R8G8B8X8,
}

impl Format {
    pub fn from_wire(v: u32) -> Option<Format> {
        Some(match v {
            1 => Format::B8G8R8A8,
            2 => Format::B8G8R8X8,
            3 => Format::A8R8G8B8,
            4 => Format::X8R8G8B8,
            67 => Format::R8G8B8A8,
            68 => Format::X8B8G8R8,
            121 => Format::A8B8G8R8,
            134 => Format::R8G8B8X8,
            _ => return None,
        })
    }

    pub fn to_wire(self) -> u32 {
        match self {
            Format::B8G8R8A8 => 1,
            Format::B8G8R8X8 => 2,
            Format::A8R8G8B8 => 3,
            Format::X8R8G8B8 => 4,
            Format::R8G8B8A8 => 67,
            Format::X8B8G8R8 => 68,
            Format::A8B8G8R8 => 121,
            Format::R8G8B8X8 => 134,
        }
    }

    /// One pixel's four bytes in this format as 0xAARRGGBB (alpha 0xff
    /// for the X formats).
    pub fn to_argb(self, p: [u8; 4]) -> u32 {
        let argb = |a: u8, r: u8, g: u8, b: u8| u32::from_be_bytes([a, r, g, b]);
        match self {
            Format::B8G8R8A8 => argb(p[3], p[2], p[1], p[0]),
            Format::B8G8R8X8 => argb(0xff, p[2], p[1], p[0]),
            Format::A8R8G8B8 => argb(p[0], p[1], p[2], p[3]),
            Format::X8R8G8B8 => argb(0xff, p[1], p[2], p[3]),
            Format::R8G8B8A8 => argb(p[3], p[0], p[1], p[2]),
            Format::X8B8G8R8 => argb(0xff, p[3], p[2], p[1]),
            Format::A8B8G8R8 => argb(p[0], p[3], p[2], p[1]),
            Format::R8G8B8X8 => argb(0xff, p[0], p[1], p[2]),
        }
    }
}

/// Bytes per pixel of every supported format.
pub const BPP: u64 = 4;

/// A resource's guest-physical pages, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    entries: Vec<MemEntry>,
    /// `ends[i]`: the offset just past entry `i` in the backing.
    ends: Vec<u64>,
}

/// Why a backing cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingError {
    /// An entry lies (partly) outside guest RAM.
    OutsideRam,
    /// The entries hold fewer bytes than asked for.
    TooShort,
}

impl Backing {
    /// A backing of `entries`, each wholly in `mem` (overlapping entries
    /// are allowed: they only alias guest pages).
    pub fn new(entries: Vec<MemEntry>, mem: &GuestMemoryMmap) -> Result<Backing, BackingError> {
        if entries.iter().any(|e| {
            e.len != 0
                && !GuestMemoryBackend::check_range(mem, GuestAddress(e.addr), e.len as usize)
        }) {
            return Err(BackingError::OutsideRam);
        }
        Ok(Backing::unchecked(entries))
    }

    /// A backing whose entries are checked when read (a restored one).
    pub fn unchecked(entries: Vec<MemEntry>) -> Backing {
        let mut at = 0u64;
        let ends = entries
            .iter()
            .map(|e| {
                at += u64::from(e.len);
                at
            })
            .collect();
        Backing { entries, ends }
    }

    pub fn entries(&self) -> &[MemEntry] {
        &self.entries
    }

    /// The bytes the entries hold together.
    pub fn len(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the backing costs the host.
    pub fn cost(&self) -> usize {
        self.entries.len() * ENTRY_COST
    }

    /// Reads `buf.len()` bytes at `offset` of the backing from guest
    /// memory.
    pub fn read(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), BackingError> {
        let mut i = self.ends.partition_point(|&end| end <= offset);
        let mut at = offset;
        let mut done = 0usize;
        while done < buf.len() {
            let (Some(entry), Some(&end)) = (self.entries.get(i), self.ends.get(i)) else {
                return Err(BackingError::TooShort);
            };
            let start = end - u64::from(entry.len);
            let skip = at - start;
            let avail = usize::try_from(end - at).unwrap_or(usize::MAX);
            let n = avail.min(buf.len() - done);
            let addr = entry
                .addr
                .checked_add(skip)
                .ok_or(BackingError::OutsideRam)?;
            mem.read_slice(&mut buf[done..done + n], GuestAddress(addr))
                .map_err(|_| BackingError::OutsideRam)?;
            done += n;
            at += n as u64;
            i += 1;
        }
        Ok(())
    }
}

/// One 2D resource.
#[derive(Debug)]
pub struct Resource {
    pub format: Format,
    pub width: u32,
    pub height: u32,
    /// The host copy, row by row, as 0xAARRGGBB.
    pub pixels: Vec<u32>,
    pub backing: Option<Backing>,
}

/// The host bytes a `width`×`height` resource takes, if it may exist.
pub fn resource_bytes(width: u32, height: u32) -> Option<usize> {
    if width == 0 || height == 0 || width > MAX_DIM || height > MAX_DIM {
        return None;
    }
    (width as usize)
        .checked_mul(height as usize)?
        .checked_mul(4)
}

/// Zeroed pixels. The allocation is zeroed lazily by the kernel (a
/// resource costs host memory only where the guest draws); every count
/// handed here is bounded by the device's limits first. `None` is kept
/// for callers that refuse what cannot be made.
pub fn alloc_pixels(count: usize) -> Option<Vec<u32>> {
    Some(vec![0u32; count])
}

impl Resource {
    pub fn bytes(&self) -> usize {
        self.pixels.len() * 4
    }

    /// Copies `rect` (within the resource) from the backing: row `r` of
    /// the rectangle starts at `offset + r × stride` in the backing, the
    /// stride being a whole row of the resource (how Linux lays out its
    /// buffers).
    pub fn transfer(
        &mut self,
        mem: &GuestMemoryMmap,
        rect: Rect,
        offset: u64,
    ) -> Result<(), TransferError> {
        if !rect.fits_in(self.width, self.height) {
            return Err(TransferError::Rect);
        }
        let backing = self.backing.as_ref().ok_or(TransferError::NoBacking)?;
        if rect.is_empty() {
            return Ok(());
        }
        let stride = u64::from(self.width) * BPP;
        let row_len = u64::from(rect.width) * BPP;
        // The last byte the transfer reads, in 64 bits: every factor is
        // at most 2^32, the offset is the guest's.
        let end = (u64::from(rect.height) - 1)
            .checked_mul(stride)
            .and_then(|v| v.checked_add(row_len))
            .and_then(|v| v.checked_add(offset))
            .ok_or(TransferError::Backing(BackingError::TooShort))?;
        if end > backing.len() {
            return Err(TransferError::Backing(BackingError::TooShort));
        }
        let mut row = vec![0u8; usize::try_from(row_len).map_err(|_| TransferError::Rect)?];
        let width = self.width as usize;
        for r in 0..rect.height {
            let src = offset + u64::from(r) * stride;
            backing
                .read(mem, src, &mut row)
                .map_err(TransferError::Backing)?;
            let y = (rect.y + r) as usize;
            let start = y * width + rect.x as usize;
            let dst = self
                .pixels
                .get_mut(start..start + rect.width as usize)
                .ok_or(TransferError::Rect)?;
            for (d, p) in dst.iter_mut().zip(row.chunks_exact(4)) {
                *d = self.format.to_argb([p[0], p[1], p[2], p[3]]);
            }
        }
        Ok(())
    }

    /// Reads the whole image from the backing, laid out as Linux lays it
    /// out (a restored resource: its host copy was not saved).
    pub fn reload(&mut self, mem: &GuestMemoryMmap) -> Result<(), TransferError> {
        let whole = Rect::new(0, 0, self.width, self.height);
        self.transfer(mem, whole, 0)
    }
}

/// Why a transfer failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferError {
    /// The rectangle is not within the resource.
    Rect,
    /// The resource has no backing.
    NoBacking,
    Backing(BackingError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap()
    }

    #[test]
    fn formats_convert_to_argb() {
        let p = [0x11, 0x22, 0x33, 0x44];
        let cases = [
            (1, 0x4433_2211),
            (2, 0xff33_2211),
            (3, 0x1122_3344),
            (4, 0xff22_3344),
            (67, 0x4411_2233),
            (68, 0xff44_3322),
            (121, 0x1144_3322),
            (134, 0xff11_2233),
        ];
        for (wire, argb) in cases {
            let f = Format::from_wire(wire).unwrap();
            assert_eq!(f.to_wire(), wire);
            assert_eq!(f.to_argb(p), argb, "{f:?}");
        }
        assert_eq!(Format::from_wire(0), None);
        assert_eq!(Format::from_wire(5), None);
    }

    /// Reads cross entries, skip empty ones, and stop at the end.
    #[test]
    fn backing_reads_span_entries() {
        let m = mem();
        m.write_slice(&[1, 2, 3, 4], GuestAddress(0x1000)).unwrap();
        m.write_slice(&[5, 6, 7, 8], GuestAddress(0x3000)).unwrap();
        let b = Backing::new(
            vec![
                MemEntry {
                    addr: 0x1000,
                    len: 4,
                },
                MemEntry {
                    addr: 0x9999,
                    len: 0,
                },
                MemEntry {
                    addr: 0x3000,
                    len: 4,
                },
            ],
            &m,
        )
        .unwrap();
        assert_eq!(b.len(), 8);
        let mut buf = [0u8; 6];
        b.read(&m, 1, &mut buf).unwrap();
        assert_eq!(buf, [2, 3, 4, 5, 6, 7]);
        assert_eq!(b.read(&m, 4, &mut [0u8; 5]), Err(BackingError::TooShort));
        assert_eq!(
            b.read(&m, u64::MAX, &mut [0u8; 1]),
            Err(BackingError::TooShort)
        );
        b.read(&m, 8, &mut []).unwrap();
        // Entries outside RAM are refused whole.
        for e in [
            MemEntry {
                addr: 0xf000,
                len: 0x2000,
            },
            MemEntry {
                addr: u64::MAX,
                len: 1,
            },
        ] {
            assert_eq!(Backing::new(vec![e], &m), Err(BackingError::OutsideRam));
        }
    }

    #[test]
    fn sizes_are_capped() {
        assert_eq!(resource_bytes(0, 1), None);
        assert_eq!(resource_bytes(MAX_DIM + 1, 1), None);
        assert_eq!(resource_bytes(640, 480), Some(640 * 480 * 4));
        assert_eq!(resource_bytes(MAX_DIM, MAX_DIM), Some(1 << 30));
    }
}
