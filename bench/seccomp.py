#!/usr/bin/env python3
"""seccomp's cost: hostvisor with --seccomp on beside --seccomp off, same run.

Each run boots the default guest with bench/blkbench.c appended to its
initramfs (as bench/disk.py does) and a 256 MiB raw image as /dev/vda
(cache=none); the guest runs the probe on it. Per run it measures:

  ready  wall time from spawning hostvisor to the guest's READY line;
  disk   blkbench's figures: sequential 1 MiB read/write (MB/s), random
         4 KiB read/write (IOPS), O_DIRECT in the guest.

Runs alternate in pairs, each mode first in every other pair (on, off, off,
on, ...), so a change in the host's load hits both alike; the image is
written out in full first (no block allocation during a run); medians are printed with the ratio on/off (the target: within 2%).
"""

import argparse
import base64
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from boot import READY, ROOT, default_cmdline, guest_dir  # noqa: E402
from disk import build_probe, parse  # noqa: E402

TESTS = ["seq-read-1M", "seq-write-1M", "rand-read-4K", "rand-write-4K"]


def run_once(hv, mode, kernel, initrd, cmdline, image, timeout):
    argv = [hv, "run", "--seccomp", mode, "--kernel", kernel, "--initrd", initrd,
            "--cmdline", cmdline, "--memory", "256M", "--disk", f"path={image},cache=none"]
    start = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    seen = b""
    ready = None
    end = start + timeout
    while True:
        chunk = os.read(p.stdout.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
        if ready is None and READY in seen:
            ready = time.monotonic() - start
        if time.monotonic() > end:
            p.kill()
            raise RuntimeError(f"{mode}: no end within {timeout} s")
    p.wait()
    results = parse(seen)
    if ready is None or not results:
        raise RuntimeError(f"{mode}: exit {p.returncode}: {seen[-400:]!r}")
    results["ready"] = ready
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs per mode")
    ap.add_argument("--seconds", type=float, default=3.0, help="per blkbench test")
    ap.add_argument("--size", type=int, default=256, help="image size in MiB")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--hostvisor", default=os.path.join(ROOT, "target", "release", "hostvisor"))
    args = ap.parse_args()

    kernel = os.path.join(guest_dir(), "vmlinux")
    samples = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        _, initrd = build_probe(tmp)
        image = os.path.join(tmp, "disk.img")
        # Written out, not sparse: the first run's writes must not pay
        # for the host file system's block allocation the later ones skip.
        with open(image, "wb") as f:
            chunk = b"\0" * (1 << 20)
            for _ in range(args.size):
                f.write(chunk)
            os.fsync(f.fileno())
        script = f"/blkbench /dev/vda {args.size} {args.seconds}".encode()
        cmdline = f"{default_cmdline()} hostvisor.run={base64.b64encode(script).decode()}"
        for i in range(args.runs):
            # ABBA: each mode goes first in every other pair.
            for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
                r = run_once(args.hostvisor, mode, kernel, initrd, cmdline, image, args.timeout)
                print(f"run {i + 1} {mode:>3}: ready {r['ready']:.2f} s, "
                      + ", ".join(f"{t} {r.get(t, 0):.1f}" for t in TESTS), flush=True)
                samples[mode].append(r)

    print(f"\nmedians of {args.runs} runs; ready in s, MB/s for 1M, IOPS for 4K")
    print(f"{'figure':<15}{'on':>10}{'off':>10}{'on/off':>9}")
    for key in ["ready"] + TESTS:
        on = statistics.median(s.get(key, 0) for s in samples["on"])
        off = statistics.median(s.get(key, 0) for s in samples["off"])
        print(f"{key:<15}{on:>10.2f}{off:>10.2f}{(on / off if off else 0):>9.3f}")


if __name__ == "__main__":
    main()
