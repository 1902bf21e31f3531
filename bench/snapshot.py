#!/usr/bin/env python3
"""Snapshot benchmark: saving a running guest and resuming it in a new
process, hostvisor beside QEMU (and Firecracker when FIRECRACKER= names
its binary) in the same run.

Every VMM boots the default guest (same vmlinux, initramfs, command line,
1 vCPU) once per RAM size (256 MiB and 2 GiB unless --sizes), with a
script that answers each line on the serial console with "RE:<length>",
and hostvisor and Firecracker with a vsock device for the guest agent.
The VMs of one size boot together. Per VMM and size it measures:

  take      snapshot of the running guest, wall time of the request(s)
            that pause, save and resume it: hostvisor `PUT /vm/snapshot`;
            QEMU QMP `stop`, `migrate "exec:cat > FILE"` until
            query-migrate says completed, `cont`; Firecracker `PATCH /vm`
            Paused, `PUT /snapshot/create` (Full), `PATCH /vm` Resumed;
  on disk   the snapshot's files: allocated bytes (du) and apparent size;
  save overhead  the VMM's memory growth while saving: /proc/PID/clear_refs
            is written 5 (which resets VmHWM to the current Rss) before the
            request, and VmHWM after it minus VmRSS before it is the peak
            growth of the whole process; /proc/PID/smaps is also sampled
            every few ms during the save, split into the guest-RAM mapping
            and the rest (bench/boot.py's rss_split_kib), and the largest
            growth of the rest is the VMM's own (excluding guest RAM);
  first instruction  from the restoring process's execve to its first
            KVM_RUN ioctl, from kernel tracepoints (bpftrace, as
            bench/boot.py; the VMM is never stopped), and from spawning it
            (Python's Popen, CLOCK_MONOTONIC) to that KVM_RUN. hostvisor
            also logs its own figures (HOSTVISOR_LOG=hostvisor::timing):
            main() to state restored and to the first KVM_RUN; QEMU's QMP
            RESUME event and Firecracker's `PUT /snapshot/load` duration
            are printed beside when caught;
  serial echo  from spawning the restoring VMM to the guest's answer to a
            line written on its serial console (stdin) once the process
            made its first KVM_RUN: the same method for every VMM;
  agent ping  from spawning it to the first Pong of hostvisor's guest
            agent through the VMM's vsock Unix socket (`CONNECT 52`, the
            protocol hostvisor's and Firecracker's vsock share; QEMU's
            vhost-vsock needs /dev/vhost-vsock, absent here), with the
            attempts that failed before it and when the first one did;
  --version spawn to exit of the VMM printing its version: what starting
            the process costs at all on this host.

Each restore is its own process, killed after its figure; restores take
turns (run 1 of every VMM, then run 2, ...), and the serial and agent
figures come from separate restores so that one does not wait for the
other. Medians of --runs (save overhead: the largest). bpftrace needs
root: without it the first-instruction rows stay empty.
"""

import argparse
import base64
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from boot import (ROOT, SetupTracer, default_cmdline, guest_dir,  # noqa: E402
                  read_until_marker, rss_split_kib, status_kib)

HV = os.path.join(ROOT, "target", "release", "hostvisor")
CID = 3
AGENT_PORT = 52
# hello {protocol: 1} and ping, each a frame (4-byte LE length, bincode
# with varint integers; crates/agent/src/lib.rs).
HELLO_PING = b"\x02\x00\x00\x00\x00\x01" + b"\x01\x00\x00\x00\x01"

# The guest's side: run by /init through hostvisor.run=, reading the
# console with shell builtins only (no new process per answer).
GUEST_SCRIPT = b'echo BENCH-SERVING\nwhile read -r l; do echo "RE:${#l}"; done\n'
PING_LINE, ANSWER = b"ping\n", b"RE:4"


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def largest(xs):
    return max((x for x in xs if x is not None), default=None)


def unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path, timeout=60):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def http_call(path, method, url, body=None):
    """(status, body) of one request on a Unix-socket HTTP API."""
    c = UnixHTTP(path)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        c.request(method, url, body=data, headers=headers)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_path(path, timeout=10):
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.0005)


def _recv_exact(s, n, buf):
    while len(buf) < n:
        c = s.recv(65536)
        if not c:
            raise ConnectionError(f"closed after {buf[:40]!r}")
        buf += c
    return buf


def agent_ping(path, timeout=10):
    """One ping of the guest agent through a vsock Unix socket; raises
    OSError when it does not answer."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(f"CONNECT {AGENT_PORT}\n".encode() + HELLO_PING)
        buf = b""
        while b"\n" not in buf:
            c = s.recv(4096)
            if not c:
                raise ConnectionError(f"closed after {buf!r}")
            buf += c
        line, buf = buf.split(b"\n", 1)
        if not line.startswith(b"OK "):
            raise ConnectionError(line.decode(errors="replace"))
        frames = []
        for _ in range(2):
            buf = _recv_exact(s, 4, buf)
            n = int.from_bytes(buf[:4], "little")
            buf = _recv_exact(s, 4 + n, buf)
            frames.append(buf[4:4 + n])
            buf = buf[4 + n:]
        if frames[0][:1] != b"\x00" or frames[1][:1] != b"\x01":
            raise ConnectionError(f"not hello and pong: {frames!r}")
    finally:
        s.close()


def wait_agent(path, start, timeout=120):
    """Seconds from `start` (monotonic) to the first Pong, how many
    attempts failed before it once the socket was there, and when the
    first of those ended (seconds from `start`, or None)."""
    end = time.monotonic() + timeout
    failed, first_fail = 0, None
    while True:
        try:
            agent_ping(path)
            return time.monotonic() - start, failed, first_fail
        except OSError:
            if time.monotonic() > end:
                raise
            if os.path.exists(path):
                failed += 1
                if first_fail is None:
                    first_fail = time.monotonic() - start
            time.sleep(0.002)


def serial_echo(proc, start, tracer, timeout=120):
    """Seconds from `start` to the guest's answer to a line written on its
    serial console once the process has made its first KVM_RUN (bytes a
    VMM reads before loading the saved UART state can be lost: QEMU's
    are), and again every second without an answer."""
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    seen = b""
    sent = None
    end = time.monotonic() + timeout
    while ANSWER not in seen:
        now = time.monotonic()
        if now > end or proc.poll() is not None:
            raise RuntimeError(f"no serial answer: {seen[-300:]!r}")
        running = not tracer.method or proc.pid in tracer.runs or now - start > 10
        if running and (sent is None or now - sent > 1):
            proc.stdin.write(PING_LINE)
            proc.stdin.flush()
            sent = now
        try:
            seen += os.read(fd, 4096)
        except BlockingIOError:
            time.sleep(0.0002)
    return time.monotonic() - start


def first_run(tracer, pid, timeout=10):
    """(execve, first KVM_RUN) CLOCK_MONOTONIC ns of process `pid` from the
    tracer (None each when not seen); forgets `pid`."""
    if not tracer.method:
        return None, None
    end = time.monotonic() + timeout
    with tracer.cond:
        while pid not in tracer.runs and time.monotonic() < end:
            tracer.cond.wait(0.2)
        e, r = tracer.execs.pop(pid, None), tracer.runs.pop(pid, None)
    return e, (r[0] if r else None)


def disk_usage(paths):
    """(allocated bytes, apparent bytes) of these files."""
    alloc = apparent = 0
    for p in paths:
        st = os.stat(p)
        alloc += st.st_blocks * 512
        apparent += st.st_size
    return alloc, apparent


class SaveSampler:
    """Memory growth of process `pid` while it saves (see the module doc)."""

    def __init__(self, pid, mem_mib):
        self.pid, self.mem_mib = pid, mem_mib
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        self.rss0 = status_kib(pid, "VmRSS")
        split = rss_split_kib(pid, mem_mib)
        self.own0 = split[0] - split[1] if split else None
        self.guest0 = split[1] if split else None
        self.own_max = self.own0
        self.guest_max = self.guest0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            split = rss_split_kib(self.pid, self.mem_mib)
            if split and self.own_max is not None:
                self.own_max = max(self.own_max, split[0] - split[1])
                self.guest_max = max(self.guest_max, split[1])
            time.sleep(0.002)

    def finish(self):
        self.stop.set()
        self.thread.join()
        hwm = status_kib(self.pid, "VmHWM")
        peak = (hwm - self.rss0) / 1024 if hwm and self.rss0 else None
        own = (self.own_max - self.own0) / 1024 if self.own0 is not None else None
        guest = (self.guest_max - self.guest0) / 1024 if self.guest0 is not None else None
        return peak, own, guest


class Vmm:
    """One VMM: boots the guest, takes snapshots, restores them."""

    has_agent = False

    def __init__(self, name, size, tmp):
        self.name, self.size = name, size
        self.dir = os.path.join(tmp, f"{name}-{size}")
        os.makedirs(self.dir)
        self.proc = None
        self.res = {k: [] for k in ("take", "peak", "own", "guest", "first", "spawn_first",
                                    "self_restored", "self_first", "running", "serial", "self_take",
                                    "agent", "agent_failed", "agent_first_fail",
                                    "start_floor")}
        self.disk = None
        self.snap_paths = None

    def spawn(self, argv, env=None):
        t = time.monotonic()
        tns = time.monotonic_ns()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=open(os.path.join(self.dir, "stderr"), "ab"),
                                env=env)
        return proc, t, tns

    def wait_booted(self):
        read_until_marker(self.proc, b"BENCH-SERVING", 600, f"{self.name} {self.size} MiB")
        self.proc.stdin.write(PING_LINE)
        self.proc.stdin.flush()
        read_until_marker(self.proc, ANSWER, 120, f"{self.name} serial")
        if self.has_agent:
            wait_agent(self.vsock_path(), time.monotonic(), 300)

    def take(self, n):
        """One snapshot of the running guest into a new place; records its
        figures and keeps the last one's files for restoring."""
        sampler = SaveSampler(self.proc.pid, self.size)
        t = time.monotonic()
        paths = self.save(n)
        took = time.monotonic() - t
        peak, own, guest = sampler.finish()
        self.res["take"].append(took * 1e3)
        self.res["peak"].append(peak)
        self.res["own"].append(own)
        self.res["guest"].append(guest)
        self.disk = disk_usage(paths)
        # Only the last snapshot is restored: drop the one before (a
        # Firecracker snapshot of 2 GiB takes 2 GiB of disk).
        for old in self.snap_paths or []:
            if os.path.isdir(os.path.dirname(old)) and os.path.dirname(old) != self.dir:
                shutil.rmtree(os.path.dirname(old), ignore_errors=True)
            else:
                unlink(old)
        self.snap_paths = paths

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restore_once(self, tracer, what):
        """One restore; `what` is "serial" or "agent"."""
        proc, t, tns = self.restore_spawn()
        try:
            extra = self.after_spawn(proc, t)
            if what == "serial":
                self.res["serial"].append(serial_echo(proc, t, tracer) * 1e3)
            else:
                secs, failed, first_fail = wait_agent(self.vsock_path(), t)
                self.res["agent"].append(secs * 1e3)
                self.res["agent_failed"].append(failed)
                self.res["agent_first_fail"].append(
                    first_fail * 1e3 if first_fail is not None else None)
            e, r = first_run(tracer, proc.pid)
            self.res["first"].append((r - e) / 1e6 if e and r else None)
            self.res["spawn_first"].append((r - tns) / 1e6 if r else None)
            self.record_extra(extra, proc)
        finally:
            proc.kill()
            proc.wait()

    def after_spawn(self, proc, t):
        return None

    def start_floor(self):
        """Wall time of the VMM binary printing its version: the cost of
        starting the process at all (exec, dynamic linking, exit)."""
        t = time.monotonic()
        subprocess.run(self.version_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.res["start_floor"].append((time.monotonic() - t) * 1e3)

    def record_extra(self, extra, proc):
        pass


class Hostvisor(Vmm):
    has_agent = True

    def __init__(self, size, tmp, kernel, initrd, cmdline):
        super().__init__("hostvisor", size, tmp)
        self.version_argv = [HV, "--version"]
        self.env = dict(os.environ, HOSTVISOR_LOG="hostvisor::timing=info")
        self.proc, _, _ = self.spawn(
            [HV, "run", "--kernel", kernel, "--initrd", initrd, "--cmdline", cmdline,
             "--memory", f"{size}M", "--serial", "stdio", "--api-socket", self.api(),
             "--vsock", f"cid={CID},socket={self.vsock_path()}"], self.env)

    def api(self):
        return os.path.join(self.dir, "api.sock")

    def vsock_path(self):
        return os.path.join(self.dir, "vsock.sock")

    def save(self, n):
        d = os.path.join(self.dir, f"snap{n}")
        status, body = http_call(self.api(), "PUT", "/vm/snapshot", {"dir": d})
        if status != 204:
            raise RuntimeError(f"hostvisor snapshot: {status} {body!r}")
        return [os.path.join(d, f) for f in os.listdir(d)]

    def take(self, n):
        super().take(n)
        # The VMM's own figure (pause, save, resume): its log line.
        end = time.monotonic() + 5
        while time.monotonic() < end:
            found = re.findall(r"snapshot taken in ([\d.]+) ms",
                               open(os.path.join(self.dir, "stderr"), errors="replace").read())
            if len(found) > n:
                self.res["self_take"].append(float(found[n]))
                return
            time.sleep(0.01)
        self.res["self_take"].append(None)

    def restore_spawn(self):
        unlink(self.api())
        unlink(self.vsock_path())
        with open(os.path.join(self.dir, "stderr"), "w"):
            pass
        snap = os.path.dirname(self.snap_paths[0])
        return self.spawn([HV, "run", "--restore", snap, "--serial", "stdio",
                           "--api-socket", self.api()], self.env)

    def record_extra(self, extra, proc):
        # The timing lines are written at once; wait briefly for them.
        path = os.path.join(self.dir, "stderr")
        restored = first = None
        end = time.monotonic() + 5
        while first is None and time.monotonic() < end:
            text = open(path, errors="replace").read()
            m = re.search(r"restored at ([\d.]+) ms", text)
            restored = float(m.group(1)) if m else None
            m = re.search(r"first KVM_RUN at ([\d.]+) ms", text)
            first = float(m.group(1)) if m else None
            if first is None:
                time.sleep(0.01)
        self.res["self_restored"].append(restored)
        self.res["self_first"].append(first)


class Qmp:
    def __init__(self, path, timeout=30):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.f = self.sock.makefile("rb")
        self.events = []
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError(f"QMP closed during {name}")
            r = json.loads(line)
            if "event" in r:
                self.events.append(r)
            elif "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")
            elif "return" in r:
                return r["return"]

    def close(self):
        self.sock.close()


class Qemu(Vmm):
    def __init__(self, size, tmp, kernel, initrd, cmdline):
        super().__init__("qemu", size, tmp)
        qemu = shutil.which("qemu-system-x86_64")
        self.version_argv = [qemu, "-version"]
        # As bench/agent.py: microvm (virtio-mmio, no PCI, no ACPI) is
        # QEMU's machine nearest to hostvisor's.
        self.argv = [qemu, "-M", "microvm,acpi=off", "-enable-kvm", "-cpu",
                     "host,-arch-capabilities", "-m", str(size), "-smp", "1",
                     "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
                     "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
                     # The stream then carries no run state, so the guest
                     # saved after `stop` resumes by itself once loaded
                     # (with it, QEMU stays paused until a QMP `cont`).
                     "-global", "migration.store-global-state=off",
                     "-qmp", f"unix:{self.qmp_path()},server=on,wait=off"]
        self.proc, _, _ = self.spawn(self.argv)

    def qmp_path(self):
        return os.path.join(self.dir, "qmp.sock")

    def save(self, n):
        path = os.path.join(self.dir, f"snap{n}.mig")
        q = Qmp(self.qmp_path())
        try:
            q.cmd("stop")
            q.cmd("migrate", uri=f"exec:cat > {path}")
            while True:
                st = q.cmd("query-migrate").get("status")
                if st == "completed":
                    break
                if st in ("failed", "cancelled"):
                    raise RuntimeError(f"QEMU migrate: {st}")
                time.sleep(0.001)
            q.cmd("cont")
        finally:
            q.close()
        return [path]

    def restore_spawn(self):
        unlink(self.qmp_path())
        return self.spawn(self.argv + ["-incoming", f"exec:cat {self.snap_paths[0]}"])

    def after_spawn(self, proc, t):
        # QMP events come only after capabilities are negotiated: catch
        # RESUME when the load outlasts connecting, else None.
        out = {"qmp": None, "t": t}

        def watch():
            try:
                wait_path(self.qmp_path())
                end = time.monotonic() + 60
                while True:
                    try:
                        q = Qmp(self.qmp_path())
                        break
                    except (ConnectionRefusedError, FileNotFoundError):
                        if time.monotonic() > end:
                            raise
                        time.sleep(0.0005)
                if q.cmd("query-status")["status"] == "running" and not q.events:
                    return  # resumed before we could listen
                while not any(e["event"] == "RESUME" for e in q.events):
                    q.cmd("query-status")
                    time.sleep(0.001)
                ev = next(e for e in q.events if e["event"] == "RESUME")
                ts = ev["timestamp"]
                out["qmp"] = ts["seconds"] + ts["microseconds"] / 1e6
                q.close()
            except Exception:  # noqa: BLE001 (the figure is optional)
                pass

        out["wall0"] = time.time() - (time.monotonic() - t)
        th = threading.Thread(target=watch, daemon=True)
        th.start()
        out["thread"] = th
        return out

    def record_extra(self, extra, proc):
        extra["thread"].join(30)
        if extra["qmp"] is not None:
            self.res["running"].append((extra["qmp"] - extra["wall0"]) * 1e3)


class Firecracker(Vmm):
    has_agent = True

    def __init__(self, binary, size, tmp, kernel, initrd, cmdline):
        super().__init__("firecracker", size, tmp)
        self.bin = binary
        self.version_argv = [binary, "--version"]
        cfg = {
            "boot-source": {"kernel_image_path": kernel, "initrd_path": initrd,
                            "boot_args": cmdline},
            "drives": [],
            "machine-config": {"vcpu_count": 1, "mem_size_mib": size},
            "vsock": {"guest_cid": CID, "uds_path": self.vsock_path()},
        }
        path = os.path.join(self.dir, "fc.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        self.proc, _, _ = self.spawn([binary, "--api-sock", self.api(), "--config-file", path,
                                      "--level", "Error"])

    def api(self):
        return os.path.join(self.dir, "api.sock")

    def vsock_path(self):
        return os.path.join(self.dir, "vsock.sock")

    def _call(self, method, url, body):
        status, text = http_call(self.api(), method, url, body)
        if status >= 300:
            raise RuntimeError(f"firecracker {method} {url}: {status} {text!r}")

    def save(self, n):
        state = os.path.join(self.dir, f"snap{n}.state")
        mem = os.path.join(self.dir, f"snap{n}.mem")
        self._call("PATCH", "/vm", {"state": "Paused"})
        self._call("PUT", "/snapshot/create", {"snapshot_type": "Full",
                                               "snapshot_path": state, "mem_file_path": mem})
        self._call("PATCH", "/vm", {"state": "Resumed"})
        return [state, mem]

    def restore_spawn(self):
        unlink(self.api())
        unlink(self.vsock_path())
        return self.spawn([self.bin, "--api-sock", self.api(), "--level", "Error"])

    def after_spawn(self, proc, t):
        wait_path(self.api())
        # The socket's file exists a moment before it listens.
        end = time.monotonic() + 10
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(self.api())
                break
            except ConnectionRefusedError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.0002)
        t0 = time.monotonic()
        self._call("PUT", "/snapshot/load", {
            "snapshot_path": self.snap_paths[0],
            "mem_backend": {"backend_type": "File", "backend_path": self.snap_paths[1]},
            "resume_vm": True})
        return time.monotonic() - t0

    def record_extra(self, extra, proc):
        self.res["running"].append(extra * 1e3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="snapshots and restores per VMM")
    ap.add_argument("--sizes", default="256,2048", help="guest RAM sizes in MiB")
    ap.add_argument("--no-qemu", action="store_true")
    args = ap.parse_args()
    if not os.access(HV, os.X_OK):
        sys.exit(f"build hostvisor first: cargo build --release ({HV})")
    tracer = SetupTracer()
    if not tracer.method:
        print(f"note: first-instruction times not measured: {tracer.why}")
    g = guest_dir()
    kernel, initrd = os.path.join(g, "vmlinux"), os.path.join(g, "initramfs.cpio")
    cmdline = f"{default_cmdline()} hostvisor.run={base64.b64encode(GUEST_SCRIPT).decode()}"
    fc_bin = os.environ.get("FIRECRACKER")
    qemu = shutil.which("qemu-system-x86_64") and not args.no_qemu
    notes = []
    if not fc_bin:
        notes.append("Firecracker not measured: set FIRECRACKER= to its binary")
    if not qemu:
        notes.append("QEMU not measured")
    load = os.getloadavg()
    results = []
    tmp = tempfile.mkdtemp(prefix="hv-snap-bench-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            vmms = [Hostvisor(size, tmp, kernel, initrd, cmdline)]
            if qemu:
                vmms.append(Qemu(size, tmp, kernel, initrd, cmdline))
            if fc_bin:
                vmms.append(Firecracker(fc_bin, size, tmp, kernel, initrd, cmdline))
            try:
                for v in vmms:
                    v.wait_booted()
                    first_run(tracer, v.proc.pid, 0)
                time.sleep(2)
                for n in range(args.runs):
                    for v in vmms:
                        v.take(n)
                        time.sleep(0.5)
            finally:
                for v in vmms:
                    v.stop()
            for n in range(args.runs):
                for v in vmms:
                    v.start_floor()
                    for what in ("serial", "agent") if v.has_agent else ("serial",):
                        try:
                            v.restore_once(tracer, what)
                        except Exception as e:  # noqa: BLE001 (reported, run goes on)
                            notes.append(f"{v.name} {size} MiB restore ({what}) failed: {e}")
            results.append((size, vmms))
    finally:
        tracer.close()
        if not os.environ.get("KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
    report(results, args.runs, load, tracer, notes)


ROWS = [
    ("execve -> first KVM_RUN (ms)", "first", median),
    ("spawn -> first KVM_RUN (ms)", "spawn_first", median),
    ("  self: main -> restored (ms)", "self_restored", median),
    ("  self: main -> 1st KVM_RUN (ms)", "self_first", median),
    ("  QMP RESUME / FC load (ms)", "running", median),
    ("spawn -> serial echo (ms)", "serial", median),
    ("spawn -> agent pong (ms)", "agent", median),
    ("  failed pings first", "agent_failed", median),
    ("  spawn -> 1st failed ping (ms)", "agent_first_fail", median),
    ("spawn -> exit, --version (ms)", "start_floor", median),
    ("take snapshot (ms)", "take", median),
    ("  self: snapshot taken in (ms)", "self_take", median),
    # The largest of the runs: the first save allocates what later ones
    # reuse, so the median would hide it.
    ("save: peak Rss growth, max (MiB)", "peak", largest),
    ("save: non-guest growth, max (MiB)", "own", largest),
    ("save: guest-RAM growth, max (MiB)", "guest", largest),
]


def report(results, runs, load, tracer, notes):
    def fmt(x):
        return "-" if x is None else (f"{x:.0f}" if abs(x) >= 1000 else f"{x:.2f}")

    print(f"\nmedians of {runs}; load average at start {load[0]:.1f} "
          f"{load[1]:.1f} {load[2]:.1f}; {os.cpu_count()} CPUs")
    if tracer.method:
        print(f"first KVM_RUN: {tracer.method}")
    for size, vmms in results:
        hv, peers = vmms[0], vmms[1:]
        print(f"\n{size} MiB guest")
        head = f"{'metric (median unless said)':<34} {'hostvisor':>10}"
        for p in peers:
            head += f" {p.name:>12} {'hv/' + p.name[:2]:>7}"
        print(head)
        for label, key, agg in ROWS:
            h = agg(hv.res[key])
            line = f"{label:<34} {fmt(h):>10}"
            for p in peers:
                v = agg(p.res[key])
                ratio = f"{h / v:.2f}x" if h is not None and v else "-"
                line += f" {fmt(v):>12} {ratio:>7}"
            print(line)
        for label, idx in (("on disk, allocated (MiB)", 0), ("on disk, apparent (MiB)", 1)):
            h = hv.disk[idx] / 2**20
            line = f"{label:<34} {fmt(h):>10}"
            for p in peers:
                v = p.disk[idx] / 2**20
                line += f" {fmt(v):>12} {f'{h / v:.2f}x' if v else '-':>7}"
            print(line)
        for v in vmms:
            print(f"raw {size} {v.name}: " + json.dumps(
                {k: [None if x is None else round(x, 3) for x in xs]
                 for k, xs in v.res.items() if xs}))
    for n in notes:
        print(f"note: {n}")


if __name__ == "__main__":
    main()
