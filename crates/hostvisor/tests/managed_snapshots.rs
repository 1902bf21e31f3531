//! Managed snapshots with the real VMM, on the default guest booted once:
//! `snapshot take` of a running VM saves its running state; `snapshot
//! restore` of the running VM brings back memory and disk as they were;
//! full and linked clones of that snapshot resume from it at the same time
//! as the source, each with its own hostname, machine id, MAC and vsock
//! CID, and the source keeps running.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

mod common;

use std::time::{Duration, Instant};

use common::*;

/// What the test reads back from a guest.
fn facts(vm: &TestVm, name: &str) -> Vec<String> {
    let out = vm.exec_args(&[
        name,
        "--",
        "sh",
        "-c",
        "hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address; \
         cat /tmp/note; head -c 4 /dev/vda; echo",
    ]);
    assert_eq!(out.code, 0, "{name}: {}{}", out.stdout, out.stderr);
    out.stdout.lines().map(str::to_string).collect()
}

/// Waits until `check` holds for the guest's facts (the identity is set
/// by the agent just after a resume).
fn settle(vm: &TestVm, name: &str, check: impl Fn(&[String]) -> bool) -> Vec<String> {
    let start = Instant::now();
    loop {
        let f = facts(vm, name);
        if check(&f) || start.elapsed() > Duration::from_secs(60) {
            return f;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn show(vm: &TestVm, name: &str) -> serde_json::Value {
    serde_json::from_str(&vm.ok(&["show", name, "--json"])).unwrap()
}

#[test]
fn running_vms_are_snapshotted_restored_and_cloned() {
    if !kvm_usable() || default_guest().is_none() {
        return;
    }
    let disks = temp_dir("managed-snap-disks");
    let base = disks.join("base.qcow2");
    create_disk(&base, "4M");
    let vm = TestVm::start("src", &["--disk", &format!("path={}", base.display())]);
    vm.sh("echo one > /tmp/note; printf AAAA | dd of=/dev/vda conv=fsync 2>/dev/null");
    let source = facts(&vm, "src");
    assert_eq!(&source[3..], ["one", "AAAA"]);

    let out = vm.ok(&["snapshot", "take", "src", "s1"]);
    assert!(out.contains("running state"), "{out}");
    vm.sh("echo two > /tmp/note; printf BBBB | dd of=/dev/vda conv=fsync 2>/dev/null");
    assert_eq!(&facts(&vm, "src")[3..], ["two", "BBBB"]);

    // Restoring the running VM: memory (the note in tmpfs) and disk as at
    // the snapshot.
    vm.ok(&["snapshot", "restore", "src", "s1"]);
    assert_eq!(show(&vm, "src")["state"], "running");
    assert_eq!(facts(&vm, "src"), source);

    // Clones of the snapshot resume from its running state, beside the
    // source, each with an identity of its own.
    // Clones are killed and deleted even if the test fails.
    struct Clones<'a>(&'a TestVm);
    impl Drop for Clones<'_> {
        fn drop(&mut self) {
            for clone in ["full1", "link1"] {
                let _ = self.0.hv(&["kill", clone]);
                let _ = self.0.hv(&["delete", clone]);
            }
        }
    }
    let _clones = Clones(&vm);
    vm.ok(&["clone", "src", "full1", "--snapshot", "s1"]);
    vm.ok(&["clone", "src", "link1", "--snapshot", "s1", "--linked"]);
    vm.ok(&["start", "full1"]);
    vm.ok(&["start", "link1"]);
    let mut cids = vec![show(&vm, "src")["config"]["vsock"]["cid"].clone()];
    let mut macs = vec![source[2].clone()];
    let mut ids = vec![source[1].clone()];
    for clone in ["full1", "link1"] {
        let f = settle(&vm, clone, |f| f[0] == clone);
        assert_eq!(f[0], clone, "{clone}: hostname");
        assert_eq!(&f[3..], ["one", "AAAA"], "{clone}: the snapshot's state");
        let config = show(&vm, clone)["config"].clone();
        // A NIC is written as its option string: nat,mac=52:54:00:...
        let nic = config["nets"][0].as_str().unwrap();
        let mac = nic.split("mac=").nth(1).unwrap().to_ascii_lowercase();
        assert_eq!(f[2], mac, "{clone}: the guest uses the clone's MAC");
        macs.push(f[2].clone());
        ids.push(f[1].clone());
        cids.push(config["vsock"]["cid"].clone());
    }
    for list in [&macs, &ids] {
        let mut unique = list.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 3, "{list:?}");
    }
    assert!(
        cids[0] != cids[1] && cids[1] != cids[2] && cids[0] != cids[2],
        "{cids:?}"
    );
    // The source ran on all along.
    assert_eq!(show(&vm, "src")["state"], "running");
    assert_eq!(facts(&vm, "src"), source);
    let _ = std::fs::remove_dir_all(&disks);
}

/// The VMM killed (SIGKILL) at random moments while `snapshot take` saves
/// a running VM, 20 times: every snapshot that was taken — the ones
/// before, and any the kill did not stop — still restores to its own
/// contents (memory and disk), and every layer passes `hostvisor disk
/// check` and `qemu-img check`. Each round resumes the VM from a saved
/// state instead of booting it.
#[test]
fn killing_the_vmm_during_snapshot_take_loses_no_snapshot() {
    if !kvm_usable() || default_guest().is_none() || !qemu_img_usable() {
        return;
    }
    let disks = temp_dir("managed-snap-kill");
    let base = disks.join("base.qcow2");
    create_disk(&base, "4M");
    let vm = TestVm::start("k", &["--disk", &format!("path={}", base.display())]);
    let mark = |m: &str| {
        vm.sh(&format!(
            "echo {m} > /tmp/note; printf {m} | dd of=/dev/vda conv=fsync 2>/dev/null"
        ));
    };
    let read = || {
        let f = facts(&vm, "k");
        (f[3].clone(), f[4].clone())
    };
    mark("BASE");
    vm.ok(&["snapshot", "take", "k", "base"]);
    // Restores a snapshot and makes sure the VM runs (a restore leaves a
    // stopped VM stopped, to resume at its next start).
    let back_to = |name: &str| {
        vm.ok(&["snapshot", "restore", "k", name]);
        if show(&vm, "k")["state"] != "running" {
            vm.ok(&["start", "k"]);
        }
    };
    let mut rng = KillRng::new();
    let mut taken = vec![("base".to_string(), "BASE".to_string())];
    for round in 0..20 {
        back_to("base");
        let m = format!("R{round:03}");
        mark(&m);
        let name = format!("t{round}");
        let pid: i32 = std::fs::read_to_string(vm.dir().join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut take = std::process::Command::new(BIN)
            .args(["snapshot", "take", "k", &name])
            .env("XDG_DATA_HOME", &vm.data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(1500)));
        // SAFETY: kill(2) on the VM process's pid, read from its pidfile.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let status = take.wait().unwrap();
        if status.success() {
            taken.push((name, m));
        }
        // The killed VM process is gone once its lock is free.
        let start = Instant::now();
        while show(&vm, "k")["state"] == "running" {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the VM did not die"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!("{} of 20 takes finished before the kill", taken.len() - 1);
    // Every layer is sound.
    let mut images = Vec::new();
    for sub in ["disks", "snapshots"] {
        let walk = walk_files(&vm.dir().join(sub));
        images.extend(
            walk.into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "qcow2")),
        );
    }
    images.push(base.clone());
    for image in &images {
        let out = vm.hv(&["disk", "check", image.to_str().unwrap()]);
        assert_eq!(
            out.code,
            0,
            "{}: {}{}",
            image.display(),
            out.stdout,
            out.stderr
        );
        let q = std::process::Command::new("qemu-img")
            .args(["check", "-U", image.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            q.status.success(),
            "{}: {}",
            image.display(),
            String::from_utf8_lossy(&q.stdout)
        );
    }
    // Every snapshot taken restores to its own memory and disk.
    for (name, m) in &taken {
        back_to(name);
        assert_eq!(read(), (m.clone(), m.clone()), "snapshot {name}");
    }
    let _ = std::fs::remove_dir_all(&disks);
}

fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk_files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
