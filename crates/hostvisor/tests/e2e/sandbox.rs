//! The VMM process's boundaries (docs/security.md): backing files an image
//! names outside the allowed set are refused, Landlock refuses a host
//! file the VM does not need, and `--user` leaves no way back to root.
//! Tiny assembly guests only: no Linux boot.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const QUICK: Duration = Duration::from_secs(60);

/// Prints "b\n" on COM1, then resets through the i8042 (a shutdown).
const PRINT_AND_RESET: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'b', 0xee, // mov al, 'b'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
    0xf4, 0xeb, 0xfd, // hlt; jmp hlt
];

/// Prints "b\n" on COM1, then halts for good.
const PRINT_AND_HALT: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'b', 0xee, // mov al, 'b'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xfa, 0xf4, 0xeb, 0xfd, // cli; hlt; jmp hlt
];

fn landlock_available() -> bool {
    // SAFETY: the version query of landlock_create_ruleset reads nothing.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32,
        )
    };
    v >= 1
}

/// An image whose backing file is a host file outside its directory, as
/// one from elsewhere could be; and that file's directory.
fn hostile_image(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = temp_dir(&format!("{name}-images"));
    let outside = temp_dir(&format!("{name}-outside"));
    let secret = outside.join("secret.raw");
    std::fs::write(&secret, vec![0x5a; 1 << 20]).unwrap();
    let image = dir.join("hostile.qcow2");
    let out = hostvisor(
        &[
            "disk",
            "create",
            image.to_str().unwrap(),
            "-b",
            secret.to_str().unwrap(),
            "-F",
            "raw",
        ],
        &[],
        QUICK,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    (image, outside)
}

#[test]
fn a_backing_file_outside_the_allowed_set_is_refused() {
    let (image, outside) = hostile_image("backing");
    let img = image.to_str().unwrap();
    let copy = image.with_file_name("copy.raw");
    // info shows the name without opening it.
    let out = hostvisor(&["disk", "info", img], &[], QUICK);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("backing file not opened") && out.stdout.contains("--allow-backing"),
        "{}",
        out.stdout
    );
    // convert and check read through the chain: refused, with the fix.
    for args in [
        vec!["disk", "convert", img, copy.to_str().unwrap(), "-O", "raw"],
        vec!["disk", "check", img],
    ] {
        let out = hostvisor(&args, &[], QUICK);
        assert_ne!(out.code, 0, "{args:?} succeeded: {}", out.stdout);
        assert!(
            out.stderr.contains("outside the image's directory")
                && out.stderr.contains("--allow-backing"),
            "{args:?}: {}",
            out.stderr
        );
    }
    // Allowed by the user (flag or environment): it reads through.
    let allow = outside.to_str().unwrap();
    let out = hostvisor(
        &[
            "disk",
            "convert",
            "--allow-backing",
            allow,
            img,
            copy.to_str().unwrap(),
            "-O",
            "raw",
        ],
        &[],
        QUICK,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(std::fs::read(&copy).unwrap(), vec![0x5a; 1 << 20]);
    let out = hostvisor(
        &["disk", "check", img],
        &[("HOSTVISOR_ALLOW_BACKING", allow)],
        QUICK,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    // A VM with the image as its disk does not start.
    if kvm_usable() {
        let kernel = tiny_kernel("backing-run", PRINT_AND_RESET);
        let disk = format!("path={img}");
        let out = hostvisor(
            &[
                "run",
                "--kernel",
                kernel.to_str().unwrap(),
                "--memory",
                "32M",
                "--disk",
                &disk,
            ],
            &[],
            QUICK,
        );
        assert_eq!(out.code, 1, "{}", out.stderr);
        assert!(out.stderr.contains("--allow-backing"), "{}", out.stderr);
        let _ = std::fs::remove_dir_all(kernel.parent().unwrap());
    }
    let _ = std::fs::remove_dir_all(image.parent().unwrap());
    let _ = std::fs::remove_dir_all(&outside);
}

#[test]
fn landlock_refuses_a_host_file_the_vm_does_not_need() {
    if !kvm_usable() {
        return;
    }
    if !landlock_available() {
        skip("HOSTVISOR_REQUIRE_LANDLOCK", "the kernel has no Landlock");
        return;
    }
    let kernel = tiny_kernel("landlock", PRINT_AND_RESET);
    let secret = temp_dir("landlock-outside").join("unrelated");
    std::fs::write(&secret, b"not the VM's").unwrap();
    let hook = [("HOSTVISOR_TEST_SANDBOX_OPEN", secret.to_str().unwrap())];
    let run = |landlock: &str| {
        let out = hostvisor(
            &[
                "run",
                "--kernel",
                kernel.to_str().unwrap(),
                "--memory",
                "32M",
                "--landlock",
                landlock,
            ],
            &hook,
            QUICK,
        );
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(out.stdout, "b\n");
        out.stderr
    };
    // The hook opens the file after setup: refused with EACCES while
    // confined, opened without Landlock (so the refusal is Landlock's).
    let confined = run("on");
    let expected = format!("sandbox test open {}: errno 13", secret.display());
    assert!(confined.contains(&expected), "{confined}");
    let open = run("off");
    let expected = format!("sandbox test open {}: ok", secret.display());
    assert!(open.contains(&expected), "{open}");
    let _ = std::fs::remove_dir_all(kernel.parent().unwrap());
    let _ = std::fs::remove_dir_all(secret.parent().unwrap());
}

/// One field of /proc/PID/status.
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {status}"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn a_vm_started_as_root_runs_as_the_user_it_is_given() {
    if !kvm_usable() {
        return;
    }
    // SAFETY: geteuid only returns a value.
    if unsafe { libc::geteuid() } != 0 {
        skip(
            "HOSTVISOR_REQUIRE_SETPRIV",
            "switching to an unprivileged user needs root",
        );
        return;
    }
    let kernel = tiny_kernel("user", PRINT_AND_HALT);
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args([
                "run",
                "--kernel",
                kernel.to_str().unwrap(),
                "--memory",
                "32M",
            ])
            .args(["--user", "nobody"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The guest prints once the VM runs, after the switch.
    let mut stdout = child.0.stdout.take().unwrap();
    let seen = read_until(&mut stdout, QUICK, |s| contains(s, b"b\n"));
    if !contains(&seen, b"b\n") {
        let _ = child.0.kill();
        let mut err = String::new();
        let _ = child.0.stderr.take().unwrap().read_to_string(&mut err);
        panic!("the guest did not run: {err}");
    }
    let pid = child.0.id();
    // nobody is 65534 on Debian and most others; read it from the system.
    let nobody = Command::new("id").args(["-u", "nobody"]).output().unwrap();
    let uid = String::from_utf8_lossy(&nobody.stdout).trim().to_string();
    let nogroup = Command::new("id").args(["-g", "nobody"]).output().unwrap();
    let gid = String::from_utf8_lossy(&nogroup.stdout).trim().to_string();
    assert_eq!(status_field(pid, "Uid"), [uid.as_str(); 4].join(" "));
    assert_eq!(status_field(pid, "Gid"), [gid.as_str(); 4].join(" "));
    assert_eq!(status_field(pid, "Groups"), gid);
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // No capability is left to regain root with (effective, permitted).
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    // Every thread, not only the main one.
    let start = Instant::now();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        assert!(
            status.contains(&format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}")),
            "{}: {status}",
            task.display()
        );
    }
    assert!(start.elapsed() < QUICK);
    drop(child);
    let _ = std::fs::remove_dir_all(kernel.parent().unwrap());
}

#[test]
fn user_needs_root_and_a_known_user() {
    // SAFETY: geteuid only returns a value.
    let root = unsafe { libc::geteuid() } == 0;
    let kernel = tiny_kernel("user-bad", PRINT_AND_RESET);
    let k = kernel.to_str().unwrap();
    let out = hostvisor(
        &[
            "run",
            "--kernel",
            k,
            "--memory",
            "32M",
            "--user",
            "no-such-user-hv",
        ],
        &[],
        QUICK,
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    let wanted = if root {
        "no such user"
    } else {
        "started as root"
    };
    assert!(out.stderr.contains(wanted), "{}", out.stderr);
    let out = hostvisor(&["run", "--kernel", k, "--user", "a b"], &[], QUICK);
    assert_eq!(out.code, 2, "{}", out.stderr);
    let _ = std::fs::remove_dir_all(kernel.parent().unwrap());
}
