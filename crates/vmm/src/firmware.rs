//! Booting through firmware (`--firmware bios|uefi|FILE`, a `pc` machine):
//! the image is mapped as the ROM that ends at 4 GiB (where the CPU's
//! reset vector is), and a legacy BIOS image (up to 256 KiB) also sits in
//! RAM just below 1 MiB — the area, plain RAM on this machine, that a
//! BIOS shadows itself into (SeaBIOS copies itself there once its
//! chipset's PAM registers make it writable; with no PAM to emulate, the
//! copy is made here), and a fw_cfg device hands the firmware the memory map,
//! the CPU count, the ACPI tables (through the table loader) and, when a
//! kernel is given, the kernel. The CMOS holds the memory sizes too.

use std::path::{Path, PathBuf};

use devices::fw_cfg::{key, loader, FwCfg};
use vm_memory::{Bytes, GuestAddress};

use crate::error::VmmError;

pub mod linuxboot;

/// Debian's SeaBIOS (package `seabios`).
pub const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";
/// Debian's OVMF as one image, code and variables (package `ovmf`).
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
/// The largest firmware image: the 16 MiB below 4 GiB.
pub const MAX_IMAGE: u64 = 16 << 20;
/// Images up to this size are copied whole below 1 MiB (a legacy BIOS);
/// of larger ones (UEFI), the last 128 KiB, as the ISA BIOS window shows.
const LOW_COPY_WHOLE: usize = 256 << 10;
const LOW_COPY_TAIL: usize = 128 << 10;

/// Which firmware.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Firmware {
    /// SeaBIOS.
    Bios,
    /// OVMF.
    Uefi,
    /// Another image.
    File(PathBuf),
}

impl Firmware {
    /// The image to load.
    pub fn image(&self) -> PathBuf {
        match self {
            Firmware::Bios => PathBuf::from(SEABIOS),
            Firmware::Uefi => PathBuf::from(OVMF),
            Firmware::File(p) => p.clone(),
        }
    }
}

impl std::str::FromStr for Firmware {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "bios" => Firmware::Bios,
            "uefi" => Firmware::Uefi,
            "" => return Err("an empty firmware name (expected bios, uefi or a file)".into()),
            path => Firmware::File(PathBuf::from(path)),
        })
    }
}

impl From<Firmware> for String {
    fn from(f: Firmware) -> String {
        match f {
            Firmware::Bios => "bios".into(),
            Firmware::Uefi => "uefi".into(),
            Firmware::File(p) => p.display().to_string(),
        }
    }
}

impl TryFrom<String> for Firmware {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// Reads a firmware image, checking it can be one.
pub fn read_image(path: &Path) -> Result<Vec<u8>, VmmError> {
    let bad = |why: String| VmmError::Firmware(format!("{}: {why}", path.display()));
    let data = std::fs::read(path).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound && path == Path::new(SEABIOS) {
            " (install Debian's seabios package)"
        } else if e.kind() == std::io::ErrorKind::NotFound && path == Path::new(OVMF) {
            " (install Debian's ovmf package)"
        } else {
            ""
        };
        bad(format!("{e}{hint}"))
    })?;
    let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
    if len == 0 || len % 4096 != 0 || len > MAX_IMAGE {
        return Err(bad(format!(
            "{len} bytes is not a firmware image (a multiple of 4 KiB, at most 16 MiB)"
        )));
    }
    Ok(data)
}

/// Where the ROM starts: it ends at 4 GiB.
pub fn rom_base(image_len: u64) -> u64 {
    (1u64 << 32) - image_len
}

/// Copies the image (or its tail) to RAM just below 1 MiB, where real
/// mode code expects the BIOS (the reset vector jumps there) and where
/// SeaBIOS's 32-bit code runs.
pub fn copy_low(mem: &hypervisor::GuestMemoryMmap, image: &[u8]) -> Result<(), VmmError> {
    let n = if image.len() <= LOW_COPY_WHOLE {
        image.len()
    } else {
        LOW_COPY_TAIL
    };
    let tail = &image[image.len() - n..];
    let at = 0x10_0000 - u64::try_from(n).unwrap_or(0);
    mem.write_slice(tail, GuestAddress(at))
        .map_err(|e| VmmError::GuestMemory(e.to_string()))
}

/// A kernel the firmware boots (a bzImage, its initrd and command line).
#[derive(Clone, Copy, Debug)]
pub struct KernelForFirmware<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
}

/// What the firmware is told.
pub struct FirmwareInfo<'a> {
    pub cpus: u32,
    /// RAM below and above the 4 GiB hole.
    pub below_4g: u64,
    pub above_4g: u64,
    pub acpi: &'a arch::acpi::AcpiTables,
}

/// The fw_cfg device with everything the firmware reads.
pub fn fw_cfg(mem: hypervisor::GuestMemoryMmap, info: &FirmwareInfo) -> Result<FwCfg, VmmError> {
    let err = |e: &dyn std::fmt::Display| VmmError::Firmware(format!("fw_cfg: {e}"));
    let mut fw = FwCfg::new(mem);
    let cpus = u16::try_from(info.cpus).unwrap_or(u16::MAX);
    fw.set_item(key::NB_CPUS, cpus.to_le_bytes().to_vec())
        .map_err(|e| err(&e))?;
    fw.set_item(key::MAX_CPUS, cpus.to_le_bytes().to_vec())
        .map_err(|e| err(&e))?;
    let ram = info.below_4g + info.above_4g;
    fw.set_item(key::RAM_SIZE, ram.to_le_bytes().to_vec())
        .map_err(|e| err(&e))?;
    fw.add_file("etc/e820", e820(info.below_4g, info.above_4g), false)
        .map_err(|e| err(&e))?;
    let t = info.acpi;
    loader::install_acpi(
        &mut fw,
        loader::AcpiFiles {
            rsdp: t.rsdp().to_vec(),
            tables: t.blob().to_vec(),
            pointers: t
                .pointers()
                .iter()
                .map(|p| (p.in_rsdp, p.offset, p.size))
                .collect(),
            checksums: t
                .checksums()
                .iter()
                .map(|c| (c.in_rsdp, c.offset, c.start, c.len))
                .collect(),
        },
    )
    .map_err(|e| err(&e))?;
    Ok(fw)
}

/// `etc/e820`: the RAM ranges as QEMU lists them to firmware (address,
/// length, type; little-endian, 20 bytes each). Firmware reserves its own
/// areas in what it passes on.
fn e820(below_4g: u64, above_4g: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut entry = |addr: u64, len: u64| {
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes()); // RAM
    };
    entry(0, below_4g);
    if above_4g > 0 {
        entry(1 << 32, above_4g);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_files_parse_and_round_trip() {
        assert_eq!("bios".parse::<Firmware>().unwrap(), Firmware::Bios);
        assert_eq!("uefi".parse::<Firmware>().unwrap(), Firmware::Uefi);
        let f: Firmware = "/x/fw.bin".parse().unwrap();
        assert_eq!(f.image(), PathBuf::from("/x/fw.bin"));
        let json = serde_json::to_string(&Firmware::Bios).unwrap();
        assert_eq!(json, "\"bios\"");
        assert!("".parse::<Firmware>().is_err());
    }

    #[test]
    fn bad_images_are_refused_clearly() {
        let dir = std::env::temp_dir().join(format!("hv-fw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let odd = dir.join("odd.bin");
        std::fs::write(&odd, [0u8; 1000]).unwrap();
        let e = read_image(&odd).unwrap_err().to_string();
        assert!(e.contains("not a firmware image"), "{e}");
        let e = read_image(&dir.join("missing.bin"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.bin"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_memory_map_lists_ram_below_and_above_the_hole() {
        let m = e820(0xc000_0000, 1 << 30);
        assert_eq!(m.len(), 40);
        assert_eq!(u64::from_le_bytes(m[20..28].try_into().unwrap()), 1 << 32);
        assert_eq!(u64::from_le_bytes(m[28..36].try_into().unwrap()), 1 << 30);
        assert_eq!(e820(256 << 20, 0).len(), 20);
        assert_eq!(rom_base(256 << 10), 0xfffc_0000);
    }
}
