#!/usr/bin/env bash
# Set up a fresh Debian 12 x86_64 machine (root, /dev/kvm) for rvmm, idempotently, and show it working:
# installs the Debian packages, builds rvmm and the guest kernel (cached), checks the host with
# `rvmm doctor`, and boots the sample guest (busybox-static root disk) with rvmm's own VMM.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(
  # guest kernel build
  linux-source-6.12 bc bison flex libelf-dev libssl-dev cpio xz-utils make gcc libc6-dev
  # images, root disks, peers and test fixtures
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

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi
bash guest-kernel/build.sh
# The guest's PID 1, static (VM isolation puts it in the initramfs).
RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
  cargo build -q --release -p rvmm-guest-init --target x86_64-unknown-linux-gnu

# Everything below shows the result; `SETUP_ONLY=1` skips it (the test command uses that).
[ "${SETUP_ONLY:-}" = 1 ] && exit 0

cargo build --release -q
rvmm=target/release/rvmm
"$rvmm" doctor || true

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/bin" "$work/root/proc"
cp /bin/busybox "$work/root/bin/"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$work/root/bin/$a"; done
# Shell builtins, then one exec: see docs/guest-kernel.md on concurrent processes under kvm_pvm.
printf '#!/bin/sh\nmount -t proc proc /proc\nread -r os _ release _ < /proc/version\necho\necho "hello from the rvmm guest: $os $release"\nreboot -f\n' \
  >"$work/root/init"
chmod 755 "$work/root/init"
mkfs.ext4 -q -F -d "$work/root" "$work/root.ext4" 32M
echo "setup: booting the sample guest with rvmm vm (about 1 minute on kvm_pvm hosts, well under a second on hardware KVM)"
start=$(date +%s.%N)
"$rvmm" vm --disk "$work/root.ext4" --cmdline "console=ttyS0 reboot=k panic=-1 quiet root=/dev/vda rw init=/init"
echo "setup: guest booted, ran and reset in $(echo "$(date +%s.%N) - $start" | bc) s"
