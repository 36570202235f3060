#!/usr/bin/env bash
# CI smoke run of the fuzz targets (docs/fuzzing.md): builds every cargo-fuzz target on stable
# (`-s none`, no sanitizer) and runs each for FUZZ_SMOKE_SECS seconds (default 5) over its seed
# corpus in fuzz/seeds/TARGET (new inputs go to a scratch directory). Fails on the first crash,
# whose reproducer libFuzzer leaves in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${FUZZ_SMOKE_SECS:-5}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
t0=$(date +%s)
cargo fuzz build -s none
echo "fuzz-smoke: targets built in $(($(date +%s) - t0)) s"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in $(cargo fuzz list); do
    mkdir -p "$scratch/$t"
    args=("$scratch/$t")
    [ -d "seeds/$t" ] && args+=("seeds/$t")
    extra=()
    [ "$t" = unpack ] && extra+=(-dict=unpack.dict)
    # -close_fd_mask=1: channel_host writes the guest's STDOUT/STDERR frames as rvmm run does.
    if ! cargo fuzz run -s none "$t" "${args[@]}" -- -max_total_time="$secs" -timeout=10 -close_fd_mask=1 \
        -print_final_stats=1 ${extra[@]+"${extra[@]}"} >"$scratch/$t.log" 2>&1; then
        tail -n 40 "$scratch/$t.log" >&2
        echo "fuzz-smoke: $t failed" >&2
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$scratch/$t.log")
    echo "fuzz-smoke: $t: ${runs:-?} runs in ${secs} s"
done
echo "fuzz-smoke: done in $(($(date +%s) - t0)) s"
