//! A kernel handed to firmware (`--firmware bios --kernel bzImage`): the
//! kernel's real-mode setup, its protected-mode part, the initrd and the
//! command line go into fw_cfg items, and QEMU's `linuxboot_dma.bin`
//! option ROM (Debian's qemu-system-data; it is firmware-side code, run
//! by SeaBIOS like any option ROM) reads them by DMA to where the Linux
//! x86 boot protocol wants them and starts the setup code — the same
//! items and ROM QEMU uses, so the same firmware works unchanged.
//!
//! Hand-written: the boot protocol's header fields are a handful of
//! offsets (Documentation/arch/x86/boot.rst), and linux-loader loads
//! kernels into guest memory, not into fw_cfg items.

use std::path::Path;

use devices::fw_cfg::{key, FwCfg};

use crate::error::VmmError;

/// Debian's copy of QEMU's option ROM.
pub const LINUXBOOT_ROM: &str = "/usr/share/qemu/linuxboot_dma.bin";

/// Where the setup code, command line and kernel go (protocol ≥ 2.02 with
/// a high-loaded kernel, as QEMU places them).
const SETUP_ADDR: u32 = 0x1_0000;
const CMDLINE_ADDR: u32 = 0x2_0000;
const KERNEL_ADDR: u32 = 0x10_0000;

/// Setup header offsets (from the start of the bzImage).
const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC: usize = 0x202;
const VERSION: usize = 0x206;
const TYPE_OF_LOADER: usize = 0x210;
const LOADFLAGS: usize = 0x211;
const RAMDISK_IMAGE: usize = 0x218;
const RAMDISK_SIZE: usize = 0x21c;
const HEAP_END_PTR: usize = 0x224;
const CMD_LINE_PTR: usize = 0x228;
const INITRD_ADDR_MAX: usize = 0x22c;

const LOADED_HIGH: u8 = 0x01;
const CAN_USE_HEAP: u8 = 0x80;

fn bad(path: &Path, why: &str) -> VmmError {
    VmmError::Firmware(format!("{}: {why}", path.display()))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Puts `kernel` (a bzImage), `initrd` and `cmdline` into `fw` with the
/// option ROM that boots them. `low_ram` is the RAM below 4 GiB.
pub fn add_kernel(
    fw: &mut FwCfg,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    low_ram: u64,
) -> Result<(), VmmError> {
    let err = |e: &dyn std::fmt::Display| VmmError::Firmware(format!("fw_cfg: {e}"));
    let mut image = std::fs::read(kernel).map_err(|e| bad(kernel, &e.to_string()))?;
    if image.len() < 0x400 || &image[HEADER_MAGIC..HEADER_MAGIC + 4] != b"HdrS" {
        return Err(bad(
            kernel,
            "a kernel booted through firmware must be a bzImage (an ELF vmlinux boots directly, without --firmware)",
        ));
    }
    let version = u16_at(&image, VERSION);
    if version < 0x0202 || image[LOADFLAGS] & LOADED_HIGH == 0 {
        return Err(bad(
            kernel,
            "boot protocol before 2.02 or a zImage: too old",
        ));
    }
    let sects = match image[SETUP_SECTS] {
        0 => 4,
        n => usize::from(n),
    };
    let setup_len = (sects + 1) * 512;
    if setup_len >= image.len() {
        return Err(bad(kernel, "the setup code is longer than the image"));
    }
    let cmdline_len = u32::try_from(cmdline.len() + 1).unwrap_or(u32::MAX);
    if cmdline.len() >= 0x1_0000 - 0x200 {
        return Err(VmmError::Firmware(
            "the kernel command line is too long".into(),
        ));
    }

    image[TYPE_OF_LOADER] = 0xb0; // "QEMU", which linuxboot_dma.bin is
    image[LOADFLAGS] |= CAN_USE_HEAP;
    let heap_end = u16::try_from(CMDLINE_ADDR - SETUP_ADDR - 0x200).unwrap_or(0);
    image[HEAP_END_PTR..HEAP_END_PTR + 2].copy_from_slice(&heap_end.to_le_bytes());
    put32(&mut image, CMD_LINE_PTR, CMDLINE_ADDR);

    if let Some(path) = initrd {
        let data = std::fs::read(path).map_err(|e| bad(path, &e.to_string()))?;
        let max = if version >= 0x0203 {
            u64::from(u32_at(&image, INITRD_ADDR_MAX))
        } else {
            0x37ff_ffff
        };
        let size = u64::try_from(data.len()).unwrap_or(u64::MAX);
        // Top of low RAM (less what firmware keeps at its end), page
        // aligned, under the kernel's limit.
        let top = (low_ram.saturating_sub(1 << 20)).min(max + 1);
        let addr = top.checked_sub(size).map(|a| a & !0xfff).filter(|&a| {
            a >= u64::from(KERNEL_ADDR) + u64::try_from(image.len()).unwrap_or(u64::MAX)
        });
        let Some(addr) = addr.and_then(|a| u32::try_from(a).ok()) else {
            return Err(bad(
                path,
                "the initrd does not fit in RAM below the kernel's limit",
            ));
        };
        put32(&mut image, RAMDISK_IMAGE, addr);
        put32(
            &mut image,
            RAMDISK_SIZE,
            u32::try_from(size).unwrap_or(u32::MAX),
        );
        let data_len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        fw.set_item(key::INITRD_ADDR, addr.to_le_bytes().to_vec())
            .map_err(|e| err(&e))?;
        fw.set_item(key::INITRD_SIZE, data_len.to_le_bytes().to_vec())
            .map_err(|e| err(&e))?;
        fw.set_item(key::INITRD_DATA, data).map_err(|e| err(&e))?;
    }

    let kernel_part = image.split_off(setup_len);
    let u32_len = |v: &Vec<u8>| u32::try_from(v.len()).unwrap_or(u32::MAX);
    let items = [
        (key::SETUP_ADDR, SETUP_ADDR.to_le_bytes().to_vec()),
        (key::SETUP_SIZE, u32_len(&image).to_le_bytes().to_vec()),
        (key::KERNEL_ADDR, KERNEL_ADDR.to_le_bytes().to_vec()),
        (
            key::KERNEL_SIZE,
            u32_len(&kernel_part).to_le_bytes().to_vec(),
        ),
        (key::CMDLINE_ADDR, CMDLINE_ADDR.to_le_bytes().to_vec()),
        (key::CMDLINE_SIZE, cmdline_len.to_le_bytes().to_vec()),
    ];
    for (k, v) in items {
        fw.set_item(k, v).map_err(|e| err(&e))?;
    }
    let mut text = cmdline.as_bytes().to_vec();
    text.push(0);
    fw.set_item(key::CMDLINE_DATA, text).map_err(|e| err(&e))?;
    fw.set_item(key::SETUP_DATA, image).map_err(|e| err(&e))?;
    fw.set_item(key::KERNEL_DATA, kernel_part)
        .map_err(|e| err(&e))?;

    let rom = std::fs::read(LINUXBOOT_ROM).map_err(|e| {
        bad(
            Path::new(LINUXBOOT_ROM),
            &format!("{e} (install Debian's qemu-system-data package)"),
        )
    })?;
    fw.add_file("genroms/linuxboot_dma.bin", rom, false)
        .map_err(|e| err(&e))?;
    // Boot the kernel first, before any disk.
    fw.add_file(
        "bootorder",
        b"/rom@genroms/linuxboot_dma.bin\n\0".to_vec(),
        false,
    )
    .map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    fn fw() -> FwCfg {
        FwCfg::new(hypervisor::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
    }

    /// Reads `len` bytes of item `key` through the I/O ports.
    fn item(fw: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
        use devices::BusDevice;
        fw.write(0x510, 0, &key.to_le_bytes());
        (0..len)
            .map(|_| {
                let mut b = [0u8];
                fw.read(0x510, 1, &mut b);
                b[0]
            })
            .collect()
    }

    /// A minimal bzImage: a setup header and a few sectors of "kernel".
    fn bzimage(dir: &Path) -> std::path::PathBuf {
        let mut b = vec![0u8; 5 * 512 + 4096];
        b[SETUP_SECTS] = 4;
        b[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        b[VERSION..VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        b[LOADFLAGS] = LOADED_HIGH;
        b[INITRD_ADDR_MAX..INITRD_ADDR_MAX + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        let p = dir.join("bzImage");
        std::fs::write(&p, b).unwrap();
        p
    }

    #[test]
    fn a_bzimage_becomes_the_items_linuxboot_reads() {
        if !Path::new(LINUXBOOT_ROM).exists() {
            eprintln!("SKIPPED: {LINUXBOOT_ROM} is not installed");
            assert!(
                std::env::var_os("HOSTVISOR_REQUIRE_FIRMWARE").is_none(),
                "HOSTVISOR_REQUIRE_FIRMWARE is set"
            );
            return;
        }
        let dir = std::env::temp_dir().join(format!("hv-linuxboot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = bzimage(&dir);
        let initrd = dir.join("initrd");
        std::fs::write(&initrd, vec![7u8; 10_000]).unwrap();
        let mut fw = fw();
        add_kernel(&mut fw, &kernel, Some(&initrd), "console=ttyS0", 256 << 20).unwrap();
        assert!(fw.file("genroms/linuxboot_dma.bin").is_some());
        let setup = item(&mut fw, key::SETUP_DATA, 5 * 512);
        assert_eq!(setup[TYPE_OF_LOADER], 0xb0);
        assert_eq!(u32_at(&setup, CMD_LINE_PTR), CMDLINE_ADDR);
        let initrd_at = u32_at(&setup, RAMDISK_IMAGE);
        assert_eq!(initrd_at % 4096, 0);
        assert!(u64::from(initrd_at) + 10_000 <= (256 << 20) - (1 << 20));
        assert_eq!(u32_at(&setup, RAMDISK_SIZE), 10_000);
        assert_eq!(item(&mut fw, key::INITRD_ADDR, 4), initrd_at.to_le_bytes());
        assert_eq!(item(&mut fw, key::KERNEL_SIZE, 4), 4096u32.to_le_bytes());
        assert_eq!(item(&mut fw, key::SETUP_SIZE, 4), 2560u32.to_le_bytes());
        assert_eq!(item(&mut fw, key::CMDLINE_DATA, 14), b"console=ttyS0\0");
        assert_eq!(
            fw.file("bootorder").unwrap(),
            b"/rom@genroms/linuxboot_dma.bin\n\0"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_elf_kernel_is_refused_with_a_hint() {
        let dir = std::env::temp_dir().join(format!("hv-linuxboot-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let elf = dir.join("vmlinux");
        let mut b = vec![0u8; 0x1000];
        b[..4].copy_from_slice(b"\x7fELF");
        std::fs::write(&elf, b).unwrap();
        let e = add_kernel(&mut fw(), &elf, None, "", 256 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be a bzImage"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
