//! The `hostvisor` command as a user meets it: bad input gets one clear
//! line and the documented exit code; the default guest boots with 1 and 2
//! vCPUs; a guest kernel panic is reported as a crash.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_hostvisor");

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs hostvisor with `args`, killing it after `limit`.
fn hostvisor(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with_limit(cmd, limit)
}

fn run_with_limit(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd.spawn().expect("cannot start hostvisor");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "hostvisor did not finish within {limit:?}; output so far:\n{}",
                out.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn kvm_usable() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("HOSTVISOR_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("KVM is required (HOSTVISOR_REQUIRE_KVM=1) but /dev/kvm cannot be opened");
        }
        eprintln!("SKIPPED: /dev/kvm cannot be opened");
    }
    ok
}

/// The default guest built by guest/build.sh, if present.
fn default_guest() -> Option<PathBuf> {
    let dir = std::env::var_os("HOSTVISOR_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            PathBuf::from(home).join(".cache/hostvisor/guest")
        });
    if dir.join("vmlinux").exists() && dir.join("initramfs.cpio").exists() {
        return Some(dir);
    }
    if std::env::var("HOSTVISOR_REQUIRE_GUEST").as_deref() == Ok("1") {
        panic!(
            "the default guest is required but missing in {}",
            dir.display()
        );
    }
    eprintln!("SKIPPED: the default guest is not built (run guest/build.sh)");
    None
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hostvisor-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A usage or runtime error: the exit code, and exactly one line on stderr
/// that starts with "hostvisor: " and contains `needle`.
fn assert_one_line_error(out: &Output, code: i32, needle: &str) {
    assert_eq!(out.code, code, "stderr: {}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {:?}", out.stderr);
    assert!(lines[0].starts_with("hostvisor: "), "{}", lines[0]);
    assert!(lines[0].contains(needle), "{:?} lacks {needle:?}", lines[0]);
    assert!(!out.stderr.contains("panicked"));
}

const QUICK: Duration = Duration::from_secs(30);

#[test]
fn bad_arguments_are_usage_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--cpus", "0"], "--cpus"),
        (&["run", "--cpus", "many"], "--cpus"),
        (&["run", "--memory", "1K"], "too small"),
        (&["run", "--memory", "lots"], "invalid size"),
        (&["run", "--serial", "tty"], "stdio, file:PATH or none"),
        (&["run", "--on-reset", "explode"], "shutdown or restart"),
        (
            &["run", "--hide-cpu-features", "cx17"],
            "unknown CPU feature `cx17`",
        ),
        (&["run", "--no-such-flag"], "--no-such-flag"),
        (&["fly"], "fly"),
    ];
    for (args, needle) in cases {
        let out = hostvisor(args, &[], QUICK);
        assert_one_line_error(&out, 2, needle);
    }
}

#[test]
fn help_and_version_succeed() {
    let out = hostvisor(&["run", "--help"], &[], QUICK);
    assert_eq!(out.code, 0);
    assert!(out.stdout.contains("--append"));
    let out = hostvisor(&["--version"], &[], QUICK);
    assert_eq!(out.code, 0);
    assert!(out.stdout.starts_with("hostvisor "));
}

#[test]
fn missing_default_guest_says_how_to_build_it() {
    let out = hostvisor(
        &["run"],
        &[("HOSTVISOR_GUEST_DIR", "/nonexistent/hv")],
        QUICK,
    );
    assert_one_line_error(&out, 1, "guest/build.sh");
}

#[test]
fn unreadable_and_non_kernel_files_are_refused() {
    if !kvm_usable() {
        return;
    }
    let dir = temp_dir("files");
    let text = dir.join("notes.txt");
    std::fs::write(&text, "not a kernel\n").unwrap();
    let out = hostvisor(&["run", "--kernel", "/nonexistent/vmlinux"], &[], QUICK);
    assert_one_line_error(&out, 1, "cannot read the kernel /nonexistent/vmlinux");
    let out = hostvisor(&["run", "--kernel", text.to_str().unwrap()], &[], QUICK);
    assert_one_line_error(&out, 1, "is not a Linux kernel");
    let out = hostvisor(&["run", "--kernel", dir.to_str().unwrap()], &[], QUICK);
    assert_one_line_error(&out, 1, "kernel");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn too_many_cpus_is_a_usage_error() {
    if !kvm_usable() {
        return;
    }
    let out = hostvisor(
        &["run", "--kernel", "/dev/null", "--cpus", "4096"],
        &[],
        QUICK,
    );
    assert_one_line_error(&out, 2, "at most");
}

#[test]
fn initrd_larger_than_ram_is_refused() {
    if !kvm_usable() {
        return;
    }
    let Some(guest) = default_guest() else { return };
    let dir = temp_dir("initrd");
    let big = dir.join("big.cpio");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(100 << 20).unwrap(); // sparse
    let kernel = guest.join("vmlinux");
    let out = hostvisor(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            big.to_str().unwrap(),
            "--memory",
            "64M",
        ],
        &[],
        QUICK,
    );
    assert_one_line_error(&out, 1, "does not fit in guest RAM");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_kvm_says_how_to_get_it() {
    // /dev/kvm hidden in a private mount namespace (needs root and unshare).
    let Ok(unshare) = which("unshare") else {
        eprintln!("SKIPPED: no unshare");
        return;
    };
    let probe = Command::new(&unshare).args(["-m", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: cannot create a mount namespace here");
        return;
    }
    let script = format!("mount -t tmpfs none /dev && exec {BIN} run --kernel /nonexistent");
    let mut cmd = Command::new(unshare);
    cmd.args(["-m", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = run_with_limit(cmd, QUICK);
    assert_one_line_error(&out, 1, "/dev/kvm");
    assert!(
        out.stderr.contains("kvm_intel or kvm_amd"),
        "{}",
        out.stderr
    );
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

const BOOT: Duration = Duration::from_secs(240);

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_matches_the_standard_alphabet() {
    assert_eq!(base64(b"echo hi"), "ZWNobyBoaQ==");
    assert_eq!(base64(b"abc"), "YWJj");
    assert_eq!(base64(b"ab"), "YWI=");
}

#[test]
fn default_guest_runs_a_script_with_one_vcpu() {
    if !kvm_usable() {
        return;
    }
    if default_guest().is_none() {
        return;
    }
    // Checks inside the guest: its clock (read from the RTC/kvmclock at
    // boot) is the host's, and the script's status comes back.
    let script = "echo GUEST-TIME=$(date +%s); echo GUEST-CPUS=$(nproc); exit 7";
    let append = format!("hostvisor.run={}", base64(script.as_bytes()));
    let host_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let out = hostvisor(&["run", "--append", &append], &[], BOOT);
    assert_eq!(
        out.code, 0,
        "stdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    assert!(
        out.stdout.contains("HOSTVISOR-GUEST-READY cpus=1"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("GUEST-CPUS=1"), "{}", out.stdout);
    assert!(
        out.stdout.contains("HOSTVISOR-RUN-EXIT 7"),
        "{}",
        out.stdout
    );
    let guest_time: i64 = out
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("GUEST-TIME="))
        .expect("guest printed its time")
        .parse()
        .unwrap();
    assert!(
        (guest_time - host_now).abs() < 300,
        "guest clock {guest_time} vs host {host_now}"
    );
}

#[test]
fn default_guest_boots_with_two_vcpus() {
    if !kvm_usable() {
        return;
    }
    if default_guest().is_none() {
        return;
    }
    let out = hostvisor(
        &["run", "--cpus", "2", "--append", "hostvisor.test=poweroff"],
        &[],
        BOOT,
    );
    assert_eq!(
        out.code, 0,
        "stdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    assert!(
        out.stdout.contains("HOSTVISOR-GUEST-READY cpus=2"),
        "{}",
        out.stdout
    );
}

#[test]
fn guest_kernel_panic_is_a_crash() {
    if !kvm_usable() {
        return;
    }
    if default_guest().is_none() {
        return;
    }
    // An init that does not exist: Linux panics, then reboots (panic=-1).
    let out = hostvisor(&["run", "--append", "rdinit=/nope init=/nope"], &[], BOOT);
    assert_eq!(
        out.code, 3,
        "stdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    assert!(
        out.stderr.contains("Kernel panic - not syncing"),
        "{}",
        out.stderr
    );
}
