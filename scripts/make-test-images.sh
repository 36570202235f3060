#!/usr/bin/env bash
# Builds rvmm's test images from Debian's busybox-static, with umoci and skopeo (no downloads).
#
#   scripts/make-test-images.sh OUTDIR
#
# OUTDIR/busybox            OCI layout, tag latest: one gzip layer, busybox + applet links, users
#                           root/nobody/app(1000), Cmd ["sh"], Env PATH and RVMM_IMAGE=busybox,
#                           WorkingDir /, ExposedPorts 8080/tcp, StopSignal SIGTERM, a label, and
#                           /usr/bin/showeuid: a static setuid-root helper (mode 4755) that prints
#                           "uid=U euid=E" (busybox cannot be setuid per applet)
# OUTDIR/multi              OCI layout, tag latest: busybox plus three layers exercising whiteouts
#                           (/etc/motd deleted), an opaque directory (/data/dir holds only z),
#                           a hardlink and a symlink; WorkingDir /data, User app
# OUTDIR/links              OCI layout: busybox plus symlinks aimed out of the root as a container
#                           runtime sees it while it sets up mounts: /mnt/escape -> /.rvmm-old/tmp
#                           (the host's /tmp while the host's root is still attached there),
#                           /mnt/up -> ../../../../tmp; and a dangling symlink /srv/dangling ->
#                           /srv/real/data, a file /var/lib/seeded/seed ("seeded") and
#                           VOLUME /var/lib/seeded
# OUTDIR/zstd               OCI layout: busybox with zstd-compressed layers
# OUTDIR/index              OCI layout whose index.json points at an image index (linux/amd64 + a
#                           linux/arm64 entry that must not be chosen)
# OUTDIR/busybox.docker.tar docker-archive of busybox, named busybox:latest (skopeo copy)
# OUTDIR/busybox.oci.tar    OCI archive of busybox, tag latest
#
# Idempotent: writes OUTDIR/.done last; concurrent callers serialize on OUTDIR.lock.
set -euo pipefail

out=${1:?usage: make-test-images.sh OUTDIR}
mkdir -p "$(dirname "$out")"
exec 9>"$out.lock"
flock 9
[[ -e $out/.done ]] && exit 0
rm -rf "$out"
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for t in umoci skopeo python3 gcc; do
  command -v $t >/dev/null || { echo "make-test-images: $t is missing (run scripts/setup.sh)" >&2; exit 1; }
done
bb=/bin/busybox
[[ -x $bb ]] || { echo "make-test-images: /bin/busybox (busybox-static) is missing" >&2; exit 1; }
file -L $bb 2>/dev/null | grep -q "statically linked" || ldd $bb 2>&1 | grep -q "not a dynamic" || {
  echo "make-test-images: /bin/busybox is not static (install busybox-static)" >&2; exit 1; }

# --- busybox: one layer --------------------------------------------------------------------
L=$out/busybox
umoci init --layout "$L"
umoci new --image "$L:latest"
umoci unpack --image "$L:latest" "$work/b"
r=$work/b/rootfs
mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,home/app,proc,sys,dev,var/www}
chmod 1777 "$r/tmp"
chmod 700 "$r/root"
cp $bb "$r/bin/busybox"
for a in $($bb --list-full); do
  [[ $a == bin/busybox ]] && continue
  mkdir -p "$r/$(dirname "$a")"
  ln -sf /bin/busybox "$r/$a"
done
cat >"$r/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
app:x:1000:1000:app:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$r/etc/group" <<'EOF'
root:x:0:
app:x:1000:
staff:x:50:app
nogroup:x:65534:
EOF
chown 1000:1000 "$r/home/app"
cat >"$work/showeuid.c" <<'CEOF'
#include <stdio.h>
#include <unistd.h>
int main(void) {
  printf("uid=%d euid=%d\n", (int)getuid(), (int)geteuid());
  return 0;
}
CEOF
gcc -static -O2 -o "$r/usr/bin/showeuid" "$work/showeuid.c"
chown 0:0 "$r/usr/bin/showeuid"
chmod 4755 "$r/usr/bin/showeuid"
echo "welcome to the rvmm test image" >"$r/etc/motd"
echo "hello from rvmm" >"$r/var/www/index.html"
umoci repack --image "$L:latest" "$work/b"
umoci config --image "$L:latest" \
  --config.cmd sh \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.env RVMM_IMAGE=busybox \
  --config.workingdir / \
  --config.exposedports 8080/tcp \
  --config.stopsignal SIGTERM \
  --config.label org.rvmm.test=busybox \
  --architecture amd64 --os linux
umoci gc --layout "$L"

# --- multi: whiteouts, opaque dir, hardlink, symlink ------------------------------------------
M=$out/multi
cp -a "$L" "$M"
python3 - "$work" <<'EOF'
import io, sys, tarfile, time
work = sys.argv[1]
def add(t, name, kind=tarfile.REGTYPE, data=b"", mode=0o644, link="", uid=0, gid=0):
    ti = tarfile.TarInfo(name)
    ti.type = kind; ti.mode = mode; ti.mtime = 1700000000; ti.linkname = link
    ti.uid = uid; ti.gid = gid
    if kind == tarfile.REGTYPE:
        ti.size = len(data); t.addfile(ti, io.BytesIO(data))
    else:
        t.addfile(ti)
with tarfile.open(f"{work}/l1.tar", "w", format=tarfile.PAX_FORMAT) as t:
    add(t, "data", tarfile.DIRTYPE, mode=0o755)
    add(t, "data/dir", tarfile.DIRTYPE, mode=0o755)
    add(t, "data/dir/x", data=b"x\n")
    add(t, "data/dir/y", data=b"y\n")
    add(t, "data/owned", data=b"app's\n", uid=1000, gid=1000, mode=0o600)
    add(t, "data/script", data=b"#!/bin/sh\necho script-ran\n", mode=0o755)
with tarfile.open(f"{work}/l2.tar", "w", format=tarfile.PAX_FORMAT) as t:
    add(t, "etc", tarfile.DIRTYPE, mode=0o755)
    add(t, "etc/.wh.motd")
    add(t, "data", tarfile.DIRTYPE, mode=0o755)
    add(t, "data/dir", tarfile.DIRTYPE, mode=0o755)
    add(t, "data/dir/.wh..wh..opq")
    add(t, "data/dir/z", data=b"z\n")
with tarfile.open(f"{work}/l3.tar", "w", format=tarfile.PAX_FORMAT) as t:
    add(t, "data", tarfile.DIRTYPE, mode=0o755)
    add(t, "data/hard", tarfile.LNKTYPE, link="data/script")
    add(t, "data/soft", tarfile.SYMTYPE, link="/data/dir/z")
EOF
for l in l1 l2 l3; do umoci raw add-layer --image "$M:latest" "$work/$l.tar"; done
umoci config --image "$M:latest" --config.workingdir /data --config.user app \
  --config.env RVMM_IMAGE=multi
umoci gc --layout "$M"

# --- links: symlinks aimed at the host ------------------------------------------------------------
K=$out/links
cp -a "$L" "$K"
python3 - "$work" <<'EOF'
import io, sys, tarfile
work = sys.argv[1]
with tarfile.open(f"{work}/links.tar", "w", format=tarfile.PAX_FORMAT) as t:
    for name, kind, link in [("mnt", tarfile.DIRTYPE, ""),
                             ("mnt/escape", tarfile.SYMTYPE, "/.rvmm-old/tmp"),
                             ("mnt/up", tarfile.SYMTYPE, "../../../../tmp"),
                             ("srv", tarfile.DIRTYPE, ""),
                             ("srv/dangling", tarfile.SYMTYPE, "/srv/real/data"),
                             ("var", tarfile.DIRTYPE, ""),
                             ("var/lib", tarfile.DIRTYPE, ""),
                             ("var/lib/seeded", tarfile.DIRTYPE, "")]:
        ti = tarfile.TarInfo(name); ti.type = kind; ti.linkname = link
        ti.mode = 0o755; ti.mtime = 1700000000
        t.addfile(ti)
    body = b"seeded\n"
    ti = tarfile.TarInfo("var/lib/seeded/seed"); ti.size = len(body); ti.mode = 0o644
    ti.mtime = 1700000000
    t.addfile(ti, io.BytesIO(body))
EOF
umoci raw add-layer --image "$K:latest" "$work/links.tar"
umoci config --image "$K:latest" --config.env RVMM_IMAGE=links --config.volume /var/lib/seeded
umoci gc --layout "$K"

# --- zstd layers -----------------------------------------------------------------------------
skopeo copy -q --dest-compress-format zstd --dest-compress oci:"$L":latest oci:"$out/zstd":latest

# --- index: an image index with two platforms ----------------------------------------------
cp -a "$L" "$out/index"
python3 - "$out/index" <<'EOF'
import hashlib, json, os, sys
d = sys.argv[1]
idx = json.load(open(f"{d}/index.json"))
m = idx["manifests"][0]
inner = dict(m); inner.pop("annotations", None)
inner["platform"] = {"architecture": "amd64", "os": "linux"}
# An arm64 entry pointing at the same manifest: choosing it would still work, so the test checks
# the chosen digest; listing it first makes a wrong pick visible.
arm = dict(inner); arm["platform"] = {"architecture": "arm64", "os": "linux", "variant": "v8"}
body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                   "manifests": [arm, inner]}).encode()
h = hashlib.sha256(body).hexdigest()
open(f"{d}/blobs/sha256/{h}", "wb").write(body)
idx["manifests"] = [{"mediaType": "application/vnd.oci.image.index.v1+json",
                     "digest": "sha256:" + h, "size": len(body),
                     "annotations": {"org.opencontainers.image.ref.name": "latest"}}]
json.dump(idx, open(f"{d}/index.json", "w"))
EOF

# --- archives ---------------------------------------------------------------------------------
skopeo copy -q oci:"$L":latest docker-archive:"$out/busybox.docker.tar":busybox:latest
skopeo copy -q oci:"$L":latest oci-archive:"$out/busybox.oci.tar":latest

touch "$out/.done"
echo "make-test-images: built in $out"
