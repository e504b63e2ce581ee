#!/usr/bin/env bash
# Fuzzes the MQTT decoder, the cluster frame reader, and a cluster peer's handshake and frames
# (cluster_peer) with cargo-fuzz (libFuzzer).
#   scripts/fuzz.sh [SECONDS]   total budget, split between the targets (default 60)
# Installs cargo-fuzz when missing. Only the stable toolchain is needed: cargo-fuzz's nightly
# flags are enabled with RUSTC_BOOTSTRAP=1. Exits non-zero when a target crashes; the crashing
# input is left in net/fuzz/artifacts/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_TOTAL="${1:-60}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi

cd "$ROOT/net"
targets=(decode cluster_frame cluster_peer)
per_target=$(( SECONDS_TOTAL / ${#targets[@]} ))
(( per_target > 0 )) || per_target=1
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    echo "fuzzing $target for ${per_target}s"
    if ! RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$per_target" -max_len=4096 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz target $target failed; crashing input in net/fuzz/artifacts/$target/" >&2
        exit 1
    fi
    grep -E "^(Done|stat::number_of_executed_units)" "$log" || true
done
