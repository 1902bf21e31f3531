#!/usr/bin/env bash
# Boot benchmark: hostvisor beside QEMU (and Firecracker / Cloud Hypervisor
# when FIRECRACKER= / CLOUD_HYPERVISOR= name their binaries), same guest,
# same run. Prints setup time (bpftrace on the first KVM_RUN; needs root),
# time to READY and memory overhead with ratios. Options: see
# `python3 bench/boot.py --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v bpftrace >/dev/null || missing+=(bpftrace)
if ((${#missing[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
bash guest/build.sh >/dev/null
cargo build --release -q
exec python3 bench/boot.py "$@"
