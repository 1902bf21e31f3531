#!/usr/bin/env python3
"""Network benchmark: TCP throughput between host and guest, hostvisor
beside QEMU with the same guest in the same run.

  nat  hostvisor `--net nat` (libslirp) against QEMU's `-netdev user`
       (libslirp), both with a port forward, two ways:
         equal MTU  hostvisor with the guest's eth0 set to MTU 1500 (the
                    script runs `ip link set eth0 mtu 1500`), QEMU's
                    default 1500: the VMMs' own share;
         defaults   hostvisor's default MTU 65520 (VIRTIO_NET_F_MTU)
                    against QEMU's 1500: what a user gets;
       (QEMU is measured once; its default is the equal MTU);
  tap  both on the same TAP device `hvbench0` (192.168.100.1/24 on the
       host; needs root; skipped otherwise).

Directions, 10 MB each, medians of --runs:
  host->guest  the guest's busybox wget fetches from a host HTTP server
               (through NAT: at 10.0.2.2, the host's loopback), timed in
               the guest with /proc/uptime;
  guest->host  the host fetches from the guest's busybox httpd (sendfile),
               through the port forward (NAT) or directly (TAP), timed on
               the host from connect to last byte.

Both boot the default guest (same vmlinux, initramfs, command line,
256 MiB, 1 vCPU) with a script run by /init (hostvisor.run=); QEMU uses
-M microvm with virtio-net-device. On nested-KVM development hosts the
guest's kernel is emulated, so these numbers measure mostly the guest's
per-packet cost; the ratio is what compares the VMMs.
"""

import argparse
import base64
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from agent import free_port, median  # noqa: E402
from boot import ROOT, default_cmdline, guest_dir, read_until_marker  # noqa: E402

HV = os.path.join(ROOT, "target", "release", "hostvisor")
SIZE_MB = 10
SIZE = SIZE_MB << 20
TAP = "hvbench0"
TAP_HOST, TAP_GUEST = "192.168.100.1", "192.168.100.2"

GUEST_SCRIPT = """
mode={mode}
if [ $mode = tap ]; then
  ip link set eth0 up
  ip addr add {guest}/24 dev eth0
else
  i=0
  until ip -4 addr show eth0 | grep -q 10.0.2.15; do
    i=$((i + 1)); [ $i -gt 120 ] && echo BENCH-NO-LEASE && exit 1; sleep 1
  done
fi
{mtu_cmd}
echo "BENCH-MTU $(cat /sys/class/net/eth0/mtu)"
mkdir -p /tmp/www
dd if=/dev/zero of=/tmp/www/big bs=1M count={size_mb} 2>/dev/null
httpd -p 80 -h /tmp/www
n=0
while [ $n -lt {runs} ]; do
  read a _ < /proc/uptime
  wget -q -O /tmp/got http://{server}:{port}/big
  status=$?
  read b _ < /proc/uptime
  size=$(wc -c < /tmp/got)
  rm -f /tmp/got
  echo "BENCH-DOWN $status $size $a $b"
  [ $status -eq 0 ] && n=$((n + 1))
done
echo BENCH-SERVING
sleep 100000
"""


class Big(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    chunk = b"\0" * (1 << 20)

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(SIZE))
        self.end_headers()
        left = SIZE
        while left:
            n = min(left, len(self.chunk))
            self.wfile.write(self.chunk[:n])
            left -= n


def serve(addr):
    srv = http.server.ThreadingHTTPServer((addr, 0), Big)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def fetch(addr, port):
    """Seconds to GET /big from the guest's httpd, and the bytes."""
    t = time.monotonic()
    with socket.create_connection((addr, port), timeout=300) as s:
        s.sendall(b"GET /big HTTP/1.0\r\n\r\n")
        got = 0
        while True:
            d = s.recv(1 << 20)
            if not d:
                break
            got += len(d)
    return time.monotonic() - t, got


def measure(argv, mode, fwd_port, runs, label):
    """Boots a VM with `argv` (its cmdline carries the script), reads its
    download timings, then times fetches from it."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    res = {"h2g": [], "g2h": [], "failed": 0, "mtu": None}
    try:
        buf = read_until_marker(proc, b"BENCH-SERVING", 600, label, stop=b"BENCH-NO-LEASE")
        for line in buf.decode(errors="replace").splitlines():
            if line.startswith("BENCH-MTU "):
                res["mtu"] = int(line.split()[1])
            if line.startswith("BENCH-DOWN "):
                status, size, a, b = line.split()[1:5]
                if status != "0" or int(size) != SIZE:
                    res["failed"] += 1
                    continue
                res["h2g"].append(SIZE / (float(b) - float(a)) / 1e6)
        addr, port = ("127.0.0.1", fwd_port) if mode == "nat" else (TAP_GUEST, 80)
        for _ in range(runs):
            for _attempt in range(3):
                try:
                    secs, got = fetch(addr, port)
                except OSError:
                    got = -1
                if got >= SIZE:
                    res["g2h"].append(SIZE / secs / 1e6)
                    break
                res["failed"] += 1
                time.sleep(2)  # httpd's child may have crashed: try again
        return res
    finally:
        proc.kill()
        proc.wait()


def script(mode, port, runs, mtu=None):
    """The guest's script; `mtu` sets eth0's MTU (None: the VMM's default)."""
    server = "10.0.2.2" if mode == "nat" else TAP_HOST
    mtu_cmd = f"ip link set eth0 mtu {mtu}" if mtu else ""
    text = GUEST_SCRIPT.format(mode=mode, guest=TAP_GUEST, size_mb=SIZE_MB, runs=runs,
                               server=server, port=port, mtu_cmd=mtu_cmd)
    return base64.b64encode(text.encode()).decode()


def hostvisor_argv(kernel, initrd, cmdline, mode, fwd, port, runs, mtu=None):
    net = f"nat,hostfwd=tcp:127.0.0.1:{fwd}-:80" if mode == "nat" else f"tap={TAP}"
    return [HV, "run", "--kernel", kernel, "--initrd", initrd, "--memory", "256M",
            "--cmdline", f"{cmdline} hostvisor.run={script(mode, port, runs, mtu)}",
            "--net", net, "--serial", "stdio"]


def qemu_argv(qemu, kernel, initrd, cmdline, mode, fwd, port, runs):
    netdev = (f"user,id=n0,hostfwd=tcp:127.0.0.1:{fwd}-:80" if mode == "nat"
              else f"tap,id=n0,ifname={TAP},script=no,downscript=no")
    # acpi=off: QEMU then names its virtio-mmio devices on the command line
    # (the guest kernel has no ACPI).
    return [qemu, "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host,-arch-capabilities",
            "-m", "256", "-smp", "1", "-kernel", kernel, "-initrd", initrd,
            "-append", f"{cmdline} hostvisor.run={script(mode, port, runs)}",
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-netdev", netdev, "-device", "virtio-net-device,netdev=n0"]


def make_tap():
    if os.geteuid() != 0:
        print("tap: skipped (needs root to make the TAP device)")
        return False
    subprocess.run(["ip", "link", "del", TAP], stderr=subprocess.DEVNULL)
    for cmd in (["ip", "tuntap", "add", "dev", TAP, "mode", "tap"],
                ["ip", "addr", "add", f"{TAP_HOST}/24", "dev", TAP],
                ["ip", "link", "set", TAP, "up"]):
        subprocess.run(cmd, check=True)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="transfers each way per VMM and mode")
    ap.add_argument("--modes", default="nat,tap", help="nat, tap or both")
    args = ap.parse_args()
    if not os.access(HV, os.X_OK):
        sys.exit(f"build hostvisor first: cargo build --release ({HV})")
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        sys.exit("qemu-system-x86_64 is missing (Debian package qemu-system-x86)")
    g = guest_dir()
    kernel, initrd = os.path.join(g, "vmlinux"), os.path.join(g, "initramfs.cpio")
    cmdline = default_cmdline()
    results = {}
    for mode in args.modes.split(","):
        if mode == "tap":
            if not make_tap():
                continue
            srv = serve(TAP_HOST)
        else:
            srv = serve("127.0.0.1")
        port = srv.server_address[1]
        try:
            # NAT: hostvisor at its default MTU and at QEMU's (1500); QEMU
            # once, at its default (1500). TAP: both at 1500.
            cases = ([("hostvisor", None), ("hostvisor", 1500), ("qemu", None)]
                     if mode == "nat" else [("hostvisor", None), ("qemu", None)])
            for peer, mtu in cases:
                fwd = free_port()
                argv = (hostvisor_argv(kernel, initrd, cmdline, mode, fwd, port, args.runs, mtu)
                        if peer == "hostvisor"
                        else qemu_argv(qemu, kernel, initrd, cmdline, mode, fwd, port, args.runs))
                key = peer if mtu is None else f"{peer}-mtu{mtu}"
                r = measure(argv, mode, fwd, args.runs, f"{key} {mode}")
                if mtu and r["mtu"] != mtu:
                    raise RuntimeError(f"{key} {mode}: the guest's eth0 has MTU {r['mtu']}")
                results[(mode, key)] = r
                print(f"{key} {mode} (guest MTU {r['mtu']}): host->guest {r['h2g']} "
                      f"guest->host {r['g2h']} MB/s, {r['failed']} failed", flush=True)
        finally:
            srv.shutdown()
            if mode == "tap":
                subprocess.run(["ip", "link", "del", TAP], stderr=subprocess.DEVNULL)

    print(f"\n{'path':<34} {'hostvisor':>10} {'qemu':>10} {'ratio':>7}   (MB/s, higher is better)")
    rows = [("nat", "hostvisor-mtu1500", "nat, equal MTU (guest MTU {h} vs {q}): the VMMs' share"),
            ("nat", "hostvisor", "nat, each default (guest MTU {h} vs {q}): what a user gets"),
            ("tap", "hostvisor", "tap (guest MTU {h} vs {q})")]
    for mode, hkey, title in rows:
        if (mode, hkey) not in results or (mode, "qemu") not in results:
            continue
        h_res, q_res = results[(mode, hkey)], results[(mode, "qemu")]
        print(title.format(h=h_res["mtu"], q=q_res["mtu"]))
        for key, label in (("h2g", "host->guest"), ("g2h", "guest->host")):
            h, q = median(h_res[key]), median(q_res[key])
            ratio = f"{h / q:.2f}x" if h and q else "-"
            print(f"  {label:<32} {h or 0:>10.2f} {q or 0:>10.2f} {ratio:>7}")
    failed = sum(r["failed"] for r in results.values())
    if failed:
        print(f"note: {failed} transfers failed (a guest program died of the nested host's "
              "SIGSEGV at start) and were made again (not counted)")


if __name__ == "__main__":
    main()
