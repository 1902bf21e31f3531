#!/usr/bin/env python3
"""Memory benchmark (issue 19): guest RAM backings and the VMM's own memory,
each beside QEMU 7.2 in the same run.

  prealloc   time to fault in 2 GiB of guest RAM (--prealloc-mib) with one
             thread and with hostvisor's default (one per CPU, at most 16):
             the memory crate's `prealloc` example, which maps RAM as
             `hostvisor run --memory 2G,prealloc` does and times only the
             preallocation. QEMU: a paused VM (-S) with
             memory-backend-ram,prealloc=on,prealloc-threads=N, timed from
             spawn to its first QMP greeting, minus the same without
             prealloc.
  hugepages  spawn to the guest's READY line with 256 MiB of 2 MiB
             hugetlb pages, and without (anonymous memory, THP advised).
             QEMU: memory-backend-memfd,hugetlb=on. Needs free huge pages;
             as root the bench reserves them in /proc/sys/vm/nr_hugepages
             and restores the old value afterwards.
  overhead   the VMM's own memory: total Rss minus the guest-RAM mapping's
             Rss, from /proc/PID/smaps: the median of 10 readings 0.5 s
             apart, starting --idle seconds after READY (--managed-idle
             for managed VMs: 10 s, by which the guest's agent is up and
             the VM process has met it), for both VMMs; the highest
             reading is printed too (a reading may land on a moment the
             VMM serves something: a clock check, a timer).
             `hostvisor run` beside QEMU -M pc (as bench/boot.py); a managed
             VM (`hostvisor start`, NAT NIC and vsock) beside QEMU -M
             microvm -daemonize with QMP (as bench/manage.py).

Every VM boots the default guest (same vmlinux, initramfs, command line),
256 MiB, 1 vCPU. Figures are medians of --runs.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from boot import READY, ROOT, default_cmdline, guest_dir, overhead_kib, read_until_marker  # noqa: E402

# Readings of the VMM's own memory per VM, 0.5 s apart (see sampled_kib).
SAMPLES = 10
import manage  # noqa: E402

HV = os.path.join(ROOT, "target", "release", "hostvisor")
PREALLOC = os.path.join(ROOT, "target", "release", "examples", "prealloc")
QEMU_CPU = ["-enable-kvm", "-cpu", "host,-arch-capabilities"]


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def default_threads():
    return min(len(os.sched_getaffinity(0)), 16)


# ---- prealloc ----

def hv_prealloc_ms(mib, threads):
    out = subprocess.run([PREALLOC, str(mib), str(threads)], check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().split("=")[1])


def qemu_paused_ms(qemu, mib, threads, tmp):
    """Spawn to the first QMP greeting of a paused QEMU with `mib` of RAM,
    preallocated by `threads` threads (0: no prealloc)."""
    qmp = os.path.join(tmp, "prealloc-qmp.sock")
    if os.path.exists(qmp):
        os.unlink(qmp)
    backend = f"memory-backend-ram,id=ram,size={mib}M"
    if threads:
        backend += f",prealloc=on,prealloc-threads={threads}"
    t0 = time.monotonic()
    p = subprocess.Popen([qemu, "-M", "pc,memory-backend=ram", *QEMU_CPU, "-m", f"{mib}M",
                          "-object", backend, "-S", "-nodefaults", "-display", "none",
                          "-qmp", f"unix:{qmp},server=on,wait=off"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"qemu ended: {p.stderr.read()[-300:]!r}")
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(qmp)
                break
            except OSError:
                s.close()
                time.sleep(0.002)
        s.recv(4096)
        s.close()
        return (time.monotonic() - t0) * 1e3
    finally:
        p.kill()
        p.wait()


# ---- boots ----

def sampled_kib(pid, mem_mib, idle, samples=SAMPLES, every=0.5):
    """The VMM's own memory while idle: `samples` readings every `every`
    seconds starting `idle` seconds from now; returns (median, highest).
    One reading can land on a moment the VMM is serving something (a
    managed hostvisor VM's clock check, QEMU's timers); the median is the
    idle figure, the highest is printed beside it."""
    time.sleep(idle)
    xs = []
    for i in range(samples):
        if i:
            time.sleep(every)
        v = overhead_kib(pid, mem_mib)
        if v is not None:
            xs.append(v)
    if not xs:
        return None
    return (statistics.median(xs), max(xs))


def hv_run_ready(kernel, initrd, cmdline, memory, idle, timeout):
    """(seconds to READY, overhead KiB) of `hostvisor run`."""
    t0 = time.monotonic()
    p = subprocess.Popen([HV, "run", "--kernel", kernel, "--initrd", initrd, "--cmdline",
                          cmdline, "--memory", memory, "--serial", "stdio"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    try:
        read_until_marker(p, READY, timeout, "hostvisor")
        ready = time.monotonic() - t0
        return ready, sampled_kib(p.pid, 256, idle)
    finally:
        p.kill()
        p.wait()


def qemu_ready(qemu, kernel, initrd, cmdline, extra, idle, timeout):
    t0 = time.monotonic()
    p = subprocess.Popen([qemu, "-M", "pc" + extra[0], *QEMU_CPU, "-m", "256M", *extra[1:],
                          "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
                          "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    try:
        read_until_marker(p, READY, timeout, "qemu")
        ready = time.monotonic() - t0
        return ready, sampled_kib(p.pid, 256, idle)
    finally:
        p.kill()
        p.wait()


def free_huge_pages():
    base = "/sys/kernel/mm/hugepages/hugepages-2048kB/"
    try:
        free = int(open(base + "free_hugepages").read())
        resv = int(open(base + "resv_hugepages").read())
        return free - resv
    except OSError:
        return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prealloc-mib", type=int, default=2048)
    ap.add_argument("--idle", type=float, default=3.0)
    ap.add_argument("--managed-idle", type=float, default=10.0)
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--skip", action="append", default=[],
                    choices=["prealloc", "hugepages", "overhead"])
    args = ap.parse_args()
    if not os.path.exists(HV):
        sys.exit("build hostvisor first: cargo build --release")
    if not os.path.exists(PREALLOC):
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "memory",
                        "--example", "prealloc"], cwd=ROOT, check=True)
    kernel = os.path.join(guest_dir(), "vmlinux")
    initrd = os.path.join(guest_dir(), "initramfs.cpio")
    cmdline = default_cmdline()
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        print("NOTE: qemu-system-x86_64 not found; QEMU columns are empty")
    n = default_threads()
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        if "prealloc" not in args.skip:
            mib = args.prealloc_mib
            hv = {1: [], n: []}
            qm = {1: [], n: []}
            # One untimed pass first: the first large allocation on a host
            # whose free memory is fragmented (or held by the page cache)
            # pays for reclaim and compaction, whoever comes first.
            hv_prealloc_ms(mib, n)
            for i in range(args.runs):
                for t in ((1, n) if i % 2 == 0 else (n, 1)):
                    hv[t].append(hv_prealloc_ms(mib, t))
                    if qemu:
                        base = qemu_paused_ms(qemu, mib, 0, tmp)
                        qm[t].append(qemu_paused_ms(qemu, mib, t, tmp) - base)
                print(f"prealloc run {i + 1}: hostvisor 1 thread {hv[1][-1]:.0f} ms, "
                      f"{n} threads {hv[n][-1]:.0f} ms"
                      + (f"; qemu {qm[1][-1]:.0f} / {qm[n][-1]:.0f} ms" if qemu else ""),
                      flush=True)
            for t in (1, n):
                rows.append((f"prealloc {mib} MiB, {t} thread{'s' if t > 1 else ''} (ms)",
                             med(hv[t]), med(qm[t])))
        if "hugepages" not in args.skip:
            need = 128
            old = None
            if free_huge_pages() < need and os.geteuid() == 0:
                old = open("/proc/sys/vm/nr_hugepages").read().strip()
                with open("/proc/sys/vm/nr_hugepages", "w") as f:
                    f.write(str(int(old) + need - free_huge_pages()))
            try:
                if free_huge_pages() < need:
                    print("NOTE: fewer than 128 free 2 MiB huge pages (run as root to reserve); "
                          "hugepages skipped")
                else:
                    res = {k: [] for k in ("hv", "hv-huge", "q", "q-huge")}
                    for i in range(args.runs):
                        res["hv"].append(hv_run_ready(kernel, initrd, cmdline, "256M", 0,
                                                      args.timeout)[0])
                        res["hv-huge"].append(hv_run_ready(kernel, initrd, cmdline,
                                                           "256M,backing=hugetlb", 0,
                                                           args.timeout)[0])
                        if qemu:
                            res["q"].append(qemu_ready(qemu, kernel, initrd, cmdline, [""], 0,
                                                       args.timeout)[0])
                            res["q-huge"].append(qemu_ready(
                                qemu, kernel, initrd, cmdline,
                                [",memory-backend=ram", "-object",
                                 "memory-backend-memfd,id=ram,size=256M,hugetlb=on,"
                                 "hugetlbsize=2M"], 0, args.timeout)[0])
                        print(f"boot run {i + 1}: " + ", ".join(
                            f"{k} {v[-1]:.2f} s" for k, v in res.items() if v), flush=True)
                    rows.append(("READY, anonymous RAM (s)", med(res["hv"]), med(res["q"])))
                    rows.append(("READY, hugetlb 2 MiB pages (s)", med(res["hv-huge"]),
                                 med(res["q-huge"])))
            finally:
                if old is not None:
                    with open("/proc/sys/vm/nr_hugepages", "w") as f:
                        f.write(old)
        if "overhead" not in args.skip:
            run_hv, run_q, man_hv, man_q = [], [], [], []
            for i in range(args.runs):
                run_hv.append(hv_run_ready(kernel, initrd, cmdline, "256M", args.idle,
                                           args.timeout)[1])
                if qemu:
                    run_q.append(qemu_ready(qemu, kernel, initrd, cmdline, [""], args.idle,
                                            args.timeout)[1])
                man_hv.append(manage.hostvisor_once(tmp, kernel, initrd, cmdline, 256,
                                                    args.managed_idle, args.timeout,
                                                    measure=sampled_kib)[2])
                if qemu:
                    man_q.append(manage.qemu_once(tmp, qemu, kernel, initrd, cmdline, 256,
                                                  args.managed_idle, args.timeout,
                                                  measure=sampled_kib)[2])
                def show(x):
                    return f"{x[0]:.0f} (max {x[1]})" if x else "-"
                print(f"overhead run {i + 1} (KiB, median of {SAMPLES} readings): "
                      + f"run {show(run_hv[-1])}"
                      + (f" / qemu pc {show(run_q[-1])}" if qemu else "")
                      + f", managed {show(man_hv[-1])}"
                      + (f" / qemu microvm {show(man_q[-1])}" if qemu else ""),
                      flush=True)
            kib = lambda v: v / 1024 if v is not None else None  # noqa: E731

            def medians(xs):
                return med([x[0] for x in xs if x])

            def highest(xs):
                return max((x[1] for x in xs if x), default=None)
            rows.append(("overhead, run (MiB)", kib(medians(run_hv)), kib(medians(run_q))))
            rows.append(("overhead, run, highest reading (MiB)", kib(highest(run_hv)),
                         kib(highest(run_q))))
            rows.append(("overhead, managed (MiB)", kib(medians(man_hv)), kib(medians(man_q))))
            rows.append(("overhead, managed, highest reading (MiB)", kib(highest(man_hv)),
                         kib(highest(man_q))))

    print(f"\nmedians of {args.runs}; QEMU 7.2 in the same run")
    print(f"{'':<40}{'hostvisor':>11}{'QEMU':>11}{'ratio':>8}")
    for name, h, q in rows:
        ratio = f"{h / q:.2f}" if h is not None and q else ""
        hs = f"{h:.2f}" if h is not None else "-"
        qs = f"{q:.2f}" if q is not None else "-"
        print(f"{name:<40}{hs:>11}{qs:>11}{ratio:>8}")


if __name__ == "__main__":
    main()
