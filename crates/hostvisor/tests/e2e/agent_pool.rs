//! The vsock device's pooled connection to the agent (a managed VM's
//! `CONNECT 52` is answered without a guest handshake) end to end, on one
//! default guest: exec works at once after boot (while the pool still
//! waits for the agent's listener), after the guest's agent restarts (the
//! pooled connection it had accepted is gone), and after a snapshot
//! restore (connections do not cross it; the pool waits for the guest to
//! handle the transport reset).

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

use std::time::{Duration, Instant};

use common::*;

fn agent_pid(vm: &TestVm) -> String {
    vm.sh("pidof hostvisor-agent").trim().to_string()
}

#[test]
fn exec_works_after_boot_an_agent_restart_and_a_restore() {
    if !kvm_usable() || default_guest().is_none() {
        return;
    }
    let vm = TestVm::start("pool", &[]);
    let config: serde_json::Value =
        serde_json::from_str(&vm.ok(&["show", "pool", "--json"])).unwrap();
    assert_eq!(config["config"]["vsock"]["pool"], serde_json::json!([52]));
    // Right after boot: the first exec waits for the agent itself.
    assert_eq!(vm.sh("echo up"), "up\n");
    for i in 0..5 {
        assert_eq!(vm.sh(&format!("echo {i}")), format!("{i}\n"));
    }

    // The agent restarts (init starts it again when a signal ends it):
    // the connection the pool held is reset by the guest, and the next
    // commands still run.
    let before = agent_pid(&vm);
    vm.sh(&format!(
        "(sleep 1; kill {before}) </dev/null >/dev/null 2>&1 &"
    ));
    let start = Instant::now();
    let after = loop {
        let out = vm.exec(&["pidof", "hostvisor-agent"]);
        let pid = out.stdout.trim().to_string();
        if out.code == 0 && !pid.is_empty() && pid != before {
            break pid;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the agent was not restarted: {}{}",
            out.stdout,
            out.stderr
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_ne!(after, before);
    for i in 0..3 {
        assert_eq!(vm.sh(&format!("echo again {i}")), format!("again {i}\n"));
    }

    // A snapshot restore: the guest drops its connections on the
    // transport reset; the next commands run.
    vm.sh("echo one > /tmp/note");
    vm.ok(&["snapshot", "take", "pool", "s1"]);
    vm.sh("echo two > /tmp/note");
    vm.ok(&["snapshot", "restore", "pool", "s1"]);
    assert_eq!(vm.sh("cat /tmp/note"), "one\n");
    for i in 0..3 {
        assert_eq!(
            vm.sh(&format!("echo restored {i}")),
            format!("restored {i}\n")
        );
    }
}
