#!/usr/bin/env bash
# Builds every cargo-fuzz target of thaw-codec (codec/fuzz) and, given SECONDS, runs each for that
# long, printing executions and crashes per target.
#
#   ci/fuzz.sh            # build only (what CI runs on every PR)
#   ci/fuzz.sh 1800       # build, then fuzz each target for 30 minutes (nightly)
#
# Exits non-zero when a build fails or any target crashes. Installs cargo-fuzz when missing.
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer); RUSTC_BOOTSTRAP=1 allows them on the
# pinned stable toolchain. Corpora live in codec/fuzz/corpus/<target>, crash inputs in
# codec/fuzz/artifacts/<target>.
set -euo pipefail

secs="${1:-}"
if [[ -n "$secs" && ! "$secs" =~ ^[0-9]+$ ]]; then
    echo "usage: $0 [SECONDS]" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/codec"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

mapfile -t targets < <(cargo fuzz list)
if [[ ${#targets[@]} -eq 0 ]]; then
    echo "fuzz: no targets found" >&2
    exit 1
fi

echo "fuzz: building ${targets[*]}"
cargo fuzz build

if [[ -z "$secs" ]]; then
    echo "fuzz: build only (pass SECONDS to run each target)"
    exit 0
fi

logdir="$(mktemp -d)"
trap 'rm -rf "$logdir"' EXIT
failed=0
printf '%-20s %12s %10s %8s  %s\n' target executions exec/s crashes result
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log="$logdir/$t.log"
    if cargo fuzz run "$t" -- -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 \
        >"$log" 2>&1; then
        result=ok
    else
        result=FAILED
        failed=1
    fi
    # libFuzzer reports each saved crash/leak/timeout input as "Test unit written to PATH".
    crashes=$(grep -c 'Test unit written to' "$log" || true)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
    printf '%-20s %12s %10s %8s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "$crashes" "$result"
    if [[ "$result" != ok ]]; then
        echo "---- $t: last lines of the log ----"
        tail -n 30 "$log"
        sed -n "s/.*Test unit written to /artifact: /p" "$log"
        echo "----"
    fi
done
exit "$failed"
