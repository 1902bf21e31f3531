//! Managed snapshots with the real VMM, on the default guest booted once:
//! `snapshot take` of a running VM saves its running state; `snapshot
//! restore` of the running VM brings back memory and disk as they were;
//! full and linked clones of that snapshot resume from it at the same time
//! as the source, each with its own hostname, machine id, MAC and vsock
//! CID, and the source keeps running.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

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
    let rig = KillRig::new("k", "managed-snap-kill");
    rig.mark("BASE");
    rig.vm.ok(&["snapshot", "take", "k", "base"]);
    let mut rng = KillRng::new();
    let mut taken = vec![("base".to_string(), "BASE".to_string())];
    for round in 0..20 {
        rig.back_to("base");
        let m = format!("R{round:03}");
        rig.mark(&m);
        let name = format!("t{round}");
        let pid = rig.pid();
        let mut take = rig.spawn_snapshot("take", &name);
        std::thread::sleep(Duration::from_millis(rng.below(1500)));
        rig.kill_vm_process(pid);
        if take.0.wait().unwrap().success() {
            taken.push((name, m));
        }
    }
    eprintln!("{} of 20 takes finished before the kill", taken.len() - 1);
    rig.check_layers();
    // Every snapshot taken restores to its own memory and disk.
    for (name, m) in &taken {
        rig.back_to(name);
        assert_eq!(rig.read(), (m.clone(), m.clone()), "snapshot {name}");
    }
    rig.finish();
}

/// A managed VM with a 4 MiB data disk, for the tests that kill a VM
/// process or the CLI in the middle of a snapshot operation: it marks the
/// guest's memory (a tmpfs file) and disk (its first bytes) and reads them
/// back, goes back to a snapshot, and checks every layer afterwards.
struct KillRig {
    vm: TestVm,
    name: &'static str,
    disks: std::path::PathBuf,
    base: std::path::PathBuf,
}

impl KillRig {
    fn new(name: &'static str, dir: &str) -> KillRig {
        let disks = temp_dir(dir);
        let base = disks.join("base.qcow2");
        create_disk(&base, "4M");
        let vm = TestVm::start(name, &["--disk", &format!("path={}", base.display())]);
        KillRig {
            vm,
            name,
            disks,
            base,
        }
    }

    fn mark(&self, m: &str) {
        self.vm.sh(&format!(
            "echo {m} > /tmp/note; printf {m} | dd of=/dev/vda conv=fsync 2>/dev/null"
        ));
    }

    /// The marks in memory and on disk.
    fn read(&self) -> (String, String) {
        let f = facts(&self.vm, self.name);
        (f[3].clone(), f[4].clone())
    }

    /// Restores a snapshot and makes sure the VM runs (a restore leaves a
    /// stopped VM stopped, to resume at its next start).
    fn back_to(&self, snapshot: &str) {
        self.vm.ok(&["snapshot", "restore", self.name, snapshot]);
        if show(&self.vm, self.name)["state"] != "running" {
            self.vm.ok(&["start", self.name]);
        }
    }

    fn pid(&self) -> i32 {
        std::fs::read_to_string(self.vm.dir().join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// `hostvisor snapshot OP NAME SNAPSHOT`, running.
    fn spawn_snapshot(&self, op: &str, snapshot: &str) -> KillOnDrop {
        let child = std::process::Command::new(BIN)
            .args(["snapshot", op, self.name, snapshot])
            .env("XDG_DATA_HOME", &self.vm.data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        KillOnDrop(child)
    }

    /// SIGKILLs the VM process `pid` and waits until it is gone (its lock
    /// free).
    fn kill_vm_process(&self, pid: i32) {
        // SAFETY: kill(2) on the VM process's pid, read from its pidfile.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let start = Instant::now();
        while show(&self.vm, self.name)["state"] == "running" {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the VM did not die"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every layer (the VM's disks, its snapshots' layers, the base)
    /// passes `hostvisor disk check` and `qemu-img check`.
    fn check_layers(&self) {
        let mut images: Vec<std::path::PathBuf> = ["disks", "snapshots"]
            .iter()
            .flat_map(|sub| walk_files(&self.vm.dir().join(sub)))
            .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
            .collect();
        images.push(self.base.clone());
        for image in &images {
            let out = self.vm.hv(&["disk", "check", image.to_str().unwrap()]);
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
    }

    fn finish(self) {
        let _ = std::fs::remove_dir_all(&self.disks);
    }
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

/// A request to the VM's API; the status and JSON body (null if none).
fn api(vm: &TestVm, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let client = api::Client::new(&vm.dir().join("api.sock"));
    let r = client.slow_request(method, path, body).unwrap();
    let json = r.json().unwrap_or(serde_json::Value::Null);
    (r.status, json)
}

/// SHA-256 of the disk as the guest reads it (its page cache dropped, so
/// the read goes to the device).
fn guest_disk_hash(vm: &TestVm, name: &str) -> String {
    let out = vm.exec_args(&[
        name,
        "--",
        "sh",
        "-c",
        "sync; echo 3 > /proc/sys/vm/drop_caches; sha256sum /dev/vda",
    ]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    out.stdout.split_whitespace().next().unwrap().to_string()
}

/// SHA-256 of the VM's disk as the host reads its current top and chain
/// (`qemu-img convert -U`: the VM has it open).
fn host_disk_hash(vm: &TestVm, name: &str, scratch: &std::path::Path) -> String {
    let config = show(vm, name)["config"].clone();
    let disk = config["disks"][0].clone();
    // A disk is written as its option string (path=...,format=...) or a
    // table.
    let top = disk["path"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| {
            let s = disk.as_str().unwrap();
            s.split(',')
                .find_map(|kv| kv.strip_prefix("path="))
                .unwrap_or(s)
                .to_string()
        });
    let raw = scratch.join("flat.raw");
    let _ = std::fs::remove_file(&raw);
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw", &top, raw.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hash = tool("sha256sum", &[raw.to_str().unwrap()]);
    std::fs::remove_file(&raw).unwrap();
    hash.split_whitespace().next().unwrap().to_string()
}

/// The per-VM API's snapshot operations on one booted guest: take (named,
/// with a description), list, delete of the snapshot the VM stands on and
/// of its ancestors while it runs (the guest sees only a pause: its disk
/// reads the same, by SHA-256 from inside and from the host, and it keeps
/// writing), and restore in place (the same VM process goes on from the
/// snapshot's running state).
#[test]
fn the_api_takes_lists_restores_and_deletes_snapshots_of_a_running_vm() {
    if !kvm_usable() || default_guest().is_none() || !qemu_img_usable() {
        return;
    }
    let disks = temp_dir("managed-snap-api");
    let base = disks.join("base.qcow2");
    create_disk(&base, "4M");
    let vm = TestVm::start("a", &["--disk", &format!("path={}", base.display())]);
    // A marker in tmpfs and at the disk's start, and data spread over it.
    let mark = |m: &str, seek: u32| {
        vm.sh(&format!(
            "echo {m} > /tmp/note; printf {m} | dd of=/dev/vda conv=fsync 2>/dev/null; \
             dd if=/dev/urandom of=/dev/vda bs=4k seek={seek} count=64 conv=fsync 2>/dev/null"
        ));
    };
    let read = || {
        let f = facts(&vm, "a");
        (f[3].clone(), f[4].clone())
    };
    let pid = || show(&vm, "a")["pid"].clone();
    let first_pid = pid();
    mark("ONE1", 100);
    let (status, s1) = api(
        &vm,
        "PUT",
        "/vm/snapshots/take",
        r#"{"name": "s1", "description": "first"}"#,
    );
    assert_eq!(status, 200, "{s1}");
    assert_eq!(s1["name"], "s1");
    assert_eq!(s1["description"], "first");
    assert_eq!(s1["saved_state"], true);
    assert_eq!(s1["current"], true);
    mark("TWO2", 300);
    // The CLI goes through the API while the VM runs.
    let out = vm.ok(&["snapshot", "take", "a", "s2"]);
    assert!(out.contains("running state"), "{out}");
    mark("THR3", 500);
    let (status, _) = api(&vm, "PUT", "/vm/snapshots/take", r#"{"name": "s3"}"#);
    assert_eq!(status, 200);
    let (status, dup) = api(&vm, "PUT", "/vm/snapshots/take", r#"{"name": "s3"}"#);
    assert_eq!(status, 409, "{dup}");
    mark("FOU4", 700);

    let (status, list) = api(&vm, "GET", "/vm/snapshots", "");
    assert_eq!(status, 200);
    let snaps = list["snapshots"].as_array().unwrap().clone();
    let names: Vec<&str> = snaps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["s1", "s2", "s3"], "{list}");
    let id = |n: usize| snaps[n]["id"].clone();
    assert_eq!(snaps[1]["parent"], id(0));
    assert_eq!(snaps[2]["parent"], id(1));
    assert_eq!(list["current"], id(2));
    assert!(snaps
        .iter()
        .all(|s| s["created"].as_str().unwrap().ends_with('Z')));

    // Deleting an ancestor of the current snapshot, then the current one,
    // while the VM runs: the disk reads the same.
    let guest_before = guest_disk_hash(&vm, "a");
    let host_before = host_disk_hash(&vm, "a", &disks);
    assert_eq!(guest_before, host_before);
    vm.ok(&["snapshot", "delete", "a", "s2"]);
    assert_eq!(guest_disk_hash(&vm, "a"), guest_before, "after deleting s2");
    assert_eq!(host_disk_hash(&vm, "a", &disks), host_before);
    let (status, e) = api(&vm, "PUT", "/vm/snapshots/delete", r#"{"snapshot": "s3"}"#);
    assert_eq!(status, 204, "{e}");
    assert_eq!(guest_disk_hash(&vm, "a"), guest_before, "after deleting s3");
    assert_eq!(host_disk_hash(&vm, "a", &disks), host_before);
    let (_, list) = api(&vm, "GET", "/vm/snapshots", "");
    assert_eq!(list["current"], id(0), "{list}");
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(read(), ("FOU4".to_string(), "FOU4".to_string()));
    // The guest writes on, and reads back what it wrote.
    vm.sh(
        "dd if=/dev/urandom of=/tmp/blob bs=4k count=256 2>/dev/null; \
         dd if=/tmp/blob of=/dev/vda bs=4k seek=200 conv=fsync 2>/dev/null; \
         echo 3 > /proc/sys/vm/drop_caches; \
         dd if=/dev/vda of=/tmp/back bs=4k skip=200 count=256 2>/dev/null; cmp /tmp/blob /tmp/back",
    );
    assert_eq!(
        show(&vm, "a")["pid"],
        first_pid,
        "the VM ran on in its process"
    );

    // Restore in place: the same process, the snapshot's memory and disk.
    let (status, r) = api(&vm, "PUT", "/vm/snapshots/restore", r#"{"snapshot": "s1"}"#);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["state"], "running");
    assert_eq!(pid(), first_pid, "restored in place");
    assert_eq!(read(), ("ONE1".to_string(), "ONE1".to_string()));
    assert_eq!(show(&vm, "a")["state"], "running");
    // The base's snapshot, current, deleted while the VM runs.
    let on_s1 = guest_disk_hash(&vm, "a");
    vm.ok(&["snapshot", "delete", "a", "s1"]);
    assert_eq!(guest_disk_hash(&vm, "a"), on_s1);
    let (_, list) = api(&vm, "GET", "/vm/snapshots", "");
    assert_eq!(list["snapshots"], serde_json::json!([]), "{list}");
    assert_eq!(list["current"], serde_json::Value::Null);
    for path in ["/vm/snapshots/restore", "/vm/snapshots/delete"] {
        let (status, e) = api(&vm, "PUT", path, r#"{"snapshot": "s2"}"#);
        assert_eq!(status, 404, "{path}: {e}");
    }
    vm.ok(&["kill", "a"]);
    for image in walk_files(&vm.dir().join("disks")).iter().chain([&base]) {
        let out = vm.hv(&["disk", "check", image.to_str().unwrap()]);
        assert_eq!(
            out.code,
            0,
            "{}: {}{}",
            image.display(),
            out.stdout,
            out.stderr
        );
    }
    let _ = std::fs::remove_dir_all(&disks);
}

/// `kill -9` at random moments while a running VM's snapshot delete
/// merges layers the VM has open (the deleted snapshot is an ancestor of
/// the current one), 20 times: of the VM process (which does the merge)
/// in even rounds, of the CLI in odd ones. Every snapshot that remains
/// restores to its own contents (memory and disk), and every layer passes
/// `hostvisor disk check` and `qemu-img check`. Each round resumes the VM
/// from a saved state instead of booting it.
#[test]
fn killing_a_running_delete_loses_no_snapshot() {
    if !kvm_usable() || default_guest().is_none() || !qemu_img_usable() {
        return;
    }
    let rig = KillRig::new("kd", "managed-snap-kill-delete");
    let names = || -> Vec<String> {
        let list: serde_json::Value =
            serde_json::from_str(&rig.vm.ok(&["snapshot", "list", "kd", "--json"])).unwrap();
        list["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    rig.mark("BASE");
    rig.vm.ok(&["snapshot", "take", "kd", "base"]);
    let mut rng = KillRng::new();
    let mut expect = vec![("base".to_string(), "BASE".to_string())];
    let mut before_kill = 0;
    for round in 0..20 {
        rig.back_to("base");
        for step in ["a", "b"] {
            let m = format!("R{round:02}{step}");
            rig.mark(&m);
            let name = format!("{step}{round}");
            rig.vm.ok(&["snapshot", "take", "kd", &name]);
            expect.push((name, m));
        }
        rig.mark(&format!("R{round:02}c"));
        let pid = rig.pid();
        let victim = format!("a{round}");
        let mut delete = rig.spawn_snapshot("delete", &victim);
        std::thread::sleep(Duration::from_millis(rng.below(1500)));
        if delete.0.try_wait().unwrap().is_some() {
            before_kill += 1;
        }
        if round % 2 == 0 {
            rig.kill_vm_process(pid);
            let _ = delete.0.wait();
        } else {
            let _ = delete.0.kill();
            let _ = delete.0.wait();
        }
        // The next command finishes (or the VM process has finished) the
        // delete; either way the snapshot goes.
        let left = names();
        assert!(left.contains(&format!("b{round}")), "{left:?}");
        // A delete killed before it began leaves the snapshot (to be
        // checked like the others); one that began is finished.
        if !left.contains(&victim) {
            expect.retain(|(n, _)| *n != victim);
        }
    }
    eprintln!("{before_kill} of 20 deletes had finished before the kill");
    // Its disks are checked closed.
    let _ = rig.vm.hv(&["kill", "kd"]);
    rig.check_layers();
    // Every snapshot that remains restores to its own memory and disk.
    let left = names();
    for (name, m) in &expect {
        assert!(left.contains(name), "snapshot {name} is gone: {left:?}");
        rig.back_to(name);
        assert_eq!(rig.read(), (m.clone(), m.clone()), "snapshot {name}");
    }
    rig.finish();
}
