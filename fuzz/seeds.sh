#!/usr/bin/env bash
# Seeds the qcow2_image fuzz corpus with small images made by qemu-img
# (Debian qemu-utils): both versions, tiny clusters, every refcount width,
# zero clusters, compressed clusters (deflate and zstd), an internal
# snapshot. Each seed is prefixed with a few operations (see the target).
set -euo pipefail
cd "$(dirname "$0")"
out=corpus/qcow2_image
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ops=$(printf '\x04\x00\x00\x00\x00\x00\x02\x00\x00\x01\x08\x00\x00\x00\x00\x04\x09\x04\x00\x00\x00\x00\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00' | base64)
seed() { # name, then qemu-img create options
  local name=$1; shift
  qemu-img create -q -f qcow2 -o "cluster_size=512,$1" "$tmp/$name" 64K
  qemu-io -f qcow2 -c "write -P 7 0 4k" -c "write -z 8k 4k" "$tmp/$name" >/dev/null
}
seed v3 compat=1.1
seed v2 compat=0.10
seed rc1 refcount_bits=1
seed rc64 refcount_bits=64
seed lazy lazy_refcounts=on
head -c 16K /dev/urandom >"$tmp/noise"
head -c 16K /dev/zero | tr '\0' 'a' >>"$tmp/noise"
qemu-img convert -c -O qcow2 -o cluster_size=512 "$tmp/noise" "$tmp/zlib"
qemu-img convert -c -O qcow2 -o cluster_size=512,compression_type=zstd "$tmp/noise" "$tmp/zstd"
qemu-img create -q -f qcow2 -o cluster_size=512 "$tmp/snap" 64K
qemu-io -f qcow2 -c "write -P 1 0 4k" "$tmp/snap" >/dev/null
qemu-img snapshot -c s1 "$tmp/snap"
qemu-io -f qcow2 -c "write -P 2 0 1k" "$tmp/snap" >/dev/null
for f in v3 v2 rc1 rc64 lazy zlib zstd snap; do
  { echo "$ops" | base64 -d; cat "$tmp/$f"; } >"$out/$f"
done
ls -l "$out"
