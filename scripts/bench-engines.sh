#!/usr/bin/env bash
# podman with rvmm-oci against podman with crun (docs/benchmarks/engines.md): launch -> exit of
# `podman run --rm --network=none IMAGE true`, N rounds each, interleaved (the host is noisy),
# medians side by side: crun, rvmm-oci's container isolation, and its VM isolation (a microVM
# restored from a warm-start snapshot, the rootfs shared over virtio-fs).
#
#   scripts/bench-engines.sh            root, after `cargo build --release` and the static
#                                       rvmm-init (scripts/setup.sh builds both)
#
# podman runs on private --root/--runroot with cgroupfs, inside one private mount namespace with
# the cgroup2 mount hidden (crun 1.8 refuses this host's hybrid cgroups), with ulimits a runtime
# can set (root here lacks CAP_SYS_RESOURCE). Both runtimes get the same podman, image and flags.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-15}
T=$(mktemp -d /tmp/rvmm-bench-engines.XXXXXX)
trap 'rm -rf "$T"' EXIT
imgs=target/test-images/bench-engines
bash scripts/make-test-images.sh "$imgs" >/dev/null
cp target/release/rvmm-oci target/release/rvmm-vmm "$T/"
cp target/x86_64-unknown-linux-gnu/release/rvmm-init "$T/"
export T N imgs
export RVMM_CACHE_DIR=${RVMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rvmm}
unshare -m -n --propagation private bash -c '
  set -euo pipefail
  ip link set lo up
  umount /sys/fs/cgroup/unified 2>/dev/null || true
  printf "#!/bin/sh\nRVMM_OCI_ROOT=%s RVMM_SNAPSHOTS=%s RVMM_CACHE_DIR=%s exec %s \"\$@\"\n" "$T/oci" "$T/snapshots" "$RVMM_CACHE_DIR" "$T/rvmm-oci" > "$T/rt-container"
  printf "#!/bin/sh\nRVMM_OCI_ISOLATION=vm RVMM_OCI_ROOT=%s RVMM_SNAPSHOTS=%s RVMM_CACHE_DIR=%s exec %s \"\$@\"\n" "$T/oci" "$T/snapshots" "$RVMM_CACHE_DIR" "$T/rvmm-oci" > "$T/rt-vm"
  chmod +x "$T/rt-container" "$T/rt-vm"
  printf "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n" > "$T/containers.conf"
  export CONTAINERS_CONF=$T/containers.conf
  pod() { podman --root "$T/root" --runroot "$T/run" --tmpdir "$T/tmp" --cgroup-manager cgroupfs \
    --events-backend file "$@"; }
  ms() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N); echo $(((t1 - t0) / 1000)) | awk "{printf \"%.1f\n\", \$1/1000}"; }
  median() { sort -n | awk "{a[NR]=\$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}"; }
  pod pull -q "oci:$(pwd)/$imgs/busybox" >/dev/null
  img=$(pod images -q | head -1)
  # Warm-up: the VM run saves its snapshot (a boot).
  for r in crun "$T/rt-container" "$T/rt-vm"; do pod --runtime "$r" run --rm --network=none "$img" true; done
  : > "$T/crun"; : > "$T/rvmm"; : > "$T/vm"
  for _ in $(seq "$N"); do
    ms pod --runtime crun run --rm --network=none "$img" true >> "$T/crun"
    ms pod --runtime "$T/rt-container" run --rm --network=none "$img" true >> "$T/rvmm"
    ms pod --runtime "$T/rt-vm" run --rm --network=none "$img" true >> "$T/vm"
  done
  pod rm -a -f >/dev/null 2>&1 || true
  # With the cgroup2 mount hidden, crun makes its "cgroups" there as plain directories of the
  # host'"'"'s /sys/fs/cgroup tmpfs; they go, as do the libpod_parent cgroups podman named.
  if ! mountpoint -q /sys/fs/cgroup/unified; then rm -rf /sys/fs/cgroup/unified/libpod_parent; fi
  for m in $(awk "\$3 == \"cgroup\" {print \$2}" /proc/self/mounts); do
    [ -d "$m/libpod_parent" ] && find "$m/libpod_parent" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  echo "podman run --rm true, launch -> exit, median of $N (ms): crun $(median < "$T/crun"), rvmm-oci container $(median < "$T/rvmm"), rvmm-oci vm $(median < "$T/vm")"
  echo "crun: $(tr "\n" " " < "$T/crun")"
  echo "rvmm-oci container: $(tr "\n" " " < "$T/rvmm")"
  echo "rvmm-oci vm: $(tr "\n" " " < "$T/vm")"
'
