#!/usr/bin/env bash
# Install what rvmm needs on a fresh Debian 12 machine, idempotently. Safe to run again.
set -euo pipefail

PKGS=(
  # guest kernel build
  linux-source-6.12 bc bison flex libelf-dev libssl-dev cpio xz-utils make gcc
  # images, rootfs, peers and test fixtures
  busybox-static umoci skopeo docker-registry apache2-utils e2fsprogs erofs-utils
  crun runc qemu-system-x86
  # networking
  iptables iproute2
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "setup: packages ok"
