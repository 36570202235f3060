#!/bin/bash
# Profiles the guest kernel of a VM run on a kvm_pvm host, by function: kvm_pvm emulates every
# guest-kernel instruction and emits kvm:kvm_emulate_insn for each (docs/guest-kernel.md), so a
# trace of that event is a complete instruction count; each RIP is looked up in the guest's vmlinux.
#
#   scripts/guest-profile.sh [-b BUCKET_S] -- rvmm run --rm --isolation=vm IMAGE true
#
# Prints the instruction total, the 40 functions with the most instructions, and the top
# functions of each BUCKET_S-second slice (default 0.25). Root only; the trace buffer takes
# ~600 MB per CPU while it runs. Nothing else should run VMs meanwhile: every guest is counted.
set -euo pipefail
bucket=0.25
if [ "${1:-}" = "-b" ]; then bucket=$2; shift 2; fi
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "usage: $0 [-b BUCKET_S] -- COMMAND..." >&2; exit 2; }
here=$(cd "$(dirname "$0")/.." && pwd)
rvmm=${RVMM:-$here/target/release/rvmm}
vmlinux=$("$rvmm" doctor 2>/dev/null | sed -n 's/.*guest kernel *\(\/[^ ]*vmlinux\).*/\1/p' | head -1)
[ -f "$vmlinux" ] || { echo "guest-profile: no guest kernel (rvmm kernel build)" >&2; exit 1; }
T=/sys/kernel/tracing
[ -d $T/events ] || mount -t tracefs nodev $T
[ -d $T/events/kvm/kvm_emulate_insn ] || { echo "guest-profile: no kvm:kvm_emulate_insn tracepoint" >&2; exit 1; }
out=$(mktemp -d)
cleanup() {
    echo 0 > $T/tracing_on
    echo 0 > $T/events/kvm/kvm_emulate_insn/enable
    echo > $T/trace
    echo 1408 > $T/buffer_size_kb
    rm -rf "$out"
}
trap cleanup EXIT
echo 0 > $T/tracing_on
echo > $T/trace
echo 600000 > $T/buffer_size_kb
echo 1 > $T/events/kvm/kvm_emulate_insn/enable
echo 1 > $T/tracing_on
"$@" || echo "guest-profile: the command exited with $?" >&2
echo 0 > $T/tracing_on
cat $T/trace > "$out/trace"
nm -n "$vmlinux" | awk 'tolower($2) ~ /^[tw]$/ {print $1, $3}' > "$out/syms"
python3 - "$out/syms" "$out/trace" "$bucket" <<'EOF'
import bisect, collections, re, sys
addrs, names = [], []
for line in open(sys.argv[1]):
    a, n = line.split()
    addrs.append(int(a, 16)); names.append(n)
pat = re.compile(rb'\s(\d+\.\d+): kvm_emulate_insn: 0:([0-9a-f]+):')
bucket = float(sys.argv[3])
total = collections.Counter(); slices = collections.defaultdict(collections.Counter)
cache = {}; t0 = None; n = 0
with open(sys.argv[2], 'rb') as f:
    for line in f:
        m = pat.search(line)
        if not m:
            continue
        t = float(m.group(1)); t0 = t if t0 is None else t0
        rip = int(m.group(2), 16)
        fn = cache.get(rip)
        if fn is None:
            i = bisect.bisect_right(addrs, rip) - 1
            fn = cache[rip] = names[i] if i >= 0 else '?'
        total[fn] += 1; slices[int((t - t0) / bucket)][fn] += 1; n += 1
if not n:
    sys.exit('guest-profile: no guest-kernel instruction was traced (not kvm_pvm?)')
print(f'{n} guest-kernel instructions over {t - t0:.2f} s')
for fn, c in total.most_common(40):
    print(f'{c:9d} {100 * c / n:5.1f}%  {fn}')
print()
for b in sorted(slices):
    c = slices[b]
    top = ', '.join(f'{k} {v}' for k, v in c.most_common(5))
    print(f'[{b * bucket:6.2f} s] {sum(c.values()):8d}: {top}')
EOF
