#!/usr/bin/env python3
"""Boot benchmark: hostvisor beside other VMMs booting the same guest.

Every VMM boots the same ELF vmlinux (PVH entry for QEMU and Cloud
Hypervisor), the same uncompressed initramfs, the same kernel command line,
RAM and vCPU count, in the same run. Per VMM it measures:

  setup  process start (execve) to the first KVM_RUN, from an strace of
         execve and ioctl only (seccomp-bpf filtered, so other syscalls run
         untraced), one strace run per boot run;
  ready  wall time from spawning the VMM to the guest's READY line;
  overhead  the VMM's peak RSS minus the guest RAM it has touched (the RSS
         of its guest-RAM mapping), sampled while the guest runs.

and prints medians with ratios against QEMU. Peers: QEMU from Debian
(qemu-system-x86, machine types pc and q35; microvm with --microvm), and
Firecracker / Cloud Hypervisor when FIRECRACKER= / CLOUD_HYPERVISOR= name
their binaries.
"""

import argparse
import base64
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY = b"HOSTVISOR-GUEST-READY"


def read_until_marker(proc, marker, timeout, what, stop=None):
    """Reads `proc`'s stdout until `marker` appears; raises if it does not
    within `timeout` seconds, if the process ends, or if `stop` shows up."""
    seen = b""
    end = time.monotonic() + timeout
    while marker not in seen:
        if time.monotonic() > end or proc.poll() is not None:
            raise RuntimeError(f"{what}: no {marker!r}: {seen[-500:]!r}")
        seen += os.read(proc.stdout.fileno(), 4096)
        if stop and stop in seen:
            raise RuntimeError(f"{what}: {stop!r}")
    return seen


def guest_dir():
    d = os.environ.get("HOSTVISOR_GUEST_DIR")
    if d:
        return d
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.environ["HOME"], ".cache")
    return os.path.join(cache, "hostvisor", "guest")


def default_cmdline():
    """hostvisor's default command line on this host (vmm::default_cmdline);
    every peer gets the same one."""
    args = ["console=ttyS0", "reboot=k", "panic=-1", "pci=off"]
    if os.path.exists("/sys/module/kvm_pvm"):
        args += ["quiet", "noxsave", "clearcpuid=cx16,erms,fsrm,popcnt,smap",
                 "random.trust_cpu=on", "percpu_alloc=page", "rodata=off"]
    return " ".join(args)


class Peer:
    def __init__(self, name, argv, setup=None):
        self.name = name
        self.argv = argv
        self.setup = setup  # files to write before running: {path: text}


def peers(args, kernel, initrd, cmdline, tmp):
    mem = args.memory
    cpus = str(args.cpus)
    hv = os.path.join(ROOT, "target", "release", "hostvisor")
    out = [Peer("hostvisor", [hv, "run", "--kernel", kernel, "--initrd", initrd,
                              "--cmdline", cmdline, "--memory", f"{mem}M",
                              "--cpus", cpus, "--serial", "stdio"])]
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        # -cpu host without IA32_ARCH_CAPABILITIES: QEMU 7.2 aborts setting
        # that MSR on nested KVM (PVM) hosts.
        common = ["-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", str(mem),
                  "-smp", cpus, "-kernel", kernel, "-initrd", initrd,
                  "-append", cmdline, "-nographic", "-no-reboot", "-nodefaults",
                  "-serial", "stdio"]
        machines = ["pc", "q35"] + (["microvm"] if args.microvm else [])
        for m in machines:
            out.append(Peer(f"qemu-{m}", [qemu, "-M", m] + common))
    fc = os.environ.get("FIRECRACKER")
    if fc:
        cfg = os.path.join(tmp, "fc.json")
        conf = {
            "boot-source": {"kernel_image_path": kernel, "initrd_path": initrd,
                            "boot_args": cmdline},
            "drives": [],
            "machine-config": {"vcpu_count": args.cpus, "mem_size_mib": mem},
        }
        out.append(Peer("firecracker", [fc, "--no-api", "--config-file", cfg,
                                        "--level", "Error"],
                        setup={cfg: json.dumps(conf)}))
    ch = os.environ.get("CLOUD_HYPERVISOR")
    if ch:
        out.append(Peer("cloud-hypervisor", [ch, "--kernel", kernel, "--initramfs", initrd,
                                             "--cmdline", cmdline, "--cpus", f"boot={cpus}",
                                             "--memory", f"size={mem}M",
                                             "--serial", "tty", "--console", "off"]))
    return out


def guest_ram_rss_kib(pid, mem_mib):
    """RSS of the mapping that holds guest RAM: the anonymous mapping whose
    size is closest to the guest's RAM size (within 25%)."""
    best = None
    size = rss = 0
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    size = rss = 0
                elif line.startswith("Size:"):
                    size = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
                    want = mem_mib * 1024
                    if 0.75 * want <= size <= 1.25 * want:
                        score = abs(size - want)
                        if best is None or score < best[0]:
                            best = (score, rss)
    except OSError:
        return None
    return best[1] if best else None


def status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def boot_once(peer, args, timeout):
    """Returns (seconds to READY, overhead KiB, peak RSS KiB) or raises."""
    start = time.monotonic()
    proc = subprocess.Popen(peer.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    seen = b""
    ready = None
    overhead = peak = None
    try:
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        deadline = start + timeout
        while time.monotonic() < deadline:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                chunk = None
            if chunk == b"":
                break
            if chunk:
                seen += chunk
                if ready is None and READY in seen:
                    ready = time.monotonic() - start
                    # The guest powers off (resets) 2 s later. Some VMMs
                    # (Cloud Hypervisor) reboot on a reset instead of
                    # exiting; they are stopped after this grace period,
                    # which does not affect what was measured.
                    deadline = time.monotonic() + 30
                    # The guest sleeps after READY (see main): sample now.
                    time.sleep(0.3)
                    peak = status_kib(proc.pid, "VmHWM")
                    guest = guest_ram_rss_kib(proc.pid, args.memory)
                    if peak is not None and guest is not None:
                        overhead = peak - guest
            else:
                time.sleep(0.005)
        if ready is None:
            raise RuntimeError(f"no READY line within {timeout} s; output: {seen[-300:]!r}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return ready, overhead, peak


def setup_time(peer, timeout):
    """execve -> first KVM_RUN, from strace."""
    strace = shutil.which("strace")
    if not strace:
        return None
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as log:
        argv = [strace, "-f", "--seccomp-bpf", "-ttt", "-e", "trace=execve,ioctl",
                "-o", log.name] + peer.argv
        # Own process group: killing it ends strace and the VMM together.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        start = time.monotonic()
        first_exec = first_run = None
        while time.monotonic() - start < timeout and first_run is None:
            time.sleep(0.2)
            for line in open(log.name):
                m = re.match(r"^\d+\s+(\d+\.\d+) (\w+)\(", line)
                if not m:
                    continue
                t, call = float(m.group(1)), m.group(2)
                if call == "execve" and first_exec is None:
                    first_exec = t
                if call == "ioctl" and "KVM_RUN" in line and first_run is None:
                    first_run = t
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if first_exec is None or first_run is None:
            return None
        return first_run - first_exec


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory", type=int, default=256, help="guest RAM in MiB")
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--microvm", action="store_true", help="also QEMU -M microvm")
    ap.add_argument("--only", help="comma-separated peer names")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()

    gdir = guest_dir()
    kernel = os.path.join(gdir, "vmlinux")
    initrd = os.path.join(gdir, "initramfs.cpio")
    for f in (kernel, initrd):
        if not os.path.exists(f):
            sys.exit(f"missing {f}: run guest/build.sh")
    # After READY the guest sleeps 2 s so memory can be sampled, then
    # powers off.
    script = base64.b64encode(b"sleep 2").decode()
    cmdline = f"{default_cmdline()} hostvisor.run={script}"

    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        selected = peers(args, kernel, initrd, cmdline, tmp)
        if args.only:
            keep = set(args.only.split(","))
            selected = [p for p in selected if p.name in keep]
        for peer in selected:
            for path, text in (peer.setup or {}).items():
                with open(path, "w") as f:
                    f.write(text)
            readies, overheads, peaks, errors = [], [], [], []
            for i in range(args.runs):
                try:
                    r, o, p = boot_once(peer, args, args.timeout)
                    readies.append(r)
                    if o is not None:
                        overheads.append(o)
                        peaks.append(p)
                    print(f"  {peer.name} run {i + 1}: READY after {r:.2f} s, "
                          f"overhead {o} KiB", flush=True)
                except Exception as e:  # noqa: BLE001 - report and go on
                    errors.append(str(e))
                    print(f"  {peer.name} run {i + 1}: FAILED: {e}", flush=True)
                    break
            setups = [t for t in (setup_time(peer, args.timeout) for _ in readies) if t is not None]
            setup = statistics.median(setups) if setups else None
            results[peer.name] = {
                "ready_s": statistics.median(readies) if readies else None,
                "ready_all_s": readies,
                "setup_ms": setup * 1e3 if setup is not None else None,
                "overhead_kib": statistics.median(overheads) if overheads else None,
                "peak_rss_kib": statistics.median(peaks) if peaks else None,
                "error": errors[0] if errors else None,
            }

    base = results.get("qemu-pc") or results.get("qemu-q35")

    def ratio(name, key):
        a = results[name].get(key)
        b = base.get(key) if base else None
        return f"{a / b:.2f}" if a and b else "-"

    print()
    print(f"guest: {kernel} + {initrd}, {args.memory} MiB, {args.cpus} vCPU(s), "
          f"{args.runs} runs, medians; ratios are VMM / QEMU pc (lower is better)")
    print(f"{'vmm':<18}{'setup ms':>10}{'ratio':>7}{'READY s':>10}{'ratio':>7}"
          f"{'overhead MiB':>14}{'ratio':>7}")
    for name, r in results.items():
        def fmt(v, scale=1.0, digits=1):
            return f"{v / scale:.{digits}f}" if v is not None else "-"
        print(f"{name:<18}{fmt(r['setup_ms']):>10}{ratio(name, 'setup_ms'):>7}"
              f"{fmt(r['ready_s'], digits=2):>10}{ratio(name, 'ready_s'):>7}"
              f"{fmt(r['overhead_kib'], 1024):>14}{ratio(name, 'overhead_kib'):>7}"
              + (f"  ({r['error'][:60]})" if r["error"] else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cmdline": cmdline, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
