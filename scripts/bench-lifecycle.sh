#!/usr/bin/env bash
# Detached runs side by side with podman + crun (docs/benchmarks/lifecycle.md): the memory of an
# idle detached `sleep` (PSS of the runtime's own processes: rvmm's supervisor and what keeps the
# run, podman's conmon) and `exec NAME true` latency (launch -> exit).
#
#   scripts/bench-lifecycle.sh [OUTDIR]        root, after `cargo build --release`
#
# rvmm runs from private copies of its binaries (no other process maps them, so PSS is not split
# with the caller) on a private --root; podman runs on a private --root/--runroot with crun and
# cgroupfs, inside one private mount namespace with the cgroup2 mount hidden (crun 1.8 refuses
# this host's hybrid cgroups) and with ulimits it can set (root here lacks CAP_SYS_RESOURCE).
# N=15 exec rounds per contender (VM: N_VM=5); VM=0 skips the VM column.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-15}
N_VM=${N_VM:-5}
VM=${VM:-1}
out=${1:-target/bench-lifecycle}
mkdir -p "$out"
out=$(cd "$out" && pwd)
T=$(mktemp -d /tmp/rvmm-bench-lifecycle.XXXXXX)
imgs=target/test-images/bench-lifecycle
bash scripts/make-test-images.sh "$imgs" >/dev/null
mkdir -p "$T/bin"
for b in rvmm rvmm-shim rvmm-vmm; do cp "target/release/$b" "$T/bin/$b"; done
init=target/x86_64-unknown-linux-gnu/release/rvmm-init
if [ "$VM" = 1 ]; then
  [ -f "$init" ] || { echo "bench-lifecycle: $init is not built (scripts/setup.sh builds it; VM=0 skips the VM column)" >&2; exit 1; }
  cp "$init" "$T/bin/rvmm-init"
fi
rvmm() { "$T/bin/rvmm" --root "$T/root" "$@"; }
cleanup() {
  rvmm rm -f lc-c lc-v >/dev/null 2>&1 || true
  rvmm gc >/dev/null 2>&1 || true
  rm -rf "$T"
}
trap cleanup EXIT
rvmm pull -q "oci:$(pwd)/$imgs/busybox" >/dev/null
image=localhost/busybox:latest
rvmm images | grep -q busybox || { echo "bench-lifecycle: the busybox image did not load" >&2; exit 1; }

# PSS (KiB) of the given pids, summed.
pss() { local t=0 p; for p in "$@"; do t=$((t + $(awk '/^Pss:/{print $2}' "/proc/$p/smaps_rollup"))); done; echo $t; }
# Median of numbers on stdin.
median() { sort -n | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
# ms of one command, launch -> exit.
ms() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N); echo $(((t1 - t0) / 1000)) | awk '{printf "%.1f\n", $1/1000}'; }
kib_mib() { awk -v k="$1" 'BEGIN{printf "%.2f", k/1024}'; }
# The supervisor of the run kept by process $1: its parent if that is one (a VM run), else none
# (a container run is kept by one process, rvmm-shim).
supervisor_of() {
  local p
  p=$(ps -o ppid= -p "$1" | tr -d ' ')
  if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qE ' (__)?supervise '; then echo "$p"; fi
}
name_of() { tr '\0' ' ' <"/proc/$1/cmdline" | cut -d' ' -f1 | xargs basename; }
# A field of the run's state.
state() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$T/root/runs/$1/state.json" "$2"; }

echo "bench-lifecycle: rvmm container" >&2
cid=$(rvmm run -d --isolation=container --network=none --name lc-c "$image" sleep 100000)
sleep 1
keeper=$(state "$cid" rvmm_pid)
sup=$(supervisor_of "$keeper")
c_all=$(pss $sup "$keeper")
if [ -n "$sup" ]; then
  c_what="$(name_of "$sup") $(kib_mib "$(pss "$sup")") + $(name_of "$keeper") $(kib_mib "$(pss "$keeper")")"
else
  c_what="one process: $(name_of "$keeper")"
fi
for _ in 1 2; do rvmm exec lc-c true; done
c_exec=$(for _ in $(seq "$N"); do ms rvmm exec lc-c true; done | median)
rvmm rm -f lc-c >/dev/null

vm_exec="—"
vm_mem="—"
if [ "$VM" = 1 ]; then
  echo "bench-lifecycle: rvmm vm" >&2
  mem=128
  vid=$(rvmm run -d --isolation=vm --memory ${mem}m --network=none --name lc-v "$image" sleep 100000)
  sleep 3
  keeper=$(state "$vid" rvmm_pid)
  sup=$(supervisor_of "$keeper")
  vmm=$(pgrep -P "$keeper" | head -1)
  # Guest RAM resident in the VMM: the PSS of its guest-memory mapping (size = --memory).
  guest=$(awk -v want=$((mem * 1024)) '/^[0-9a-f]+-/{m=0} /^Size:/{m=($2==want)} /^Pss:/{if(m){print $2; exit}}' "/proc/$vmm/smaps")
  v_all=$(pss $sup "$keeper" "$vmm")
  v_over=$((v_all - ${guest:-0}))
  for _ in 1 2; do rvmm exec lc-v true; done
  v_exec=$(for _ in $(seq "$N_VM"); do ms rvmm exec lc-v true; done | median)
  vm_exec="$v_exec ms"
  v_keep=$(pss "$keeper")
  v_vmm=$((v_over - v_keep))
  if [ -n "$sup" ]; then
    v_keep_what="supervisor $(kib_mib "$(pss $sup)") + run $(kib_mib "$v_keep")"
    v_vmm=$((v_vmm - $(pss $sup)))
  else
    v_keep_what="$(name_of "$keeper") run $(kib_mib "$v_keep"), one process"
  fi
  vm_mem="$(kib_mib "$v_over") MiB beyond guest RAM ($v_keep_what + VMM $(kib_mib "$v_vmm"))"
  rvmm rm -f lc-v >/dev/null
fi

echo "bench-lifecycle: podman + crun" >&2
P=$T/podman
mkdir -p "$P"
export T P N image imgs
p_line=$(unshare -m --propagation private bash -c '
  set -euo pipefail
  umount /sys/fs/cgroup/unified 2>/dev/null || true
  pod() { podman --root "$P/root" --runroot "$P/run" --tmpdir "$P/tmp" --cgroup-manager cgroupfs \
    --events-backend file --runtime crun "$@"; }
  pss() { local t=0 p; for p in "$@"; do t=$((t + $(awk "/^Pss:/{print \$2}" "/proc/$p/smaps_rollup"))); done; echo $t; }
  median() { sort -n | awk "{a[NR]=\$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}"; }
  ms() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N); echo $(((t1 - t0) / 1000)) | awk "{printf \"%.1f\n\", \$1/1000}"; }
  pod pull -q "oci:$(pwd)/$imgs/busybox" >/dev/null
  cid=$(pod run -d --network=none --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 --name lc-p "$(pod images -q | head -1)" sleep 100000)
  sleep 1
  conmon=$(pgrep -f "conmon.*$cid" | head -1)
  k=$(pss $conmon)
  for _ in 1 2; do pod exec lc-p true; done
  e=$(for _ in $(seq "$N"); do ms pod exec lc-p true; done | median)
  pod rm -f -t 0 lc-p >/dev/null
  # crun made its "cgroups" as plain tmpfs directories under the hidden cgroup2 mount point.
  if ! mountpoint -q /sys/fs/cgroup/unified; then rm -rf /sys/fs/cgroup/unified/libpod_parent; fi
  for m in $(awk "\$3 == \"cgroup\" {print \$2}" /proc/self/mounts); do
    [ -d "$m/libpod_parent" ] && find "$m/libpod_parent" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  echo "$e $k $(ps -e -o comm= | grep -c "^crun$" || true)"
')
read -r p_exec p_keep p_crun <<<"$p_line"

{
  echo "| what | rvmm container | rvmm VM | podman + crun |"
  echo "|---|---:|---:|---:|"
  echo "| \`exec NAME true\`, launch → exit (median of $N; VM $N_VM) | $c_exec ms | $vm_exec | $p_exec ms |"
  echo "| idle detached \`sleep\`: PSS of the runtime's own processes | $(kib_mib "$c_all") MiB ($c_what) | $vm_mem | $(kib_mib "$p_keep") MiB (conmon; crun processes left: $p_crun) |"
} | tee "$out/lifecycle.md"
