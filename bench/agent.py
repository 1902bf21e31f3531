#!/usr/bin/env python3
"""Guest-agent benchmark: running a command in the guest and copying a file
in and out, through hostvisor's agent over virtio-vsock, beside the same
through QEMU in the same run.

The peer: QEMU's vhost-vsock needs /dev/vhost-vsock, which the development
machines lack, so the issue's fallback applies: a remote shell over QEMU's
user-mode NAT (-netdev user, hostfwd). The guest has no sshd, so busybox
`nc -ll -e` serves it: unencrypted and with no checksums, so the peer does
less work than ssh would, and the ratio flatters QEMU.

  exec      wall time of one `sh -c true` in the guest: `hostvisor exec
            VM -- sh -c true` (a hostvisor process each time) against a
            TCP connection to the guest's nc running sh, sending "true";
  upload    MB/s of a 10 MB file into the guest: `hostvisor cp` (SHA-256
            checked at both ends) against piping it into nc's `head -c SIZE > file`;
  download  MB/s of that file back out.

Both boot the default guest (same vmlinux, initramfs, command line, 256 MiB,
1 vCPU); QEMU uses -M microvm with virtio-net-device. The VMs boot together
and are measured in turns (one exec on each, then the next round), after
--warmup untimed commands each, so a shared host's changing load falls on
all of them alike. Medians of --execs commands and --runs copies.

--baseline HOSTVISOR:GUEST_DIR also measures another hostvisor binary with
its own guest (initramfs, and so agent) in the same run, for before/after
figures of a change.
"""

import argparse
import base64
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from boot import ROOT, default_cmdline, guest_dir, read_until_marker  # noqa: E402

HV = os.path.join(ROOT, "target", "release", "hostvisor")
SIZE = 10_000_000

# The peer guest's services (run by /init through hostvisor.run=).
PEER_SCRIPT = """
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
while :; do nc -ll -p 2222 -e /bin/sh; sleep 1; done &
while :; do nc -ll -p 2223 -e /bin/sh -c 'head -c 10000000 > /tmp/up'; sleep 1; done &
while :; do nc -ll -p 2224 -e /bin/sh -c 'cat /tmp/up'; sleep 1; done &
echo BENCH-SERVING
sleep 100000
"""


def median(xs):
    return statistics.median(xs) if xs else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_round(port, send, timeout=120):
    """Sends `send` and reads until the guest's side closes (never
    half-closing: QEMU's NAT resets such connections at times)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        if send:
            s.sendall(send)
        got = 0
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                return got
            got += len(chunk)
    finally:
        s.close()


class QemuPeer:
    """QEMU booting the default guest with nc servers behind port forwards."""

    name = "qemu (nc/NAT)"

    def __init__(self, kernel, initrd, cmdline, data):
        self.data = data
        self.res = {"exec": [], "upload": [], "download": [], "failed": 0}
        qemu = shutil.which("qemu-system-x86_64")
        self.ports = {p: free_port() for p in (2222, 2223, 2224)}
        fwd = ",".join(f"hostfwd=tcp:127.0.0.1:{h}-:{g}" for g, h in self.ports.items())
        script = base64.b64encode(PEER_SCRIPT.encode()).decode()
        # acpi=off: QEMU then names its virtio-mmio devices on the command
        # line (the guest kernel has no ACPI).
        argv = [qemu, "-M", "microvm,acpi=off", "-enable-kvm", "-cpu",
                "host,-arch-capabilities", "-m", "256", "-smp", "1", "-kernel", kernel,
                "-initrd", initrd, "-append", f"{cmdline} hostvisor.run={script}",
                "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
                "-netdev", f"user,id=n0,{fwd}", "-device", "virtio-net-device,netdev=n0"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)

    def wait_ready(self):
        read_until_marker(self.proc, b"BENCH-SERVING", 300, "QEMU's guest")
        # The servers start in the background: wait until one answers.
        end = time.monotonic() + 120
        while True:
            try:
                tcp_round(self.ports[2222], b"true; exit\n", timeout=10)
                return
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(1)

    def _timed(self, port, send):
        # A server the guest's crash fault took down is restarted by its
        # loop: such attempts are made again and not timed.
        for _ in range(5):
            t = time.monotonic()
            try:
                got = tcp_round(self.ports[port], send)
                return time.monotonic() - t, got
            except ConnectionResetError:
                self.res["failed"] += 1
                time.sleep(2)
        raise RuntimeError(f"QEMU peer port {port} keeps resetting")

    def exec(self):
        return self._timed(2222, b"true; exit\n")[0]

    def upload(self):
        return SIZE / self._timed(2223, self.data)[0] / 1e6

    def download(self):
        secs, got = self._timed(2224, b"")
        if got != SIZE:
            raise RuntimeError(f"QEMU peer download returned {got} bytes")
        return SIZE / secs / 1e6

    def notes(self):
        if self.res["failed"]:
            yield (f"{self.res['failed']} QEMU peer connections were reset (a guest server "
                   "crashed and was restarted) and made again (not counted)")

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Hostvisor:
    """A managed hostvisor VM reached through its agent."""

    def __init__(self, name, hv_bin, kernel, initrd, cmdline, src):
        self.name, self.hv_bin, self.src = name, hv_bin, src
        self.res = {"exec": [], "upload": [], "download": [], "retried": 0, "crashed": 0}
        self.tmp = tempfile.mkdtemp(prefix="hv-agent-bench-")
        self.env = dict(os.environ, XDG_DATA_HOME=self.tmp)
        self.back = os.path.join(self.tmp, "back.bin")
        self.hv("create", "bench", "--kernel", kernel, "--initrd", initrd, "--cmdline", cmdline,
                "--memory", "256M")
        self.hv("start", "bench")

    def hv(self, *args):
        return subprocess.run([self.hv_bin, *args], env=self.env, check=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self):
        self.hv("guest-info", "bench", "--wait", "300")

    def exec(self):
        # On nested PVM hosts about one new guest process in a hundred dies
        # of SIGSEGV at start (DEVELOPERS.md); such runs are made again and
        # counted.
        for _ in range(3):
            t = time.monotonic()
            out = subprocess.run([self.hv_bin, "exec", "bench", "--", "sh", "-c", "true"],
                                 env=self.env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            if out.returncode == 0:
                return time.monotonic() - t
            if out.returncode != 139:
                raise RuntimeError(f"hostvisor exec failed: {out.returncode}")
            self.res["crashed"] += 1
        raise RuntimeError("hostvisor exec: the guest process crashed three times")

    def _copy(self, src, dst):
        t = time.monotonic()
        out = self.hv("cp", src, dst)
        secs = time.monotonic() - t
        self.res["retried"] += b"damaged" in out.stderr
        return SIZE / secs / 1e6

    def upload(self):
        return self._copy(self.src, "bench:/tmp/up")

    def download(self):
        rate = self._copy("bench:/tmp/up", self.back)
        if os.path.getsize(self.back) != SIZE:
            raise RuntimeError("hostvisor download has the wrong size")
        return rate

    def notes(self):
        if self.res["crashed"]:
            yield (f"{self.res['crashed']} {self.name} guest commands died of SIGSEGV at start "
                   "and were run again (not counted)")
        if self.res["retried"]:
            yield (f"{self.res['retried']} {self.name} copies arrived damaged and were made "
                   "again (counted in their time)")

    def stop(self):
        subprocess.run([self.hv_bin, "kill", "bench"], env=self.env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(self.tmp, ignore_errors=True)


def measure(targets, runs, execs, warmup):
    """Takes turns: each round times one exec (or copy) on every target, so
    the host's load (other work on a shared machine) falls on all alike."""
    for t in targets:
        t.wait_ready()
    for _ in range(warmup):
        for t in targets:
            t.exec()
    for _ in range(execs):
        for t in targets:
            t.res["exec"].append(t.exec())
    for _ in range(runs):
        for t in targets:
            t.res["upload"].append(t.upload())
            t.res["download"].append(t.download())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="copies each way per VMM")
    ap.add_argument("--execs", type=int, default=10, help="commands per VMM")
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed commands per VMM first (the guests just booted)")
    ap.add_argument("--baseline", metavar="HOSTVISOR:GUEST_DIR",
                    help="also measure this hostvisor binary with the guest in GUEST_DIR")
    args = ap.parse_args()
    if not os.access(HV, os.X_OK):
        sys.exit(f"build hostvisor first: cargo build --release ({HV})")
    g = guest_dir()
    kernel, initrd = os.path.join(g, "vmlinux"), os.path.join(g, "initramfs.cpio")
    cmdline = default_cmdline()
    data = os.urandom(SIZE)
    targets = []
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(data)
        f.flush()
        try:
            # All boot together and are measured in turns.
            targets.append(Hostvisor("hostvisor", HV, kernel, initrd, cmdline, f.name))
            if args.baseline:
                base_hv, base_dir = args.baseline.split(":", 1)
                targets.append(Hostvisor("baseline", base_hv, os.path.join(base_dir, "vmlinux"),
                                         os.path.join(base_dir, "initramfs.cpio"), cmdline,
                                         f.name))
            if shutil.which("qemu-system-x86_64"):
                targets.append(QemuPeer(kernel, initrd, cmdline, data))
            measure(targets, args.runs, args.execs, args.warmup)
        finally:
            for t in targets:
                t.stop()

    hv = targets[0]
    base = targets[1] if args.baseline else None
    peer = targets[-1] if isinstance(targets[-1], QemuPeer) else None

    def fmt(x):
        return "-" if x is None else format(x, ".2f")

    print(f"{'metric':<22} {'hostvisor':>12} {'qemu (nc/NAT)':>14} {'ratio':>7}"
          + (f" {'baseline':>10} {'ratio':>7}" if base else ""))
    rows = [("exec round trip (ms)", "exec", 1000, "lower"),
            ("upload 10 MB (MB/s)", "upload", 1, "higher"),
            ("download 10 MB (MB/s)", "download", 1, "higher")]
    for label, key, scale, better in rows:
        h = median(hv.res[key]) * scale
        p = median(peer.res[key]) * scale if peer else None
        ratio = f"{h / p:.2f}x" if p else "-"
        line = f"{label:<22} {h:>12.2f} {fmt(p):>14} {ratio:>7}"
        if base:
            b = median(base.res[key]) * scale
            line += f" {b:>10.2f} {f'{b / p:.2f}x' if p else '-':>7}"
        print(f"{line}  ({better} is better)")
    for t in targets:
        for note in t.notes():
            print(f"note: {note}")


if __name__ == "__main__":
    main()
