#!/usr/bin/env bash
# Every benchmark, then one table: the gateway against a HAProxy mTLS pair, the DNS shim
# against unbound, and route-sync, each judged against its issue's targets.
#
#   bash tests/bench/all.sh [--quick] [--json PATH] [--results DIR]
#
# Runs in turn, each writing its JSON and a log into the results directory (a new
# /tmp/isthmus-bench-all-* unless --results; kept, and printed at the start and the end):
# - tests/bench/gateway.sh [--quick]       gateway.json, gateway.log (installs haproxy)
# - dns-shim/bench/dns.sh [--quick]        dns.json, dns.log (installs dnsperf and unbound)
# - cargo run --release -p isthmus-route-sync --example bench -- --routes N
#                                          route-sync.json, route-sync.log; N is 250,000, or
#                                          25,000 with --quick (its targets are for 250,000)
# and then isthmus-bench-report (tests/src/bin/isthmus-bench-report.rs), which prints the
# combined table on stdout: per component, each metric's Isthmus and peer figures, their
# ratio, the target and whether it is met. --json PATH also writes that report, with each
# benchmark's own document, to PATH. The benchmarks' own tables and progress go to stderr.
#
# A benchmark that fails does not stop the others: the table marks it failed, with its exit
# status and log, and the script exits 1 at the end. Missed targets do not change the exit
# status. On 2 shared cores, builds included, --quick takes about 10 minutes and the full run
# about 15.
set -uo pipefail

# The header above, without its comment marks.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

quick=()
routes=250000
json=""
results=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=(--quick); routes=25000; shift ;;
        --json) [[ $# -ge 2 ]] || { echo "all.sh: --json needs a PATH" >&2; exit 64; }
            json="$2"; shift 2 ;;
        --results) [[ $# -ge 2 ]] || { echo "all.sh: --results needs a DIR" >&2; exit 64; }
            results="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "all.sh: unknown argument $1 (expected --quick, --json PATH, --results DIR)" >&2
            exit 64 ;;
    esac
done

# Paths given relative to where the script was started from, before the cd below.
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
[[ -n "$json" ]] && json="$(absolute "$json")"
if [[ -n "$results" ]]; then
    results="$(absolute "$results")"
    mkdir -p "$results" || exit 1
else
    results="$(mktemp -d /tmp/isthmus-bench-all-XXXXXX)" || exit 1
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root" || exit 1
echo "all.sh: results and logs in $results" >&2

# The report binary first: a build error shows before half an hour of benchmarks, not after.
if ! cargo build --release -p isthmus-tests --bin isthmus-bench-report >&2; then
    echo "all.sh: could not build isthmus-bench-report; nothing run" >&2
    exit 1
fi
target_dir="$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
report_bin="${target_dir:-$root/target}/release/isthmus-bench-report"

# --failed arguments for the report, one pair per failed benchmark.
failed=()

# bench NAME COMMAND...: runs COMMAND with its output in NAME.log (and on stderr), and
# records a failure: a non-zero exit, or no NAME.json.
bench() {
    local name="$1"
    shift
    local log="$results/$name.log" start=$SECONDS rc
    rm -f "$results/$name.json"
    echo "" >&2
    echo "all.sh: == $name: $*" >&2
    "$@" 2>&1 | tee "$log" >&2
    rc=${PIPESTATUS[0]}
    local took=$((SECONDS - start))
    if [[ $rc -ne 0 ]]; then
        failed+=(--failed "$name=exit $rc after ${took} s; log: $log")
    elif [[ ! -s "$results/$name.json" ]]; then
        failed+=(--failed "$name=exit 0 after ${took} s but no JSON; log: $log")
    fi
    echo "all.sh: == $name: exit $rc after ${took} s" >&2
}

bench gateway bash tests/bench/gateway.sh "${quick[@]}" --json "$results/gateway.json"
bench dns bash dns-shim/bench/dns.sh "${quick[@]}" --json "$results/dns.json"
bench route-sync cargo run --release -p isthmus-route-sync --example bench -- \
    --routes "$routes" --json "$results/route-sync.json"

args=(--gateway "$results/gateway.json" --dns "$results/dns.json"
    --route-sync "$results/route-sync.json" "${failed[@]}")
[[ -n "$json" ]] && args+=(--json "$json")
echo "" >&2
echo "Isthmus benchmarks${quick:+ (--quick)}"
echo ""
if ! "$report_bin" "${args[@]}"; then
    echo "all.sh: isthmus-bench-report failed; the documents are in $results" >&2
    exit 1
fi
echo "results and logs: $results"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "all.sh: $((${#failed[@]} / 2)) benchmark(s) failed (see the table)" >&2
    exit 1
fi
