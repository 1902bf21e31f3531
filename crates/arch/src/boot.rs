//! Loading a Linux kernel and initrd, and the boot_params ("zero page")
//! that the 64-bit boot protocol hands the kernel: command line, initrd,
//! and the e820 memory map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::{ArchError, GuestMemoryMmap, Result};

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The format of a kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux`, entered at its ELF entry point.
    Elf,
    /// A `bzImage`, entered at its 64-bit entry (load address + 0x200).
    BzImage,
}

/// A kernel loaded into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// The 64-bit entry point.
    pub entry: u64,
    /// The first guest address after the kernel.
    pub end: u64,
    /// The bzImage's setup header, to be copied into boot_params.
    pub setup_header: Option<setup_header>,
}

/// Tells the format of a kernel image from its first bytes.
pub fn probe_kernel_format(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(b"\x7fELF") {
        Some(KernelFormat::Elf)
    } else if head.get(0x202..0x206) == Some(b"HdrS") {
        Some(KernelFormat::BzImage)
    } else {
        None
    }
}

/// Loads the kernel at `path` into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel> {
    let name = path.display().to_string();
    let read_err = |source| ArchError::ReadKernel {
        path: name.clone(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let mut head = vec![0u8; 0x400];
    let n = read_up_to(&mut file, &mut head).map_err(read_err)?;
    head.truncate(n);
    let format = probe_kernel_format(&head).ok_or(ArchError::NotAKernel { path: name.clone() })?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let highmem = Some(GuestAddress(HIGH_MEMORY_START));
    let result = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut file, highmem),
        KernelFormat::BzImage => BzImage::load(mem, None, &mut file, highmem),
    }
    .map_err(|e| ArchError::LoadKernel {
        path: name,
        reason: e.to_string(),
    })?;
    let entry = match format {
        KernelFormat::Elf => result.kernel_load.0,
        KernelFormat::BzImage => result.kernel_load.0 + 0x200,
    };
    Ok(LoadedKernel {
        format,
        entry,
        end: result.kernel_end,
        setup_header: result.setup_header,
    })
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        match file.read(&mut buf[total..])? {
            0 => break,
            n => total += n,
        }
    }
    Ok(total)
}

/// Where an initrd of `size` bytes goes: page-aligned at the top of RAM
/// below `limit` (the lower of the end of low RAM and what the kernel can
/// address), above the kernel.
pub fn initrd_placement(size: u64, kernel_end: u64, limit: u64) -> Result<u64> {
    let too_large = ArchError::InitrdTooLarge { size, limit };
    let addr = limit.checked_sub(size).ok_or(too_large)? & !0xfff;
    if addr < kernel_end {
        return Err(ArchError::InitrdTooLarge { size, limit });
    }
    Ok(addr)
}

/// Loads the initrd at `path`; returns its guest address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    ram_size: u64,
) -> Result<(u64, u64)> {
    let name = path.display().to_string();
    let read_err = |source| ArchError::ReadInitrd {
        path: name.clone(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    // initrd_addr_max is in the header from boot protocol 2.03 on; older
    // kernels (and an ELF vmlinux, which has no header) take the
    // protocol's defaults.
    let max_addr = match kernel.setup_header {
        Some(h) if h.version >= 0x0203 && h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        Some(_) => 0x37ff_ffff,
        None => 0x7fff_ffff,
    };
    let low_ram_end = ram_size.min(MMIO_HOLE_START);
    let addr = initrd_placement(size, kernel.end, low_ram_end.min(max_addr + 1))?;
    let count = usize::try_from(size).map_err(|_| ArchError::InitrdTooLarge {
        size,
        limit: low_ram_end,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, count)
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

/// Checks and writes the kernel command line.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<()> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(ArchError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    if cmdline.contains('\0') {
        return Err(ArchError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|_| ArchError::GuestMemory {
            addr: CMDLINE_START,
        })
}

/// The e820 map for `ram_size` bytes of RAM laid out as [`ram_ranges`].
pub fn e820_map(ram_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, type_| boot_e820_entry {
        addr,
        size,
        r#type: type_,
    };
    let mut map = vec![
        entry(0, MPTABLE_START, E820_RAM),
        entry(MPTABLE_START, EBDA_END - MPTABLE_START, E820_RESERVED),
    ];
    for (start, size) in ram_ranges(ram_size) {
        let start = start.max(HIGH_MEMORY_START);
        let end = if start >= MMIO_HOLE_END {
            start + size
        } else {
            size
        };
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}

/// Builds boot_params for the loaded kernel.
pub fn boot_params(
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    ram_size: u64,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(header) = kernel.setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = 0xff; // "undefined" boot loader
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(ram_size);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    params
}

/// Writes boot_params at [`ZERO_PAGE_START`].
pub fn write_boot_params(mem: &GuestMemoryMmap, params: &boot_params) -> Result<()> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| ArchError::GuestMemory {
            addr: ZERO_PAGE_START,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_formats_are_probed_from_magic() {
        assert_eq!(
            probe_kernel_format(b"\x7fELF\x02\x01"),
            Some(KernelFormat::Elf)
        );
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(probe_kernel_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(probe_kernel_format(b"#!/bin/sh\n"), None);
        assert_eq!(probe_kernel_format(&[]), None);
    }

    #[test]
    fn non_kernel_files_are_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let dir = std::env::temp_dir().join(format!("hv-arch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("not-a-kernel");
        std::fs::write(&file, b"hello").unwrap();
        assert!(matches!(
            load_kernel(&mem, &file),
            Err(ArchError::NotAKernel { .. })
        ));
        // A truncated ELF is an error, not a panic.
        std::fs::write(&file, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(matches!(
            load_kernel(&mem, &file),
            Err(ArchError::LoadKernel { .. })
        ));
        assert!(matches!(
            load_kernel(&mem, &dir.join("missing")),
            Err(ArchError::ReadKernel { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn e820_for_small_and_large_memory() {
        let small = e820_map(64 << 20);
        let t = |m: &[boot_e820_entry]| {
            m.iter()
                .map(|e| (e.addr, e.size, e.r#type))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            t(&small),
            vec![
                (0, MPTABLE_START, E820_RAM),
                (MPTABLE_START, EBDA_END - MPTABLE_START, E820_RESERVED),
                (HIGH_MEMORY_START, (64 << 20) - HIGH_MEMORY_START, E820_RAM),
            ]
        );
        let large = e820_map(6 << 30);
        assert_eq!(
            t(&large)[2..],
            [
                (
                    HIGH_MEMORY_START,
                    MMIO_HOLE_START - HIGH_MEMORY_START,
                    E820_RAM
                ),
                (1 << 32, (6 << 30) - MMIO_HOLE_START, E820_RAM),
            ]
        );
    }

    #[test]
    fn initrd_goes_high_and_must_fit() {
        assert_eq!(
            initrd_placement(0x1800, 0x200_0000, 0x400_0000).unwrap(),
            0x3ff_e000
        );
        assert!(matches!(
            initrd_placement(0x300_0000, 0x200_0000, 0x400_0000),
            Err(ArchError::InitrdTooLarge { .. })
        ));
        assert!(initrd_placement(u64::MAX, 0, 0x400_0000).is_err());
    }

    #[test]
    fn boot_params_fields() {
        let kernel = LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0x100_0000,
            end: 0x200_0000,
            setup_header: None,
        };
        let p = boot_params(&kernel, 42, Some((0x300_0000, 0x1234)), 64 << 20);
        let hdr = p.hdr;
        assert_eq!(
            (hdr.type_of_loader, hdr.boot_flag, hdr.header),
            (0xff, 0xaa55, 0x5372_6448)
        );
        assert_eq!(
            (hdr.cmd_line_ptr, hdr.cmdline_size),
            (CMDLINE_START as u32, 42)
        );
        assert_eq!((hdr.ramdisk_image, hdr.ramdisk_size), (0x300_0000, 0x1234));
        assert_eq!(p.e820_entries, 3);
    }

    #[test]
    fn cmdline_limits() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        write_cmdline(&mem, "console=ttyS0").unwrap();
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        assert!(matches!(
            write_cmdline(&mem, &"x".repeat(CMDLINE_MAX_SIZE)),
            Err(ArchError::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            write_cmdline(&mem, "a\0b"),
            Err(ArchError::CmdlineNul)
        ));
    }
}
