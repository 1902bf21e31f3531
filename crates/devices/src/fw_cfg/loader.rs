//! The ACPI table loader script (`etc/table-loader`): how firmware learns
//! where to put the tables hostvisor builds and how to link them.
//!
//! The VMM cannot know where the firmware will place tables in guest RAM,
//! so it hands them over as fw_cfg files together with a script of
//! 128-byte commands, which SeaBIOS and OVMF run: allocate a file in a
//! memory zone, add one file's address to a pointer inside another, fix a
//! checksum, and write a file's address back into a writable fw_cfg file
//! (how the VMM learns, for example, where the vmgenid buffer went).
//! The format is QEMU's (`hw/acpi/bios-linker-loader.c`), which both
//! firmwares implement; every field is little-endian.

/// One command's size.
pub const ENTRY_LEN: usize = 128;
const NAME_LEN: usize = super::FILE_NAME_LEN;

const CMD_ALLOCATE: u32 = 1;
const CMD_ADD_POINTER: u32 = 2;
const CMD_ADD_CHECKSUM: u32 = 3;
const CMD_WRITE_POINTER: u32 = 4;

/// Where the firmware puts an allocated file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zone {
    /// Anywhere in RAM (below 4 GiB).
    High = 1,
    /// The F segment (0xF0000–0xFFFFF), where an OS looks for the RSDP
    /// on BIOS machines.
    FSeg = 2,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoaderError {
    #[error("table-loader file name {0:?} is empty or longer than 55 bytes")]
    BadName(String),
    #[error("table-loader pointer size {0} is not 1, 2, 4 or 8")]
    BadSize(u8),
    #[error("table-loader alignment {0} is not a power of two")]
    BadAlign(u32),
}

/// A table-loader script being written.
#[derive(Clone, Debug, Default)]
pub struct TableLoader {
    script: Vec<u8>,
}

impl TableLoader {
    pub fn new() -> Self {
        Self::default()
    }

    /// The script, the contents of the `etc/table-loader` file.
    pub fn bytes(&self) -> &[u8] {
        &self.script
    }

    /// The firmware allocates `file` (a fw_cfg file) aligned to `align`
    /// in `zone` and loads it there.
    pub fn allocate(&mut self, file: &str, align: u32, zone: Zone) -> Result<(), LoaderError> {
        if !align.is_power_of_two() {
            return Err(LoaderError::BadAlign(align));
        }
        let mut e = Entry::new(CMD_ALLOCATE);
        e.name(file)?;
        e.u32(align);
        e.u8(zone as u8);
        self.push(e);
        Ok(())
    }

    /// The `size`-byte little-endian value at `offset` in `dest` gets the
    /// address where `src` was loaded added to it (so a table holds its
    /// neighbour's offset and ends up holding its address).
    pub fn add_pointer(
        &mut self,
        dest: &str,
        src: &str,
        offset: u32,
        size: u8,
    ) -> Result<(), LoaderError> {
        check_size(size)?;
        let mut e = Entry::new(CMD_ADD_POINTER);
        e.name(dest)?;
        e.name(src)?;
        e.u32(offset);
        e.u8(size);
        self.push(e);
        Ok(())
    }

    /// The byte at `offset` in `file` is set so that the bytes
    /// `start..start + length` sum to zero (an ACPI checksum), after the
    /// pointers in them are patched.
    pub fn add_checksum(
        &mut self,
        file: &str,
        offset: u32,
        start: u32,
        length: u32,
    ) -> Result<(), LoaderError> {
        let mut e = Entry::new(CMD_ADD_CHECKSUM);
        e.name(file)?;
        e.u32(offset);
        e.u32(start);
        e.u32(length);
        self.push(e);
        Ok(())
    }

    /// The firmware writes the address of `src_offset` in the loaded
    /// `src` as a `size`-byte value at `dst_offset` in the writable fw_cfg
    /// file `dest`, which the VMM then reads.
    pub fn write_pointer(
        &mut self,
        dest: &str,
        src: &str,
        dst_offset: u32,
        src_offset: u32,
        size: u8,
    ) -> Result<(), LoaderError> {
        check_size(size)?;
        let mut e = Entry::new(CMD_WRITE_POINTER);
        e.name(dest)?;
        e.name(src)?;
        e.u32(dst_offset);
        e.u32(src_offset);
        e.u8(size);
        self.push(e);
        Ok(())
    }

    fn push(&mut self, e: Entry) {
        self.script.extend_from_slice(&e.bytes);
    }
}

/// The fw_cfg file names QEMU uses for ACPI, which firmware expects.
pub const RSDP_FILE: &str = "etc/acpi/rsdp";
pub const TABLES_FILE: &str = "etc/acpi/tables";
pub const LOADER_FILE: &str = "etc/table-loader";

/// ACPI tables as a VMM builds them for firmware: the RSDP and one blob
/// of the other tables whose pointers hold offsets into the blob.
#[derive(Clone, Debug, Default)]
pub struct AcpiFiles {
    pub rsdp: Vec<u8>,
    pub tables: Vec<u8>,
    /// Pointer fields: (in the RSDP, else in the blob; offset; size).
    pub pointers: Vec<(bool, u32, u8)>,
    /// Checksums, in the order to fix them: (in the RSDP, else in the
    /// blob; the checksum byte's offset; the range's start; its length).
    pub checksums: Vec<(bool, u32, u32, u32)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InstallError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    FwCfg(#[from] super::FwCfgError),
}

/// Hands ACPI tables to firmware: the RSDP (in the F segment, where an OS
/// scans for it) and the blob as fw_cfg files, and the table-loader
/// script that places them, patches every pointer with the blob's address
/// and fixes every checksum.
pub fn install_acpi(fw: &mut super::FwCfg, acpi: AcpiFiles) -> Result<(), InstallError> {
    let mut l = TableLoader::new();
    l.allocate(RSDP_FILE, 16, Zone::FSeg)?;
    l.allocate(TABLES_FILE, 64, Zone::High)?;
    let file = |in_rsdp: bool| if in_rsdp { RSDP_FILE } else { TABLES_FILE };
    for &(in_rsdp, offset, size) in &acpi.pointers {
        l.add_pointer(file(in_rsdp), TABLES_FILE, offset, size)?;
    }
    for &(in_rsdp, offset, start, len) in &acpi.checksums {
        l.add_checksum(file(in_rsdp), offset, start, len)?;
    }
    fw.add_file(RSDP_FILE, acpi.rsdp, false)?;
    fw.add_file(TABLES_FILE, acpi.tables, false)?;
    fw.add_file(LOADER_FILE, l.bytes().to_vec(), false)?;
    Ok(())
}

fn check_size(size: u8) -> Result<(), LoaderError> {
    match size {
        1 | 2 | 4 | 8 => Ok(()),
        _ => Err(LoaderError::BadSize(size)),
    }
}

/// One command, filled field after field.
struct Entry {
    bytes: [u8; ENTRY_LEN],
    at: usize,
}

impl Entry {
    fn new(command: u32) -> Self {
        let mut e = Entry {
            bytes: [0; ENTRY_LEN],
            at: 0,
        };
        e.u32(command);
        e
    }

    fn put(&mut self, b: &[u8]) {
        // Every command's fields fit in its 128 bytes (at most 4 + 56 +
        // 56 + 4 + 4 + 1 = 125).
        self.bytes[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }

    fn name(&mut self, name: &str) -> Result<(), LoaderError> {
        if name.is_empty() || name.len() >= NAME_LEN || name.contains('\0') {
            return Err(LoaderError::BadName(name.to_string()));
        }
        let mut field = [0u8; NAME_LEN];
        field[..name.len()].copy_from_slice(name.as_bytes());
        self.put(&field);
        Ok(())
    }

    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }

    fn u8(&mut self, v: u8) {
        self.put(&[v]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn name_at(b: &[u8], at: usize) -> String {
        let field = &b[at..at + NAME_LEN];
        let end = field.iter().position(|&c| c == 0).unwrap();
        String::from_utf8(field[..end].to_vec()).unwrap()
    }

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// Where each file went, and each WRITE_POINTER's (file, offset, value).
    type Outcome = (HashMap<String, u64>, Vec<(String, u32, u64)>);

    /// What a firmware does with the script (SeaBIOS's romfile_loader,
    /// reduced): files are placed one after another at 0x1000-aligned
    /// addresses; returns each file's address and the patched contents.
    fn run(script: &[u8], files: &mut HashMap<String, Vec<u8>>) -> Outcome {
        let mut addr = HashMap::new();
        let mut next = 0x10_0000u64;
        let mut written = Vec::new();
        for e in script.chunks(ENTRY_LEN) {
            match le32(e, 0) {
                CMD_ALLOCATE => {
                    let f = name_at(e, 4);
                    let align = u64::from(le32(e, 60));
                    next = next.div_ceil(align) * align;
                    addr.insert(f.clone(), next);
                    next += files[&f].len() as u64;
                }
                CMD_ADD_POINTER => {
                    let (dest, src) = (name_at(e, 4), name_at(e, 60));
                    let (off, size) = (le32(e, 116) as usize, e[120] as usize);
                    let d = files.get_mut(&dest).unwrap();
                    let mut v = [0u8; 8];
                    v[..size].copy_from_slice(&d[off..off + size]);
                    let p = u64::from_le_bytes(v) + addr[&src];
                    d[off..off + size].copy_from_slice(&p.to_le_bytes()[..size]);
                }
                CMD_ADD_CHECKSUM => {
                    let f = name_at(e, 4);
                    let (off, start, len) = (le32(e, 60), le32(e, 64), le32(e, 68));
                    let d = files.get_mut(&f).unwrap();
                    d[off as usize] = 0;
                    let sum = d[start as usize..(start + len) as usize]
                        .iter()
                        .fold(0u8, |a, &b| a.wrapping_add(b));
                    d[off as usize] = sum.wrapping_neg();
                }
                CMD_WRITE_POINTER => {
                    let (dest, src) = (name_at(e, 4), name_at(e, 60));
                    let (dst_off, src_off) = (le32(e, 116), le32(e, 120));
                    written.push((dest, dst_off, addr[&src] + u64::from(src_off)));
                }
                c => panic!("unknown command {c}"),
            }
        }
        (addr, written)
    }

    #[test]
    fn a_script_links_tables_and_fixes_their_checksums() {
        let mut l = TableLoader::new();
        l.allocate("etc/acpi/rsdp", 16, Zone::FSeg).unwrap();
        l.allocate("etc/acpi/tables", 64, Zone::High).unwrap();
        // The RSDP's XSDT address (offset 24, 8 bytes) points 0x40 into
        // the tables file; its checksum covers its first 20 bytes.
        l.add_pointer("etc/acpi/rsdp", "etc/acpi/tables", 24, 8)
            .unwrap();
        l.add_checksum("etc/acpi/rsdp", 8, 0, 20).unwrap();
        l.write_pointer("etc/vmgenid_addr", "etc/acpi/tables", 0, 0x80, 8)
            .unwrap();
        assert_eq!(l.bytes().len(), 5 * ENTRY_LEN);

        let mut rsdp = vec![0u8; 36];
        rsdp[..8].copy_from_slice(b"RSD PTR ");
        rsdp[24..32].copy_from_slice(&0x40u64.to_le_bytes());
        let mut files = HashMap::from([
            ("etc/acpi/rsdp".to_string(), rsdp),
            ("etc/acpi/tables".to_string(), vec![0xaa; 0x100]),
        ]);
        let (addr, written) = run(l.bytes(), &mut files);
        let rsdp = &files["etc/acpi/rsdp"];
        let xsdt = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        assert_eq!(xsdt, addr["etc/acpi/tables"] + 0x40);
        assert_eq!(rsdp[..20].iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        assert_eq!(addr["etc/acpi/tables"] % 64, 0);
        assert_eq!(
            written,
            vec![(
                "etc/vmgenid_addr".to_string(),
                0,
                addr["etc/acpi/tables"] + 0x80
            )]
        );
    }

    #[test]
    fn fields_sit_where_the_firmware_reads_them() {
        let mut l = TableLoader::new();
        l.allocate("a", 4096, Zone::High).unwrap();
        l.write_pointer("d", "s", 7, 9, 4).unwrap();
        let b = l.bytes();
        assert_eq!(le32(b, 0), CMD_ALLOCATE);
        assert_eq!(name_at(b, 4), "a");
        assert_eq!(le32(b, 60), 4096);
        assert_eq!(b[64], 1);
        let w = &b[ENTRY_LEN..];
        assert_eq!(le32(w, 0), CMD_WRITE_POINTER);
        assert_eq!((name_at(w, 4), name_at(w, 60)), ("d".into(), "s".into()));
        assert_eq!((le32(w, 116), le32(w, 120), w[124]), (7, 9, 4));
    }

    #[test]
    fn bad_commands_are_refused() {
        let mut l = TableLoader::new();
        assert_eq!(
            l.allocate("a", 3, Zone::High),
            Err(LoaderError::BadAlign(3))
        );
        assert_eq!(l.add_pointer("a", "b", 0, 3), Err(LoaderError::BadSize(3)));
        let long = "x".repeat(56);
        assert_eq!(
            l.add_checksum(&long, 0, 0, 1),
            Err(LoaderError::BadName(long.clone()))
        );
        assert_eq!(
            l.allocate("", 1, Zone::FSeg),
            Err(LoaderError::BadName(String::new()))
        );
        assert!(l.bytes().is_empty(), "a refused command writes nothing");
    }

    /// The firmware path gives what direct boot gives: the fw_cfg files
    /// run through the loader script equal the tables placed directly at
    /// the address the loader chose.
    #[test]
    fn firmware_places_acpi_tables_as_direct_boot_does() {
        use arch::acpi::{AcpiConfig, AcpiTables, PmBlock, SerialPort};
        let cfg = AcpiConfig {
            cpus: 2,
            pm: PmBlock {
                pm1_evt: 0x600,
                pm1_evt_len: 4,
                pm1_cnt: 0x604,
                pm1_cnt_len: 2,
                pm_tmr: 0x608,
                pm_tmr_len: 4,
                gpe0: 0x60c,
                gpe0_len: 4,
                reset: 0x610,
                reset_value: 6,
                slp_typ_s5: 5,
                sci_irq: 9,
            },
            serial: vec![SerialPort {
                port: 0x3f8,
                irq: 4,
            }],
            pci: None,
            virtio_mmio: vec![],
        };
        let t = AcpiTables::build(&cfg).unwrap();
        let files = AcpiFiles {
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
        };
        let mem =
            memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 4096)]).unwrap();
        let mut fw = super::super::FwCfg::new(mem);
        install_acpi(&mut fw, files).unwrap();
        let mut loaded: HashMap<String, Vec<u8>> = [RSDP_FILE, TABLES_FILE]
            .iter()
            .map(|n| (n.to_string(), fw.file(n).unwrap().to_vec()))
            .collect();
        let (addr, written) = run(fw.file(LOADER_FILE).unwrap(), &mut loaded);
        assert!(written.is_empty());
        let (rsdp, blob) = t.placed(addr[TABLES_FILE]);
        assert_eq!(loaded[RSDP_FILE], rsdp);
        assert_eq!(loaded[TABLES_FILE], blob);
        // Installing twice is refused (the files exist).
        assert!(install_acpi(&mut fw, AcpiFiles::default()).is_err());
    }
}
