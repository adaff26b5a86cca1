#!/usr/bin/env bash
# Builds every fuzz target with libFuzzer on the stable toolchain and runs each one for a
# bounded time from its committed seed corpus; any crash, panic, timeout or leak-free OOM
# fails the script.
#
#   tests/fuzz/run.sh [seconds per target] [target...]     (default: 60 s, every target)
#
# Why no cargo-fuzz: it only wraps `cargo build` with the flags below, and installing it
# costs CI minutes of compiling. (`cargo fuzz build -s none` does run on stable: it compiled
# without asking for nightly here, but was not run to the end or used.) The
# flags are the ones cargo-fuzz passes: LLVM's sanitizer-coverage pass with inline 8-bit
# counters, a PC table and compare tracing is what makes libFuzzer coverage-guided, and
# `--cfg fuzzing` is what libfuzzer-sys expects. No sanitizer (`-Zsanitizer` is nightly
# only), so a finding is a panic, an abort, an overflow or debug-assertion failure (both
# enabled), a timeout or running out of memory: all of them are bugs on input we parse.
#
# Each target's corpus starts from tests/fuzz/seeds/<target> (committed); what a run adds
# goes to tests/fuzz/corpus/<target> (ignored by git) and is reused by the next local run.
# A crashing input is written to tests/fuzz/artifacts/<target>/ and its path printed;
# reproduce it with `tests/fuzz/target/<triple>/release/<target> <file>`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

seconds="${1:-60}"
shift || true
all=(authority frame peek dns update spiffe config route_file)
targets=("${@:-${all[@]}}")
# Run this many targets at a time (CI and developer machines have 2 cores).
jobs="${FUZZ_JOBS:-2}"

host="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cllvm-args=-sanitizer-coverage-stack-depth \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks"
export CARGO_INCREMENTAL=0
# `--target` keeps RUSTFLAGS away from build scripts and proc macros (host code), as
# cargo-fuzz does; the separate target dir keeps these objects out of the workspace's.
echo "==> building ${#targets[@]} fuzz targets (release, sanitizer coverage)"
build_start=$SECONDS
cargo build --locked --release --target "$host" --target-dir "$here/target" \
    $(printf -- '--bin %s ' "${targets[@]}")
echo "built in $((SECONDS - build_start)) s"

run_one() {
    local t="$1"
    local bin="$here/target/$host/release/$t"
    mkdir -p "corpus/$t" "artifacts/$t"
    # -max_total_time bounds the run; -timeout turns a hang on one input into a failure;
    # -rss_limit_mb turns runaway memory into one. Seeds are read-only inputs, new inputs go
    # to corpus/.
    if "$bin" "corpus/$t" "seeds/$t" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        >"artifacts/$t.log" 2>&1; then
        local stats
        stats="$(grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::new_units_added)' "artifacts/$t.log" | tr '\n' ' ')"
        echo "ok   $t: $stats"
    else
        echo "FAIL $t (log: tests/fuzz/artifacts/$t.log):"
        grep -E 'panicked|ERROR: libFuzzer|SUMMARY|Test unit written|deadly signal' "artifacts/$t.log" | head -20
        return 1
    fi
}

echo "==> running each target for ${seconds} s, ${jobs} at a time"
run_start=$SECONDS
failed=0
pids=()
names=()
for t in "${targets[@]}"; do
    run_one "$t" &
    pids+=($!)
    names+=("$t")
    if ((${#pids[@]} >= jobs)); then
        wait "${pids[0]}" || failed=$((failed + 1))
        pids=("${pids[@]:1}")
        names=("${names[@]:1}")
    fi
done
for p in "${pids[@]}"; do
    wait "$p" || failed=$((failed + 1))
done
echo "ran in $((SECONDS - run_start)) s"
passed=$((${#targets[@]} - failed))
echo "fuzz: ${passed} passed, ${failed} failed"
((failed == 0))
