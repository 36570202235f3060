#!/usr/bin/env bash
# Builds a test image with a real distribution userland: Debian bookworm, debootstrap's minbase
# variant (coreutils, bash, dpkg, apt, util-linux, ...), from the Debian mirror apt already uses.
#
#   scripts/make-debian-image.sh OUTDIR
#
# OUTDIR/debian   OCI layout, tag latest: one gzip layer, a user app (1000) with a home, Cmd
#                 ["bash"], Env PATH and RVMM_IMAGE=debian.
#
# About 50 MB to download and a minute or two to build; idempotent (OUTDIR/.done is written
# last; concurrent callers serialize on OUTDIR.lock). The mirror is the first deb URI of apt's
# own configuration, so it works wherever `apt-get install` does.
set -euo pipefail

out=${1:?usage: make-debian-image.sh OUTDIR}
mkdir -p "$(dirname "$out")"
exec 9>"$out.lock"
flock 9
[[ -e $out/.done ]] && exit 0
rm -rf "$out"
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for t in debootstrap umoci; do
  command -v $t >/dev/null || { echo "make-debian-image: $t is missing (run scripts/setup.sh)" >&2; exit 1; }
done
mirror=$( (grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null || true) \
  | head -1 | awk '{print $2}')
mirror=${mirror:-http://deb.debian.org/debian}

L=$out/debian
umoci init --layout "$L"
umoci new --image "$L:latest"
umoci unpack --image "$L:latest" "$work/b"
r=$work/b/rootfs
echo "make-debian-image: debootstrap --variant=minbase bookworm from $mirror"
debootstrap --variant=minbase bookworm "$r" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -20 "$work/debootstrap.log" >&2; exit 1; }
chroot "$r" useradd -m -u 1000 -s /bin/bash app
# What a container image does not need: package caches and logs.
rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/* "$r"/var/log/*.log "$r"/debootstrap
umoci repack --image "$L:latest" "$work/b"
umoci config --image "$L:latest" \
  --config.cmd bash \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.env RVMM_IMAGE=debian \
  --config.workingdir / \
  --architecture amd64 --os linux
umoci gc --layout "$L"
touch "$out/.done"
echo "make-debian-image: built in $out"
