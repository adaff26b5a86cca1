#!/usr/bin/env bash
# DNS shim benchmark: the shim against unbound on loopback, with 50,000 routes.
#
#   bash dns-shim/bench/dns.sh [--json PATH] [--quick]
#
# What it does:
# - installs dnsperf and unbound with apt-get when missing;
# - builds the shim (release);
# - writes 50,000 routes (45,000 homed in the other cluster, 5,000 at home) and the same
#   names as unbound data;
# - starts an upstream unbound (authoritative for the 5,000 home names, TTL 0: what the
#   platform resolver would be), the shim (VIP mode, forwarding to that upstream), and a
#   "subject" unbound that does the shim's job: the 45,000 migrated names as `local-data`
#   in a transparent local zone, every other name forwarded to the same upstream;
# - runs dnsperf against the shim and the subject unbound, for migrated names (answered
#   locally) and for home names (forwarded), and prints QPS, average and p99 latency, lost
#   queries, the shim/unbound ratio, and the shim's RSS.
#
# Fairness: both servers get 2 threads (the shim: 2 runtime workers and 2 SO_REUSEPORT UDP
# sockets; unbound: num-threads 2 with so-reuseport). The subject unbound's caches are as
# small as unbound allows, and the upstream answers with TTL 0, which unbound does not
# serve from cache: every forwarded query goes to the upstream for both. dnsperf runs in
# verbose mode (one line per query, for the p99), which costs it the same for both.
# Everything shares the machine's cores with dnsperf and the upstream, as a host would.
set -euo pipefail

JSON=""
QUICK=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --json) JSON="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (expected --json PATH or --quick)" >&2; exit 64 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
ROUTES=50000
REMOTE=45000
if [[ $QUICK == 1 ]]; then DURATION=5; else DURATION=20; fi
CLIENTS=10
OUTSTANDING=200

need() {
  local missing=()
  command -v dnsperf >/dev/null || missing+=(dnsperf)
  command -v unbound >/dev/null || missing+=(unbound)
  [[ ${#missing[@]} == 0 ]] && return
  echo "installing ${missing[*]}" >&2
  if ! apt-get install -y "${missing[@]}" >/dev/null 2>&1; then
    apt-get update >/dev/null
    apt-get install -y "${missing[@]}" >/dev/null
  fi
}
need

echo "building the shim (release)..." >&2
(cd "$ROOT" && cargo build --release -q -p isthmus-dns-shim)
BIN="$ROOT/target/release/isthmus-dns-shim"

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Free loopback ports, UDP and TCP both.
free_port() {
  local p
  while :; do
    p=$(( (RANDOM % 20000) + 30000 ))
    if [[ -z "$(ss -Hantu "( sport = :$p )" 2>/dev/null)" ]] && [[ ! " ${USED_PORTS:-} " =~ " $p " ]]; then
      USED_PORTS="${USED_PORTS:-} $p"
      echo "$p"
      return
    fi
  done
}
UP_PORT=$(free_port)
UB_PORT=$(free_port)
SHIM_PORT=$(free_port)
ADMIN_PORT=$(free_port)

echo "generating $ROUTES routes..." >&2
awk -v n=$ROUTES -v remote=$REMOTE -v dir="$WORK" 'BEGIN {
  routes = dir "/routes.yaml"; migrated = dir "/migrated.txt"; home = dir "/home.txt";
  local_data = dir "/local-data.conf"; upstream_data = dir "/upstream-data.conf";
  print "routes:" > routes
  for (i = 0; i < n; i++) {
    name = sprintf("svc-%05d.ns-%02d.apps.internal", i, i % 50)
    if (i < remote) {
      printf "  - {name: %s, port: 8080, home_cluster: k8s, exported: true}\n", name > routes
      print name " A" > migrated
      printf "  local-data: \"%s. 0 IN A 100.64.%d.%d\"\n", name, int(i / 250), i % 250 + 1 > local_data
    } else {
      printf "  - {name: %s, port: 8080, home_cluster: diego, exported: true}\n", name > routes
      print name " A" > home
      printf "  local-data: \"%s. 0 IN A 10.255.%d.%d\"\n", name, int(i / 250) % 250, i % 250 + 1 > upstream_data
    }
  }
}'

unbound_common() {
  cat <<EOF
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "$WORK"
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 0
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  do-not-query-localhost: no
  qname-minimisation: no
  prefetch: no
EOF
}

{
  echo "server:"
  echo "  interface: 127.0.0.1@$UP_PORT"
  echo "  num-threads: 1"
  unbound_common
  echo "  local-zone: \"apps.internal.\" static"
  cat "$WORK/upstream-data.conf"
} > "$WORK/upstream.conf"

{
  echo "server:"
  echo "  interface: 127.0.0.1@$UB_PORT"
  echo "  num-threads: 2"
  echo "  so-reuseport: yes"
  echo "  msg-cache-size: 64k"
  echo "  rrset-cache-size: 64k"
  echo "  key-cache-size: 64k"
  echo "  neg-cache-size: 64k"
  echo "  cache-max-ttl: 0"
  echo "  cache-max-negative-ttl: 0"
  unbound_common
  echo "  local-zone: \"apps.internal.\" transparent"
  cat "$WORK/local-data.conf"
  echo "forward-zone:"
  echo "  name: \"apps.internal.\""
  echo "  forward-addr: 127.0.0.1@$UP_PORT"
} > "$WORK/subject.conf"

cat > "$WORK/shim.yaml" <<EOF
cluster: diego
domains: [apps.internal]
listen: "127.0.0.1:$SHIM_PORT"
answer: {vip_range: 100.64.0.0/16}
upstream: {kind: dns, servers: ["127.0.0.1:$UP_PORT"]}
routes: {file: $WORK/routes.yaml}
admin: {listen: "127.0.0.1:$ADMIN_PORT"}
udp_sockets: 2
EOF

unbound -c "$WORK/upstream.conf" >"$WORK/upstream.log" 2>&1 & PIDS+=($!)
unbound -c "$WORK/subject.conf" >"$WORK/subject.log" 2>&1 & PIDS+=($!)
"$BIN" --config "$WORK/shim.yaml" --log warn --threads 2 >"$WORK/shim.log" 2>&1 & SHIM_PID=$!; PIDS+=($SHIM_PID)

# Ready when a migrated name answers (the shim has loaded its routes; unbound its data).
wait_ready() {
  local port=$1 name
  name=$(head -1 "$WORK/migrated.txt")
  echo "$name" > "$WORK/one.txt"
  for _ in $(seq 1 300); do
    if dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/one.txt" -n 1 -t 1 2>/dev/null | grep -q "Queries completed:    1 "; then
      return 0
    fi
    sleep 0.1
  done
  echo "server on port $port did not come up; logs in $WORK" >&2
  cat "$WORK"/*.log >&2
  exit 1
}
wait_ready "$UP_PORT" || true
wait_ready "$UB_PORT"
wait_ready "$SHIM_PORT"

# Runs dnsperf; prints "qps avg_ms p99_ms lost sent".
run() {
  local port=$1 file=$2 out="$WORK/dnsperf.out"
  dnsperf -s 127.0.0.1 -p "$port" -d "$file" -l 1 -c $CLIENTS -q $OUTSTANDING -T 1 -t 2 >/dev/null 2>&1 || true
  dnsperf -s 127.0.0.1 -p "$port" -d "$file" -l "$DURATION" -c $CLIENTS -q $OUTSTANDING -T 1 -t 2 -v >"$out" 2>/dev/null
  local qps avg lost sent p99
  qps=$(awk '/Queries per second:/ {print $4}' "$out")
  avg=$(awk '/Average Latency \(s\):/ {printf "%.3f", $4 * 1000}' "$out")
  lost=$(awk '/Queries lost:/ {print $3}' "$out")
  sent=$(awk '/Queries sent:/ {print $3}' "$out")
  p99=$(awk '/^> / {print $NF}' "$out" | sort -n | awk '{v[NR] = $1} END {i = int(NR * 0.99); if (i < 1) i = 1; printf "%.3f", v[i] * 1000}')
  echo "$qps $avg $p99 $lost $sent"
}

echo "measuring ($DURATION s per run)..." >&2
read -r S_LOCAL_QPS S_LOCAL_AVG S_LOCAL_P99 S_LOCAL_LOST S_LOCAL_SENT <<<"$(run "$SHIM_PORT" "$WORK/migrated.txt")"
read -r U_LOCAL_QPS U_LOCAL_AVG U_LOCAL_P99 U_LOCAL_LOST U_LOCAL_SENT <<<"$(run "$UB_PORT" "$WORK/migrated.txt")"
read -r S_FWD_QPS S_FWD_AVG S_FWD_P99 S_FWD_LOST S_FWD_SENT <<<"$(run "$SHIM_PORT" "$WORK/home.txt")"
read -r U_FWD_QPS U_FWD_AVG U_FWD_P99 U_FWD_LOST U_FWD_SENT <<<"$(run "$UB_PORT" "$WORK/home.txt")"

RSS_KB=$(awk '/VmRSS/ {print $2}' "/proc/$SHIM_PID/status")
HWM_KB=$(awk '/VmHWM/ {print $2}' "/proc/$SHIM_PID/status")
REMOTE_NAMES=$(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | awk '/^isthmus_dns_remote_names / {print $2}')
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
LOCAL_RATIO=$(ratio "$S_LOCAL_QPS" "$U_LOCAL_QPS")
FWD_RATIO=$(ratio "$S_FWD_QPS" "$U_FWD_QPS")

printf '\nDNS shim vs unbound, %d routes (%d migrated), %d s per run, dnsperf -c %d -q %d\n\n' \
  $ROUTES $REMOTE "$DURATION" $CLIENTS $OUTSTANDING
printf '| %-9s | %-7s | %10s | %8s | %8s | %8s | %11s |\n' "names" "server" "QPS" "avg ms" "p99 ms" "lost" "shim/unbound"
printf '|-----------|---------|------------|----------|----------|----------|-------------|\n'
printf '| %-9s | %-7s | %10.0f | %8s | %8s | %8s | %11s |\n' local shim "$S_LOCAL_QPS" "$S_LOCAL_AVG" "$S_LOCAL_P99" "$S_LOCAL_LOST" "$LOCAL_RATIO"
printf '| %-9s | %-7s | %10.0f | %8s | %8s | %8s | %11s |\n' local unbound "$U_LOCAL_QPS" "$U_LOCAL_AVG" "$U_LOCAL_P99" "$U_LOCAL_LOST" ""
printf '| %-9s | %-7s | %10.0f | %8s | %8s | %8s | %11s |\n' forwarded shim "$S_FWD_QPS" "$S_FWD_AVG" "$S_FWD_P99" "$S_FWD_LOST" "$FWD_RATIO"
printf '| %-9s | %-7s | %10.0f | %8s | %8s | %8s | %11s |\n' forwarded unbound "$U_FWD_QPS" "$U_FWD_AVG" "$U_FWD_P99" "$U_FWD_LOST" ""
printf '\nshim RSS with %s remote names: %d MB now, %d MB peak (target <= 100 MB)\n' \
  "${REMOTE_NAMES:-?}" $((RSS_KB / 1024)) $((HWM_KB / 1024))
printf 'targets: local >= 1.0x unbound with 0 lost; forwarded >= 0.5x unbound\n'

if [[ -n "$JSON" ]]; then
  cat >"$JSON" <<EOF
{
  "routes": $ROUTES, "migrated": $REMOTE, "duration_s": $DURATION,
  "dnsperf": {"clients": $CLIENTS, "outstanding": $OUTSTANDING},
  "local": {
    "shim": {"qps": $S_LOCAL_QPS, "avg_ms": $S_LOCAL_AVG, "p99_ms": $S_LOCAL_P99, "lost": $S_LOCAL_LOST, "sent": $S_LOCAL_SENT},
    "unbound": {"qps": $U_LOCAL_QPS, "avg_ms": $U_LOCAL_AVG, "p99_ms": $U_LOCAL_P99, "lost": $U_LOCAL_LOST, "sent": $U_LOCAL_SENT},
    "ratio": $LOCAL_RATIO
  },
  "forwarded": {
    "shim": {"qps": $S_FWD_QPS, "avg_ms": $S_FWD_AVG, "p99_ms": $S_FWD_P99, "lost": $S_FWD_LOST, "sent": $S_FWD_SENT},
    "unbound": {"qps": $U_FWD_QPS, "avg_ms": $U_FWD_AVG, "p99_ms": $U_FWD_P99, "lost": $U_FWD_LOST, "sent": $U_FWD_SENT},
    "ratio": $FWD_RATIO
  },
  "shim_rss_mb": $((RSS_KB / 1024)), "shim_peak_rss_mb": $((HWM_KB / 1024))
}
EOF
  echo "wrote $JSON" >&2
fi
