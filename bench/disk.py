#!/usr/bin/env python3
"""Disk benchmark: virtio-blk throughput inside the guest, hostvisor beside
QEMU, and the host's own throughput on the same image file as the limit.

bench/blkbench.c (sequential 1 MiB and random 4 KiB reads and writes with
O_DIRECT, each for a fixed time) is built statically and appended to the
default guest's initramfs. Both VMMs boot that guest with a 256 MiB raw
image as /dev/vda over virtio-mmio (QEMU: -M microvm,acpi=off, so that
it announces virtio-blk-device on the command line as hostvisor does) with host caching off (hostvisor cache=none, QEMU
cache=none, aio=threads), and the guest runs the probe on /dev/vda. Then
the host runs it on the image file. Same run, same image; figures in MB/s
with ratios hostvisor / QEMU and hostvisor / host.
"""

import argparse
import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from boot import ROOT, default_cmdline, guest_dir  # noqa: E402

LINE = re.compile(rb"BLKBENCH (\S+) ([0-9.]+) MB/s ([0-9.]+) IOPS")


def build_probe(tmp):
    exe = os.path.join(tmp, "root", "blkbench")
    os.makedirs(os.path.dirname(exe))
    subprocess.run(["gcc", "-O2", "-static", "-o", exe,
                    os.path.join(ROOT, "bench", "blkbench.c")], check=True)
    extra = os.path.join(tmp, "extra.cpio")
    with open(extra, "wb") as out:
        subprocess.run(["cpio", "--create", "--format=newc", "--owner=0:0", "--quiet"],
                       input=b"blkbench\n", cwd=os.path.dirname(exe), stdout=out, check=True)
    initrd = os.path.join(tmp, "initramfs-bench.cpio")
    with open(initrd, "wb") as out:
        for part in (os.path.join(guest_dir(), "initramfs.cpio"), extra):
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    return exe, initrd


def parse(output):
    """test -> MB/s for the 1 MiB tests, IOPS for the 4 KiB ones."""
    results = {}
    for m in LINE.finditer(output):
        name = m.group(1).decode()
        results[name] = float(m.group(3) if name.endswith("4K") else m.group(2))
    return results


def run_vm(argv, timeout):
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout)
    results = parse(p.stdout)
    if not results:
        tail = p.stdout[-400:].decode(errors="replace")
        raise RuntimeError(f"no results (exit {p.returncode}): {tail}")
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="per test")
    ap.add_argument("--size", type=int, default=256, help="image size in MiB")
    ap.add_argument("--timeout", type=int, default=300)
    args = ap.parse_args()

    kernel = os.path.join(guest_dir(), "vmlinux")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        exe, initrd = build_probe(tmp)
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            f.truncate(args.size << 20)
        script = f"/blkbench /dev/vda {args.size} {args.seconds}".encode()
        cmdline = f"{default_cmdline()} hostvisor.run={base64.b64encode(script).decode()}"
        results = {}
        hv = os.path.join(ROOT, "target", "release", "hostvisor")
        results["hostvisor"] = run_vm(
            [hv, "run", "--kernel", kernel, "--initrd", initrd, "--cmdline", cmdline,
             "--memory", "256M", "--disk", f"path={image},cache=none"], args.timeout)
        qemu = shutil.which("qemu-system-x86_64")
        if qemu:
            try:
                results["qemu-microvm"] = run_vm(
                    [qemu, "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host,-arch-capabilities",
                     "-m", "256", "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
                     "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
                     "-global", "virtio-mmio.force-legacy=false",
                     "-drive", f"id=d0,file={image},format=raw,if=none,cache=none,aio=threads",
                     "-device", "virtio-blk-device,drive=d0"], args.timeout)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"qemu-microvm failed: {e}")
        host = subprocess.run([exe, image, str(args.size), str(args.seconds)],
                              stdout=subprocess.PIPE, check=True)
        results["host"] = parse(host.stdout)

    tests = ["seq-read-1M", "seq-write-1M", "rand-read-4K", "rand-write-4K"]
    q = results.get("qemu-microvm", {})
    print(f"\n{args.size} MiB raw image, O_DIRECT in guest and host, {args.seconds} s per test; "
          "MB/s for 1M, IOPS for 4K")
    print(f"{'test':<15}{'hostvisor':>11}{'qemu':>9}{'hv/qemu':>9}{'host':>9}{'hv/host':>9}")
    for t in tests:
        h = results["hostvisor"].get(t)
        qv = q.get(t)
        lim = results["host"].get(t)
        print(f"{t:<15}{h or 0:>11.1f}{qv or 0:>9.1f}"
              f"{(h / qv if h and qv else 0):>9.2f}{lim or 0:>9.1f}"
              f"{(h / lim if h and lim else 0):>9.2f}")


if __name__ == "__main__":
    main()
