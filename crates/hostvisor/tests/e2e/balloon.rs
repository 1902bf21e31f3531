//! The balloon end to end on the default guest (its kernel has
//! CONFIG_VIRTIO_BALLOON and CONFIG_PAGE_REPORTING), in one clone of the
//! booted template (a managed VM gets a balloon by default; the clone is
//! a restored VM, so its RAM is the snapshot's memory file mapped
//! copy-on-write, and what it frees must not come back from that file):
//! - the guest's statistics (including the disk caches) match its
//!   /proc/meminfo within 5%;
//! - free page reporting: the guest fills 48 MiB of tmpfs and frees it;
//!   the VMM's RSS falls by at least 32 MiB within 10 s;
//! - the control: the same with reporting turned off in the guest
//!   (`page_reporting_order` above the largest order, so no free block
//!   qualifies; same boot, same device): the RSS does not fall;
//! - inflating to 64 MiB shrinks the guest's MemAvailable by about that
//!   and the host's RSS (the balloon takes the pages the control freed,
//!   still resident); deflating gives the memory back to the guest;
//! - deflate-on-OOM: with the balloon inflated to leave ~40 MiB, a guest
//!   process writing 12 MiB more than that to tmpfs completes, the guest
//!   lives on, and the balloon's `actual` falls below its target.
//!
//! Filling guest memory runs at ~25 MB/min on the development machines'
//! emulating KVM, so the sizes are small and there are two fills.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
const REPORTING_ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";

fn rss(pid: i64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// The guest's `/proc/meminfo`: each field in bytes, by name (without
/// the colon).
fn meminfo_fields(vm: &TestVm) -> HashMap<String, u64> {
    let text = vm.sh("cat /proc/meminfo");
    text.lines()
        .filter_map(|l| {
            let (name, v) = l.split_once(':')?;
            let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some((name.to_string(), kb * 1024))
        })
        .collect()
}

/// `/proc/meminfo` of the guest: (MemTotal, MemFree, MemAvailable) in
/// bytes.
fn meminfo(vm: &TestVm) -> (u64, u64, u64) {
    let m = meminfo_fields(vm);
    let field = |name: &str| -> u64 { *m.get(name).unwrap_or_else(|| panic!("{name} in {m:?}")) };
    (field("MemTotal"), field("MemFree"), field("MemAvailable"))
}

fn balloon(vm: &TestVm) -> serde_json::Value {
    serde_json::from_str(&vm.ok(&["balloon", &vm.name, "--stats", "--json"])).unwrap()
}

fn within(a: u64, b: u64, percent: u64) -> bool {
    a.abs_diff(b) * 100 <= b * percent
}

/// Waits up to `limit` for `cond`; how long it took.
fn wait(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn the_balloon_reports_inflates_and_deflates() {
    if !kvm_usable() || default_guest().is_none() {
        return;
    }
    let vm = TestVm::from_template("balloon", &common::template::DEFAULT, &[]);
    let show: serde_json::Value =
        serde_json::from_str(&vm.ok(&["show", "balloon", "--json"])).unwrap();
    assert!(
        show["config"]["balloon"]["reporting"] == true,
        "a managed VM has a balloon with reporting: {show:#}"
    );
    assert!(show["status"]["balloon"].is_object(), "{show:#}");
    let pid = show["pid"].as_i64().unwrap();
    let text = vm.ok(&["show", "balloon"]);
    assert!(text.contains("balloon: target 0.0 MiB"), "{text}");

    // Statistics against /proc/meminfo.
    let b = balloon(&vm);
    let m = meminfo_fields(&vm);
    let field = |name: &str| -> u64 { *m.get(name).unwrap_or_else(|| panic!("{name} in {m:?}")) };
    let stats = &b["stats"];
    // Linux's driver sends NR_FILE_PAGES as the disk caches; /proc/meminfo
    // splits that into Cached and Buffers (and SwapCached, 0 without
    // swap), so the two together are the same figure.
    for (key, want) in [
        ("total_memory", field("MemTotal")),
        ("free_memory", field("MemFree")),
        ("available_memory", field("MemAvailable")),
        ("disk_caches", field("Cached") + field("Buffers")),
    ] {
        let got = stats[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}: {b:#}"));
        assert!(within(got, want, 5), "{key}: {got} vs /proc/meminfo {want}");
    }
    eprintln!("balloon statistics: {stats}");
    let text = vm.ok(&["balloon", "balloon", "--stats"]);
    assert!(text.contains("available:"), "{text}");

    // Free page reporting gives freed memory back within seconds.
    vm.sh("dd if=/dev/zero of=/run/fill bs=1M count=48 2>/dev/null");
    let full = rss(pid);
    vm.sh("rm /run/fill");
    let took = wait(Duration::from_secs(10), || rss(pid) + 32 * MIB <= full);
    let after = rss(pid);
    assert!(
        took.is_some(),
        "RSS {} MiB after freeing 48 MiB, {} MiB before: reporting gave back too little",
        after / MIB,
        full / MIB
    );
    eprintln!(
        "reporting: RSS {} -> {} MiB in {:?}",
        full / MIB,
        after / MIB,
        took.unwrap()
    );
    let reported = balloon(&vm)["counters"]["released_bytes"].as_u64().unwrap();
    assert!(reported >= 32 * MIB, "released {reported}");

    // The control: no reporting, no drop.
    let order = vm.sh(&format!("cat {REPORTING_ORDER}"));
    vm.sh(&format!("echo 11 > {REPORTING_ORDER}"));
    vm.sh("dd if=/dev/zero of=/run/fill bs=1M count=48 2>/dev/null");
    let full = rss(pid);
    vm.sh("rm /run/fill");
    std::thread::sleep(Duration::from_secs(10));
    let kept = rss(pid);
    assert!(
        kept + 16 * MIB > full,
        "RSS fell from {} to {} MiB without reporting",
        full / MIB,
        kept / MIB
    );

    // Inflating takes memory from the guest and gives it to the host.
    let (_, _, available) = meminfo(&vm);
    let before = rss(pid);
    vm.ok(&["balloon", "balloon", "64M"]);
    let inflated = wait(Duration::from_secs(120), || {
        balloon(&vm)["actual_bytes"].as_u64() == Some(64 * MIB)
    });
    assert!(inflated.is_some(), "{:#}", balloon(&vm));
    let (_, _, shrunk) = meminfo(&vm);
    assert!(
        shrunk + 56 * MIB <= available,
        "MemAvailable {} MiB with a 64 MiB balloon, {} MiB before",
        shrunk / MIB,
        available / MIB
    );
    let host = rss(pid);
    assert!(
        host + 32 * MIB <= before,
        "RSS {} MiB with a 64 MiB balloon, {} MiB before",
        host / MIB,
        before / MIB
    );
    let text = vm.ok(&["show", "balloon"]);
    assert!(text.contains("target 64.0 MiB, actual 64.0 MiB"), "{text}");

    // Deflating gives it back.
    vm.ok(&["balloon", "balloon", "0"]);
    let deflated = wait(Duration::from_secs(120), || {
        balloon(&vm)["actual_bytes"].as_u64() == Some(0)
    });
    assert!(deflated.is_some(), "{:#}", balloon(&vm));
    let (_, _, back) = meminfo(&vm);
    assert!(
        back + 8 * MIB >= available,
        "MemAvailable {} MiB after deflating, {} MiB before inflating",
        back / MIB,
        available / MIB
    );
    vm.sh(&format!("echo {} > {REPORTING_ORDER}", order.trim()));

    // A target beyond the guest's RAM is refused.
    let out = vm.hv(&["balloon", "balloon", "1G"]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("larger than the guest's"),
        "{}",
        out.stderr
    );

    // Deflate-on-OOM: with the balloon holding all but ~40 MiB, a guest
    // process that writes more than is left to tmpfs (which nothing can
    // reclaim: no swap) runs the guest out of memory; the driver's OOM
    // notifier gives balloon pages back (1 MiB a time) instead of the OOM
    // killer killing something, so the write completes, the guest (and
    // its agent) lives on, and `actual` falls below the target.
    let (_, free, _) = meminfo(&vm);
    let target = (free - 40 * MIB) / MIB * MIB;
    vm.ok(&["balloon", "balloon", &format!("{}M", target / MIB)]);
    let inflated = wait(Duration::from_secs(240), || {
        balloon(&vm)["actual_bytes"].as_u64() == Some(target)
    });
    assert!(
        inflated.is_some(),
        "target {} MiB: {:#}",
        target / MIB,
        balloon(&vm)
    );
    eprintln!(
        "inflated to {} MiB in {:?}",
        target / MIB,
        inflated.unwrap()
    );
    let (_, _, left) = meminfo(&vm);
    let fill = left / MIB + 12;
    let started = Instant::now();
    let out = vm.exec(&[
        "sh",
        "-c",
        &format!("dd if=/dev/zero of=/run/oom bs=1M count={fill} 2>&1 && ls -l /run/oom"),
    ]);
    let after = balloon(&vm);
    eprintln!(
        "writing {fill} MiB with {} MiB available took {:?}: exit {}, {}{}",
        left / MIB,
        started.elapsed(),
        out.code,
        out.stdout,
        out.stderr
    );
    assert_eq!(
        out.code,
        0,
        "the allocating process did not complete; console:\n{}",
        vm.console_tail(20)
    );
    assert!(
        out.stdout.contains(&(fill * MIB).to_string()),
        "{}",
        out.stdout
    );
    let actual = after["actual_bytes"].as_u64().unwrap();
    assert!(
        actual + 4 * MIB <= target,
        "the balloon did not deflate on OOM: actual {} MiB, target {} MiB: {after:#}",
        actual / MIB,
        target / MIB
    );
    // (The file stays: an `rm` of it takes most of a minute here, and the
    // VM goes when the test ends.)
    assert_eq!(vm.sh("echo alive").trim(), "alive");
    let console = vm.console_tail(40);
    assert!(
        !console.contains("Out of memory: Killed process"),
        "the OOM killer ran: {console}"
    );
    eprintln!(
        "deflate-on-OOM: actual {} MiB after the write, target {} MiB",
        actual / MIB,
        target / MIB
    );
}

/// Managed VMs keep their balloon settings: `create` gives one with
/// everything on unless told otherwise, `create --balloon OPTIONS` and
/// `edit --balloon` are stored as given, `edit` without `--balloon` keeps
/// them, and `off` removes the balloon. No boot.
#[test]
fn managed_vms_remember_balloon_settings() {
    let data = temp_dir("balloon-settings");
    let env = [("XDG_DATA_HOME", data.to_str().unwrap())];
    let hv = |args: &[&str]| {
        let out = hostvisor(args, &env, QUICK);
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
        out.stdout
    };
    let balloon_of = |name: &str| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&hv(&["show", name, "--json"])).unwrap();
        v["config"]["balloon"].clone()
    };
    hv(&["create", "plain", "--kernel", "/nonexistent/vmlinux"]);
    let b = balloon_of("plain");
    assert_eq!(b["reporting"], true, "{b}");
    assert_eq!(b["deflate_on_oom"], true, "{b}");
    assert_eq!(b["stats"], true, "{b}");

    hv(&[
        "create",
        "tuned",
        "--kernel",
        "/nonexistent/vmlinux",
        "--balloon",
        "reporting=off,stats=5",
    ]);
    let b = balloon_of("tuned");
    assert_eq!(b["reporting"], false, "{b}");
    assert_eq!(b["deflate_on_oom"], true, "{b}");
    assert_eq!(b["stats_interval_s"], 5, "{b}");
    // An edit of something else keeps them.
    hv(&["edit", "tuned", "--cpus", "2"]);
    assert_eq!(balloon_of("tuned"), b);
    hv(&["edit", "tuned", "--balloon", "deflate-on-oom=off"]);
    let b = balloon_of("tuned");
    assert_eq!(b["reporting"], true, "{b}");
    assert_eq!(b["deflate_on_oom"], false, "{b}");
    hv(&["edit", "tuned", "--balloon", "off"]);
    assert!(balloon_of("tuned").is_null());
    hv(&["edit", "tuned", "--memory", "512M"]);
    assert!(
        balloon_of("tuned").is_null(),
        "an edit brought the balloon back"
    );

    hv(&[
        "create",
        "none",
        "--kernel",
        "/nonexistent/vmlinux",
        "--balloon",
        "none",
    ]);
    assert!(balloon_of("none").is_null());
    let _ = std::fs::remove_dir_all(&data);
}
