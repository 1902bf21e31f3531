//! The `hostvisor` command as a user meets it: bad input gets one clear
//! line and the documented exit code; the default guest boots with 1 and 2
//! vCPUs; a guest kernel panic is reported as a crash.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

use common::*;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[test]
fn bad_arguments_are_usage_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--cpus", "0"], "--cpus"),
        (&["run", "--cpus", "many"], "--cpus"),
        (&["run", "--memory", "1K"], "too small"),
        (&["run", "--memory", "lots"], "invalid size"),
        (&["run", "--serial", "tty"], "stdio, file:PATH or none"),
        (&["run", "--on-reset", "explode"], "shutdown or restart"),
        (&["run", "--console", "vga"], "serial or virtio"),
        (
            &["run", "--hide-cpu-features", "cx17"],
            "unknown CPU feature `cx17`",
        ),
        (&["run", "--no-such-flag"], "--no-such-flag"),
        (&["fly"], "fly"),
        // A stop timeout beyond a day (the API's bound) never reaches it.
        (&["stop", "vm", "--timeout", "99999999999"], "0..=86400"),
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
        skip("HOSTVISOR_REQUIRE_MOUNTNS", "no unshare");
        return;
    };
    let probe = Command::new(&unshare).args(["-m", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        skip(
            "HOSTVISOR_REQUIRE_MOUNTNS",
            "cannot create a mount namespace here (needs root)",
        );
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
        out.stderr.contains("kvm_intel or kvm_amd") && out.stderr.contains("hostvisor doctor"),
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
    // boot) is the host's; the virtio-rng device (over virtio-mmio) is the
    // guest's hardware RNG and yields bytes; the script's status comes back.
    // No pipelines: on PVM hosts some guest pipelines segfault now and then
    // (under Firecracker too), which this test must not depend on.
    let script = "echo GUEST-TIME=$(date +%s); echo GUEST-CPUS=$(nproc); \
                  read r < /sys/class/misc/hw_random/rng_current; echo RNG=$r; \
                  echo RNG-BYTES=$(od -An -tx1 -N16 /dev/hwrng); exit 7";
    let append = format!("hostvisor.run={}", base64(script.as_bytes()));
    let host_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let out = hostvisor(&["run", "--rng", "--append", &append], &[], BOOT);
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
    assert!(out.stdout.contains("RNG=virtio_rng.0"), "{}", out.stdout);
    assert_clean_boot_log(&out.stdout);
    let rng_hex = out
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("RNG-BYTES="))
        .expect("guest printed RNG bytes")
        .replace(' ', "");
    assert_eq!(rng_hex.len(), 32, "16 bytes from /dev/hwrng: {rng_hex:?}");
    assert_ne!(rng_hex, "0".repeat(32));
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

/// Also the virtio-console check: with `--console virtio` the UART's output
/// is discarded, so the READY line can only have come through hvc0.
#[test]
fn default_guest_boots_with_two_vcpus_on_a_virtio_console() {
    if !kvm_usable() {
        return;
    }
    if default_guest().is_none() {
        return;
    }
    let out = hostvisor(
        &[
            "run",
            "--cpus",
            "2",
            "--console",
            "virtio",
            "--append",
            "hostvisor.test=poweroff",
        ],
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
    assert_clean_boot_log(&out.stdout);
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

/// Prints "b\n" on COM1, then halts with interrupts off, for good.
const PRINT_AND_HALT: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'b', 0xee, // mov al, 'b'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xfa, 0xf4, 0xeb, 0xfd, // cli; hlt; jmp hlt
];

/// Prints "b\n" on COM1, then resets through the i8042.
const PRINT_AND_RESET: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'b', 0xee, // mov al, 'b'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
    0xf4, 0xeb, 0xfd, // hlt; jmp hlt
];

fn tiny_run(name: &str, code: &[u8], extra: &[&str]) -> Output {
    let kernel = tiny_kernel(name, code);
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "32M",
    ];
    args.extend_from_slice(extra);
    let out = hostvisor(&args, &[], QUICK);
    let _ = std::fs::remove_dir_all(kernel.parent().unwrap());
    out
}

#[test]
fn elf_kernel_reset_is_a_shutdown() {
    if !kvm_usable() {
        return;
    }
    let out = tiny_run("reset", PRINT_AND_RESET, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "b\n");
}

#[test]
fn on_reset_restart_boots_again() {
    if !kvm_usable() {
        return;
    }
    let kernel = tiny_kernel("restart", PRINT_AND_RESET);
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "32M",
        ])
        .args(["--on-reset", "restart"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let seen = read_until(&mut stdout, QUICK, |s| {
        s.iter().filter(|&&b| b == b'\n').count() >= 3
    });
    let still_running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(kernel.parent().unwrap());
    assert!(
        seen.starts_with(b"b\nb\nb\n"),
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
    assert!(still_running, "a restarting VM keeps running");
}

#[test]
fn debug_exit_codes_reach_the_exit_status() {
    if !kvm_usable() {
        return;
    }
    // mov al, N; out 0xf4, al
    let out = tiny_run("dbg0", &[0xb0, 0, 0xe6, 0xf4, 0xf4], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = tiny_run("dbg5", &[0xb0, 5, 0xe6, 0xf4, 0xf4], &[]);
    assert_one_line_error(&out, 3, "failure 5 on the debug-exit port");
}

#[test]
fn guest_triple_fault_is_a_crash() {
    if !kvm_usable() {
        return;
    }
    // ud2 with an empty IDT: #UD cannot be delivered -> triple fault.
    let out = tiny_run("ud2", &[0x0f, 0x0b], &[]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(out.stderr.contains("the guest crashed"), "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"));
}

/// Echoes every byte the UART receives; exits through the debug port on
/// 'q'.
const ECHO_UNTIL_Q: &[u8] = &[
    0x66, 0xba, 0xfd, 0x03, // loop: mov dx, 0x3fd (LSR)
    0xec, // wait: in al, dx
    0xa8, 0x01, // test al, 1 (data ready)
    0x74, 0xfb, // jz wait
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xec, // in al, dx
    0xee, // out dx, al
    0x3c, b'q', // cmp al, 'q'
    0x75, 0xed, // jne loop
    0xb0, 0x00, 0xe6, 0xf4, // mov al, 0; out 0xf4, al
    0xf4, 0xeb, 0xfe, // hlt; jmp $
];

struct Pty {
    master: std::fs::File,
    slave: std::fs::File,
}

fn open_pty() -> Pty {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new descriptors into the out-parameters.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty failed");
    // SAFETY: both descriptors were just created and are owned here.
    unsafe {
        Pty {
            master: std::fs::File::from_raw_fd(master),
            slave: std::fs::File::from_raw_fd(slave),
        }
    }
}

fn local_modes(f: &std::fs::File) -> libc::tcflag_t {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data; tcgetattr fills it for a terminal fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `f` is an open terminal and `t` a valid termios.
    assert_eq!(unsafe { libc::tcgetattr(f.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

/// Runs the echo kernel with its console on a fresh pseudo-terminal; for
/// each step types its input (no newline) and waits until the console
/// output contains its text. Returns (exit code, console output, stderr,
/// whether ICANON|ECHO were back on the terminal afterwards).
fn echo_kernel_on_pty(name: &str, steps: &[(&[u8], &[u8])]) -> (i32, String, String, bool) {
    use std::io::Write;
    let pty = open_pty();
    let before = local_modes(&pty.slave);
    assert_ne!(before & libc::ICANON, 0, "a new pty starts canonical");
    let kernel = tiny_kernel(name, ECHO_UNTIL_Q);
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "32M",
        ])
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut master = pty.master.try_clone().unwrap();
    // Wait until hostvisor has switched the terminal to raw mode.
    let start = Instant::now();
    while local_modes(&pty.slave) & libc::ICANON != 0 && start.elapsed() < QUICK {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let reader = {
        let mut m = pty.master.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            loop {
                match m.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        })
    };
    let mut seen = Vec::new();
    for (input, until) in steps {
        master.write_all(input).unwrap();
        while !until.is_empty() && !contains(&seen, until) {
            match rx.recv_timeout(QUICK) {
                Ok(chunk) => seen.extend_from_slice(&chunk),
                Err(_) => break,
            }
        }
    }
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > QUICK {
            let _ = child.kill();
            panic!(
                "hostvisor did not exit; console: {:?}",
                String::from_utf8_lossy(&seen)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let restored = local_modes(&pty.slave) & (libc::ICANON | libc::ECHO)
        == before & (libc::ICANON | libc::ECHO);
    while let Ok(chunk) = rx.recv_timeout(Duration::from_millis(50)) {
        seen.extend_from_slice(&chunk);
    }
    drop(rx);
    drop(pty);
    drop(master);
    let _ = reader.join();
    let _ = std::fs::remove_dir_all(kernel.parent().unwrap());
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&seen).into_owned(),
        stderr,
        restored,
    )
}

#[test]
fn console_input_reaches_the_guest_in_raw_mode() {
    if !kvm_usable() {
        return;
    }
    // No newline: in canonical mode the terminal would hold these bytes back.
    let (code, out, stderr, restored) = echo_kernel_on_pty("echo", &[(b"hi q", b"hi q")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(out.contains("hi q"), "{out:?}");
    assert!(restored, "terminal modes restored after the VM ended");
}

#[test]
fn ctrl_a_x_kills_the_vm_and_restores_the_terminal() {
    if !kvm_usable() {
        return;
    }
    let (code, out, stderr, restored) =
        echo_kernel_on_pty("ctrl-a", &[(b"ab", b"ab"), (b"\x01x", b"")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("VM terminated"), "{stderr}");
    assert!(out.contains("ab"), "{out:?}");
    assert!(restored, "terminal modes restored after Ctrl-A x");
}

/// A minimal bzImage: a setup header (boot protocol 2.15, one setup
/// sector) and a protected-mode part whose 64-bit entry (+0x200) is `code`.
fn tiny_bzimage(name: &str, code: &[u8]) -> PathBuf {
    let mut image = vec![0u8; 1024];
    image[0x1f1] = 1; // setup_sects
    image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    image[0x211] = 1; // LOADED_HIGH
    image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    image[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    image.extend_from_slice(&[0xf4; 0x200]); // 32-bit entry: never used
    image.extend_from_slice(code);
    let path = temp_dir(name).join("bzImage");
    std::fs::write(&path, image).unwrap();
    path
}

#[test]
fn bzimage_kernel_is_entered_at_its_64_bit_entry() {
    if !kvm_usable() {
        return;
    }
    let kernel = tiny_bzimage("bzimage", PRINT_AND_RESET);
    let initrd = kernel.with_file_name("initrd");
    std::fs::write(&initrd, b"not really a cpio").unwrap();
    let out = hostvisor(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "32M",
        ],
        &[],
        QUICK,
    );
    let _ = std::fs::remove_dir_all(kernel.parent().unwrap());
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "b\n");
}

fn mkfs_ext4(path: &std::path::Path, size: u64, contents: Option<&std::path::Path>) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F"]);
    if let Some(dir) = contents {
        cmd.arg("-d").arg(dir);
    }
    let status = cmd
        .arg(path)
        .status()
        .expect("mkfs.ext4 (e2fsprogs) is installed");
    assert!(status.success());
}

#[test]
fn guest_writes_a_data_disk_and_cannot_write_a_read_only_one() {
    if !kvm_usable() || default_guest().is_none() {
        return;
    }
    let dir = temp_dir("disks");
    let data = dir.join("data.img");
    mkfs_ext4(&data, 32 << 20, None);
    let files = dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("hello.txt"), "from-the-host\n").unwrap();
    let ro = dir.join("ro.img");
    mkfs_ext4(&ro, 16 << 20, Some(&files));
    let script = "mkdir -p /mnt /ro; \
        mount -t ext4 /dev/vda /mnt && echo hello-disk > /mnt/FILE && sync && umount /mnt && echo DATA-OK; \
        mount -t ext4 -o ro /dev/vdb /ro && read x < /ro/hello.txt && echo RO-READ=$x; \
        dd if=/dev/zero of=/dev/vdb bs=512 count=1 && echo RO-WRITE-OK || echo RO-WRITE-FAILED; \
        echo STILL-RUNNING";
    let data_arg = format!("path={}", data.display());
    let ro_arg = format!("path={},readonly=on", ro.display());
    let append = format!("hostvisor.run={}", base64(script.as_bytes()));
    let out = hostvisor(
        &[
            "run", "--disk", &data_arg, "--disk", &ro_arg, "--append", &append,
        ],
        &[],
        BOOT,
    );
    assert_eq!(
        out.code, 0,
        "stdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    for line in [
        "DATA-OK",
        "RO-READ=from-the-host",
        "RO-WRITE-FAILED",
        "STILL-RUNNING",
    ] {
        assert!(out.stdout.contains(line), "{line} missing: {}", out.stdout);
    }
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let cat = Command::new("debugfs")
        .args(["-R", "cat /FILE"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "hello-disk\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn flushed_writes_survive_a_sigkill_of_the_vmm() {
    if !kvm_usable() || default_guest().is_none() {
        return;
    }
    let dir = temp_dir("sigkill");
    let disk = dir.join("raw.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    // The guest writes a pattern to the raw disk with a flush (fsync), says
    // so, and would go on running; the VMM is killed the moment it says so.
    let script = "printf 'hostvisor-was-here' > /tmp/p; \
        dd if=/tmp/p of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null && echo SYNCED; sleep 60";
    let disk_arg = format!("path={}", disk.display());
    let append = format!("hostvisor.run={}", base64(script.as_bytes()));
    // Killed (SIGKILL) the moment it says SYNCED.
    let seen = run_until(
        &["run", "--disk", &disk_arg, "--append", &append],
        &[],
        b"SYNCED",
    );
    assert!(
        contains(&seen, b"SYNCED"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    let image = std::fs::read(&disk).unwrap();
    assert_eq!(&image[8 * 512..8 * 512 + 18], b"hostvisor-was-here");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn disk_errors_are_clear() {
    if !kvm_usable() {
        return;
    }
    let out = hostvisor(
        &["run", "--kernel", "/dev/null", "--disk", "readonly=on"],
        &[],
        QUICK,
    );
    assert_one_line_error(&out, 2, "path=FILE");
    let out = hostvisor(
        &[
            "run",
            "--kernel",
            "/dev/null",
            "--disk",
            "path=/x,cache=direct",
        ],
        &[],
        QUICK,
    );
    assert_one_line_error(&out, 2, "unknown cache mode");
    let kernel = tiny_kernel("disk-missing", PRINT_AND_RESET);
    let k = kernel.to_str().unwrap();
    let out = hostvisor(
        &["run", "--kernel", k, "--disk", "path=/nonexistent/d.img"],
        &[],
        QUICK,
    );
    assert_one_line_error(&out, 1, "cannot open the disk image /nonexistent/d.img");
    // One writable image, two VMs: the second is refused. The first stays
    // up (prints, then halts) and has its disk open once its line is in
    // the serial file; a fixed sleep raced with its start on a loaded host.
    let img = kernel.with_file_name("shared.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let disk = format!("path={}", img.display());
    let halting = tiny_kernel("disk-holder", PRINT_AND_HALT);
    let serial = halting.with_file_name("serial.out");
    let serial_arg = format!("file:{}", serial.display());
    let mut first = Command::new(BIN)
        .args([
            "run",
            "--kernel",
            halting.to_str().unwrap(),
            "--disk",
            &disk,
            "--serial",
            &serial_arg,
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !std::fs::read(&serial).is_ok_and(|s| s.starts_with(b"b")) {
        assert!(
            start.elapsed() < QUICK,
            "the first VM did not start within {QUICK:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = hostvisor(&["run", "--kernel", k, "--disk", &disk], &[], QUICK);
    let _ = first.kill();
    let _ = first.wait();
    let _ = std::fs::remove_dir_all(halting.parent().unwrap());
    assert_one_line_error(&out, 1, "in use by another VM");
    let _ = std::fs::remove_dir_all(kernel.parent().unwrap());
}

#[test]
fn default_guest_boots_from_its_root_disk() {
    if !kvm_usable() {
        return;
    }
    let Some(guest) = default_guest() else { return };
    let rootfs = guest.join("rootfs.img");
    assert!(rootfs.exists(), "guest/build.sh makes rootfs.img");
    let dir = temp_dir("rootdisk");
    let disk = dir.join("root.img");
    std::fs::copy(&rootfs, &disk).unwrap();
    let script = "while read dev mnt type rest; do [ \"$mnt\" = / ] && echo ROOT=$dev:$type; done < /proc/mounts; \
                  touch /booted-from-disk; sync";
    let disk_arg = format!("path={}", disk.display());
    let append = format!("root=/dev/vda hostvisor.run={}", base64(script.as_bytes()));
    let out = hostvisor(
        &["run", "--disk", &disk_arg, "--append", &append],
        &[],
        BOOT,
    );
    assert_eq!(
        out.code, 0,
        "stdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    assert!(out.stdout.contains("ROOT=/dev/vda:ext4"), "{}", out.stdout);
    assert_clean_boot_log(&out.stdout);
    let ls = Command::new("debugfs")
        .args(["-R", "ls /"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&ls.stdout).contains("booted-from-disk"));
    std::fs::remove_dir_all(&dir).unwrap();
}
