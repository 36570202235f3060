#!/usr/bin/env bash
# Soak (issue 21, part 5; not in CI): start/stop cycles in both isolations for N minutes, sampling
# what could leak, then a summary saying whether anything grew.
#
#   bash scripts/soak.sh [MINUTES (default 30)] [OUTDIR (default target/soak-DATE)]
#
# Each cycle: an attached container run, a detached container run + exec + stop + rm, an attached
# warm VM run, a detached VM run + logs + stop + rm. Every SAMPLE_EVERY seconds (default 30) one CSV
# row: open fds and RSS of the rvmm processes of this soak's root (supervisors and run rvmms), free
# memory, run directories, leases, snapshots, rvmm cgroups, rvh/rvt links, mounts under the root.
# Everything lives under its own root (OUTDIR/root) and snapshot dir; its run names start with
# "soak-", so other engineers' leftover checks can tell them apart. Needs root, KVM and a built
# rvmm (target/debug/rvmm, rvmm-vmm and rvmm-shim, copied to OUTDIR so a rebuild does not change the
# binaries under test).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-30}
OUT=${2:-target/soak-$(date +%Y%m%d-%H%M%S)}
SAMPLE_EVERY=${SAMPLE_EVERY:-30}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cp target/debug/rvmm "$OUT/rvmm"
for b in rvmm-vmm rvmm-shim; do [ -f target/debug/$b ] && cp target/debug/$b "$OUT/$b"; done
[ -f target/x86_64-unknown-linux-gnu/release/rvmm-init ] &&
  export RVMM_GUEST_INIT=$(pwd)/target/x86_64-unknown-linux-gnu/release/rvmm-init
ROOT=$OUT/root
export RVMM_SNAPSHOTS=$OUT/snapshots
R() { "$OUT/rvmm" --root "$ROOT" "$@"; }
CSV=$OUT/soak.csv
LOG=$OUT/soak.log

imgs=target/test-images/soak
[ -f "$imgs/.done" ] || bash scripts/make-test-images.sh "$imgs" >/dev/null
R pull -q "oci:$imgs/busybox" >/dev/null
BB=localhost/busybox
R snapshot prewarm >/dev/null

# The rvmm processes of this root: their fds and RSS.
procs() { pgrep -f -- "--root $ROOT" || true; }
sample() {
  local fds=0 rss=0 n=0 p
  for p in $(procs); do
    [ -d /proc/$p ] || continue
    n=$((n + 1))
    fds=$((fds + $(ls /proc/$p/fd 2>/dev/null | wc -l)))
    rss=$((rss + $(awk '/VmRSS/{print $2}' /proc/$p/status 2>/dev/null || echo 0)))
  done
  local free runs leases snaps cgroups links mounts
  free=$(awk '/MemAvailable/{print $2}' /proc/meminfo)
  runs=$(ls "$ROOT/runs" 2>/dev/null | wc -l)
  leases=$(grep -l -r -F -f <(ls "$ROOT/runs" 2>/dev/null; echo none-xyz) /run/rvmm/ipam 2>/dev/null | wc -l)
  snaps=$(ls -A "$RVMM_SNAPSHOTS" 2>/dev/null | wc -l)
  cgroups=0
  for id in $(ls "$ROOT/runs" 2>/dev/null); do
    cgroups=$((cgroups + $(ls -d /sys/fs/cgroup/*/rvmm/"$id" 2>/dev/null | wc -l)))
  done
  links=0
  for id in $(ls "$ROOT/runs" 2>/dev/null); do
    links=$((links + $(ls /sys/class/net 2>/dev/null | grep -c -e "rvh${id:0:11}" -e "rvt${id:0:11}" || true)))
  done
  mounts=$(grep -c -F "$ROOT" /proc/self/mountinfo || true)
  echo "$(date +%s),$cycles,$n,$fds,$rss,$free,$runs,$leases,$snaps,$cgroups,$links,$mounts" >>"$CSV"
}

# From here on a failing command is counted, not fatal (and grep finding nothing is no error).
set +e +o pipefail

# A sample taken with one detached run of each isolation up (their supervisors and rvmms count).
sample_up() {
  R run -d --isolation=container --name soak-sc $BB sleep 60 >/dev/null 2>>"$LOG" || fail=$((fail + 1))
  R run -d --isolation=vm --name soak-sv $BB sleep 60 >/dev/null 2>>"$LOG" || fail=$((fail + 1))
  sample
  R rm -f soak-sc soak-sv >/dev/null 2>>"$LOG" || fail=$((fail + 1))
}

echo "time,cycles,rvmm_procs,rvmm_fds,rvmm_rss_kib,mem_available_kib,run_dirs,leases,snapshots,cgroups,links,mounts" >"$CSV"
cycles=0
fail=0
end=$(($(date +%s) + MINUTES * 60))
next=0
echo "soak: $MINUTES min, root $ROOT, started $(date -u +%FT%TZ)" | tee "$LOG"
while [ "$(date +%s)" -lt "$end" ]; do
  if [ "$(date +%s)" -ge "$next" ]; then
    sample_up
    next=$(($(date +%s) + SAMPLE_EVERY))
  fi
  { R run --rm --isolation=container --name soak-c-$cycles $BB sh -c 'echo hi' | grep -q hi; } 2>>"$LOG" || fail=$((fail + 1))
  if R run -d --isolation=container --name soak-d-$cycles $BB sleep 600 >/dev/null 2>>"$LOG"; then
    R exec soak-d-$cycles true 2>>"$LOG" || fail=$((fail + 1))
    R stop -t 5 soak-d-$cycles >/dev/null 2>>"$LOG" || fail=$((fail + 1))
    R rm soak-d-$cycles >/dev/null 2>>"$LOG" || fail=$((fail + 1))
  else
    fail=$((fail + 1))
  fi
  { R run --rm --isolation=vm --name soak-v-$cycles $BB sh -c 'echo hi' | grep -q hi; } 2>>"$LOG" || fail=$((fail + 1))
  if R run -d --isolation=vm --name soak-w-$cycles $BB sh -c 'echo up; sleep 600' >/dev/null 2>>"$LOG"; then
    R logs soak-w-$cycles >/dev/null 2>>"$LOG" || fail=$((fail + 1))
    R stop -t 30 soak-w-$cycles >/dev/null 2>>"$LOG" || fail=$((fail + 1))
    R rm soak-w-$cycles >/dev/null 2>>"$LOG" || fail=$((fail + 1))
  else
    fail=$((fail + 1))
  fi
  cycles=$((cycles + 1))
done
sample_up
R gc >/dev/null 2>>"$LOG" || fail=$((fail + 1))
R gc --check >/dev/null 2>>"$LOG" || fail=$((fail + 1))

# Summary: first sample against the last, per column.
{
  echo "soak: $MINUTES min, $cycles cycles (4 runs each: container attached, container detached+exec+stop, VM attached, VM detached+logs+stop), $fail failed command(s)"
  awk -F, 'NR==2{for(i=1;i<=NF;i++)first[i]=$i} NR>1{for(i=1;i<=NF;i++){last[i]=$i; if($i>max[i]||NR==2)max[i]=$i}} NR==1{for(i=1;i<=NF;i++)h[i]=$i}
    END{for(i=3;i<=NF;i++){d=last[i]-first[i]; grew=(h[i]=="mem_available_kib")?"":(d>0?"  GREW":"");
      printf "  %-18s first %-10s last %-10s max %-10s%s\n", h[i], first[i], last[i], max[i], grew}}' "$CSV"
} | tee "$OUT/summary.txt"
echo "csv: $CSV"
