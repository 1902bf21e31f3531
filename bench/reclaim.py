#!/usr/bin/env python3
"""Reclaim benchmark: how soon memory a guest frees goes back to the host,
hostvisor's virtio-balloon with free page reporting beside QEMU 7.2's
(`-device virtio-balloon-device,free-page-reporting=on`, -M microvm), in
the same run.

Both boot the default guest (same vmlinux, initramfs, command line,
--memory, 1 vCPU) with a script (hostvisor.run=) that lets the guest settle,
fills FILL MiB of its initramfs (ramfs/tmpfs) from /dev/zero, says so on
the console, waits, frees it (rm) and says so. The host samples the VMM's
RSS (/proc/PID/status VmRSS) just before the free and then every 20 ms:

  reclaim  seconds from the guest's "freed" line (its `rm` has returned)
           to the RSS having fallen by DROP MiB (three quarters of the fill
           by default) from its level before the `rm`; 0 when it had
           fallen that far already while the guest was still freeing;
           "never" if it did not within --timeout seconds of the line;
  from rm  the same from the start of the `rm` (freeing 48 MiB takes the
           emulated guest tens of seconds here, and reporting runs
           meanwhile);
  rm       how long the guest's `rm` took (its console lines);
  dropped  how far the RSS fell by the end, in MiB.

Linux reports free pages 2 s after enough of them are free
(PAGE_REPORTING_DELAY), in 2 MiB blocks at least; on the development
machines' emulating KVM the guest's own work is ~1000x slower than on real
VT-x, and filling memory runs at ~25 MB/min, hence the small fill.
Runs are interleaved (run 1 of each VMM, then run 2, ...).

  python3 bench/reclaim.py [--runs N] [--fill MIB] [--hostvisor PATH]
"""

import argparse
import base64
import os
import select
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from boot import ROOT, default_cmdline, guest_dir  # noqa: E402

SCRIPT = """
sleep {settle}
dd if=/dev/zero of=/reclaim-fill bs=1M count={fill} 2>/dev/null
echo BENCH-FILLED
sleep {hold}
echo BENCH-FREEING
rm /reclaim-fill
echo BENCH-FREED
sleep 100000
"""


def rss(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Console:
    """Reads a VMM's console (its stdout) without blocking."""

    def __init__(self, proc):
        self.proc = proc
        self.seen = b""

    def wait_for(self, marker, timeout, what):
        end = time.monotonic() + timeout
        while marker not in self.seen:
            left = end - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"{what}: no {marker!r}: {self.seen[-400:]!r}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"{what}: console closed: {self.seen[-400:]!r}")
                self.seen += chunk
        return time.monotonic()


def one_run(name, argv, fill, drop, timeout, hold):
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        con = Console(proc)
        con.wait_for(b"BENCH-FILLED", 900, name)
        # The RSS before the free: sampled until the guest starts its rm.
        full = rss(proc.pid)
        low = full
        reached = None
        freeing = freed = None
        deadline = time.monotonic() + hold + 600
        while True:
            now = rss(proc.pid)
            if now is None:
                break
            if freeing is None:
                full = now
            low = min(low, now)
            if freeing is not None and reached is None and full - now >= drop * 2**20:
                reached = time.monotonic()
            if freed is not None and (reached is not None or time.monotonic() - freed > timeout):
                break
            ready, _, _ = select.select([proc.stdout], [], [], 0.02)
            if ready:
                con.seen += os.read(proc.stdout.fileno(), 4096)
            t = time.monotonic()
            if freeing is None and b"BENCH-FREEING" in con.seen:
                freeing = t
            if freed is None and b"BENCH-FREED" in con.seen:
                freed = t
            if t > deadline or proc.poll() is not None:
                raise RuntimeError(f"{name}: no BENCH-FREED")
        return {
            "reclaim": None if reached is None else max(0.0, reached - freed),
            "from_rm": None if reached is None else reached - freeing,
            "rm": freed - freeing,
            "dropped": (full - low) / 2**20,
            "full": full / 2**20,
        }
    finally:
        proc.kill()
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fill", type=int, default=48, help="MiB the guest fills and frees")
    ap.add_argument("--drop", type=int, default=None,
                    help="MiB the RSS must fall (default: 3/4 of --fill)")
    ap.add_argument("--memory", type=int, default=256, help="guest RAM in MiB")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--settle", type=int, default=20,
                    help="seconds the guest waits after boot before filling")
    ap.add_argument("--hostvisor", default=os.path.join(ROOT, "target", "release", "hostvisor"))
    args = ap.parse_args()
    drop = args.drop or args.fill * 3 // 4
    gdir = guest_dir()
    kernel, initrd = os.path.join(gdir, "vmlinux"), os.path.join(gdir, "initramfs.cpio")
    hold = 5
    script = base64.b64encode(SCRIPT.format(settle=args.settle, fill=args.fill,
                                            hold=hold).encode()).decode()
    cmdline = f"{default_cmdline()} hostvisor.run={script}"
    peers = [("hostvisor", [args.hostvisor, "run", "--kernel", kernel, "--initrd", initrd,
                            "--cmdline", cmdline, "--memory", f"{args.memory}M",
                            "--serial", "stdio", "--balloon"])]
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        # acpi=off: QEMU names its virtio-mmio devices on the command line
        # (the guest kernel has no ACPI); -cpu without
        # IA32_ARCH_CAPABILITIES: QEMU 7.2 aborts setting it on PVM hosts.
        peers.append(("qemu", [qemu, "-M", "microvm,acpi=off", "-enable-kvm", "-cpu",
                               "host,-arch-capabilities", "-m", str(args.memory), "-smp", "1",
                               "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
                               "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
                               "-device", "virtio-balloon-device,free-page-reporting=on"]))
    else:
        print("qemu: skipped (qemu-system-x86_64 not installed)")
    print(f"fill {args.fill} MiB, reclaimed when RSS fell {drop} MiB; guest {args.memory} MiB; "
          f"{args.runs} runs", flush=True)
    results = {name: [] for name, _ in peers}
    for run in range(args.runs):
        for name, argv in peers:
            try:
                r = one_run(name, argv, args.fill, drop, args.timeout, hold)
            except RuntimeError as e:
                print(f"run {run + 1} {name}: failed: {e}", flush=True)
                continue
            results[name].append(r)
            took = "never" if r["reclaim"] is None else f"{r['reclaim']:.2f} s"
            from_rm = "never" if r["from_rm"] is None else f"{r['from_rm']:.1f} s"
            print(f"run {run + 1} {name:<10} reclaim {took:>8}  from rm {from_rm:>7}  "
                  f"rm {r['rm']:.1f} s  dropped {r['dropped']:6.1f} MiB "
                  f"(RSS {r['full']:.0f} MiB before)", flush=True)

    def med(name, key):
        xs = [r[key] for r in results[name] if r[key] is not None]
        return statistics.median(xs) if xs else None

    print()
    print(f"{'metric':<14} " + " ".join(f"{n:>12}" for n, _ in peers) + "   ratio")
    for key, unit in (("reclaim", "s"), ("from_rm", "s"), ("rm", "s"), ("dropped", "MiB")):
        vals = [med(n, key) for n, _ in peers]
        cells = " ".join(f"{'-' if v is None else f'{v:.2f} {unit}':>12}" for v in vals)
        ratio = ""
        if len(vals) == 2 and vals[0] and vals[1]:
            ratio = f"{vals[0] / vals[1]:.2f}x"
        print(f"{key:<14} {cells}   {ratio}")
    never = {n: sum(r["reclaim"] is None for r in results[n]) for n, _ in peers}
    if any(never.values()):
        print("runs that never reached the drop: " + ", ".join(f"{n} {c}" for n, c in never.items()))


if __name__ == "__main__":
    main()
