#!/usr/bin/env python3
"""Managed-VM benchmark: how long `hostvisor start` takes to give a running
VM, and what one idle managed VM process costs in memory, beside QEMU run
the same way (daemonized, with its QMP control socket), in the same run.

  start     wall time of `hostvisor start NAME` (it returns once the VM's
            API answers) / of `qemu-system-x86_64 -daemonize` (it returns
            once the VM is set up) plus QEMU's first QMP greeting;
  ready     from the start command to the guest's READY line in the
            console file;
  overhead  the VM process's total Rss minus the Rss of its guest-RAM
            mapping, both from one read of /proc/PID/smaps (the same
            instant), after the guest has sat idle at its shell for --idle
            seconds.

Both boot the default guest (same vmlinux, initramfs, command line, 256 MiB,
1 vCPU); QEMU uses -M microvm (the closest machine). Medians of --runs.
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
from boot import READY, ROOT, default_cmdline, guest_dir, overhead_kib  # noqa: E402

HV = os.path.join(ROOT, "target", "release", "hostvisor")


def overhead_after(pid, mem, idle):
    """One reading of the VMM's own memory `idle` seconds from now."""
    time.sleep(idle)
    return overhead_kib(pid, mem)


def wait_file(path, needle, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(path, "rb") as f:
                if needle in f.read():
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def hostvisor_once(tmp, kernel, initrd, cmdline, mem, idle, timeout, measure=overhead_after):
    env = dict(os.environ, XDG_DATA_HOME=tmp)
    subprocess.run([HV, "create", "bench", "--kernel", kernel, "--initrd", initrd,
                    "--cmdline", cmdline, "--memory", f"{mem}M"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    vm = os.path.join(tmp, "hostvisor", "vms", "bench")
    t0 = time.monotonic()
    subprocess.run([HV, "start", "bench"], env=env, check=True, stdout=subprocess.DEVNULL)
    start = time.monotonic() - t0
    try:
        if not wait_file(os.path.join(vm, "console.log"), READY, timeout):
            raise RuntimeError("hostvisor: no READY line")
        ready = time.monotonic() - t0
        with open(os.path.join(vm, "pid")) as f:
            pid = int(f.read())
        over = measure(pid, mem, idle)
    finally:
        subprocess.run([HV, "kill", "bench"], env=env, stdout=subprocess.DEVNULL)
        subprocess.run([HV, "delete", "bench"], env=env, stdout=subprocess.DEVNULL)
    return start, ready, over


def qemu_once(tmp, qemu, kernel, initrd, cmdline, mem, idle, timeout, measure=overhead_after):
    console = os.path.join(tmp, "qemu-console.log")
    qmp = os.path.join(tmp, "qmp.sock")
    pidfile = os.path.join(tmp, "qemu.pid")
    for p in (console, qmp, pidfile):
        if os.path.exists(p):
            os.unlink(p)
    t0 = time.monotonic()
    subprocess.run([qemu, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities",
                    "-m", str(mem), "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
                    "-display", "none", "-nodefaults", "-no-reboot",
                    "-serial", f"file:{console}", "-qmp", f"unix:{qmp},server=on,wait=off",
                    "-pidfile", pidfile, "-daemonize"], check=True)
    s = socket.socket(socket.AF_UNIX)
    s.connect(qmp)
    s.recv(4096)  # the QMP greeting
    s.close()
    start = time.monotonic() - t0
    with open(pidfile) as f:
        pid = int(f.read())
    try:
        if not wait_file(console, READY, timeout):
            raise RuntimeError("qemu: no READY line")
        ready = time.monotonic() - t0
        over = measure(pid, mem, idle)
    finally:
        os.kill(pid, 9)
    return start, ready, over


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory", type=int, default=256, help="MiB")
    ap.add_argument("--idle", type=float, default=3.0)
    ap.add_argument("--timeout", type=int, default=240)
    args = ap.parse_args()
    if not os.path.exists(HV):
        sys.exit("build hostvisor first: cargo build --release")
    kernel = os.path.join(guest_dir(), "vmlinux")
    initrd = os.path.join(guest_dir(), "initramfs.cpio")
    cmdline = default_cmdline()
    qemu = shutil.which("qemu-system-x86_64")
    results = {"hostvisor": [], "qemu-microvm": []}
    print("memory method: total Rss minus guest-RAM Rss, one read of /proc/PID/smaps "
          f"after {args.idle} s idle", flush=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        for i in range(args.runs):
            r = hostvisor_once(tmp, kernel, initrd, cmdline, args.memory, args.idle, args.timeout)
            results["hostvisor"].append(r)
            print(f"hostvisor run {i + 1}: start {r[0] * 1e3:.1f} ms, ready {r[1]:.2f} s, "
                  f"overhead {r[2]} KiB", flush=True)
            if qemu:
                r = qemu_once(tmp, qemu, kernel, initrd, cmdline, args.memory, args.idle,
                              args.timeout)
                results["qemu-microvm"].append(r)
                print(f"qemu-microvm run {i + 1}: start {r[0] * 1e3:.1f} ms, ready {r[1]:.2f} s, "
                      f"overhead {r[2]} KiB", flush=True)

    def med(name, k):
        vals = [r[k] for r in results[name] if r[k] is not None]
        return statistics.median(vals) if vals else None

    print(f"\nmanaged VM, {args.memory} MiB, 1 vCPU, medians of {args.runs}")
    print(f"{'':<14}{'start ms':>10}{'ready s':>9}{'overhead MiB':>14}")
    for name in results:
        if not results[name]:
            continue
        print(f"{name:<14}{med(name, 0) * 1e3:>10.1f}{med(name, 1):>9.2f}"
              f"{med(name, 2) / 1024:>14.1f}")
    if results["qemu-microvm"]:
        print(f"{'hv / qemu':<14}{med('hostvisor', 0) / med('qemu-microvm', 0):>10.2f}"
              f"{med('hostvisor', 1) / med('qemu-microvm', 1):>9.2f}"
              f"{med('hostvisor', 2) / med('qemu-microvm', 2):>14.2f}")


if __name__ == "__main__":
    main()
