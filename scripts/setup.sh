#!/usr/bin/env bash
# Set up a fresh Debian 12 x86_64 machine (root, /dev/kvm) for rvmm, idempotently, and show it working:
# installs the Debian packages, builds rvmm, its guest init and the guest kernel (cached), checks the host
# with `rvmm doctor`, builds the sample image (Debian's busybox-static, no download), runs it as a container
# and in a microVM, and prints the startup and memory comparison of `rvmm bench --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(
  # guest kernel build
  linux-source-6.12 bc bison flex libelf-dev libssl-dev cpio xz-utils make gcc libc6-dev
  # images, root disks, peers and test fixtures
  busybox-static umoci skopeo docker-registry apache2-utils e2fsprogs erofs-utils debootstrap
  crun runc qemu-system-x86
  # peers the lifecycle figures compare with (docs/benchmarks/lifecycle.md): podman + conmon over crun;
  # the engines that drive rvmm-oci in tests/engines.rs (podman, containerd with its runc shim)
  podman conmon containerd
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

# The sample image: Debian's busybox-static as an OCI image, built locally (no download), imported into
# the store as localhost/rvmm-sample:latest.
imgs=target/sample-image
bash scripts/make-test-images.sh "$imgs"
rm -rf "$imgs/rvmm-sample" && cp -a "$imgs/busybox" "$imgs/rvmm-sample"
"$rvmm" pull -q "oci:$imgs/rvmm-sample" >/dev/null
sample=localhost/rvmm-sample:latest
say='echo "hello from $(hostname), kernel $(uname -r), $(id -un) in $(pwd)"'

echo "setup: running $sample as a container"
"$rvmm" run --rm --isolation=container --network=none "$sample" sh -c "$say"
echo "setup: running $sample in a microVM (the first VM boots, about 12 s on kvm_pvm hosts, and saves a snapshot that later runs start from)"
"$rvmm" run --rm --isolation=vm --network=none "$sample" sh -c "$say"

echo "setup: comparing startup and memory (rvmm bench --quick --scenario startup,memory; a few minutes here)"
out=target/bench-quick
# Progress: one line per scenario here (the bench prints one per round).
"$rvmm" bench --quick --scenario startup,memory --out "$out" 2> >(grep --line-buffered -E 'scenario|fail|error' >&2) >/dev/null
# The tables of the report, without the charts.
sed -n '/^## Startup/,/^Raw results/p' "$out/report.md" | grep -v '^!\[' | grep -v '^Raw results'
echo "setup: full report in $out/report.md"
