#!/usr/bin/env bash
# Side by side, in one run on one machine: kamigate (Redis engine in both durability modes,
# embedded engine in both) against the baseline edge (benches/baseline/: hyper + fred, one
# four-command claim script), on the same Redis and the same load (wrk).
#
#   benches/side_by_side.sh [--short] [--secs N] [--conns C]
#
# For each system it prints claims/s and redemptions/s, p50 and p99 latency, and server and
# Redis CPU per request (utime + stime from /proc, ledger writer included), each also as a
# ratio to the baseline; `batch` rows are claims sent 100 to a request
# (POST /v1/skus/{sku}/claims/batch), counted per claim and compared with single claims;
# `soldout` rows are claims of a SKU with nothing left (every answer a 409), compared with the
# baseline's claims. --short runs a few seconds per system (what CI runs: it checks that every
# system ran and produced figures, never a timing). Release binaries are built unless
# KAMIGATE_BIN and BASELINE_BIN name binaries to use.
#
# kamigate runs with its defaults, limits raised so they never trigger. Each kamigate SKU holds
# CODES codes that can be issued and redeemed a million times (max_issues, max_uses), so a run
# needs no import of millions of codes; claims still pop, issue and push back keys as usual.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=10 CONNS=32 CODES=1000
while [ $# -gt 0 ]; do
  case "$1" in
    --short) SECS=2 CONNS=8 CODES=200 ;;
    --secs) SECS=$2; shift ;;
    --conns) CONNS=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "${KAMIGATE_BIN:-}" ] || [ -z "${BASELINE_BIN:-}" ]; then
  cargo build --release --quiet --bin kamigate --bin baseline-edge
  KAMIGATE_BIN=target/release/kamigate BASELINE_BIN=target/release/baseline-edge
fi
. benches/lib.sh

# CPU seconds (user + system) a process has used so far.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat"; }

start_redis "$work"

ADMIN=admin-token-side-by-side-01
MERCHANT=merchant-token-side-by-side
results="$work/results"

# run <system> <kind> <url> <script> <server pid> <uses redis: 1|0> [claims per request]
# Figures are per claim (or redemption): a batch request counts as its claims. CPU is
# counted until the ledger has caught up (SKU_VIEW set: kamigate).
run() {
  local system=$1 kind=$2 url=$3 script=$4 pid=$5 with_redis=$6 per=${7:-1}
  local s0 r0 s1 r1 out
  s0=$(cpu "$pid"); r0=$(cpu "$redis_pid")
  out=$(TOKEN="$MERCHANT" ORDER_PREFIX="$system-$RANDOM" SKU=sbs CODES=$CODES BATCH=$per \
    wrk -t1 -c"$CONNS" -d"${SECS}s" --latency -s "benches/wrk/$script" "$url")
  [ -z "${SKU_VIEW:-}" ] || caught_up "$SKU_VIEW" "$MERCHANT"
  s1=$(cpu "$pid"); r1=$(cpu "$redis_pid")
  local rps p50 p99 requests non2xx
  rps=$(awk -v per="$per" '/^Requests\/sec/ {print $2 * per}' <<<"$out")
  requests=$(awk -v per="$per" '/requests in/ {print $1 * per}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out"); non2xx=${non2xx:-0}
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  awk -v sys="$system" -v kind="$kind" -v rps="$rps" -v n="$requests" -v bad="$non2xx" \
      -v p50="$p50" -v p99="$p99" -v s0="$s0" -v s1="$s1" -v r0="$r0" -v r1="$r1" \
      -v wr="$with_redis" 'BEGIN {
    server = n > 0 ? (s1 - s0) * 1e6 / n : 0
    redis = (wr == 1 && n > 0) ? (r1 - r0) * 1e6 / n : 0
    printf "%s %s %s %s %s %s %.1f %.1f %s\n", sys, kind, rps, n, p50, p99, server, redis, bad
  }' >>"$results"
}

# The baseline.
port=$(free_port)
"$BASELINE_BIN" "127.0.0.1:$port" "redis://127.0.0.1:$redis_port" --load sbs $((CODES * 1000)) \
  >"$work/baseline.log" 2>&1 &
pid=$!; pids+=("$pid")
for _ in $(seq 200); do grep -q "baseline edge on" "$work/baseline.log" && break; sleep 0.05; done
run baseline claim "http://127.0.0.1:$port/v1/skus/sbs/claims" claim.lua "$pid" 1
run baseline redeem "http://127.0.0.1:$port/v1/redeem" redeem.lua "$pid" 1
kill "$pid"

# kamigate <system> <redis database: 1… or 0 for the embedded engine> <durability>
kamigate() {
  local system=$1 db=$2 durability=$3 with_redis=1
  [ "$db" = 0 ] && with_redis=0
  local dir="$work/$system" redis_url=""
  mkdir -p "$dir"
  [ "$with_redis" = 1 ] && redis_url="redis://127.0.0.1:$redis_port/$db"
  start_kamigate "$KAMIGATE_BIN" "$dir" "$durability" "$redis_url"
  local pid=$kg_pid public=$kg_public admin=$kg_admin
  SKU_VIEW="$public/v1/skus/sbs"
  run "$system" claim "$public/v1/skus/sbs/claims" claim.lua "$pid" "$with_redis"
  run "$system" redeem "$public/v1/redeem" redeem.lua "$pid" "$with_redis"
  run "$system" batch "$public/v1/skus/sbs/claims/batch" claim_batch.lua \
    "$pid" "$with_redis" 100
  # Sold out: a SKU whose one code is gone; every claim is a new order answered 409.
  sell_out
  run "$system" soldout "$public/v1/skus/gone/claims" claim.lua "$pid" \
    "$with_redis"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  SKU_VIEW=
}
kamigate redis-engine 1 engine
kamigate redis-ledger 2 ledger
kamigate embedded-ledger 0 ledger
kamigate embedded-engine 0 engine

echo "side by side: ${SECS}s per system and kind, ${CONNS} connections, wrk -t1 ($(date -u +%F))"
awk '
  $1 == "baseline" { rps[$2] = $3; p99[$2] = $6; srv[$2] = $7; red[$2] = $8 }
  $1 == "baseline" && $2 == "claim" {
    rps["batch"] = $3; srv["batch"] = $7; red["batch"] = $8
    rps["soldout"] = $3; p99["soldout"] = $6; srv["soldout"] = $7; red["soldout"] = $8
  }
  { row[NR] = $0 }
  function ratio(a, b) { if (b > 0) return a / b; return 0 }
  function ms(t) {  # wrk latency (e.g. 1.23ms, 850.00us, 1.10s) in ms
    if (t ~ /us$/) return substr(t, 1, length(t) - 2) / 1000
    if (t ~ /ms$/) return substr(t, 1, length(t) - 2) + 0
    if (t ~ /s$/) return substr(t, 1, length(t) - 1) * 1000
    return t + 0
  }
  END {
    printf "%-16s %-7s %10s %8s %9s %9s %11s %11s %8s %8s %8s %8s\n", "system", "kind",
      "req/s", "non-2xx", "p50", "p99", "server us", "redis us", "x rps", "x p99", "x srv", "x redis"
    for (i = 1; i <= NR; i++) {
      split(row[i], f, " ")
      k = f[2]
      printf "%-16s %-7s %10.0f %8d %9s %9s %11.1f %11.1f %8.2f %8.2f %8.2f %8.2f\n",
        f[1], k, f[3], f[9], f[5], f[6], f[7], f[8],
        ratio(f[3], rps[k]), ratio(ms(f[6]), ms(p99[k])), ratio(f[7], srv[k]),
        ratio(f[8], red[k])
    }
  }' "$results"
