#!/usr/bin/env bash
# Builds a BIOS-bootable raw disk image of the default guest: an MBR with
# one ext2 partition holding /boot/bzImage, /boot/initramfs.cpio and GRUB's
# configuration, and GRUB 2 (i386-pc) in the MBR and the gap after it —
# firmware → boot loader → kernel, with nothing but Debian's grub-pc-bin,
# fdisk and e2fsprogs, and no root (no loop devices, no mounts).
#
# Usage: guest/grub-disk.sh GUEST_DIR OUT.img [extra kernel arguments]
#   GUEST_DIR holds bzImage and initramfs.cpio (guest/build.sh's output).
# guest/build.sh disk calls it.
set -euo pipefail

guest=$1 out=$2
shift 2
extra="$*"
grub=/usr/lib/grub/i386-pc
for f in "$guest/bzImage" "$guest/initramfs.cpio" "$grub/boot.img"; do
  [[ -f $f ]] || { echo "grub-disk.sh: $f is missing" >&2; exit 1; }
done
command -v grub-mkimage >/dev/null || { echo "grub-disk.sh: grub-mkimage is missing (Debian's grub-pc-bin)" >&2; exit 1; }
command -v sfdisk >/dev/null || PATH=$PATH:/usr/sbin:/sbin

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The partition's files. GRUB talks on COM1 (there is no screen), boots at
# once, and hands the kernel the serial console.
mkdir -p "$work/root/boot/grub"
cp "$guest/bzImage" "$guest/initramfs.cpio" "$work/root/boot/"
cat > "$work/root/boot/grub/grub.cfg" <<EOF
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=0
echo "GRUB: loading the kernel"
menuentry "hostvisor default guest" {
  linux /boot/bzImage console=ttyS0 reboot=k panic=-1 $extra
  initrd /boot/initramfs.cpio
}
EOF

# 1 MiB before the partition (MBR + GRUB's core image), the partition after.
part_mib=$(( ( $(du -sm "$work/root" | cut -f1) * 3 / 2 ) + 8 ))
size_mib=$(( part_mib + 1 ))
truncate -s "${part_mib}M" "$work/part.img"
mke2fs -q -F -t ext2 -L hostvisor-boot -d "$work/root" "$work/part.img"

rm -f "$out.tmp"
truncate -s "${size_mib}M" "$out.tmp"
echo 'start=2048, type=83, bootable' | sfdisk -q "$out.tmp"
dd if="$work/part.img" of="$out.tmp" bs=1M seek=1 conv=notrunc status=none

# GRUB's core image: found in the gap after the MBR (sector 1 on, as its
# first sector's default block list says), it reads its modules' config
# from the partition.
grub-mkimage -O i386-pc -d "$grub" -o "$work/core.img" -p '(hd0,msdos1)/boot/grub' \
  biosdisk part_msdos ext2 linux normal configfile serial terminal echo test
core_sectors=$(( ( $(stat -c %s "$work/core.img") + 511 ) / 512 ))
(( core_sectors < 2048 - 1 )) || { echo "grub-disk.sh: core.img does not fit the gap" >&2; exit 1; }
dd if="$work/core.img" of="$out.tmp" bs=512 seek=1 conv=notrunc status=none
# The MBR: GRUB's boot code (440 bytes), keeping the partition table. Its
# default says "load sector 1", where core.img is.
dd if="$grub/boot.img" of="$out.tmp" bs=440 count=1 conv=notrunc status=none
mv "$out.tmp" "$out"
echo "$out"
