//! Guest memory end to end: a VM with memfd-backed, preallocated RAM
//! boots, and the VMM's own memory (Rss beside guest RAM, measured as
//! Firecracker's tests do) stays within its budget for `hostvisor run`
//! and for a managed VM, idle and after serving execs and API requests.
//! One boot each, of the release build (what users run: a debug build's
//! code is 3-4 times as large), which [`release_binary`] builds if the
//! README's quick start has not.

#![allow(clippy::unwrap_used)]

use super::common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;

const GUEST_MIB: u64 = 256;
/// Issue 19's budget for the VMM's own memory: 3 MiB, for `hostvisor run`
/// and for a managed VM. Nearly all of it is file pages of code that has
/// run (the kernel maps code 64 KiB around each fault); the VMM gives them
/// back when setup is over and, while it runs, whenever they grew
/// (memory::overhead::Trimmer, every 2 s, and after each clock check of a
/// managed VM). A reading taken while the VMM is serving something is
/// higher for a moment, so each check waits (up to [`SETTLE`]) for the
/// idle figure rather than taking one reading.
const RUN_BUDGET_KIB: u64 = 3 * 1024;
/// A managed VM process's (API server, NAT, vsock, clock keeping).
const MANAGED_BUDGET_KIB: u64 = 3 * 1024;
/// How long an idle VMM may take to come within its budget: a few of the
/// trimmer's periods.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(20);

/// Waits until process `pid`'s own memory is within `budget_kib` (or
/// [`SETTLE`] has passed); returns the last reading.
fn settled(pid: u32, budget_kib: u64) -> Overhead {
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let o = overhead(pid);
        if o.total_kib <= budget_kib || std::time::Instant::now() > deadline {
            return o;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// The VMM's own memory from one read of /proc/PID/smaps.
struct Overhead {
    /// Rss of every mapping but guest RAM (Firecracker's measure).
    total_kib: u64,
    /// Guest RAM's Rss: the memfd mapping, or an anonymous one of the
    /// guest's size.
    guest_kib: u64,
    /// A line per mapping of 64 KiB or more, for failure messages.
    detail: String,
}

fn overhead(pid: u32) -> Overhead {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut o = Overhead {
        total_kib: 0,
        guest_kib: 0,
        detail: String::new(),
    };
    let (mut header, mut is_guest) = (String::new(), false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            header = line.to_string();
            is_guest = line.contains("/memfd:hostvisor-guest-ram");
        } else if let Some(v) = line.strip_prefix("Size:") {
            let size: u64 = v.trim().trim_end_matches(" kB").parse().unwrap();
            let anon = header.split_whitespace().count() == 5;
            is_guest |= anon && size == GUEST_MIB * 1024;
        } else if let Some(v) = line.strip_prefix("Rss:") {
            let rss: u64 = v.trim().trim_end_matches(" kB").parse().unwrap();
            if is_guest {
                o.guest_kib += rss;
                continue;
            }
            o.total_kib += rss;
            if rss >= 64 {
                o.detail.push_str(&format!("{rss:>6} KiB  {header}\n"));
            }
        }
    }
    o
}

/// The Rss of the executable's code (its `r-xp` mapping) in process `pid`.
fn exe_code_kib(pid: u32) -> u64 {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let exe = exe
        .to_str()
        .unwrap()
        .trim_end_matches(" (deleted)")
        .to_string();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut lines = smaps.lines();
    while let Some(line) = lines.next() {
        if line.contains(" r-xp ") && line.ends_with(&exe) {
            for l in lines.by_ref() {
                if let Some(v) = l.strip_prefix("Rss:") {
                    return v.trim().trim_end_matches(" kB").parse().unwrap();
                }
            }
        }
    }
    0
}

/// Checks the VMM's own memory against `budget_kib`.
fn assert_within(what: &str, o: &Overhead, budget_kib: u64) {
    eprintln!(
        "{what}: own {} KiB, guest RAM {} KiB\n{}",
        o.total_kib, o.guest_kib, o.detail
    );
    assert!(
        o.total_kib <= budget_kib,
        "{what} uses {} KiB beside guest RAM, over its {budget_kib} KiB budget:\n{}",
        o.total_kib,
        o.detail
    );
}

#[test]
fn a_memfd_preallocated_vm_boots_and_run_stays_within_its_budget() {
    let Some(guest) = default_guest() else { return };
    if !kvm_usable() {
        return;
    }
    let mut child = KillOnDrop(
        Command::new(release_binary())
            // The default balloon, with free page reporting off: it
            // would give the free pages prealloc made resident back.
            .args([
                "run",
                "--memory",
                "256M,backing=memfd,prealloc",
                "--balloon",
                "reporting=off",
            ])
            .arg("--kernel")
            .arg(guest.join("vmlinux"))
            .arg("--initrd")
            .arg(guest.join("initramfs.cpio"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdout = child.0.stdout.take().unwrap();
    let seen = read_until(&mut stdout, BOOT, |s| contains(s, b"HOSTVISOR-GUEST-READY"));
    assert!(
        contains(&seen, b"HOSTVISOR-GUEST-READY"),
        "no READY line:\n{}",
        String::from_utf8_lossy(&seen)
    );
    let o = settled(child.0.id(), RUN_BUDGET_KIB);
    // Preallocated: all of guest RAM is resident (in the memfd mapping).
    assert_eq!(
        o.guest_kib,
        GUEST_MIB * 1024,
        "guest RAM not preallocated\n{}",
        o.detail
    );
    assert_within("hostvisor run", &o, RUN_BUDGET_KIB);
}

#[test]
fn a_managed_vm_stays_within_its_budget() {
    let Some(guest) = default_guest() else { return };
    if !kvm_usable() {
        return;
    }
    let kernel = guest.join("vmlinux");
    let initrd = guest.join("initramfs.cpio");
    // The defaults of a managed VM (a NAT NIC and the agent's vsock),
    // RAM in a memfd.
    let vm = TestVm::start_with(
        &release_binary(),
        "overhead",
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "256M,backing=memfd",
        ],
    );
    let pid: u32 = std::fs::read_to_string(vm.dir().join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Booted: once its clock keeper has met the agent, the VM process
    // gives back what only booting needed, and its code's Rss falls to
    // well under what booting had mapped. Wait for that (watching from
    // the start of the boot), and measure the idle VM: nothing else talks
    // to it first (serving an exec or an API request maps more of the
    // VMM's code: docs/benchmarks.md).
    let mut peak = 0;
    let deadline = std::time::Instant::now() + BOOT;
    loop {
        let now = exe_code_kib(pid);
        peak = peak.max(now);
        if now * 10 < peak * 6 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the VM process never gave back its boot-only code ({now} KiB mapped, {peak} KiB at most); console:\n{}",
            vm.console_tail(10)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let o = settled(pid, MANAGED_BUDGET_KIB);
    assert_within("a managed VM, idle", &o, MANAGED_BUDGET_KIB);
    // In use: execs through the agent and API requests map more of the
    // VMM's code; it gives that back within a few seconds of quiet
    // (memory::overhead::Trimmer).
    let shown = vm.ok(&["show", "overhead"]);
    assert!(shown.contains("backing = \"memfd\""), "{shown}");
    for _ in 0..3 {
        assert_eq!(vm.sh("echo up").trim(), "up");
    }
    vm.ok(&["pause", "overhead"]);
    vm.ok(&["resume", "overhead"]);
    let busy = overhead(pid).total_kib;
    let o = settled(pid, MANAGED_BUDGET_KIB);
    eprintln!("a managed VM right after serving requests: {busy} KiB");
    assert_within(
        "a managed VM after execs and API requests",
        &o,
        MANAGED_BUDGET_KIB,
    );
}

/// Managed VMs keep their memory options: `show` prints them, `edit
/// --memory SIZE` keeps them, and bad combinations are refused. No boot.
#[test]
fn managed_vms_remember_memory_options() {
    let data = temp_dir("memopts");
    let env = [("XDG_DATA_HOME", data.to_str().unwrap())];
    let hv = |args: &[&str]| hostvisor(args, &env, BOOT);
    let out = hv(&[
        "create",
        "m",
        "--kernel",
        "/nonexistent/vmlinux",
        "--memory",
        "512M,backing=memfd,prealloc,merge",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let show = |want: &[&str], not: &[&str]| {
        let out = hv(&["show", "m", "--json"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        let opts = &v["config"]["memory_options"];
        for w in want {
            let (k, val) = w.split_once('=').unwrap();
            assert_eq!(opts[k].to_string().trim_matches('"'), val, "{}", out.stdout);
        }
        for n in not {
            assert!(opts.get(n).is_none(), "{n}: {}", out.stdout);
        }
        v["config"]["memory"].as_str().unwrap().to_string()
    };
    assert_eq!(
        show(&["backing=memfd", "prealloc=true", "merge=true"], &["lock"]),
        "512M"
    );
    // The text form prints them too.
    let text = hv(&["show", "m"]).stdout;
    assert!(text.contains("backing = \"memfd\""), "{text}");
    // A size alone keeps the options.
    assert_eq!(hv(&["edit", "m", "--memory", "1G"]).code, 0);
    assert_eq!(show(&["backing=memfd", "prealloc=true"], &[]), "1G");
    // Options replace them.
    assert_eq!(
        hv(&["edit", "m", "--memory", "1G,backing=hugetlb,lock"]).code,
        0
    );
    assert_eq!(
        show(&["backing=hugetlb", "lock=true"], &["prealloc", "merge"]),
        "1G"
    );
    // A size that is not whole huge pages, with the stored hugetlb.
    let out = hv(&["edit", "m", "--memory", "1025M"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("multiple of 2 MiB"), "{}", out.stderr);
    let out = hv(&[
        "create",
        "n",
        "--kernel",
        "/k",
        "--memory",
        "256M,backing=tmpfs",
    ]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("anon, memfd or hugetlb"),
        "{}",
        out.stderr
    );
    let _ = std::fs::remove_dir_all(&data);
}

/// Bad `--memory` options are usage errors, on one line.
#[test]
fn bad_memory_options_are_usage_errors() {
    for (arg, needle) in [
        ("256M,swap", "unknown memory option `swap`"),
        ("256M,backing=pmem", "anon, memfd or hugetlb"),
        ("257M,backing=hugetlb", "multiple of 2 MiB"),
        ("256M,prealloc=maybe", "on or off"),
        ("256M,lock,lock", "given twice"),
    ] {
        let out = hostvisor(&["run", "--memory", arg], &[], QUICK);
        assert_one_line_error(&out, 2, needle);
    }
}

fn free_huge_pages() -> u64 {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{name}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    read("free_hugepages").saturating_sub(read("resv_hugepages"))
}

/// Without enough reserved huge pages, backing=hugetlb fails before any
/// VM exists: one line naming the sysctl, exit status 1; a managed VM
/// does not start and leaves no process.
#[test]
fn hugetlb_without_reserved_pages_fails_clearly() {
    if !kvm_usable() {
        return;
    }
    // 1 GiB: 512 pages, more than this host has free.
    if free_huge_pages() >= 512 {
        eprintln!("SKIPPED: this host has 512 free huge pages; the failure cannot be shown");
        return;
    }
    // Any kernel: RAM is made before the kernel is read.
    let kernel = tiny_kernel("hugetlb", &[0xf4]);
    let out = hostvisor(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "1G,backing=hugetlb",
        ],
        &[],
        QUICK,
    );
    assert_one_line_error(&out, 1, "/proc/sys/vm/nr_hugepages");
    assert!(out.stderr.contains("needs 512"), "{}", out.stderr);

    let data = temp_dir("hugetlb-managed");
    let env = [("XDG_DATA_HOME", data.to_str().unwrap())];
    let hv = |args: &[&str]| hostvisor(args, &env, BOOT);
    let create = hv(&[
        "create",
        "huge",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "1G,backing=hugetlb",
    ]);
    assert_eq!(create.code, 0, "{}", create.stderr);
    let start = hv(&["start", "huge"]);
    assert_ne!(start.code, 0, "{}", start.stdout);
    assert!(
        format!("{}{}", start.stdout, start.stderr).contains("nr_hugepages"),
        "{}{}",
        start.stdout,
        start.stderr
    );
    // No VM process is left: the VM is not running (its failed start
    // shows as a crash) and has no pid.
    let list = hv(&["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let state = v[0]["state"].as_str().unwrap();
    assert!(state != "running" && state != "paused", "{}", list.stdout);
    assert!(v[0]["pid"].is_null(), "{}", list.stdout);
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_dir_all(kernel.parent().unwrap());
}

/// Prints "b\n" on COM1, then halts with interrupts off, for good: a
/// guest that touches no RAM but its own code.
const PRINT_AND_HALT: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'b', 0xee, // mov al, 'b'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xfa, 0xf4, 0xeb, 0xfd, // cli; hlt; jmp hlt
];

/// The tiny guests' RAM.
const TINY_MIB: u64 = 128;

/// Guest RAM's mappings in process `pid` (a guest of `guest_kib`): the
/// memfd, the named anonymous mapping, or else an anonymous or hugetlb
/// mapping of the guest's size; each as its header line and its fields
/// (kB).
fn guest_mappings(pid: u32, guest_kib: u64) -> Vec<(String, HashMap<String, u64>)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut maps: Vec<(String, HashMap<String, u64>)> = Vec::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            maps.push((line.to_string(), HashMap::new()));
        } else if let (Some((name, v)), Some(last)) = (line.split_once(':'), maps.last_mut()) {
            if let Ok(kb) = v.trim().trim_end_matches(" kB").parse() {
                last.1.insert(name.to_string(), kb);
            }
        }
    }
    maps.retain(|(header, f)| {
        let fields = header.split_whitespace().count();
        header.contains("hostvisor-guest-ram")
            || (f.get("Size") == Some(&guest_kib)
                && (fields == 5 || header.ends_with("/anon_hugepage (deleted)")))
    });
    maps
}

/// A `hostvisor run` of [`PRINT_AND_HALT`] with `--memory MEMORY`,
/// returned once the guest has printed (its first instructions ran).
fn run_tiny(name: &str, memory: &str) -> (KillOnDrop, PathBuf) {
    let kernel = tiny_kernel(name, PRINT_AND_HALT);
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args(["run", "--memory", memory, "--kernel"])
            .arg(&kernel)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stdout = child.0.stdout.take().unwrap();
    let seen = read_until(&mut stdout, QUICK, |s| contains(s, b"b\n"));
    if !contains(&seen, b"b\n") {
        let _ = child.0.kill();
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut err);
        panic!(
            "--memory {memory}: the guest did not print; stdout {:?}, stderr {err}",
            String::from_utf8_lossy(&seen)
        );
    }
    (child, kernel)
}

/// Preallocation makes all of guest RAM resident before the guest runs:
/// a guest that touches none of it (it prints a byte and halts) has
/// guest-RAM Rss equal to its size with `prealloc` (anonymous and memfd
/// backing), and far less without (the control).
#[test]
fn prealloc_makes_guest_ram_resident_before_the_guest_runs() {
    if !kvm_usable() {
        return;
    }
    let guest_kib = TINY_MIB * 1024;
    for (memory, preallocated) in [
        ("128M,prealloc", true),
        ("128M,backing=memfd,prealloc", true),
        ("128M", false),
    ] {
        let (child, kernel) = run_tiny("prealloc", memory);
        let maps = guest_mappings(child.0.id(), guest_kib);
        let rss: u64 = maps.iter().map(|(_, f)| f["Rss"]).sum();
        let size: u64 = maps.iter().map(|(_, f)| f["Size"]).sum();
        drop(child);
        let _ = std::fs::remove_dir_all(kernel.parent().unwrap());
        assert_eq!(size, guest_kib, "--memory {memory}: guest RAM {maps:#?}");
        eprintln!("--memory {memory}: guest RAM Rss {rss} KiB");
        if preallocated {
            assert_eq!(rss, guest_kib, "--memory {memory}: {maps:#?}");
        } else {
            assert!(rss < 16 * 1024, "--memory {memory}: Rss {rss} KiB");
        }
    }
}

/// Restores /proc/sys/vm/nr_hugepages when dropped.
struct HugePagesGuard(String);

impl Drop for HugePagesGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write("/proc/sys/vm/nr_hugepages", &self.0) {
            eprintln!("could not restore nr_hugepages to {}: {e}", self.0.trim());
        }
    }
}

/// Reserves `pages` more 2 MiB pages than are free now; a guard that
/// gives them back, or why they could not be reserved.
fn reserve_huge_pages(pages: u64) -> Result<HugePagesGuard, String> {
    const SYSCTL: &str = "/proc/sys/vm/nr_hugepages";
    let old = std::fs::read_to_string(SYSCTL).map_err(|e| format!("{SYSCTL}: {e}"))?;
    let now: u64 = old.trim().parse().map_err(|e| format!("{SYSCTL}: {e}"))?;
    let guard = HugePagesGuard(old);
    let want = now + pages;
    std::fs::write(SYSCTL, want.to_string())
        .map_err(|e| format!("cannot write {SYSCTL} (not root?): {e}"))?;
    if free_huge_pages() < pages {
        return Err(format!(
            "asked for {want} huge pages, the kernel found only {} free (memory too fragmented?)",
            free_huge_pages()
        ));
    }
    Ok(guard)
}

/// backing=hugetlb on a running VM: guest RAM is one mapping of 2 MiB
/// pages, all of them faulted in (prealloc) before the guest runs.
/// Reserving the pages needs root; without them the test prints SKIPPED,
/// or fails when HOSTVISOR_REQUIRE_HUGEPAGES=1.
#[test]
fn hugetlb_guest_ram_is_in_huge_pages() {
    if !kvm_usable() {
        return;
    }
    let guard = match reserve_huge_pages(TINY_MIB / 2) {
        Ok(g) => g,
        Err(why) => {
            skip("HOSTVISOR_REQUIRE_HUGEPAGES", &why);
            return;
        }
    };
    let guest_kib = TINY_MIB * 1024;
    let (child, kernel) = run_tiny("hugetlb-vm", "128M,backing=hugetlb,prealloc");
    let maps = guest_mappings(child.0.id(), guest_kib);
    drop(child);
    drop(guard);
    let _ = std::fs::remove_dir_all(kernel.parent().unwrap());
    assert_eq!(maps.len(), 1, "{maps:#?}");
    let (header, f) = &maps[0];
    assert_eq!(f["Size"], guest_kib, "{header}");
    assert_eq!(f["KernelPageSize"], 2048, "{header}: {f:?}");
    let huge = f.get("Private_Hugetlb").unwrap_or(&0) + f.get("Shared_Hugetlb").unwrap_or(&0);
    assert_eq!(huge, guest_kib, "{header}: {f:?}");
}
