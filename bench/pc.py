#!/usr/bin/env python3
"""PC machine benchmark (issue 16): the `pc` machine beside `microvm` and
beside QEMU booting through the same firmware, in the same run.

Linux boots, all of the same guest (the default guest's one kernel, with
ACPI, as ELF vmlinux and as bzImage; the same uncompressed initramfs; the
same kernel command line, RAM, vCPUs and virtio devices):

  hv-microvm        hostvisor --machine microvm, vmlinux entered directly
  hv-pc             hostvisor --machine pc, the same vmlinux entered directly
  hv-pc-bios        hostvisor --firmware bios --kernel bzImage: SeaBIOS
                    (Debian's bios-256k.bin) gets the bzImage through fw_cfg
                    and QEMU's linuxboot_dma.bin option ROM starts it
  qemu-pc-bios      QEMU 7.2 -M pc -bios bios-256k.bin -kernel bzImage
  qemu-q35-bios     QEMU 7.2 -M q35, the same
  qemu-pc-direct    QEMU 7.2 -M pc -kernel vmlinux (its PVH entry, through
                    the same SeaBIOS and QEMU's pvh.bin option ROM)

and the setup time of Firecracker (FIRECRACKER=, or /work/keep/firecracker
when it exists) from starts stopped at its first KVM_RUN (with
--firecracker-boot, full boots as well). Per VMM: setup (execve -> first
KVM_RUN, bpftrace), READY (spawn -> the guest's READY line) and overhead
(Rss minus the guest-RAM mapping's Rss), measured as bench/boot.py does —
its helpers are used here, see its docstring for the method.

The command line is hostvisor's default for this host (boot.py's copy of
vmm::default_cmdline, less `pci=off`, which hostvisor no longer uses and
the pc machines cannot boot with) plus a `hostvisor.run=` script that
sleeps 2 s after READY so memory can be sampled and then powers the guest
off. Every VM gets the same virtio devices: a read-only virtio-blk disk
(the guest's rootfs.img, not mounted: no root=) and a virtio-rng — on PCI
with MSI-X for hv-pc, hv-pc-bios and QEMU, on virtio-mmio for hv-microvm.
(`hostvisor run` has no virtio device unless asked; these two exercise the
transport without waiting for anything. --devices none boots without.)

Firmware alone (no Linux): a 26-byte boot sector (the one of
crates/hostvisor/tests/e2e/firmware.rs) on a 1 MiB raw disk prints a marker on
COM1 and writes 0 to port 0xf4: hostvisor `--firmware bios --disk
path=IMG` (its debug exit, exit 0) against QEMU `-M pc -bios ... -drive
file=IMG,if=virtio,format=raw -device isa-debug-exit,iobase=0xf4` (exit
status 1 = (0 << 1) | 1). Measured: spawn -> marker and spawn -> exit.

Runs are interleaved (run 1 of every VMM, then run 2, ...); figures are
medians. Ratios printed: pc direct / microvm direct (target: within 5%),
hostvisor's firmware boot / QEMU's with the same firmware (target: below
1), hostvisor pc direct / QEMU pc direct, setup against Firecracker's.
"""

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import boot  # noqa: E402  (bench/boot.py: the measurement helpers)

SEABIOS = "/usr/share/seabios/bios-256k.bin"
LINUXBOOT_ROM = "/usr/share/qemu/linuxboot_dma.bin"
KEPT_FIRECRACKER = "/work/keep/firecracker"
SECTOR_MARKER = b"HOSTVISOR-BOOT-SECTOR-OK"
# Firecracker's setup on 2026-11-23 (docs/benchmarks.md, under strace),
# the figure used when Firecracker is not at hand.
FIRECRACKER_DOC_SETUP_MS = 22.6


def cmdline():
    """The same line for every VMM: hostvisor's default for this host
    without `pci=off`, plus a script that sleeps 2 s after READY, after
    which the guest's init powers it off."""
    args = [a for a in boot.default_cmdline().split() if a != "pci=off"]
    script = base64.b64encode(b"sleep 2").decode()
    return " ".join(args + [f"hostvisor.run={script}"])


def boot_sector(msg, code):
    """crates/hostvisor/tests/e2e/firmware.rs's boot sector: prints `msg` on
    COM1 and writes `code` to port 0xf4; padded to 510 bytes plus the
    0x55 0xaa signature."""
    text_at = 26
    lo, hi = (0x7C00 + text_at).to_bytes(2, "little")
    s = bytes([
        0xFA,  # cli
        0x31, 0xC0,  # xor ax, ax
        0x8E, 0xD8,  # mov ds, ax
        0xBE, lo, hi,  # mov si, text
        0xBA, 0xF8, 0x03,  # mov dx, 0x3f8
        0xAC,  # lodsb
        0x84, 0xC0,  # test al, al
        0x74, 0x03,  # jz +3
        0xEE,  # out dx, al
        0xEB, 0xF8,  # jmp lodsb
        0xB0, code,  # mov al, code
        0xE6, 0xF4,  # out 0xf4, al
        0xF4,  # hlt
        0xEB, 0xFD,  # jmp hlt
    ])
    assert len(s) == text_at
    s += msg + b"\0"
    return s.ljust(510, b"\0") + b"\x55\xaa"


def qemu_common(qemu, args):
    # -cpu host without IA32_ARCH_CAPABILITIES: QEMU 7.2 aborts setting
    # that MSR on nested KVM (PVM) hosts (as in boot.py).
    return [qemu, "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", str(args.memory),
            "-smp", str(args.cpus), "-nographic", "-no-reboot", "-nodefaults",
            "-serial", "stdio"]


def linux_peers(args, gdir, cmd, hv, qemu):
    vmlinux = os.path.join(gdir, "vmlinux")
    bzimage = os.path.join(gdir, "bzImage")
    initrd = os.path.join(gdir, "initramfs.cpio")
    disk = os.path.join(gdir, "rootfs.img")
    hv_common = ["--initrd", initrd, "--cmdline", cmd, "--memory", f"{args.memory}M",
                 "--cpus", str(args.cpus), "--serial", "stdio"]
    hv_dev, q_dev = [], []
    if args.devices == "disk+rng":
        hv_dev = ["--disk", f"path={disk},readonly=on,format=raw", "--rng"]
        q_dev = ["-drive", f"file={disk},if=none,id=d0,format=raw,readonly=on",
                 "-device", "virtio-blk-pci,drive=d0", "-device", "virtio-rng-pci"]
    out = [
        boot.Peer("hv-microvm", [hv, "run", "--machine", "microvm", "--kernel", vmlinux]
                  + hv_common + hv_dev),
        boot.Peer("hv-pc", [hv, "run", "--machine", "pc", "--kernel", vmlinux]
                  + hv_common + hv_dev),
        boot.Peer("hv-pc-bios", [hv, "run", "--firmware", "bios", "--kernel", bzimage]
                  + hv_common + hv_dev),
    ]
    if qemu:
        common = qemu_common(qemu, args) + ["-bios", SEABIOS, "-initrd", initrd,
                                            "-append", cmd] + q_dev
        out += [
            boot.Peer("qemu-pc-bios", common + ["-M", "pc", "-kernel", bzimage]),
            boot.Peer("qemu-q35-bios", common + ["-M", "q35", "-kernel", bzimage]),
            boot.Peer("qemu-pc-direct", common + ["-M", "pc", "-kernel", vmlinux]),
        ]
    return out


def firecracker_peer(args, gdir, cmd, tmp):
    """boot.py's Firecracker peer (FIRECRACKER=, else the kept binary), or
    None."""
    if not os.environ.get("FIRECRACKER") and os.access(KEPT_FIRECRACKER, os.X_OK):
        os.environ["FIRECRACKER"] = KEPT_FIRECRACKER
    if not os.environ.get("FIRECRACKER"):
        return None
    ns = types.SimpleNamespace(memory=args.memory, cpus=args.cpus, microvm=False)
    for p in boot.peers(ns, os.path.join(gdir, "vmlinux"),
                        os.path.join(gdir, "initramfs.cpio"), cmd, tmp):
        if p.name == "firecracker":
            return p
    return None


def sector_peers(args, img, hv, qemu):
    out = [boot.Peer("hv-pc-bios-sector",
                     [hv, "run", "--firmware", "bios", "--disk", f"path={img},format=raw",
                      "--memory", f"{args.memory}M", "--cpus", str(args.cpus),
                      "--serial", "stdio"])]
    if qemu:
        out.append(boot.Peer("qemu-pc-bios-sector",
                             qemu_common(qemu, args)
                             + ["-M", "pc", "-bios", SEABIOS,
                                "-drive", f"file={img},if=virtio,format=raw",
                                "-device", "isa-debug-exit,iobase=0xf4"]))
    return out


# The exit status each VMM gives for the boot sector's `out 0xf4, 0`.
SECTOR_EXIT = {"hv-pc-bios-sector": 0, "qemu-pc-bios-sector": 1}


def sector_once(peer, tracer, timeout):
    """One boot-sector boot: {marker_s, exit_s, code, setup_ms}; raises if
    the marker does not come, the VMM does not exit, or exits otherwise
    than the debug exit says."""
    start = time.monotonic()
    proc = subprocess.Popen(peer.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out = {"marker_s": None, "exit_s": None, "code": None, "setup_ms": None}
    seen = b""
    try:
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        deadline = start + timeout
        while time.monotonic() < deadline:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                chunk = None
            if chunk:
                seen += chunk
                if out["marker_s"] is None and SECTOR_MARKER in seen:
                    out["marker_s"] = time.monotonic() - start
            elif chunk == b"" or proc.poll() is not None:
                # EOF: the VMM is ending; wait for its status.
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    break
                out["exit_s"] = time.monotonic() - start
                out["code"] = proc.returncode
                break
            else:
                time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out["setup_ms"], _ = tracer.setup(proc.pid)
    if out["marker_s"] is None:
        raise RuntimeError(f"no {SECTOR_MARKER!r}: {seen[-300:]!r} "
                           f"{proc.stderr.read()[-300:]!r}")
    if out["exit_s"] is None:
        raise RuntimeError(f"did not exit within {timeout} s")
    if out["code"] != SECTOR_EXIT.get(peer.name):
        raise RuntimeError(f"exit status {out['code']}, not {SECTOR_EXIT.get(peer.name)}")
    return out


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, scale=1.0, digits=1):
    return f"{v / scale:.{digits}f}" if v is not None else "-"


def ratio(a, b, digits=2):
    return f"{a / b:.{digits}f}" if a is not None and b else "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory", type=int, default=256, help="guest RAM in MiB")
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=400, help="seconds to READY")
    ap.add_argument("--only", help="comma-separated peer names (Linux, sector and "
                    "firecracker peers alike)")
    ap.add_argument("--devices", choices=["disk+rng", "none"], default="disk+rng",
                    help="virtio devices of every Linux VM")
    ap.add_argument("--setup-samples", type=int, default=3,
                    help="extra setup-only starts per run and VMM (stopped at the first "
                    "KVM_RUN); setup is the median over these and the boots")
    ap.add_argument("--sector-samples", type=int, default=3,
                    help="boot-sector boots per run and VMM (they take seconds)")
    ap.add_argument("--firecracker-boot", action="store_true",
                    help="boot Firecracker to READY too (default: setup-only starts)")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()

    gdir = boot.guest_dir()
    for f in ("vmlinux", "bzImage", "initramfs.cpio", "rootfs.img"):
        if not os.path.exists(os.path.join(gdir, f)):
            sys.exit(f"missing {os.path.join(gdir, f)}: run guest/build.sh "
                     "(HOSTVISOR_GUEST_DIR= names another guest directory)")
    for f in (SEABIOS, LINUXBOOT_ROM):
        if not os.path.exists(f):
            sys.exit(f"missing {f}: install Debian's seabios and qemu-system-data")
    hv = os.path.join(boot.ROOT, "target", "release", "hostvisor")
    if not os.access(hv, os.X_OK):
        sys.exit(f"missing {hv}: cargo build --release -p hostvisor")
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        print("QEMU: skipped (qemu-system-x86_64 is not installed)")
    cmd = cmdline()
    load_before = os.getloadavg()

    tracer = boot.SetupTracer()
    print(f"setup method: {tracer.method or 'none, setup not measured: ' + tracer.why}")
    print(f"guest: {gdir}; cmdline: {cmd}; devices: {args.devices}", flush=True)
    print(f"load average at the start: {load_before[0]:.2f} {load_before[1]:.2f} "
          f"{load_before[2]:.2f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        img = os.path.join(tmp, "bootsector.img")
        with open(img, "wb") as f:
            f.write(boot_sector(SECTOR_MARKER + b"\r\n", 0).ljust(1 << 20, b"\0"))
        linux = linux_peers(args, gdir, cmd, hv, qemu)
        fc = firecracker_peer(args, gdir, cmd, tmp)
        if fc is None:
            print("firecracker: not at hand (FIRECRACKER= is unset and "
                  f"{KEPT_FIRECRACKER} is missing); its setup is the documented "
                  f"{FIRECRACKER_DOC_SETUP_MS} ms")
        elif args.firecracker_boot:
            linux.append(fc)
        sectors = sector_peers(args, img, hv, qemu)
        setup_only_peers = [fc] if fc is not None and not args.firecracker_boot else []
        if args.only:
            keep = set(args.only.split(","))
            linux = [p for p in linux if p.name in keep]
            sectors = [p for p in sectors if p.name in keep]
            setup_only_peers = [p for p in setup_only_peers if p.name in keep]
        every = linux + sectors + setup_only_peers
        runs = {p.name: [] for p in every}
        errors = {p.name: [] for p in every}

        def write_setup(peer):
            for path, text in (peer.setup or {}).items():
                with open(path, "w") as f:
                    f.write(text)

        try:
            for i in range(args.runs):
                for peer in linux:
                    if errors[peer.name]:
                        continue
                    write_setup(peer)
                    try:
                        r = boot.boot_once(peer, args, args.timeout, tracer)
                    except Exception as e:  # noqa: BLE001 - report and go on
                        errors[peer.name].append(str(e))
                        print(f"  {peer.name} run {i + 1}: FAILED: {e}", flush=True)
                        continue
                    r["setup_extra_ms"] = [boot.setup_only(peer, tracer, 30)[0]
                                           for _ in range(args.setup_samples)]
                    runs[peer.name].append(r)
                    print(f"  {peer.name} run {i + 1}: setup {fmt(r['setup_ms'])} ms "
                          f"({r['ioctls']} ioctls; setup-only "
                          f"{[fmt(v) for v in r['setup_extra_ms']]}), READY after "
                          f"{r['ready_s']:.2f} s, overhead {r['overhead_kib']} KiB (Rss "
                          f"{r['rss_kib']} - guest RAM {r['guest_kib']})", flush=True)
                for peer in setup_only_peers:
                    write_setup(peer)
                    vals = [boot.setup_only(peer, tracer, 30)[0]
                            for _ in range(1 + args.setup_samples)]
                    runs[peer.name].append({"setup_ms": None, "setup_extra_ms": vals})
                    print(f"  {peer.name} run {i + 1}: setup-only "
                          f"{[fmt(v) for v in vals]} ms", flush=True)
                for peer in sectors:
                    for j in range(args.sector_samples):
                        if errors[peer.name]:
                            break
                        try:
                            r = sector_once(peer, tracer, 120)
                        except Exception as e:  # noqa: BLE001 - report and go on
                            errors[peer.name].append(str(e))
                            print(f"  {peer.name} run {i + 1}.{j + 1}: FAILED: {e}",
                                  flush=True)
                            break
                        runs[peer.name].append(r)
                        print(f"  {peer.name} run {i + 1}.{j + 1}: setup "
                              f"{fmt(r['setup_ms'])} ms, marker after "
                              f"{r['marker_s']:.3f} s, exit {r['code']} after "
                              f"{r['exit_s']:.3f} s", flush=True)
        finally:
            tracer.close()
    load_after = os.getloadavg()

    results = {}
    for name, rs in runs.items():
        setups = [r.get("setup_ms") for r in rs] + [v for r in rs
                                                     for v in r.get("setup_extra_ms", [])]
        setups = [v for v in setups if v is not None]
        results[name] = {
            "setup_ms": med(setups),
            "setup_min_ms": min(setups) if setups else None,
            "setup_samples": len(setups),
            "ready_s": med([r.get("ready_s") for r in rs]),
            "ready_runs_s": [r.get("ready_s") for r in rs if r.get("ready_s") is not None],
            "overhead_kib": med([r.get("overhead_kib") for r in rs]),
            "ioctls_before_run": med([r.get("ioctls") for r in rs]),
            "marker_s": med([r.get("marker_s") for r in rs]),
            "exit_s": med([r.get("exit_s") for r in rs]),
            "runs": rs,
            "error": errors[name][0] if errors[name] else None,
        }

    def get(name, key):
        return results.get(name, {}).get(key)

    print()
    print(f"guest {gdir}, {args.memory} MiB, {args.cpus} vCPU(s), devices {args.devices}, "
          f"{args.runs} runs, medians (setup: median of each boot and "
          f"{args.setup_samples} setup-only starts per run)")
    print(f"load average: {load_before[0]:.2f} at the start, {load_after[0]:.2f} at the end")
    print(f"{'vmm':<22}{'setup ms':>10}{'(min)':>8}{'READY s':>10}{'overhead MiB':>14}"
          f"  READY runs")
    for name in [p.name for p in linux + setup_only_peers]:
        r = results[name]
        print(f"{name:<22}{fmt(r['setup_ms']):>10}{fmt(r['setup_min_ms']):>8}"
              f"{fmt(r['ready_s'], digits=2):>10}{fmt(r['overhead_kib'], 1024):>14}  "
              + "/".join(f"{v:.2f}" for v in r["ready_runs_s"])
              + (f"  ({r['error'][:80]})" if r["error"] else ""))
    print(f"{'boot sector':<22}{'setup ms':>10}{'(min)':>8}{'marker s':>10}{'exit s':>10}")
    for p in sectors:
        r = results[p.name]
        print(f"{p.name:<22}{fmt(r['setup_ms']):>10}{fmt(r['setup_min_ms']):>8}"
              f"{fmt(r['marker_s'], digits=3):>10}{fmt(r['exit_s'], digits=3):>10}"
              + (f"  ({r['error'][:80]})" if r["error"] else ""))

    fc_setup = get("firecracker", "setup_ms")
    fc_what = "measured" if fc_setup is not None else "documented, 2026-11-23"
    if fc_setup is None:
        fc_setup = FIRECRACKER_DOC_SETUP_MS
    lines = [
        ("pc direct / microvm direct, READY (target <= 1.05)",
         ratio(get("hv-pc", "ready_s"), get("hv-microvm", "ready_s"), 3)),
        ("pc direct / microvm direct, setup",
         ratio(get("hv-pc", "setup_ms"), get("hv-microvm", "setup_ms"))),
        ("pc direct / microvm direct, overhead",
         ratio(get("hv-pc", "overhead_kib"), get("hv-microvm", "overhead_kib"))),
        ("hostvisor bios / QEMU pc bios, READY (target < 1)",
         ratio(get("hv-pc-bios", "ready_s"), get("qemu-pc-bios", "ready_s"))),
        ("hostvisor bios / QEMU q35 bios, READY (target < 1)",
         ratio(get("hv-pc-bios", "ready_s"), get("qemu-q35-bios", "ready_s"))),
        ("hostvisor bios / QEMU pc bios, setup",
         ratio(get("hv-pc-bios", "setup_ms"), get("qemu-pc-bios", "setup_ms"))),
        ("hostvisor bios / QEMU pc bios, overhead",
         ratio(get("hv-pc-bios", "overhead_kib"), get("qemu-pc-bios", "overhead_kib"))),
        ("hostvisor pc direct / QEMU pc direct, READY",
         ratio(get("hv-pc", "ready_s"), get("qemu-pc-direct", "ready_s"))),
        ("boot sector, hostvisor / QEMU pc, to marker (target < 1)",
         ratio(get("hv-pc-bios-sector", "marker_s"), get("qemu-pc-bios-sector", "marker_s"))),
        ("boot sector, hostvisor / QEMU pc, to exit",
         ratio(get("hv-pc-bios-sector", "exit_s"), get("qemu-pc-bios-sector", "exit_s"))),
    ]
    for name in ("hv-microvm", "hv-pc", "hv-pc-bios"):
        lines.append((f"setup {name} / Firecracker ({fc_what}, {fc_setup:.1f} ms)",
                      ratio(get(name, "setup_ms"), fc_setup)))
    print("ratios (lower is better):")
    for what, v in lines:
        print(f"  {what:<62}{v:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cmdline": cmd, "guest_dir": gdir,
                       "setup_method": tracer.method,
                       "load_average": {"start": load_before, "end": load_after},
                       "firecracker_setup": {"ms": fc_setup, "source": fc_what},
                       "ratios": dict(lines), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
