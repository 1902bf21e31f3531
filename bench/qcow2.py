#!/usr/bin/env python3
"""qcow2 engine benchmark: hostvisor's image engine beside QEMU's, on the
same host files, in the same run.

`hostvisor disk bench` issues exactly the request sequence of `qemu-img
bench` at queue depth 1 (count requests of one size, each `step` bytes
after the previous, modulo the image size), so the two engines do the same
work: 4 KiB "random" requests use a large odd stride (40503 blocks of
4 KiB), which visits every 4 KiB block of the image in a scattered order
(qemu-img bench has no random mode), and 1 MiB sequential requests use a
stride of 1 MiB.

Writes go to fresh copies of one empty qcow2 image (64 KiB clusters, so
they include cluster allocation); reads go to the image QEMU's write pass
produced, read by both. Each figure is the median of --runs runs; both
tools' own reported times are used, which (as qemu-img bench measures)
run from the first request to the last completion, without the image open
and the final flush on close.
Results: IOPS for 4 KiB, MB/s for 1 MiB, and the ratio hostvisor / QEMU
(above 1: hostvisor is faster).
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HV = os.path.join(ROOT, "target", "release", "hostvisor")
TIME = re.compile(r"Run completed in ([0-9.]+) seconds")
STRIDE_4K = 4096 * 40503


def timed(argv):
    out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout
    m = TIME.search(out)
    if not m:
        raise RuntimeError(f"{argv[0]}: no time in {out!r}")
    return float(m.group(1))


def qemu_bench(image, cache, write, size, step, count):
    argv = ["qemu-img", "bench", "-f", "qcow2", "-t", cache, "-d", "1", "-c", str(count),
            "-s", str(size), "-S", str(step)]
    if write:
        argv.append("-w")
    return timed(argv + [image])


def hv_bench(image, cache, write, size, step, count):
    argv = [HV, "disk", "bench", "-f", "qcow2", "-t", cache, "-c", str(count),
            "-s", str(size), "-S", str(step)]
    if write:
        argv.append("-w")
    return timed(argv + [image])


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="image size in MiB")
    ap.add_argument("--count-4k", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", default="none", help="none or writeback (both tools)")
    args = ap.parse_args()
    if not os.path.exists(HV):
        sys.exit("build hostvisor first: cargo build --release")
    if not shutil.which("qemu-img"):
        sys.exit("qemu-img is missing: apt-get install qemu-utils")

    tests = [
        # name, write, request size, step, count
        ("rand-write-4K", True, 4096, STRIDE_4K, args.count_4k),
        ("rand-read-4K", False, 4096, STRIDE_4K, args.count_4k),
        ("seq-write-1M", True, 1 << 20, 1 << 20, args.size),
        ("seq-read-1M", False, 1 << 20, 1 << 20, args.size),
    ]
    times = {t[0]: {"hostvisor": [], "qemu": []} for t in tests}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        empty = os.path.join(tmp, "empty.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", empty, f"{args.size}M"],
                       check=True)
        for _ in range(args.runs):
            written = {}
            for name, write, size, step, count in tests:
                for tool, fn in (("qemu", qemu_bench), ("hostvisor", hv_bench)):
                    if write:
                        image = os.path.join(tmp, f"{tool}-{name}.qcow2")
                        shutil.copyfile(empty, image)
                        if tool == "qemu":
                            written[name.replace("write", "read")] = image
                    else:
                        image = written[name]
                    times[name][tool].append(fn(image, args.cache, write, size, step, count))
                if write:
                    # What hostvisor wrote must be a valid image.
                    subprocess.run(["qemu-img", "check", "-q",
                                    os.path.join(tmp, f"hostvisor-{name}.qcow2")], check=True)

    print(f"\nqcow2, {args.size} MiB image, 64 KiB clusters, cache={args.cache}, queue depth 1, "
          f"median of {args.runs}; IOPS for 4K, MB/s for 1M")
    print(f"{'test':<15}{'hostvisor':>11}{'qemu':>11}{'hv/qemu':>9}")
    for name, _write, size, _step, count in tests:
        rate = {}
        for tool in ("hostvisor", "qemu"):
            t = statistics.median(times[name][tool])
            rate[tool] = count / t if size == 4096 else count * size / t / 1e6
        print(f"{name:<15}{rate['hostvisor']:>11.1f}{rate['qemu']:>11.1f}"
              f"{rate['hostvisor'] / rate['qemu']:>9.2f}")


if __name__ == "__main__":
    main()
