#!/usr/bin/env bash
# The gateway benchmark: direct vs Isthmus (TLS/TCP and QUIC) vs a HAProxy mTLS pair.
#
#   bash tests/bench/gateway.sh [--quick] [--json PATH] [other isthmus-bench-gateway flags]
#
# Installs HAProxy with apt-get when it is missing, builds the release binaries, raises the
# open-files limit to its hard limit (10,000 idle connections need it), and runs
# target/release/isthmus-bench-gateway with the arguments given. The table goes to stdout,
# progress to stderr; the child logs and configurations stay in the directory it prints.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

if ! command -v haproxy >/dev/null 2>&1; then
    echo "gateway.sh: haproxy not found; installing it with apt-get" >&2
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y haproxy >&2; then
        DEBIAN_FRONTEND=noninteractive apt-get update >&2 || true
        # A failure here is not fatal: the benchmark reports the haproxy path as failed.
        DEBIAN_FRONTEND=noninteractive apt-get install -y haproxy >&2 ||
            echo "gateway.sh: could not install haproxy; its path will be reported as failed" >&2
    fi
fi

cargo build --release -p isthmus-gateway -p isthmus-tests >&2

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

target_dir="$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
exec "${target_dir:-$root/target}/release/isthmus-bench-gateway" "$@"
