//! `hostvisor run` and its terminal, with tiny hand-made guests instead of
//! Linux (an ELF "kernel" of a few instructions, booted in seconds): the
//! console input thread follows the VM across reboots, and `Ctrl-A x`
//! ends a VM whose console output nobody reads.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Prints `BOOT\n` on COM1, then echoes every byte it receives; an `R`
/// resets the machine through the i8042.
const ECHO_GUEST: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'B', 0xee, // mov al, 'B'; out dx, al
    0xb0, b'O', 0xee, //
    0xb0, b'O', 0xee, //
    0xb0, b'T', 0xee, //
    0xb0, b'\n', 0xee, //
    // poll:
    0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd (LSR)
    0xec, // in al, dx
    0xa8, 0x01, // test al, 1 (data ready)
    0x74, 0xf7, // jz poll
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xec, // in al, dx
    0x3c, b'R', // cmp al, 'R'
    0x74, 0x03, // je reset
    0xee, // out dx, al (echo)
    0xeb, 0xeb, // jmp poll
    // reset:
    0xb0, 0xfe, // mov al, 0xfe
    0xe6, 0x64, // out 0x64, al (i8042: pulse reset)
    0xf4, // hlt
    0xeb, 0xfd, // jmp hlt
];

/// Writes `A` on COM1 forever.
const CHATTY_GUEST: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'A', // mov al, 'A'
    0xee, // out dx, al
    0xeb, 0xfd, // jmp out
];

fn write_guest(name: &str, code: &[u8]) -> (PathBuf, PathBuf) {
    let kernel = tiny_kernel(name, code);
    (kernel.parent().unwrap().to_path_buf(), kernel)
}

fn spawn_run(kernel: &Path, extra: &[&str]) -> Child {
    Command::new(BIN)
        .args([
            "run",
            "--memory",
            "64M",
            "--kernel",
            kernel.to_str().unwrap(),
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Collects a child's output on a thread.
fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            s.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    seen
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

fn wait_until(what: &str, limit: Duration, seen: &Mutex<Vec<u8>>, done: impl Fn(&[u8]) -> bool) {
    let start = Instant::now();
    while !done(&seen.lock().unwrap()) {
        assert!(
            start.elapsed() < limit,
            "timed out waiting for {what}; output: {:?}",
            String::from_utf8_lossy(&seen.lock().unwrap())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the child to exit within `limit`, killing it otherwise.
fn exits_within(child: &mut Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// With `--on-reset restart`, every boot used to start another stdin
/// reader and never stop the old one, so keystrokes after a reboot went
/// to a dead machine (and `Ctrl-A x` with them). Now one thread follows
/// the VM: after two reboots, typed bytes reach the new guest and
/// `Ctrl-A x` ends the process.
#[test]
fn console_input_follows_the_vm_across_reboots() {
    if !kvm_usable() {
        return;
    }
    let (dir, kernel) = write_guest("console-reboot", ECHO_GUEST);
    let mut child = spawn_run(&kernel, &["--on-reset", "restart"]);
    let mut stdin = child.stdin.take().unwrap();
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    let limit = Duration::from_secs(60);
    wait_until("the first boot", limit, &out, |o| count(o, b"BOOT\n") >= 1);
    for boots in 2..=3 {
        stdin.write_all(b"R").unwrap();
        wait_until("a reboot", limit, &out, |o| count(o, b"BOOT\n") >= boots);
    }
    for word in [&b"hello"[..], b"again"] {
        stdin.write_all(word).unwrap();
        wait_until(
            "the echo from the third boot",
            Duration::from_secs(20),
            &out,
            |o| {
                let after = o.rsplit(|&b| b == b'\n').next().unwrap_or_default();
                contains(after, word)
            },
        );
    }
    stdin.write_all(b"\x01x").unwrap();
    let code = exits_within(&mut child, Duration::from_secs(20));
    assert_eq!(
        code,
        Some(0),
        "Ctrl-A x after reboots did not end the VM; stderr: {}",
        String::from_utf8_lossy(&err.lock().unwrap())
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A guest whose console output nobody reads blocks its vCPU in a write
/// to the full pipe; `Ctrl-A x` must still end the process (the vCPU is
/// left behind after a bounded wait), where it used to wait forever.
#[test]
fn ctrl_a_x_ends_a_vm_whose_output_nobody_reads() {
    if !kvm_usable() {
        return;
    }
    let (dir, kernel) = write_guest("console-blocked", CHATTY_GUEST);
    let mut child = spawn_run(&kernel, &[]);
    let mut stdin = child.stdin.take().unwrap();
    // Keep stdout open and unread: the pipe fills and stays full.
    let _stdout = child.stdout.take().unwrap();
    let err = collect(child.stderr.take().unwrap());
    // Give the guest time to fill the pipe (64 KiB, a byte per exit).
    let fd = std::os::fd::AsRawFd::as_raw_fd(&_stdout);
    let start = Instant::now();
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD on our end of the pipe writes one int.
        unsafe { libc::ioctl(fd, libc::FIONREAD, &mut queued) };
        if queued >= 60 << 10 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the guest did not fill the pipe ({queued} bytes); stderr: {}",
            String::from_utf8_lossy(&err.lock().unwrap())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    stdin.write_all(b"\x01x").unwrap();
    let code = exits_within(&mut child, Duration::from_secs(20));
    assert_eq!(
        code,
        Some(0),
        "the VM did not end; stderr: {}",
        String::from_utf8_lossy(&err.lock().unwrap())
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
