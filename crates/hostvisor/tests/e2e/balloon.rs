//! The balloon end to end on the default guest (its kernel has
//! CONFIG_VIRTIO_BALLOON and CONFIG_PAGE_REPORTING), in one clone of the
//! booted template (a managed VM gets a balloon by default; the clone is
//! a restored VM, so its RAM is the snapshot's memory file mapped
//! copy-on-write, and what it frees must not come back from that file):
//! - the guest's statistics match its /proc/meminfo within 5%;
//! - free page reporting: the guest fills 48 MiB of tmpfs and frees it;
//!   the VMM's RSS falls by at least 32 MiB within 10 s;
//! - the control: the same with reporting turned off in the guest
//!   (`page_reporting_order` above the largest order, so no free block
//!   qualifies; same boot, same device): the RSS does not fall;
//! - inflating to 64 MiB shrinks the guest's MemAvailable by about that
//!   and the host's RSS (the balloon takes the pages the control freed,
//!   still resident); deflating gives the memory back to the guest.
//!
//! Filling guest memory runs at ~25 MB/min on the development machines'
//! emulating KVM, so the sizes are small and there are two fills.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

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

/// `/proc/meminfo` of the guest: (MemTotal, MemFree, MemAvailable) in
/// bytes.
fn meminfo(vm: &TestVm) -> (u64, u64, u64) {
    let text = vm.sh("cat /proc/meminfo");
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in {text}"))
            * 1024
    };
    (
        field("MemTotal:"),
        field("MemFree:"),
        field("MemAvailable:"),
    )
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
    let (total, free, available) = meminfo(&vm);
    let stats = &b["stats"];
    for (key, want) in [
        ("total_memory", total),
        ("free_memory", free),
        ("available_memory", available),
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
}
