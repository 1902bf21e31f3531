//! Managed VMs end to end: create → start → list → console → API → pause
//! (the guest's clock stands still) → resume → stop → delete, and a VM
//! process killed with SIGKILL shows as crashed and starts again.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// Runs hostvisor with its store in `data`.
fn hv(data: &Path, args: &[&str]) -> Output {
    hostvisor(
        args,
        &[("XDG_DATA_HOME", data.to_str().unwrap())],
        Duration::from_secs(60),
    )
}

fn ok(data: &Path, args: &[&str]) -> String {
    let out = hv(data, args);
    assert_eq!(
        out.code, 0,
        "hostvisor {args:?}: {}{}",
        out.stdout, out.stderr
    );
    out.stdout
}

fn vm_dir(data: &Path, name: &str) -> PathBuf {
    data.join("hostvisor/vms").join(name)
}

fn state(data: &Path, name: &str) -> String {
    let list: serde_json::Value = serde_json::from_str(&ok(data, &["list", "--json"])).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .map(|v| v["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// The guest's clock readings printed so far (`TICK <seconds>`).
fn ticks(console: &Path) -> Vec<i64> {
    let text = String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default()).into_owned();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("TICK "))
        .filter_map(|t| t.trim().parse().ok())
        .collect()
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_managed_vm_lives_its_whole_life() {
    if !kvm_usable() || default_guest().is_none() {
        return;
    }
    let data = temp_dir("manage");
    let name = "e2e";
    // The guest prints its clock every second, and echoes lines typed on
    // its console.
    let script = "while true; do echo TICK $(date +%s); read -t 1 line && echo GOT-$line; done";
    let append = format!("hostvisor.run={}", base64(script.as_bytes()));
    // No vsock: the guest agent would set the clock right after the resume
    // (as it should), and this test is about the VMM freezing it.
    ok(
        &data,
        &["create", name, "--append", &append, "--vsock", "none"],
    );
    let dir = vm_dir(&data, name);
    let config = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(config.contains("cpus = 1"), "{config}");
    assert_eq!(state(&data, name), "created");
    let out = hv(&data, &["create", name]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("already exists"));
    // Unknown fields in a definition are refused by name.
    std::fs::write(
        dir.join("config.toml"),
        format!("{config}colour = \"red\"\n"),
    )
    .unwrap();
    let out = hv(&data, &["start", name]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("unknown field `colour`"),
        "{}",
        out.stderr
    );
    std::fs::write(dir.join("config.toml"), &config).unwrap();

    ok(&data, &["start", name]);
    assert_eq!(state(&data, name), "running");
    let out = hv(&data, &["start", name]);
    assert!(
        out.code == 1 && out.stderr.contains("already running"),
        "{}",
        out.stderr
    );
    let sock = dir.join("api.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // `console` (not a terminal here: no raw mode) sees the READY line,
    // and so does `logs -f`.
    for follow in [&["console", name][..], &["logs", "-f", name]] {
        let seen = run_until(
            follow,
            &[("XDG_DATA_HOME", data.to_str().unwrap())],
            b"TICK",
        );
        assert!(
            contains(&seen, b"HOSTVISOR-GUEST-READY cpus=1"),
            "{follow:?}: {}",
            String::from_utf8_lossy(&seen)
        );
    }

    // The API, on the real VM.
    let client = api::Client::new(&sock);
    let vm = client.request("GET", "/vm", "").unwrap();
    assert_eq!(vm.status, 200);
    let vm = vm.json().unwrap();
    assert_eq!(vm["name"], name);
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["status"]["vcpus"], 1);
    assert!(vm["status"]["counters"]["exits"].as_u64().unwrap() > 0);
    assert!(vm["config"]["kernel"].is_string());
    // Typing on the console reaches the guest.
    let typed = client.request("PUT", "/vm/console", "hello\n").unwrap();
    assert_eq!(typed.status, 204);
    wait_for("the typed line", Duration::from_secs(60), || {
        contains(
            &std::fs::read(dir.join("console.log")).unwrap_or_default(),
            b"GOT-hello",
        )
    });
    for (method, path, body, want) in [
        ("PUT", "/vm/resume", "", 409),
        ("PUT", "/vm/pause", "{bad json", 400),
        ("PUT", "/vm/stop", r#"{"timeout_seconds": 1}"#, 400),
        // Beyond a day: refused, where it once overflowed in the VM
        // process after a 202 and the VM never stopped.
        (
            "PUT",
            "/vm/stop",
            r#"{"timeout_s": 18446744073709551615}"#,
            400,
        ),
        ("DELETE", "/vm", "", 405),
        ("GET", "/vms", "", 404),
    ] {
        let r = client.request(method, path, body).unwrap();
        assert_eq!(r.status, want, "{method} {path}: {}", r.error_message());
        assert!(!r.error_message().is_empty());
    }

    // Pause: no vCPU runs and the guest's clock stands still.
    let console_log = dir.join("console.log");
    wait_for("two ticks", BOOT, || ticks(&console_log).len() >= 2);
    ok(&data, &["pause", name]);
    let paused_at = Instant::now();
    assert_eq!(state(&data, name), "paused");
    let out = hv(&data, &["pause", name]);
    assert!(
        out.code == 1 && out.stderr.contains("already paused"),
        "{}",
        out.stderr
    );
    let before = ticks(&console_log);
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(ticks(&console_log), before, "the guest ran while paused");
    ok(&data, &["resume", name]);
    let paused_for = paused_at.elapsed().as_secs() as i64;
    wait_for("ticks after resume", Duration::from_secs(60), || {
        ticks(&console_log).len() >= before.len() + 3
    });
    let after = ticks(&console_log);
    let (last_before, next) = (before[before.len() - 1], after[before.len()]);
    // A tick takes a few seconds here (more under load); a clock that ran
    // through the pause would jump by at least the pause.
    assert!(
        next - last_before < paused_for - 3,
        "the guest's clock moved {}s across a {paused_for}s pause",
        next - last_before
    );
    let show: serde_json::Value =
        serde_json::from_str(&ok(&data, &["show", name, "--json"])).unwrap();
    assert!(
        show["status"]["paused_ms"].as_u64().unwrap() >= 5000,
        "{show}"
    );

    // Stop: the VM process ends cleanly and leaves no socket or pidfile.
    ok(&data, &["stop", name, "--timeout", "5"]);
    assert_eq!(state(&data, name), "stopped");
    assert!(!sock.exists() && !dir.join("pid").exists());
    let out = hv(&data, &["pause", name]);
    assert!(
        out.code == 1 && out.stderr.contains("not running"),
        "{}",
        out.stderr
    );
    ok(&data, &["edit", name, "--memory", "128M"]);
    assert!(std::fs::read_to_string(dir.join("config.toml"))
        .unwrap()
        .contains("memory = \"128M\""));
    assert!(ok(&data, &["logs", name]).contains("TICK"));

    // SIGKILL of the VM process: crashed, and it starts again.
    ok(&data, &["start", name]);
    let pid: i32 = std::fs::read_to_string(dir.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) of the VM process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("the VM process to die", Duration::from_secs(10), || {
        state(&data, name) == "crashed"
    });
    ok(&data, &["start", name]);
    assert_eq!(state(&data, name), "running");
    ok(&data, &["kill", name]);
    assert_eq!(state(&data, name), "stopped");

    // Delete removes every file.
    ok(&data, &["delete", name]);
    assert!(!dir.exists());
    assert_eq!(state(&data, name), "");
    let out = hv(&data, &["show", name]);
    assert!(
        out.code == 1 && out.stderr.contains("no VM named"),
        "{}",
        out.stderr
    );
    std::fs::remove_dir_all(&data).unwrap();
}

#[test]
fn concurrent_starts_run_one_vm_process() {
    if !kvm_usable() || default_guest().is_none() {
        return;
    }
    let data = temp_dir("manage-race");
    ok(
        &data,
        &["create", "race", "--append", "hostvisor.test=poweroff"],
    );
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let data = data.clone();
            std::thread::spawn(move || hv(&data, &["start", "race"]).code)
        })
        .collect();
    let codes: Vec<i32> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(codes.iter().filter(|&&c| c == 0).count(), 1, "{codes:?}");
    ok(&data, &["kill", "race"]);
    ok(&data, &["delete", "race"]);
    std::fs::remove_dir_all(&data).unwrap();
}
