#!/usr/bin/env bash
# Build rvmm's guest kernel: Debian's linux-source-6.12, `make tinyconfig` + config.fragment + patches/,
# an uncompressed vmlinux cached under ${XDG_CACHE_HOME:-~/.cache}/rvmm/kernel/<hash of the inputs>/.
# A cache hit returns at once. Installs what it needs from apt. Safe to run concurrently (flock).
#   build.sh               build unless cached
#   build.sh --print-path  print where the vmlinux for these inputs lives (built or not)
# `rvmm kernel build` runs this same script, embedded in the binary.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${RVMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rvmm}

# The cache key: every input file's name and sha256, in this order (src/kernel.rs computes the same).
inputs() {
  echo build.sh
  echo config.fragment
  (cd "$here" && ls patches/*.patch | LC_ALL=C sort)
}
hash=$(cd "$here" && for f in $(inputs); do printf '%s\n' "$f"; sha256sum <"$f" | cut -d' ' -f1; done |
  sha256sum | cut -c1-16)
out=$cache/kernel/$hash

if [ "${1:-}" = "--print-path" ]; then
  echo "$out/vmlinux"
  exit 0
fi
if [ -f "$out/vmlinux" ]; then
  echo "kernel: cached $out/vmlinux"
  exit 0
fi

say() { echo "kernel: $*"; }

need=()
for p in linux-source-6.12 bc bison flex libelf-dev libssl-dev make gcc xz-utils; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
  say "installing ${need[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
tarball=$(ls /usr/src/linux-source-6.12.tar.* 2>/dev/null | head -n 1)
[ -n "$tarball" ] || { echo "kernel: /usr/src/linux-source-6.12.tar.* not found" >&2; exit 1; }

mkdir -p "$cache/kernel-build"
exec 9>"$cache/kernel-build/.lock"
flock 9
if [ -f "$out/vmlinux" ]; then # built by someone else while we waited
  say "cached $out/vmlinux"
  exit 0
fi

bdir=$cache/kernel-build/$hash
src=$bdir/linux-source-6.12
# Keep only this build tree: old ones are gigabytes.
for d in "$cache"/kernel-build/*/; do
  [ "$d" = "$bdir/" ] || rm -rf "$d"
done
start=$(date +%s)
if [ ! -f "$bdir/.prepared" ]; then
  rm -rf "$bdir"
  mkdir -p "$bdir"
  say "extracting $(basename "$tarball")"
  tar -C "$bdir" -xf "$tarball"
  for p in $(cd "$here" && ls patches/*.patch | LC_ALL=C sort); do
    say "applying $p"
    patch -d "$src" -p1 --quiet <"$here/$p"
  done
  touch "$bdir/.prepared"
fi

cd "$src"
say "configuring (tinyconfig + config.fragment)"
make -s tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m .config "$here/config.fragment" >/dev/null
make -s olddefconfig >/dev/null
# Every option the fragment asks for must have survived Kconfig's dependency resolution.
bad=0
while IFS='=' read -r key val; do
  case "$key" in CONFIG_*) ;; *) continue ;; esac
  got=$(grep -E "^$key=" .config | cut -d= -f2- || true)
  if [ "$val" = "n" ]; then
    [ -z "$got" ] || { echo "kernel: $key should be off, is $got" >&2; bad=1; }
  elif [ "$got" != "$val" ]; then
    echo "kernel: $key=$val requested, Kconfig gave '${got:-unset}'" >&2
    bad=1
  fi
done < <(grep -E '^CONFIG_' "$here/config.fragment")
[ "$bad" = 0 ] || exit 1

jobs=$(nproc)
say "building vmlinux with $jobs jobs (about 10 minutes on 2 cores)"
# Progress: one line per 200 compiled objects; the full log stays in the build dir.
set +e
make -j"$jobs" vmlinux 2>&1 | tee "$bdir/build.log" |
  awk '/^  (CC|AS|LD|AR)/ { n++; if (n % 200 == 0) { printf "kernel: %d objects built\n", n; fflush() } }'
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
  tail -n 30 "$bdir/build.log" >&2
  echo "kernel: build failed (log: $bdir/build.log)" >&2
  exit 1
fi

mkdir -p "$out"
cp .config "$out/config"
cp vmlinux "$out/vmlinux.tmp"
mv "$out/vmlinux.tmp" "$out/vmlinux"
say "built $out/vmlinux ($(du -h "$out/vmlinux" | cut -f1)) in $(($(date +%s) - start)) s"
