//! The `pc` machine end to end, on the default guest (its one kernel has
//! ACPI and MSI for this machine): every virtio device is a PCI function using
//! MSI-X, disk I/O, the NAT and the agent work over virtio-pci (also after
//! a snapshot is restored), the
//! guest's own power-off is ACPI S5 (not a reset), and `hostvisor stop`
//! of a VM without an agent powers it off through the ACPI power button.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// The default guest, built with ACPI (its bzImage comes with that
/// build), or why not (after `skip`).
fn pc_guest() -> bool {
    if !kvm_usable() {
        skip("HOSTVISOR_REQUIRE_KVM", "/dev/kvm is not usable");
        return false;
    }
    match default_guest() {
        Some(dir) if dir.join("bzImage").exists() => true,
        _ => {
            skip(
                "HOSTVISOR_REQUIRE_GUEST",
                "the default guest is older than its ACPI kernel (run guest/build.sh)",
            );
            false
        }
    }
}

/// The `exit` record of a managed VM once its process has ended.
fn wait_exit(vm: &TestVm, limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(vm.dir().join("exit")) {
            let state = vm.ok(&["show", &vm.name]);
            if !state.contains("running") {
                return Some(text);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// A one-shot HTTP server on the host's loopback (which the NAT shows the
/// guest as 10.0.2.2).
fn serve_once(body: &'static str) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req);
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

fn sha256_hex(path: &Path) -> String {
    let out = tool("sha256sum", &[path.to_str().unwrap()]);
    out.split_whitespace().next().unwrap().to_string()
}

#[test]
fn every_virtio_device_works_over_pci_with_msix_and_poweroff_is_acpi_s5() {
    if !pc_guest() {
        return;
    }
    let dir = temp_dir("pc-devices");
    let disk = dir.join("data.img");
    // A disk with known content: 1 MiB of a pattern.
    let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&disk, &pattern).unwrap();
    let disk_arg = format!("path={}", disk.display());
    let vm = TestVm::start(
        "pc",
        &[
            "--machine",
            "pc",
            "--disk",
            &disk_arg,
            "--rng",
            "--cpus",
            "2",
        ],
    );

    // Every device is a modern virtio PCI function (vendor 1af4, device
    // 0x1040 + type), found by the guest's own PCI probe.
    let listing = vm.sh(
        "cd /sys/bus/pci/devices && for d in *; do read v < $d/vendor; read i < $d/device; echo $d $v $i; done",
    );
    for (device, what) in [
        ("0x1042", "block"),
        ("0x1044", "entropy"),
        ("0x1053", "vsock"),
        ("0x1041", "network"),
    ] {
        assert!(
            listing.contains(&format!("0x1af4 {device}")),
            "no virtio {what} function in:\n{listing}"
        );
    }
    // Their interrupts are messages (the functions offer MSI-X only; Linux
    // lists them as PCI-MSI), a vector per queue, none on an INTx line.
    let interrupts = vm.sh("cat /proc/interrupts");
    for queue in ["-config", "-req.0", "-rx", "-tx", "-input"] {
        assert!(
            interrupts
                .lines()
                .any(|l| l.contains("PCI-MSI") && l.contains(queue)),
            "no MSI-X vector for a {queue} queue:\n{interrupts}"
        );
    }
    assert!(
        !interrupts
            .lines()
            .any(|l| l.contains("IO-APIC") && l.contains("virtio")),
        "a virtio device on an INTx line:\n{interrupts}"
    );
    // ACPI is how the guest found its machine.
    assert!(vm.sh("ls /sys/firmware/acpi/tables").contains("DSDT"));

    // Disk: the guest reads what the host wrote and writes back.
    let guest_sum = vm.sh("sha256sum /dev/vda");
    assert!(
        guest_sum.starts_with(&sha256_hex(&disk)),
        "{guest_sum} vs the host's"
    );
    vm.sh("echo written-over-pci > /tmp/m && dd if=/tmp/m of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null");

    // NAT: the guest fetches a page from the host.
    vm.sh("until [ -f /run/udhcpc.eth0 ]; do sleep 1; done");
    let port = serve_once("hello from the host");
    let page = vm.sh(&format!("wget -q -O - http://10.0.2.2:{port}/"));
    assert_eq!(page, "hello from the host");

    // A pc VM snapshots and restores: the PCI functions, their MSI-X
    // tables and the ACPI block come back, and the devices carry on.
    vm.sh("echo before > /tmp/mark");
    vm.ok(&["snapshot", "take", &vm.name, "s1"]);
    vm.sh("echo after > /tmp/mark");
    vm.ok(&["snapshot", "restore", &vm.name, "s1"]);
    assert_eq!(vm.sh("cat /tmp/mark"), "before\n");
    assert!(
        vm.sh("sha256sum /dev/vda").len() > 64,
        "the disk still answers"
    );
    let port = serve_once("again");
    assert_eq!(
        vm.sh(&format!("wget -q -O - http://10.0.2.2:{port}/")),
        "again"
    );

    // The guest's own power-off ends the VM through ACPI S5.
    let _ = vm.exec(&["sh", "-c", "sync; poweroff -f"]);
    let exit = wait_exit(&vm, Duration::from_secs(60)).expect("the VM did not end");
    assert!(exit.contains("PoweredOff"), "{exit}");
    let back = std::fs::read(&disk).unwrap();
    assert_eq!(&back[4096..4096 + 17], b"written-over-pci\n");
}

#[test]
fn stop_without_an_agent_presses_the_acpi_power_button() {
    if !pc_guest() {
        return;
    }
    let vm = TestVm::start(
        "pcbutton",
        &["--machine", "pc", "--vsock", "none", "--net", "none"],
    );
    let console = vm.dir().join("console.log");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("the ACPI power button powers the guest off") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest never set up its power button:\n{}",
            vm.console_tail(20)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let started = Instant::now();
    let out = vm.hv(&["stop", &vm.name, "--timeout", "60"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("stopped"), "{}", out.stdout);
    let exit = std::fs::read_to_string(vm.dir().join("exit")).unwrap();
    assert!(
        exit.contains("PoweredOff"),
        "the guest did not power itself off (a kill?): {exit}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}
