//! `hostvisor doctor`, shell completions and man pages.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const QUICK: Duration = Duration::from_secs(30);

fn doctor_json(env: &[(&str, &str)]) -> (i32, Vec<serde_json::Value>) {
    let out = hostvisor(&["doctor", "--json"], env, QUICK);
    let checks: Vec<serde_json::Value> = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json printed no JSON ({e}):\n{}", out.stdout));
    (out.code, checks)
}

fn check<'a>(checks: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {checks:?}"))
}

#[test]
fn doctor_on_this_host_lists_every_check() {
    if !kvm_usable() {
        return;
    }
    let out = hostvisor(&["doctor"], &[], QUICK);
    for name in [
        "kvm",
        "kvm-api",
        "kvm-kind",
        "libslirp",
        "default-guest",
        "qemu-img",
        "tap",
        "hugepages",
        "user-namespaces",
        "landlock",
    ] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(name)),
            "no line for {name}:\n{}",
            out.stdout
        );
    }
    assert_eq!(out.code, 0, "a usable host passes:\n{}", out.stdout);
    let (code, checks) = doctor_json(&[]);
    assert_eq!(code, 0);
    assert_eq!(check(&checks, "kvm")["status"], "ok");
    assert_eq!(check(&checks, "libslirp")["status"], "ok");
    assert!(check(&checks, "libslirp")["message"]
        .as_str()
        .is_some_and(|m| m.contains("libslirp 4.")));
    // This project's development machines run a nested PVM KVM: the doctor
    // must say what that costs.
    let kind = check(&checks, "kvm-kind");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(kind["status"], "warn");
        assert!(kind["message"].as_str().unwrap().contains("emulated"));
    }
}

#[test]
fn doctor_names_a_missing_libslirp_and_its_fix() {
    let env = [("HOSTVISOR_LIBSLIRP", "/nonexistent/libslirp.so.0")];
    let out = hostvisor(&["doctor"], &env, QUICK);
    assert_eq!(out.code, 1, "libslirp is required:\n{}", out.stdout);
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("libslirp"))
        .expect("a libslirp line");
    assert!(line.starts_with("FAIL"), "{line}");
    assert!(line.contains("apt install libslirp0"), "{line}");
    let (code, checks) = doctor_json(&env);
    assert_eq!(code, 1);
    assert_eq!(check(&checks, "libslirp")["status"], "fail");
    assert_eq!(check(&checks, "libslirp")["required"], true);

    // A VM with a NAT NIC fails with the same advice, and nothing else
    // needs the library: the binary starts without it.
    if !kvm_usable() {
        return;
    }
    let out = hostvisor(
        &["run", "--kernel", "/nonexistent", "--net", "nat"],
        &env,
        QUICK,
    );
    assert_one_line_error(&out, 1, "libslirp");
    assert!(
        out.stderr.contains("apt install libslirp0") && out.stderr.contains("hostvisor doctor"),
        "{}",
        out.stderr
    );
    let out = hostvisor(&["--version"], &env, QUICK);
    assert_eq!(out.code, 0, "{}", out.stderr);
}

#[test]
fn doctor_explains_an_inaccessible_kvm_device() {
    // A /dev/kvm of mode 000 (a node of our own, bind-mounted over it in a
    // private mount namespace) seen by an unprivileged user: root would
    // open it anyway.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip(
            "HOSTVISOR_REQUIRE_MOUNTNS",
            "making a private /dev/kvm needs root",
        );
        return;
    }
    let dir = temp_dir("doctor-kvm");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The binary where the unprivileged user can run it.
    let bin = dir.join("hostvisor");
    std::fs::copy(BIN, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let node = dir.join("kvm");
    let c_node = std::ffi::CString::new(node.to_str().unwrap()).unwrap();
    // SAFETY: a valid path; creates a character device node 10:232 (KVM's)
    // of mode 000.
    let made = unsafe { libc::mknod(c_node.as_ptr(), libc::S_IFCHR, libc::makedev(10, 232)) };
    if made != 0 {
        skip(
            "HOSTVISOR_REQUIRE_MOUNTNS",
            &format!(
                "cannot make a device node here: {}",
                std::io::Error::last_os_error()
            ),
        );
        return;
    }
    let mut cmd = Command::new(&bin);
    cmd.args(["doctor"])
        .env("HOSTVISOR_GUEST_DIR", "/nonexistent")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let dev_kvm = c"/dev/kvm";
    let root = c"/";
    // SAFETY: between fork and exec only async-signal-safe system calls
    // run, on C strings made before the fork; they change only the child's
    // mount namespace and credentials.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return fail();
            }
            let private = libc::MS_REC | libc::MS_PRIVATE;
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                private,
                std::ptr::null(),
            ) != 0
            {
                return fail();
            }
            if libc::mount(
                c_node.as_ptr(),
                dev_kvm.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                return fail();
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return fail();
            }
            Ok(())
        });
    }
    let out = run_with_limit(cmd, QUICK);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    let line = out
        .stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("kvm"))
        .unwrap_or_else(|| panic!("no kvm line:\n{}", out.stdout));
    assert!(line.starts_with("FAIL"), "{line}");
    assert!(line.contains("Permission denied"), "{line}");
    assert!(line.contains("usermod -aG"), "{line}");
}

#[test]
fn completions_for_each_shell_come_from_the_cli_definition() {
    let out = hostvisor(&["completions", "bash"], &[], QUICK);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for word in ["doctor", "guest-info", "--on-reset", "convert"] {
        assert!(out.stdout.contains(word), "bash completion lacks {word}");
    }
    // The script is valid bash.
    let script = temp_dir("completions").join("hostvisor.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .unwrap();
    assert!(syntax.success());
    std::fs::remove_dir_all(script.parent().unwrap()).unwrap();
    for shell in ["zsh", "fish"] {
        let out = hostvisor(&["completions", shell], &[], QUICK);
        assert_eq!(out.code, 0);
        assert!(out.stdout.contains("guest-info"), "{shell}");
    }
    let out = hostvisor(&["completions", "tcsh"], &[], QUICK);
    assert_one_line_error(&out, 2, "tcsh");
}

#[test]
fn man_pages_cover_every_command() {
    let dir = temp_dir("man");
    let out = hostvisor(&["man", dir.to_str().unwrap()], &[], QUICK);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for page in [
        "hostvisor.1",
        "hostvisor-run.1",
        "hostvisor-doctor.1",
        "hostvisor-disk-convert.1",
    ] {
        let text =
            std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page} is not a man page");
    }
    let run = std::fs::read_to_string(dir.join("hostvisor-run.1")).unwrap();
    assert!(run.contains("on\\-reset"), "run's page lists its options");
    assert!(
        !dir.join("hostvisor-vm-process.1").exists(),
        "hidden commands get no page"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
