#!/usr/bin/env python3
"""Shared-directory benchmark: hostvisor's virtio-fs share beside QEMU's 9p
(`-virtfs`-style local fsdev, what Lima used), same guest, same host
directory, one VM after the other.

The default guest (kernel has CONFIG_VIRTIO_FS and CONFIG_9P_FS /
NET_9P_VIRTIO) runs one script in each VM and times each step with
/proc/uptime (10 ms resolution):
- seq-write: `dd` of SIZE MiB of zeros into the share, fsync'd (MB/s);
- seq-read: the same file read back after dropping the guest's caches
  (MB/s);
- create / stat / unlink: 1,000 empty files made by the shell, tested with
  `[ -f ]`, removed by one `rm` (operations per second);
- find: `find` over a host-made tree of 2,000 files in 20 directories,
  caches dropped first (seconds).
QEMU runs -M microvm,acpi=off with virtio-9p-device (fsdev local,
security_model=mapped-xattr by default; --security none for the other) and
the guest mounts it with trans=virtio,version=9p2000.L,msize=512000.
QEMU with virtiofsd is not compared: virtiofsd is not packaged here.
On nested-KVM development hosts every guest kernel path runs emulated:
absolute figures are far below real hardware; the ratio is the point.
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

LINE = re.compile(rb"SHAREBENCH (\S+) ([0-9.]+)")

SCRIPT = r"""M=/mnt/bench
mkdir -p $M
grep -q " $M " /proc/mounts || mount -t {fstype} {opts} bench $M || echo SHAREBENCH-MOUNT-FAILED
now() {{ read up _ < /proc/uptime; echo ${{up/./}}; }}
t0=$(now); dd if=/dev/zero of=$M/big bs=1M count={size} conv=fsync 2>/dev/null; t1=$(now)
echo "SHAREBENCH seq-write-cs $((t1 - t0))"
sync; echo 3 > /proc/sys/vm/drop_caches
t0=$(now); dd if=$M/big of=/dev/null bs=1M 2>/dev/null; t1=$(now)
echo "SHAREBENCH seq-read-cs $((t1 - t0))"
rm -f $M/big; mkdir $M/m
t0=$(now); i=0; while [ $i -lt 1000 ]; do : > $M/m/f$i; i=$((i+1)); done; t1=$(now)
echo "SHAREBENCH create-cs $((t1 - t0))"
sync; echo 3 > /proc/sys/vm/drop_caches
t0=$(now); i=0; while [ $i -lt 1000 ]; do [ -f $M/m/f$i ]; i=$((i+1)); done; t1=$(now)
echo "SHAREBENCH stat-cs $((t1 - t0))"
t0=$(now); rm -rf $M/m; t1=$(now)
echo "SHAREBENCH unlink-cs $((t1 - t0))"
sync; echo 3 > /proc/sys/vm/drop_caches
t0=$(now); find $M/tree > /dev/null; t1=$(now)
echo "SHAREBENCH find-cs $((t1 - t0))"
"""


def make_tree(root):
    for d in range(20):
        sub = os.path.join(root, "tree", f"d{d}")
        os.makedirs(sub)
        for f in range(100):
            with open(os.path.join(sub, f"f{f}"), "w") as out:
                out.write(f"{d}/{f}\n")


def run_vm(argv, timeout):
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout)
    found = {m.group(1).decode(): float(m.group(2)) for m in LINE.finditer(p.stdout)}
    if b"SHAREBENCH-MOUNT-FAILED" in p.stdout or "find-cs" not in found:
        tail = p.stdout[-600:].decode(errors="replace")
        raise RuntimeError(f"incomplete run (exit {p.returncode}): {tail}")
    return found


def figures(raw, size):
    """Seconds (centiseconds from the guest) to MB/s and ops/s."""
    s = {k[:-3]: max(v, 1.0) / 100 for k, v in raw.items()}
    return {
        "seq-write MB/s": size * 1.048576 / s["seq-write"],
        "seq-read MB/s": size * 1.048576 / s["seq-read"],
        "create ops/s": 1000 / s["create"],
        "stat ops/s": 1000 / s["stat"],
        "unlink ops/s": 1000 / s["unlink"],
        "find 2000 files s": s["find"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=16, help="file size in MiB")
    ap.add_argument("--security", default="mapped-xattr", choices=["mapped-xattr", "none"],
                    help="QEMU 9p security_model")
    ap.add_argument("--cache", default="auto", choices=["auto", "always", "never"],
                    help="hostvisor share cache=")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--no-qemu", action="store_true")
    args = ap.parse_args()

    kernel = os.path.join(guest_dir(), "vmlinux")
    initrd = os.path.join(guest_dir(), "initramfs.cpio")
    hv = os.path.join(ROOT, "target", "release", "hostvisor")
    results = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        share = os.path.join(tmp, "share")
        os.makedirs(share)
        make_tree(share)

        def cmdline(fstype, opts):
            script = SCRIPT.format(fstype=fstype, opts=opts, size=args.size).encode()
            return f"{default_cmdline()} hostvisor.run={base64.b64encode(script).decode()}"

        results["hostvisor virtio-fs"] = run_vm(
            [hv, "run", "--kernel", kernel, "--initrd", initrd,
             "--cmdline", cmdline("virtiofs", ""), "--memory", "256M",
             "--share", f"{share}:bench,cache={args.cache},mount=/mnt/bench"], args.timeout)
        qemu = shutil.which("qemu-system-x86_64")
        if qemu and not args.no_qemu:
            opts = "-o trans=virtio,version=9p2000.L,msize=512000"
            try:
                results[f"qemu 9p {args.security}"] = run_vm(
                    [qemu, "-M", "microvm,acpi=off", "-enable-kvm",
                     "-cpu", "host,-arch-capabilities", "-m", "256",
                     "-kernel", kernel, "-initrd", initrd,
                     "-append", cmdline("9p", opts),
                     "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
                     "-global", "virtio-mmio.force-legacy=false",
                     "-fsdev", f"local,id=f0,path={share},security_model={args.security}",
                     "-device", "virtio-9p-device,fsdev=f0,mount_tag=bench"], args.timeout)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"qemu failed: {e}")

    rows = {name: figures(raw, args.size) for name, raw in results.items()}
    names = list(rows)
    print(f"\n{args.size} MiB file, 1,000 small files, find over 2,000 files; "
          f"hostvisor cache={args.cache}")
    print(f"{'':<20}" + "".join(f"{n:>24}" for n in names)
          + ("       ratio" if len(names) == 2 else ""))
    for key in rows[names[0]]:
        vals = [rows[n][key] for n in names]
        line = f"{key:<20}" + "".join(f"{v:>24.2f}" for v in vals)
        if len(vals) == 2:
            lower_better = key.startswith("find")
            ratio = vals[1] / vals[0] if lower_better else vals[0] / vals[1]
            line += f"{ratio:>11.2f}x"
        print(line)


if __name__ == "__main__":
    main()
