// Offsets into a few KiB of tables.
#![allow(clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::process::Command;

use super::*;

const BASE: u64 = 0x7ff0_0000;

fn config() -> AcpiConfig {
    AcpiConfig {
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
        pci: Some(PciHost {
            ecam_base: 0xe000_0000,
            last_bus: 0,
            io: (0xc000, 0xffff),
            mmio32: (0xc000_0000, 0xdfff_ffff),
            mmio64: Some((0x1_0000_0000, 0x1_ffff_ffff)),
            intx_gsi: [16, 17, 18, 19],
        }),
        virtio_mmio: vec![VirtioMmio {
            addr: 0xd000_0000,
            len: 0x1000,
            irq: 5,
        }],
    }
}

fn le(b: &[u8], at: usize, n: usize) -> u64 {
    let mut v = [0u8; 8];
    v[..n].copy_from_slice(&b[at..at + n]);
    u64::from_le_bytes(v)
}

fn sums_to_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x)) == 0
}

/// The placed tables by signature, as an OS finds them from the RSDP.
fn walk(rsdp: &[u8], blob: &[u8]) -> HashMap<String, Vec<u8>> {
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert!(sums_to_zero(&rsdp[..20]) && sums_to_zero(&rsdp[..36]));
    let table = |addr: u64| -> Vec<u8> {
        let at = (addr - BASE) as usize;
        // Every table, the FACS too, has its length at byte 4.
        let len = le(blob, at + 4, 4) as usize;
        blob[at..at + len].to_vec()
    };
    let xsdt = table(le(rsdp, 24, 8));
    assert_eq!(&xsdt[..4], b"XSDT");
    let mut found = HashMap::new();
    for i in 0..(xsdt.len() - 36) / 8 {
        let t = table(le(&xsdt, 36 + 8 * i, 8));
        found.insert(String::from_utf8(t[..4].to_vec()).unwrap(), t);
    }
    let fadt = found["FACP"].clone();
    let dsdt = table(le(&fadt, 40, 4));
    assert_eq!(le(&fadt, 140, 8), le(&fadt, 40, 4), "X_DSDT = DSDT");
    let facs_addr = le(&fadt, 36, 4);
    assert_eq!(facs_addr % 64, 0, "the FACS is 64-byte aligned");
    found.insert("FACS".into(), table(facs_addr));
    found.insert("DSDT".into(), dsdt);
    found.insert("XSDT".into(), xsdt);
    found
}

#[test]
fn an_os_finds_every_table_with_good_checksums() {
    let t = AcpiTables::build(&config()).unwrap();
    let (rsdp, blob) = t.placed(BASE);
    let tables = walk(&rsdp, &blob);
    let mut names: Vec<&str> = tables.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["APIC", "DSDT", "FACP", "FACS", "MCFG", "XSDT"]);
    for (name, t) in &tables {
        if name != "FACS" {
            assert!(sums_to_zero(t), "{name}'s checksum");
        }
    }
    // The unplaced blob holds offsets; placing elsewhere moves pointers.
    let (rsdp2, _) = t.placed(BASE + 0x1000);
    assert_eq!(le(&rsdp2, 24, 8), le(&rsdp, 24, 8) + 0x1000);
}

#[test]
fn the_fadt_describes_the_pm_block_and_the_madt_the_cpus() {
    let cfg = config();
    let (rsdp, blob) = AcpiTables::build(&cfg).unwrap().placed(BASE);
    let t = walk(&rsdp, &blob);
    let fadt = &t["FACP"];
    assert_eq!(le(fadt, 46, 2), 9, "SCI_INT");
    assert_eq!(le(fadt, 48, 4), 0, "no SMI command port: ACPI mode only");
    assert_eq!(le(fadt, 56, 4), 0x600, "PM1a_EVT_BLK");
    assert_eq!(le(fadt, 64, 4), 0x604, "PM1a_CNT_BLK");
    assert_eq!(le(fadt, 76, 4), 0x608, "PM_TMR_BLK");
    assert_eq!(le(fadt, 80, 4), 0x60c, "GPE0_BLK");
    assert_eq!((fadt[88], fadt[89], fadt[91], fadt[92]), (4, 2, 4, 4));
    let flags = le(fadt, 112, 4);
    assert_eq!(flags & (1 << 4), 0, "a fixed power button");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    assert_ne!(flags & (1 << 8), 0, "a 32-bit PM timer");
    assert_eq!(flags & (1 << 20), 0, "not hardware-reduced");
    // RESET_REG: system I/O, 8 bits, at 0x610; value 6.
    assert_eq!((fadt[116], fadt[117]), (1, 8));
    assert_eq!(le(fadt, 120, 8), 0x610);
    assert_eq!(fadt[128], 6);

    let madt = &t["APIC"];
    assert_eq!(le(madt, 36, 4), u64::from(LAPIC_ADDR));
    assert_eq!(le(madt, 40, 4), 1, "PCAT_COMPAT");
    let mut at = 44;
    let mut lapics = Vec::new();
    let mut overrides = Vec::new();
    while at < madt.len() {
        let (kind, len) = (madt[at], madt[at + 1] as usize);
        match kind {
            0 => lapics.push((madt[at + 2], madt[at + 3], le(madt, at + 4, 4))),
            1 => assert_eq!(le(madt, at + 4, 4), u64::from(IOAPIC_ADDR)),
            2 => overrides.push((madt[at + 3], le(madt, at + 4, 4), le(madt, at + 8, 2))),
            4 => assert_eq!((madt[at + 2], madt[at + 5]), (0xff, 1)),
            k => panic!("unexpected MADT entry {k}"),
        }
        at += len;
    }
    assert_eq!(at, madt.len());
    assert_eq!(lapics, [(0, 0, 1), (1, 1, 1)]);
    assert_eq!(overrides, [(0, 2, 0), (9, 9, 0b1101)]);

    let mcfg = &t["MCFG"];
    assert_eq!(le(mcfg, 44, 8), 0xe000_0000);
    assert_eq!((mcfg[54], mcfg[55]), (0, 0), "buses 0..=0");
}

#[test]
fn bad_cpu_counts_are_refused() {
    for cpus in [0, 255] {
        let cfg = AcpiConfig { cpus, ..config() };
        assert_eq!(
            AcpiTables::build(&cfg).err(),
            Some(AcpiError::TooManyCpus(cpus))
        );
    }
    let no_pci = AcpiConfig {
        pci: None,
        ..config()
    };
    let (rsdp, blob) = AcpiTables::build(&no_pci).unwrap().placed(BASE);
    assert!(!walk(&rsdp, &blob).contains_key("MCFG"));
}

/// ACPICA's disassembler (what Linux's ACPI is built from) reads every
/// table back: no errors, and the DSDT's objects are where they belong.
#[test]
fn acpica_disassembles_every_table() {
    if Command::new("iasl").arg("-v").output().is_err() {
        if std::env::var_os("HOSTVISOR_REQUIRE_IASL").is_some() {
            panic!("iasl (Debian's acpica-tools) is required");
        }
        eprintln!("SKIPPED: iasl not installed (apt install acpica-tools)");
        return;
    }
    let (rsdp, blob) = AcpiTables::build(&config()).unwrap().placed(BASE);
    let dir = std::env::temp_dir().join(format!("hv-acpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = HashMap::new();
    for (name, table) in walk(&rsdp, &blob) {
        let file = dir.join(format!("{}.dat", name.to_lowercase()));
        std::fs::write(&file, &table).unwrap();
        let out = Command::new("iasl")
            .current_dir(&dir)
            .args(["-d"])
            .arg(&file)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "iasl -d {name}: {log}");
        assert!(
            !log.contains("Error") && !log.contains("Invalid"),
            "{name}: {log}"
        );
        let dsl = std::fs::read_to_string(file.with_extension("dsl")).unwrap();
        assert!(!dsl.contains("Incorrect checksum"), "{name}: {dsl}");
        text.insert(name, dsl);
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let dsdt = &text["DSDT"];
    for needle in [
        "Name (_S5, Package (0x04)",
        "Device (PCI0)",
        "EisaId (\"PNP0A08\")",
        "EisaId (\"PNP0A03\")",
        "Name (_PRT, Package (0x80)",
        "Device (MRES)",
        "EisaId (\"PNP0C02\")",
        "Device (COM1)",
        "EisaId (\"PNP0501\")",
        "Name (_HID, \"LNRO0005\")",
        "0xE0000000",
    ] {
        assert!(dsdt.contains(needle), "DSDT lacks {needle}:\n{dsdt}");
    }
    let fadt = &text["FACP"];
    for needle in [
        "PM1A Event Block Address : 00000600",
        "PM1A Control Block Address : 00000604",
        "PM Timer Block Address : 00000608",
        "SCI Interrupt : 0009",
        "Value to cause reset : 06",
    ] {
        assert!(
            fadt.split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .contains(needle),
            "FADT lacks {needle}:\n{fadt}"
        );
    }
}
