#!/usr/bin/env bash
# Run every test rvmm has: installs what is missing, builds the guest kernel when its cache misses,
# then formatting, lints and the whole test suite. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# In CI a test that would skip for a missing capability fails instead.
if [ "${CI:-}" = "true" ]; then
  export RVMM_REQUIRE="${RVMM_REQUIRE:-all}"
fi

SETUP_ONLY=1 bash scripts/setup.sh

cargo fmt --all --check
cargo clippy --all-targets --workspace -- -D warnings
cargo test --workspace --all-targets 2>&1
# Every fuzz target for a few seconds over its seed corpus (docs/fuzzing.md).
bash scripts/fuzz-smoke.sh
