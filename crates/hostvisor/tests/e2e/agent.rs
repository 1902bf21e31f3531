//! The guest agent end to end, on the default guest: one managed VM (what
//! a bare `create` makes — vsock by default — resumed from the shared
//! template rather than booted) for exec, exit codes, signals, stdin, a
//! 10 MB copy both ways, the clock and a graceful stop; and one
//! `hostvisor run --vsock` VM, booted (the agent must come up in a boot
//! of `run`), driven through the client library, with hostile input on
//! the vsock socket and a shutdown that ends `run` with 0.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent::client::{Client, Transport};
use common::*;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn the_agent_runs_commands_copies_files_keeps_time_and_stops_the_guest() {
    if !kvm_usable() || default_guest().is_none() {
        return;
    }
    // A clone of the booted default guest: the CID a bare `create` gets
    // in a store of its own, and (as a clone) its name as hostname.
    let vm = TestVm::from_template("agent", &common::template::DEFAULT, &[]);
    let show = vm.ok(&["show", "agent"]);
    assert!(show.contains("vsock: cid 3"), "{show}");

    // exec: output, exit codes, signals, timeouts, missing programs.
    let out = vm.exec(&["uname", "-a"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.starts_with("Linux agent "), "{}", out.stdout);
    let out = vm.exec(&["sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (7, "out\n", "err\n")
    );
    assert_eq!(vm.exec(&["sh", "-c", "kill -TERM $$"]).code, 128 + 15);
    let out = vm.exec_args(&["agent", "--timeout", "1", "--", "sleep", "30"]);
    assert_eq!(out.code, 124);
    assert!(out.stderr.contains("timed out"), "{}", out.stderr);
    assert_eq!(vm.exec(&["/no/such/program"]).code, 127);
    let out = vm.exec_args(&[
        "agent",
        "-e",
        "WHO=agent",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo $WHO; pwd",
    ]);
    assert_eq!(out.stdout, "agent\n/tmp\n", "{}", out.stderr);
    // -i: stdin reaches the command.
    let interactive = || {
        let mut child = Command::new(BIN)
            .args([
                "exec",
                "-i",
                "agent",
                "--",
                "sh",
                "-c",
                "read -r l; echo got-$l",
            ])
            .env("XDG_DATA_HOME", &vm.data)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"typed\n").unwrap();
        child.wait_with_output().unwrap()
    };
    let mut out = interactive();
    if out.status.code() == Some(128 + 11) {
        eprintln!("NOTE: exec -i died of SIGSEGV in the guest; retrying once (nested-KVM fault)");
        out = interactive();
    }
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got-typed\n");

    // 10 MB both ways, the same SHA-256 everywhere; the mode is kept.
    let dir = temp_dir("agent-files");
    let src = dir.join("ten.bin");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<u8> = (0..10_000_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(&src, &data).unwrap();
    std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    let want = tool("sha256sum", &[src.to_str().unwrap()]);
    let want = want.split_whitespace().next().unwrap();
    vm.ok(&["cp", src.to_str().unwrap(), "agent:/tmp/"]);
    let guest = vm.sh("sha256sum /tmp/ten.bin; stat -c %a /tmp/ten.bin");
    assert_eq!(guest, format!("{want}  /tmp/ten.bin\n750\n"));
    let back = dir.join("back.bin");
    vm.ok(&["cp", "agent:/tmp/ten.bin", back.to_str().unwrap()]);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the copy back differs"
    );
    let out = vm.hv(&["cp", "agent:/no/such/file", back.to_str().unwrap()]);
    assert_one_line_error(&out, 1, "/no/such/file");
    assert_eq!(std::fs::read(&back).unwrap().len(), data.len(), "kept");
    let out = vm.hv(&["cp", src.to_str().unwrap(), back.to_str().unwrap()]);
    assert_one_line_error(&out, 2, "NAME:PATH");

    // The clock: set an hour wrong, corrected within the check interval.
    let wrong = now() - 3600;
    // Set and read back in one command: the VMM's clock check (every
    // 10 s) may correct the clock between two commands.
    let set_back: i64 = vm
        .sh(&format!("date -s @{wrong} >/dev/null; date +%s"))
        .trim()
        .parse()
        .unwrap();
    assert!(set_back < now() - 3000, "the guest clock was not set back");
    let guest_now = |vm: &TestVm| vm.sh("date +%s").trim().parse::<i64>().unwrap();
    let start = Instant::now();
    while (guest_now(&vm) - now()).abs() > 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the guest clock was not corrected"
        );
        std::thread::sleep(Duration::from_secs(2));
    }

    let info: serde_json::Value =
        serde_json::from_str(&vm.ok(&["guest-info", "agent", "--json"])).unwrap();
    assert_eq!(info["hostname"], "agent");
    assert!(info["kernel_release"].as_str().unwrap().starts_with("6.1"));
    assert!(info["mem_total_kib"].as_u64().unwrap() > 100_000);
    // The default guest configures no interface (not even lo) before the
    // network issue; the address listing is checked on the host's own
    // interfaces in the agent crate's tests.
    assert!(info["addresses"].is_array());
    assert_eq!(info["agent_version"], agent::VERSION);

    // stop: the agent powers the guest off; nothing is killed.
    vm.ok(&["stop", "agent"]);
    let show: serde_json::Value =
        serde_json::from_str(&vm.ok(&["show", "agent", "--json"])).unwrap();
    assert_eq!(show["state"], "stopped");
    assert_eq!(show["last_exit"]["message"], "Reset", "{show}");
    let console = std::fs::read_to_string(vm.dir().join("console.log")).unwrap();
    assert!(console.contains("reboot: Restarting system"), "{console}");
    let out = vm.exec(&["true"]);
    assert_one_line_error(&out, 125, "not running");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_with_vsock_serves_the_agent_survives_hostile_input_and_shuts_down() {
    if !kvm_usable() || default_guest().is_none() {
        return;
    }
    let dir = temp_dir("run-vsock");
    let socket = dir.join("v.sock");
    let mut vm = Command::new(BIN)
        .args([
            "run",
            "--serial",
            "none",
            "--vsock",
            &format!("cid=7,socket={}", socket.display()),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client = Client::new(Transport::Muxer(socket.clone()));
    client.wait_ready(BOOT).unwrap();

    // Hostile host-side input: bad CONNECT lines, a port nobody serves,
    // garbage frames for the agent. The VM and the agent live on.
    let talk = |bytes: &[u8]| {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(bytes).unwrap();
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply).into_owned()
    };
    assert!(talk(b"HELLO\n").starts_with("ERROR"));
    assert!(talk(b"CONNECT 99999999999\n").starts_with("ERROR"));
    assert_eq!(talk(b"CONNECT 4000\n"), "", "no listener: closed");
    let reply = talk(b"CONNECT 52\n\xff\xff\xff\xff");
    assert!(reply.starts_with("OK "), "{reply}");
    let reply = talk(b"CONNECT 52\n\x05\x00\x00\x00\x63\x63\x63\x63\x63");
    assert!(reply.starts_with("OK "), "{reply}");

    let (version, _) = client.ping().unwrap();
    assert_eq!(version, agent::VERSION);
    let info = client.info().unwrap();
    assert_eq!(info.hostname, "hostvisor");

    client.shutdown(false).unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = vm.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < QUICK * 2, "the guest did not shut down");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    vm.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!socket.exists(), "the vsock socket is removed at exit");
    let _ = std::fs::remove_dir_all(&dir);
}
