#!/usr/bin/env python3
"""Boot benchmark: hostvisor beside other VMMs booting the same guest.

Every VMM boots the same ELF vmlinux (PVH entry for QEMU and Cloud
Hypervisor), the same uncompressed initramfs, the same kernel command line,
RAM and vCPU count, in the same run. Per VMM it measures:

  setup  process start (execve) to the first KVM_RUN ioctl, from kernel
         tracepoints (syscalls:sys_enter_execve and sys_enter_ioctl with
         cmd == KVM_RUN, 0xae80) read by bpftrace: the probes run in the
         kernel and never stop the VMM, so the figure does not grow with
         the number of ioctls a VMM makes (strace, used before, stopped the
         process on every traced ioctl). Measured in the same boot as the
         other figures;
  ready  wall time from spawning the VMM to the guest's READY line;
  overhead  the VMM's resident memory beside the guest's: the process's
         total Rss minus the Rss of its guest-RAM mapping, both summed from
         one read of /proc/PID/smaps while the guest sleeps after READY
         (current against current; the peak VmHWM minus the current guest
         RAM, used before, counted transient peaks of the VMM's setup).

and prints medians with ratios against QEMU. Peers: QEMU from Debian
(qemu-system-x86, machine types pc and q35; microvm with --microvm), and
Firecracker / Cloud Hypervisor when FIRECRACKER= / CLOUD_HYPERVISOR= name
their binaries (skipped with a note otherwise). Runs are interleaved (run 1
of every VMM, then run 2, ...) so that a change in the host's load hits all.
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
import threading
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


def rss_split_kib(pid, mem_mib):
    """(total Rss, guest-RAM Rss) of process `pid` in KiB, both summed from
    one read of /proc/PID/smaps, so they describe the same instant. The
    guest-RAM mapping is the one whose size is closest to the guest's RAM
    size (within 25%). None if the process or the mapping is gone."""
    want = mem_mib * 1024
    best = None
    total = size = 0
    try:
        with open(f"/proc/{pid}/smaps") as f:
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            size = 0
        elif line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("Rss:"):
            rss = int(line.split()[1])
            total += rss
            if 0.75 * want <= size <= 1.25 * want:
                score = abs(size - want)
                if best is None or score < best[0]:
                    best = (score, rss)
    return (total, best[1]) if best else None


def overhead_kib(pid, mem_mib):
    """The VMM's own resident memory: total Rss minus guest-RAM Rss, from
    the same read of smaps (see rss_split_kib)."""
    split = rss_split_kib(pid, mem_mib)
    return split[0] - split[1] if split else None


def status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


KVM_RUN = 0xAE80  # _IO(KVMIO, 0x80)

# $1 is this script's pid: only its children (the VMMs it spawns; a vCPU
# thread's real_parent is its process's parent) are recorded. nsecs is
# CLOCK_MONOTONIC. The R line also gives the number of ioctls the VMM made
# before its first KVM_RUN (what strace used to stop on).
SETUP_PROBES = """
BEGIN { printf("TRACING\\n"); }
tracepoint:syscalls:sys_enter_execve /curtask->real_parent->tgid == $1/ {
  printf("E %d %llu\\n", pid, nsecs);
}
tracepoint:syscalls:sys_enter_ioctl /curtask->real_parent->tgid == $1 && @run[pid] == 0/ {
  if (args->cmd == KVM_RUN_CMD) {
    @run[pid] = 1;
    printf("R %d %llu %d\\n", pid, nsecs, @n[pid]);
    delete(@n[pid]);
  } else {
    @n[pid]++;
  }
}
END { clear(@run); clear(@n); }
""".replace("KVM_RUN_CMD", str(KVM_RUN))


class SetupTracer:
    """execve -> first KVM_RUN of each VMM this script spawns, from kernel
    tracepoints read by bpftrace, which never stops the traced process
    (unlike strace or ptrace). One bpftrace for the whole benchmark; the
    boots are measured as they run. `method` says what was used; None (with
    `why`) when it cannot run here."""

    def __init__(self):
        self.method = None
        self.why = None
        self.proc = None
        self.execs, self.runs = {}, {}
        bpftrace = shutil.which("bpftrace")
        if not bpftrace:
            self.why = "bpftrace is missing (Debian package bpftrace)"
            return
        if os.geteuid() != 0:
            self.why = "bpftrace needs root"
            return
        if not os.path.isdir("/sys/kernel/tracing/events"):
            subprocess.run(["mount", "-t", "tracefs", "tracefs", "/sys/kernel/tracing"],
                           stderr=subprocess.DEVNULL)
        version = subprocess.run([bpftrace, "--version"], capture_output=True,
                                 text=True).stdout.strip()
        self.proc = subprocess.Popen([bpftrace, "-e", SETUP_PROBES, str(os.getpid())],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        line = ""
        end = time.monotonic() + 120  # compiling the probes is slow on a busy host
        while time.monotonic() < end and self.proc.poll() is None:
            line = self.proc.stdout.readline()
            if line.strip() == "TRACING":
                break
        if line.strip() != "TRACING":
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            self.close()
            self.why = f"bpftrace did not start: {err.strip()[-300:]}"
            return
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.method = (f"{version}: tracepoints syscalls:sys_enter_execve -> first "
                       f"syscalls:sys_enter_ioctl with cmd == KVM_RUN ({KVM_RUN:#x}); "
                       "in-kernel probes, the VMM is never stopped")

    def _read(self):
        for line in self.proc.stdout:
            parts = line.split()
            if len(parts) < 3 or parts[0] not in ("E", "R"):
                continue
            pid, ns = int(parts[1]), int(parts[2])
            with self.cond:
                if parts[0] == "E":
                    self.execs.setdefault(pid, ns)  # the first one
                else:
                    self.runs.setdefault(pid, (ns, int(parts[3]) if len(parts) > 3 else None))
                self.cond.notify_all()

    def setup(self, pid, timeout=10.0):
        """(ms from `pid`'s execve to its first KVM_RUN, ioctls before it),
        or (None, None); forgets `pid` (so a reused pid starts afresh)."""
        if not self.method:
            return None, None
        end = time.monotonic() + timeout
        with self.cond:
            while pid not in self.runs and time.monotonic() < end:
                self.cond.wait(0.2)
            e, r = self.execs.pop(pid, None), self.runs.pop(pid, None)
        if e is None or r is None:
            return None, None
        return (r[0] - e) / 1e6, r[1]

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def strace_setup_ms(peer, timeout):
    """The old way, kept only to show what it measured (--strace-compare):
    execve -> first KVM_RUN from `strace -f --seccomp-bpf -e
    trace=execve,ioctl`, which stops the VMM on every ioctl it makes. The
    VMM is killed at its first KVM_RUN."""
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
    return (first_run - first_exec) * 1e3


def setup_only(peer, tracer, timeout):
    """One more setup sample: start the VMM, stop it at its first KVM_RUN.
    Returns (ms, ioctls) or (None, None)."""
    proc = subprocess.Popen(peer.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        return tracer.setup(proc.pid, timeout)
    finally:
        proc.kill()
        proc.wait()


def boot_once(peer, args, timeout, tracer):
    """Returns {ready_s, setup_ms, ioctls, overhead_kib, rss_kib,
    guest_kib, peak_kib} (None where not measured) or raises."""
    start = time.monotonic()
    proc = subprocess.Popen(peer.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    seen = b""
    out = {"ready_s": None, "setup_ms": None, "ioctls": None, "overhead_kib": None,
           "rss_kib": None, "guest_kib": None, "peak_kib": None}
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
                if out["ready_s"] is None and READY in seen:
                    out["ready_s"] = time.monotonic() - start
                    # The guest sleeps after READY (see main): sample now,
                    # then stop the VMM (Cloud Hypervisor would reboot the
                    # guest on its reset rather than exit).
                    time.sleep(0.3)
                    out["peak_kib"] = status_kib(proc.pid, "VmHWM")
                    split = rss_split_kib(proc.pid, args.memory)
                    if split:
                        out["rss_kib"], out["guest_kib"] = split
                        out["overhead_kib"] = split[0] - split[1]
                    break
            else:
                time.sleep(0.005)
        if out["ready_s"] is None:
            raise RuntimeError(f"no READY line within {timeout} s; output: {seen[-300:]!r}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out["setup_ms"], out["ioctls"] = tracer.setup(proc.pid)
    return out


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
    ap.add_argument("--setup-samples", type=int, default=3,
                    help="extra setup-only starts per run (stopped at the first KVM_RUN); "
                    "setup is the median over these and the boots")
    ap.add_argument("--strace-compare", action="store_true",
                    help="also measure setup the old way, under strace (stops the VMM on "
                    "every ioctl), to show the difference")
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

    for var, name in (("FIRECRACKER", "firecracker"), ("CLOUD_HYPERVISOR", "cloud-hypervisor")):
        if not os.environ.get(var):
            print(f"{name}: skipped ({var}= does not name a binary; not built here)")
    tracer = SetupTracer()
    print(f"setup method: {tracer.method or 'none, setup not measured: ' + tracer.why}")
    print("memory method: total Rss minus guest-RAM Rss, one read of /proc/PID/smaps "
          "0.3 s after READY", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        selected = peers(args, kernel, initrd, cmdline, tmp)
        if args.only:
            keep = set(args.only.split(","))
            selected = [p for p in selected if p.name in keep]
        runs = {p.name: [] for p in selected}
        errors = {p.name: [] for p in selected}
        try:
            for i in range(args.runs):
                for peer in selected:
                    if errors[peer.name]:
                        continue
                    for path, text in (peer.setup or {}).items():
                        with open(path, "w") as f:
                            f.write(text)
                    try:
                        r = boot_once(peer, args, args.timeout, tracer)
                    except Exception as e:  # noqa: BLE001 - report and go on
                        errors[peer.name].append(str(e))
                        print(f"  {peer.name} run {i + 1}: FAILED: {e}", flush=True)
                        continue
                    if args.strace_compare:
                        r["strace_setup_ms"] = strace_setup_ms(peer, args.timeout)
                    r["setup_extra_ms"] = [setup_only(peer, tracer, 30)[0]
                                           for _ in range(args.setup_samples)]
                    runs[peer.name].append(r)
                    print(f"  {peer.name} run {i + 1}: setup {r['setup_ms']} ms "
                          f"({r['ioctls']} ioctls before KVM_RUN; setup-only starts "
                          f"{r['setup_extra_ms']}), READY after "
                          f"{r['ready_s']:.2f} s, overhead {r['overhead_kib']} KiB (Rss "
                          f"{r['rss_kib']} - guest RAM {r['guest_kib']}; VmHWM "
                          f"{r['peak_kib']})"
                          + (f"; under strace: setup {r['strace_setup_ms']} ms"
                             if args.strace_compare else ""), flush=True)
        finally:
            tracer.close()

    def med(name, key):
        vals = [r[key] for r in runs[name] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def setups(name):
        vals = [r["setup_ms"] for r in runs[name]]
        vals += [v for r in runs[name] for v in r["setup_extra_ms"]]
        return [v for v in vals if v is not None]

    results = {}
    for name in runs:
        results[name] = {
            "ready_s": med(name, "ready_s"),
            "setup_ms": statistics.median(setups(name)) if setups(name) else None,
            "setup_min_ms": min(setups(name)) if setups(name) else None,
            "setup_samples": len(setups(name)),
            "overhead_kib": med(name, "overhead_kib"),
            "peak_rss_kib": med(name, "peak_kib"),
            "strace_setup_ms": med(name, "strace_setup_ms"),
            "ioctls_before_run": med(name, "ioctls"),
            "runs": runs[name],
            "error": errors[name][0] if errors[name] else None,
        }

    base = results.get("qemu-pc") or results.get("qemu-q35")

    def ratio(name, key):
        a = results[name].get(key)
        b = base.get(key) if base else None
        return f"{a / b:.2f}" if a and b else "-"

    print()
    print(f"guest: {kernel} + {initrd}, {args.memory} MiB, {args.cpus} vCPU(s), "
          f"{args.runs} runs, medians; ratios are VMM / QEMU pc (lower is better)")
    print(f"setup: {tracer.method or 'not measured: ' + tracer.why}; median of each boot "
          f"and {args.setup_samples} setup-only starts per run")
    print(f"{'vmm':<18}{'setup ms':>10}{'ratio':>7}{'(min)':>8}{'READY s':>10}{'ratio':>7}"
          f"{'overhead MiB':>14}{'ratio':>7}")
    for name, r in results.items():
        def fmt(v, scale=1.0, digits=1):
            return f"{v / scale:.{digits}f}" if v is not None else "-"
        print(f"{name:<18}{fmt(r['setup_ms']):>10}{ratio(name, 'setup_ms'):>7}"
              f"{fmt(r['setup_min_ms']):>8}"
              f"{fmt(r['ready_s'], digits=2):>10}{ratio(name, 'ready_s'):>7}"
              f"{fmt(r['overhead_kib'], 1024):>14}{ratio(name, 'overhead_kib'):>7}"
              + (f"  ({r['error'][:60]})" if r["error"] else ""))
    if args.strace_compare:
        print("setup under strace (the old method; stops the VMM on every ioctl):")
        for name, r in results.items():
            print(f"  {name:<16}{r['strace_setup_ms'] or 0:>10.1f} ms  "
                  f"ratio {ratio(name, 'strace_setup_ms')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cmdline": cmdline, "setup_method": tracer.method,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
