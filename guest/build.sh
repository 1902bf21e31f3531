#!/usr/bin/env bash
# Builds hostvisor's default guest from Debian packages only:
#   vmlinux         an ELF Linux 6.1 kernel (booted directly: no decompressor)
#   bzImage         the same kernel as a bzImage, for boot loaders and
#                   firmware (`--firmware bios --kernel`)
#   initramfs.cpio  an uncompressed busybox initramfs whose /init prints
#                   "HOSTVISOR-GUEST-READY cpus=N" (see guest/init)
#                   and runs hostvisor-agent when the VM has a vsock device
#   rootfs.img      the same busybox tree as an ext4 image, to boot from a
#                   disk: hostvisor run --disk path=COPY --append root=/dev/vda
#
#   grub-disk.img   (with `disk`) a BIOS-bootable raw disk: GRUB 2 in its
#                   MBR, the bzImage and initramfs on an ext2 partition
#                   (guest/grub-disk.sh): hostvisor run --firmware bios
#                   --disk path=COPY boots it through SeaBIOS and GRUB
#
# Usage: guest/build.sh [rootfs | disk | deps | --print-dir]
# (`rootfs` prints the image's path; everything is built either way.
# `deps` only installs the Debian packages hostvisor's build and tests
# need, libslirp's among them.)
# Outputs go to ${HOSTVISOR_GUEST_DIR:-~/.cache/hostvisor/guest}. The build is
# idempotent: each output records a hash of its inputs and is rebuilt only
# when they change.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${HOSTVISOR_GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hostvisor/guest}
case ${1:-} in
  --print-dir) echo "$out"; exit 0 ;;
  rootfs | disk | deps | "") ;;
  *) echo "usage: guest/build.sh [rootfs | disk | deps | --print-dir]" >&2; exit 2 ;;
esac
mkdir -p "$out"

log() { printf 'guest/build.sh: %s\n' "$*" >&2; }

need_pkgs=()
[[ -f /usr/src/linux-source-6.1.tar.xz ]] || need_pkgs+=(linux-source-6.1)
[[ -x /bin/busybox ]] && /bin/busybox --list | grep -qx nproc || need_pkgs+=(busybox-static)
for tool in gcc make flex bison bc cpio xz; do
  command -v "$tool" >/dev/null || need_pkgs+=(build-essential flex bison bc cpio xz-utils)
done
[[ -f /usr/include/libelf.h ]] || need_pkgs+=(libelf-dev)
[[ -f /usr/include/openssl/ssl.h ]] || need_pkgs+=(libssl-dev)
command -v mkfs.ext4 >/dev/null || need_pkgs+=(e2fsprogs)
# The disk-image tests compare hostvisor's qcow2 with qemu-img's.
command -v qemu-img >/dev/null || need_pkgs+=(qemu-utils)
# hostvisor itself links libslirp (the NAT) through pkg-config; the network
# tests make namespaces and TAP devices with iproute2.
[[ -f /usr/include/slirp/libslirp.h ]] || need_pkgs+=(libslirp-dev)
pkg-config --exists glib-2.0 2>/dev/null || need_pkgs+=(libglib2.0-dev)
command -v pkg-config >/dev/null || need_pkgs+=(pkg-config)
command -v ip >/dev/null || need_pkgs+=(iproute2)
# The ACPI table tests read hostvisor's tables back with ACPICA's iasl.
command -v iasl >/dev/null || need_pkgs+=(acpica-tools)
# Firmware for `--firmware bios|uefi` (and their tests).
[[ -f /usr/share/seabios/bios-256k.bin ]] || need_pkgs+=(seabios)
[[ -f /usr/share/ovmf/OVMF.fd ]] || need_pkgs+=(ovmf)
[[ -f /usr/share/qemu/linuxboot_dma.bin ]] || need_pkgs+=(qemu-system-data)
# `disk`: GRUB for BIOS and a partition table without root.
[[ -f /usr/lib/grub/i386-pc/boot.img ]] || need_pkgs+=(grub-pc-bin)
command -v sfdisk >/dev/null || [[ -x /usr/sbin/sfdisk ]] || need_pkgs+=(fdisk)
# The cloud-init seed tests compare hostvisor's seed with cloud-localds's
# (which needs mkfs.vfat and mcopy for a vfat seed) and read both with mtools.
command -v cloud-localds >/dev/null || need_pkgs+=(cloud-image-utils)
command -v mcopy >/dev/null || need_pkgs+=(mtools)
command -v mkfs.vfat >/dev/null || need_pkgs+=(dosfstools)
if ((${#need_pkgs[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    log "missing Debian packages: ${need_pkgs[*]} (install them with apt-get as root)"
    exit 1
  fi
  log "installing ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

[[ ${1:-} == deps ]] && exit 0

src_version=$(dpkg-query -W -f '${Version}' linux-source-6.1)

# ---- kernel -------------------------------------------------------------
# One kernel for both machines: kernel-6.1.config with the options of
# guest/kernel-pc.fragment added (ACPI, MSI, PCI MMCONFIG), as an ELF
# vmlinux (direct boots) and a bzImage (boot loaders, firmware).
build_kernel() {
  local name=$1 fragment=${2:-}
  local kernel_hash
  kernel_hash=$(cat "$here/kernel-6.1.config" ${fragment:+"$fragment"} "$here"/patches/*-6.1.patch \
    <(echo "$src_version") | sha256sum | cut -c1-16)
  if [[ -f $out/$name && -f $out/bzImage && $(cat "$out/$name.hash" 2>/dev/null) == "$kernel_hash" ]]; then
    log "kernel up to date ($out/$name)"
    return
  fi
  local work=$out/build-$name
  rm -rf "$work"; mkdir -p "$work"
  log "unpacking linux-source-6.1 ($src_version) for $name"
  tar -C "$work" -xf /usr/src/linux-source-6.1.tar.xz
  local ksrc
  ksrc=$(echo "$work"/linux-source-6.1)
  for p in "$here"/patches/*-6.1.patch; do
    log "applying $(basename "$p")"
    patch -d "$ksrc" -p1 --quiet < "$p"
  done
  cp "$here/kernel-6.1.config" "$ksrc/.config"
  if [[ -n $fragment ]]; then
    grep -E '^(CONFIG_|# CONFIG_.* is not set)' "$fragment" >> "$ksrc/.config"
  fi
  make -C "$ksrc" -s olddefconfig
  if [[ -n $fragment ]]; then
    # Every option the fragment turns on must have survived olddefconfig,
    # and none it turns off may be on.
    while IFS= read -r line; do
      grep -qx -- "$line" "$ksrc/.config" || { log "$name: $line did not take"; exit 1; }
    done < <(grep '^CONFIG_' "$fragment")
    while IFS= read -r opt; do
      ! grep -q "^$opt=" "$ksrc/.config" || { log "$name: $opt is still on"; exit 1; }
    done < <(sed -n 's/^# \(CONFIG_[A-Z0-9_]*\) is not set$/\1/p' "$fragment")
  fi
  log "building $name with $(nproc) jobs (a few minutes)"
  make -C "$ksrc" -s -j"$(nproc)" vmlinux bzImage
  cp "$ksrc/arch/x86/boot/bzImage" "$out/bzImage"
  cp "$ksrc/vmlinux" "$out/$name.tmp"
  strip --strip-debug "$out/$name.tmp" 2>/dev/null || true
  mv "$out/$name.tmp" "$out/$name"
  echo "$kernel_hash" > "$out/$name.hash"
  rm -rf "$work"
  log "kernel built: $out/$name"
}
build_kernel vmlinux "$here/kernel-pc.fragment"
rm -f "$out/vmlinux-pc" "$out/vmlinux-pc.hash"

# ---- guest agent ----------------------------------------------------------
# hostvisor-agent (crates/agent), linked statically: the guest has no libc.
# cargo rebuilds it only when its sources change.
repo=$(cd "$here/.." && pwd)
agent_target=x86_64-unknown-linux-gnu
agent_bin=$repo/target/guest-agent/$agent_target/guest/hostvisor-agent
log "building the guest agent"
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet \
  --profile guest -p agent --bin hostvisor-agent --target "$agent_target" \
  --target-dir "$repo/target/guest-agent")

# ---- initramfs and root filesystem ---------------------------------------
busybox_version=$(dpkg-query -W -f '${Version}' busybox-static 2>/dev/null || /bin/busybox | head -1)
tree_hash=$(cat "$here/init" "$here/udhcpc.script" "$here/build.sh" "$agent_bin" <(echo "$busybox_version") | sha256sum | cut -c1-16)

# The guest's files: busybox, /init, a few files in /etc and a web page.
make_tree() {
  local root=$1
  mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,root,etc,mnt,run}
  cp /bin/busybox "$root/bin/busybox"
  # No applet links: Debian's busybox shell is "standalone" (it runs its
  # applets by name without links), and on nested KVMs unpacking ~270
  # symlinks costs ~4 s of boot. `busybox --install -s` adds them if wanted.
  ln -s busybox "$root/bin/sh"
  install -m 0755 "$here/init" "$root/init"
  install -m 0755 "$agent_bin" "$root/bin/hostvisor-agent"
  install -m 0755 "$here/udhcpc.script" "$root/etc/udhcpc.script"
  # busybox httpd's default page: `httpd -p 80 -h /www`.
  mkdir -p "$root/www"
  echo "hostvisor guest" > "$root/www/index.html"
  ln -s /init "$root/sbin/init"
  # An unprivileged user (uid 1000, as on most distributions' first
  # user): `su user -c CMD` runs as it (shares' ownership tests).
  printf '%s\n' "root:x:0:0:root:/root:/bin/sh" "user:x:1000:1000:user:/tmp:/bin/sh" > "$root/etc/passwd"
  printf '%s\n' "root:x:0:" "user:x:1000:" > "$root/etc/group"
  echo "hostvisor" > "$root/etc/hostname"
  # The ACPI power button's action (busybox acpid; `pc` machines).
  mkdir -p "$root/etc/acpi/PWRF"
  printf '#!/bin/sh\nsync\nexec poweroff -f\n' > "$root/etc/acpi/PWRF/00000080"
  chmod 0755 "$root/etc/acpi/PWRF/00000080"
  printf '%s\n' "proc /proc proc defaults 0 0" "sysfs /sys sysfs defaults 0 0" \
    "devtmpfs /dev devtmpfs defaults 0 0" > "$root/etc/fstab"
}

if [[ -f $out/initramfs.cpio && -f $out/rootfs.img && $(cat "$out/tree.hash" 2>/dev/null) == "$tree_hash" ]]; then
  log "initramfs and rootfs up to date"
else
  tree=$(mktemp -d)
  trap 'rm -rf "$tree"' EXIT
  make_tree "$tree/root"
  # The root filesystem image (64 MiB, room to write).
  rm -f "$out/rootfs.img.tmp"
  truncate -s 64M "$out/rootfs.img.tmp"
  mkfs.ext4 -q -F -L hostvisor-root -d "$tree/root" "$out/rootfs.img.tmp"
  mv "$out/rootfs.img.tmp" "$out/rootfs.img"
  # The initramfs, marked so /init knows it may switch to a root= disk.
  touch "$tree/root/etc/hostvisor-initramfs"
  (cd "$tree/root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --quiet) > "$out/initramfs.cpio.tmp"
  mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"
  echo "$tree_hash" > "$out/tree.hash"
  log "initramfs and rootfs built"
fi
if [[ ${1:-} == disk ]]; then
  # The PVM host workarounds hostvisor's default command line carries
  # (see `hostvisor run`'s defaults): GRUB hands the kernel its own line.
  pvm_args=
  [[ -d /sys/module/kvm_pvm ]] && pvm_args="quiet noxsave clearcpuid=cx16,erms,fsrm,popcnt,smap random.trust_cpu=on percpu_alloc=page rodata=off"
  disk_hash=$(cat "$out/bzImage" "$out/initramfs.cpio" "$here/grub-disk.sh" <(echo "$pvm_args") | sha256sum | cut -c1-16)
  if [[ -f $out/grub-disk.img && $(cat "$out/grub-disk.hash" 2>/dev/null) == "$disk_hash" ]]; then
    log "GRUB disk up to date"
  else
    bash "$here/grub-disk.sh" "$out" "$out/grub-disk.img" $pvm_args >/dev/null
    echo "$disk_hash" > "$out/grub-disk.hash"
    log "GRUB disk built"
  fi
  echo "$out/grub-disk.img"
elif [[ ${1:-} == rootfs ]]; then echo "$out/rootfs.img"; else echo "$out"; fi
