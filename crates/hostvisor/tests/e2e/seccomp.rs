//! seccomp end to end (docs/security.md), on clones of the booted default
//! template (a resume takes about a second; no guest boot of its own):
//! - every thread of a running managed VM's process is filtered
//!   (`Seccomp: 2` in `/proc/PID/task/*/status`), with the threads of
//!   each kind there (vCPU, device workers, NAT, API, spawner);
//! - a device thread that makes a call outside its filter (the
//!   `HOSTVISOR_SECCOMP_TEST_DENY` hook of debug builds) ends the VM
//!   process with status 159 and a line naming the call and the thread,
//!   in the VM's log and in `start`'s error.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

use common::template;
use common::*;

/// The threads of process `pid`: (name, the `Seccomp:` field).
fn threads(pid: i32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or("")
                .trim()
                .to_string()
        };
        out.push((field("Name:"), field("Seccomp:")));
    }
    out
}

#[test]
fn every_thread_is_filtered_and_a_forbidden_call_is_reported() {
    if !kvm_usable() || default_guest().is_none() {
        return;
    }
    let vm = TestVm::from_template("seccomp", &template::DEFAULT, &[]);
    // The agent's path (API requests, vsock connections) works filtered.
    assert_eq!(vm.exec(&["true"]).code, 0);
    let pid: i32 = std::fs::read_to_string(vm.dir().join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let threads = threads(pid);
    let unfiltered: Vec<_> = threads.iter().filter(|(_, s)| s != "2").collect();
    assert!(
        unfiltered.is_empty(),
        "threads without a seccomp filter: {unfiltered:?} (all: {threads:?})"
    );
    for name in [
        "vcpu0",
        "virtio-net",
        "virtio-vsock",
        "virtio-balloon",
        "net-nat",
        "api",
        "spawner",
    ] {
        assert!(
            threads.iter().any(|(n, _)| n == name),
            "no {name} thread in {threads:?}"
        );
    }

    // A second clone of the same snapshot, started with the hook: its
    // vsock worker starts as the machine is restored and makes a call
    // its filter does not allow.
    vm.ok(&[
        "clone",
        "template",
        "seccomp-deny",
        "--snapshot",
        "booted",
        "--linked",
    ]);
    let out = hostvisor(
        &["start", "seccomp-deny"],
        &[
            ("XDG_DATA_HOME", vm.data.to_str().unwrap()),
            ("HOSTVISOR_SECCOMP_TEST_DENY", "virtio-vsock"),
        ],
        BOOT,
    );
    let line = "hostvisor: seccomp: thread \"virtio-vsock\" (virtio-vsock filter) made the forbidden system call personality (135); ending the VM process";
    assert_ne!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("exit status: 159"),
        "start should report the VM process's status 159: {}",
        out.stderr
    );
    let log = std::fs::read_to_string(vm.data.join("hostvisor/vms/seccomp-deny/vmm.log")).unwrap();
    assert!(log.contains(line), "the VM's log lacks {line:?}:\n{log}");
    let _ = vm.hv(&["delete", "seccomp-deny"]);
    // The first VM is unharmed.
    assert_eq!(vm.exec(&["true"]).code, 0);
}
