//! Firmware boots on the `pc` machine: SeaBIOS (Debian's) finds a
//! virtio-blk disk on PCI (moving its BAR where it wants it), boots its
//! boot sector, which prints on COM1 and ends the VM through the
//! debug-exit port. No Linux: a few seconds, even on an emulating KVM.
//! Bad firmware choices are clear errors.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

use std::time::Duration;

use common::*;

const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";

/// A 16-bit boot sector: prints `msg` on COM1 (port 0x3f8) and writes
/// `code` to the debug-exit port 0xf4.
fn boot_sector(msg: &[u8], code: u8) -> Vec<u8> {
    let text_at: u16 = 26;
    let [lo, hi] = (0x7c00 + text_at).to_le_bytes();
    let mut s = vec![
        0xfa, // cli
        0x31, 0xc0, // xor ax, ax
        0x8e, 0xd8, // mov ds, ax
        0xbe, lo, hi, // mov si, text
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xac, // lodsb
        0x84, 0xc0, // test al, al
        0x74, 0x03, // jz +3
        0xee, // out dx, al
        0xeb, 0xf8, // jmp lodsb
        0xb0, code, // mov al, code
        0xe6, 0xf4, // out 0xf4, al
        0xf4, // hlt
        0xeb, 0xfd, // jmp hlt
    ];
    assert_eq!(s.len(), usize::from(text_at));
    s.extend_from_slice(msg);
    s.push(0);
    s.resize(510, 0);
    s.extend_from_slice(&[0x55, 0xaa]);
    s
}

/// Boots SeaBIOS from a 1 MiB disk at `path` whose boot sector prints
/// `msg` and exits with `code`.
fn boot_from_sector(path: &std::path::Path, msg: &[u8], code: u8, env: &[(&str, &str)]) -> Output {
    let mut image = boot_sector(msg, code);
    image.resize(1 << 20, 0);
    std::fs::write(path, &image).unwrap();
    let disk = format!("path={}", path.display());
    hostvisor(
        &["run", "--firmware", "bios", "--disk", &disk],
        env,
        Duration::from_secs(120),
    )
}

fn seabios_usable() -> bool {
    if !kvm_usable() {
        skip("HOSTVISOR_REQUIRE_KVM", "/dev/kvm is not usable");
        return false;
    }
    if !std::path::Path::new(SEABIOS).exists() {
        skip(
            "HOSTVISOR_REQUIRE_FIRMWARE",
            "Debian's seabios package is not installed",
        );
        return false;
    }
    true
}

#[test]
fn seabios_boots_a_boot_sector_from_a_virtio_pci_disk() {
    if !seabios_usable() {
        return;
    }
    let dir = temp_dir("fw-bootsector");
    let out = boot_from_sector(
        &dir.join("boot.img"),
        b"HOSTVISOR-BOOT-SECTOR-OK\r\n",
        0,
        &[("HOSTVISOR_LOG", "hostvisor::firmware=info")],
    );
    assert_eq!(
        out.code, 0,
        "stdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    assert!(
        out.stdout.contains("HOSTVISOR-BOOT-SECTOR-OK"),
        "{}",
        out.stdout
    );
    // It was SeaBIOS, through our virtio-pci disk, that got there (its
    // log goes to the debug console, port 0x402).
    assert!(out.stderr.contains("SeaBIOS (version"), "{}", out.stderr);
    assert!(out.stderr.contains("found virtio-blk at"), "{}", out.stderr);
    assert!(
        out.stderr.contains("Booting from Hard Disk"),
        "{}",
        out.stderr
    );

    // The boot sector's exit code comes out as the VM's crash status.
    let out = boot_from_sector(&dir.join("fail.img"), b"FAILING\r\n", 7, &[]);
    assert_eq!(out.code, 3, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("FAILING"), "{}", out.stdout);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_firmware_choices_are_clear_errors() {
    let dir = temp_dir("fw-bad");
    let odd = dir.join("odd.bin");
    std::fs::write(&odd, [0u8; 1000]).unwrap();
    let out = hostvisor(
        &["run", "--firmware", odd.to_str().unwrap()],
        &[],
        Duration::from_secs(30),
    );
    assert_one_line_error(&out, 1, "not a firmware image");
    let out = hostvisor(
        &["run", "--firmware", "bios", "--machine", "microvm"],
        &[],
        Duration::from_secs(30),
    );
    assert_one_line_error(&out, 2, "needs a pc machine");
    let _ = std::fs::remove_dir_all(&dir);
}

/// SeaBIOS boots the default guest with its kernel (the bzImage),
/// initrd and command line handed over through fw_cfg DMA (QEMU's
/// linuxboot_dma.bin option ROM), to READY, and the guest powers off
/// through ACPI.
#[test]
fn seabios_boots_the_default_guest_handed_over_by_fw_cfg() {
    if !seabios_usable() {
        return;
    }
    let Some(guest) = default_guest() else {
        return;
    };
    let bzimage = guest.join("bzImage");
    if !bzimage.exists() {
        skip(
            "HOSTVISOR_REQUIRE_GUEST",
            "the default guest has no bzImage (run guest/build.sh)",
        );
        return;
    }
    let initrd = guest.join("initramfs.cpio");
    let out = hostvisor(
        &[
            "run",
            "--firmware",
            "bios",
            "--kernel",
            bzimage.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--append",
            "hostvisor.test=poweroff",
        ],
        &[("HOSTVISOR_LOG", "hostvisor::firmware=info")],
        Duration::from_secs(900),
    );
    assert_eq!(
        out.code, 0,
        "stdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
    assert!(
        out.stdout.contains("HOSTVISOR-GUEST-READY"),
        "{}",
        out.stdout
    );
    // Through SeaBIOS and its option ROM, not a direct load.
    assert!(out.stderr.contains("SeaBIOS (version"), "{}", out.stderr);
    assert!(out.stderr.contains("Booting from ROM"), "{}", out.stderr);
}

/// Managed VMs remember their machine and firmware; `edit` changes them.
#[test]
fn managed_vms_keep_their_machine_and_firmware() {
    let data = temp_dir("fw-managed");
    let env = [("XDG_DATA_HOME", data.to_str().unwrap())];
    let hv = |args: &[&str]| {
        let out = hostvisor(args, &env, Duration::from_secs(30));
        assert_eq!(out.code, 0, "{args:?}: {}{}", out.stdout, out.stderr);
        out.stdout
    };
    let config = |name: &str| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&hv(&["show", name, "--json"])).unwrap()["config"]
            .clone()
    };
    hv(&["create", "fw1", "--firmware", "bios"]);
    let c = config("fw1");
    assert_eq!(
        (c["machine"].as_str(), c["firmware"].as_str()),
        (Some("pc"), Some("bios"))
    );
    hv(&["edit", "fw1", "--firmware", "none", "--machine", "microvm"]);
    let c = config("fw1");
    assert!(c["firmware"].is_null(), "{c}");
    assert!(c["machine"].is_null() || c["machine"] == "microvm", "{c}");
    hv(&["edit", "fw1", "--firmware", "uefi"]);
    let c = config("fw1");
    assert_eq!(
        (c["machine"].as_str(), c["firmware"].as_str()),
        (Some("pc"), Some("uefi"))
    );
    hv(&["delete", "fw1"]);
    let _ = std::fs::remove_dir_all(&data);
}
