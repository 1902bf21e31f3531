//! Helpers shared by the CLI integration tests: running hostvisor with a
//! time limit, reading its console, and the KVM / default-guest checks.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub mod template;

pub const BIN: &str = env!("CARGO_BIN_EXE_hostvisor");

pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs hostvisor with `args`, killing it after `limit`.
pub fn hostvisor(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    hostvisor_at(Path::new(BIN), args, env, limit)
}

/// The release build of hostvisor, built by cargo now if it is missing
/// or stale (a no-op after the README's quick start, which builds it):
/// for tests that measure what users run, such as the VMM's own memory —
/// a debug build's code is 3-4 times as large.
pub fn release_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            // Integration tests get <target>/tmp; the binary is in
            // <target>/release.
            let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = Command::new(cargo)
                .args([
                    "build",
                    "--release",
                    "--quiet",
                    "-p",
                    "hostvisor",
                    "--bin",
                    "hostvisor",
                ])
                .arg("--manifest-path")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml"))
                .env("CARGO_TARGET_DIR", target)
                .output()
                .expect("cannot run cargo");
            assert!(
                out.status.success(),
                "cargo build --release failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            target.join("release/hostvisor")
        })
        .clone()
}

/// As [`hostvisor`], with another build of the binary (see
/// [`release_binary`]).
pub fn hostvisor_at(bin: &Path, args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with_limit(cmd, limit)
}

pub fn run_with_limit(mut cmd: Command, limit: Duration) -> Output {
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

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Reads `from` until `done` holds for what was read, it ends, or `limit`
/// passes (checked between reads).
pub fn read_until(from: &mut impl Read, limit: Duration, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    let start = Instant::now();
    while !done(&seen) && start.elapsed() < limit {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    seen
}

/// A healthy boot of the default guest prints nothing a newcomer would
/// read as broken: no console line with "fatal", "error" or "failed" (in
/// any case). `console` is everything the guest printed.
pub fn assert_clean_boot_log(console: &str) {
    let alarming: Vec<&str> = console
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            ["fatal", "error", "failed"].iter().any(|w| l.contains(w))
        })
        .collect();
    assert!(
        alarming.is_empty(),
        "a healthy boot printed alarming lines: {alarming:#?}\nwhole console:\n{console}"
    );
}

/// A test that cannot run here: prints `SKIPPED: why`, or fails when the
/// environment variable `require` is 1 (CI sets it where the host can run
/// the test, so nothing is skipped there silently).
pub fn skip(require: &str, why: &str) {
    if std::env::var(require).as_deref() == Ok("1") {
        panic!("{why}, but {require}=1 requires this test to run");
    }
    eprintln!("SKIPPED: {why} (set {require}=1 to make this a failure)");
}

pub fn kvm_usable() -> bool {
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
pub fn default_guest() -> Option<PathBuf> {
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

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hostvisor-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A usage or runtime error: the exit code, and exactly one line on stderr
/// that starts with "hostvisor: " and contains `needle`.
pub fn assert_one_line_error(out: &Output, code: i32, needle: &str) {
    assert_eq!(out.code, code, "stderr: {}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {:?}", out.stderr);
    assert!(lines[0].starts_with("hostvisor: "), "{}", lines[0]);
    assert!(lines[0].contains(needle), "{:?} lacks {needle:?}", lines[0]);
    assert!(!out.stderr.contains("panicked"));
}

pub const QUICK: Duration = Duration::from_secs(30);

pub const BOOT: Duration = Duration::from_secs(240);

pub fn base64(data: &[u8]) -> String {
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

/// Whether qemu-img (Debian qemu-utils) is installed; CI sets
/// HOSTVISOR_REQUIRE_QEMU_IMG=1 to fail instead of skipping.
pub fn qemu_img_usable() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok();
    if !ok {
        assert!(
            std::env::var("HOSTVISOR_REQUIRE_QEMU_IMG").as_deref() != Ok("1"),
            "qemu-img is required (HOSTVISOR_REQUIRE_QEMU_IMG=1) but missing"
        );
        eprintln!("SKIPPED: qemu-img is not installed (Debian package qemu-utils)");
    }
    ok
}

/// Runs a tool that must succeed; returns its stdout.
pub fn tool(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs hostvisor with `args` until its stdout shows `needle` (or BOOT
/// passes), then kills it (SIGKILL); returns what it printed.
pub fn run_until(args: &[&str], env: &[(&str, &str)], needle: &[u8]) -> Vec<u8> {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("cannot start hostvisor");
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let seen = read_until(&mut stdout, BOOT, |s| contains(s, needle));
    let _ = child.kill();
    let _ = child.wait();
    seen
}

/// A managed VM in a store of its own, for end-to-end tests: commands run
/// in the guest through its agent (`hostvisor exec`), not by parsing the
/// console. Dropping it kills and deletes the VM.
pub struct TestVm {
    pub data: PathBuf,
    pub name: String,
    /// The hostvisor binary that runs it (the test build's unless
    /// [`TestVm::start_with`] named another).
    pub bin: PathBuf,
}

impl TestVm {
    /// Creates VM `name` with `create_args` and starts it.
    pub fn start(name: &str, create_args: &[&str]) -> TestVm {
        TestVm::start_with(Path::new(BIN), name, create_args)
    }

    /// As [`TestVm::start`], run by the hostvisor binary `bin`.
    pub fn start_with(bin: &Path, name: &str, create_args: &[&str]) -> TestVm {
        let vm = TestVm {
            data: temp_dir(&format!("vm-{name}")),
            name: name.to_string(),
            bin: bin.to_path_buf(),
        };
        let mut args = vec!["create", name];
        args.extend_from_slice(create_args);
        vm.ok(&args);
        vm.ok(&["start", name]);
        vm
    }

    /// Runs hostvisor against this VM's store.
    pub fn hv(&self, args: &[&str]) -> Output {
        hostvisor_at(
            &self.bin,
            args,
            &[("XDG_DATA_HOME", self.data.to_str().unwrap())],
            BOOT,
        )
    }

    /// As `hv`, asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.hv(args);
        assert_eq!(
            out.code, 0,
            "hostvisor {args:?}: {}{}",
            out.stdout, out.stderr
        );
        out.stdout
    }

    /// Runs `command` in the guest (waiting for the agent after a boot).
    pub fn exec(&self, command: &[&str]) -> Output {
        let mut args = vec![self.name.as_str(), "--"];
        args.extend_from_slice(command);
        self.exec_args(&args)
    }

    /// `hostvisor exec ARGS`. A guest process that died of SIGSEGV is run
    /// again (twice at most; callers' commands are idempotent): on nested PVM hosts about one new guest process in a
    /// hundred crashes reading its TLS right after exec (the same busybox
    /// instruction under the agent and under /init's shell; GUEST.md's
    /// "pipelines segfault sometimes"), which is the host's fault, not
    /// the agent's.
    pub fn exec_args(&self, args: &[&str]) -> Output {
        let mut full = vec!["exec"];
        full.extend_from_slice(args);
        let out = self.hv(&full);
        if out.code == 125 {
            eprintln!(
                "exec failed; the console ends with:\n{}",
                self.console_tail(15)
            );
        }
        let mut out = out;
        // Right after boot the crash comes more often: up to two more tries.
        for _ in 0..2 {
            if out.code != 128 + 11 {
                break;
            }
            eprintln!(
                "NOTE: {args:?} died of SIGSEGV in the guest; running it again (nested-KVM fault)"
            );
            out = self.hv(&full);
        }
        out
    }

    /// As `exec`, asserting exit status 0; returns stdout.
    pub fn sh(&self, script: &str) -> String {
        let out = self.exec(&["sh", "-c", script]);
        assert_eq!(out.code, 0, "{script}: {}{}", out.stdout, out.stderr);
        out.stdout
    }

    /// The last `lines` lines of the VM's console log.
    pub fn console_tail(&self, lines: usize) -> String {
        let console = std::fs::read_to_string(self.dir().join("console.log")).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    pub fn dir(&self) -> PathBuf {
        self.data.join("hostvisor/vms").join(&self.name)
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        let _ = self.hv(&["kill", &self.name]);
        let _ = self.hv(&["delete", &self.name]);
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// A minimal ELF64 "kernel": `code` in one PT_LOAD segment at 1 MiB,
/// entered in 64-bit mode like a vmlinux.
pub fn tiny_kernel(name: &str, code: &[u8]) -> PathBuf {
    const BASE: u64 = 0x10_0000;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&BASE.to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers
    elf.extend_from_slice(&0u64.to_le_bytes()); // no sections
    elf.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [
        0x1000u64,
        BASE,
        BASE,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.resize(0x1000, 0);
    elf.extend_from_slice(code);
    let path = temp_dir(name).join("kernel.elf");
    std::fs::write(&path, elf).unwrap();
    path
}

/// A small xorshift generator for kill moments: it prints its seed, so a
/// failing sequence can be replayed (HOSTVISOR_KILL_SEED).
pub struct KillRng(u64);

impl KillRng {
    pub fn new() -> KillRng {
        let seed = std::env::var("HOSTVISOR_KILL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("kill moments: HOSTVISOR_KILL_SEED={seed}");
        KillRng(seed)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Creates a qcow2 image of `size` (like "4M") with `hostvisor disk create`.
pub fn create_disk(path: &std::path::Path, size: &str) {
    let out = hostvisor(
        &["disk", "create", path.to_str().unwrap(), "--size", size],
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
}

/// A child process killed (and reaped) when dropped, so that a failing
/// test leaves no VM behind.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
