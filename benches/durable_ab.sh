#!/usr/bin/env bash
# Durable mode, two builds taking turns: for each round and each binary, claims of one SKU
# (`wrk -t1 -c32`, SECS seconds) with `durability = "engine"` and then "ledger", each on a
# gateway, data dir and redis-server of its own.
#
#   benches/durable_ab.sh <binary A> <binary B> [rounds] [redis|embedded]
#
# Prints per run: claims/s, p50, p99, the gateway's CPU per claim (utime + stime from /proc)
# split by thread name (the runtime's workers, the ledger's threads), its context switches
# per claim, Redis's CPU per claim, the claims a group commit carried (with SKUS > 1, a
# SKU's part of one: the SKUs' batches that meet share a transaction) and the bytes the
# gateway wrote to disk per claim (the WAL and its checkpoints). Runs alternate A, B, A, B…
# so that a machine whose load drifts treats both alike: compare the binaries within a
# round, and ledger mode with engine mode of the same binary and round. PER=N (default 1)
# sends N orders a request through the batch claim route instead, figures per claim; MODES
# (default "engine ledger") picks the durability modes. KIND=redeem measures redemptions of
# the codes the warm-up claimed instead (a new redeemer each, the lockout windows on),
# figures per redemption; KIND=soldout claims of a SKU with nothing left (new orders, every
# answer 409), figures per claim. POSTGRES=<server URL without a database> puts each run's
# ledger in a fresh database of that server (see benches/lib.sh) and prints the server's CPU
# per claim too. SKUS=N (claims only, one a request) spreads the claims over N SKUs in turn,
# as a sale of several products does. CPU is counted until the ledger has every event of the run, so an
# engine-mode writer's backlog is counted in its run. COMMANDS=1 (Redis engine) also prints
# Redis's `INFO commandstats` of the run per claim or redemption: the calls of each command
# (those inside scripts included) and their microseconds. Ends with the paired ratios of
# the rounds and their medians: B ÷ A per mode, and ledger ÷ engine mode per binary, each
# taken within a round (a single run's rate says more about the machine's minute than
# about the build). CODES (default 1000) and SKU_JSON (default: each code issued and redeemed
# up to a million times) set the stock: `CODES=150000 SKU_JSON='{}'` sells single-use codes,
# as a flash sale does, each key's row then changed once rather than thousands of times.
set -euo pipefail
cd "$(dirname "$0")/.."

A=${1:?binary A} B=${2:?binary B} ROUNDS=${3:-3} ENGINE=${4:-redis}
SECS=${SECS:-6} CONNS=${CONNS:-32} CODES=${CODES:-1000} PER=${PER:-1} MODES=${MODES:-engine ledger}
KIND=${KIND:-claim} COMMANDS=${COMMANDS:-0} SKUS=${SKUS:-1}
if [ "$SKUS" -gt 1 ] && { [ "$KIND" != claim ] || [ "$PER" -gt 1 ]; }; then
  echo "SKUS spreads claims of one order a request only" >&2; exit 2
fi
export SKUS
. benches/lib.sh

ADMIN=admin-token-durable-ab-0001
MERCHANT=merchant-token-durable-ab
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# With POSTGRES set: CPU ticks of the server's processes so far (the gateway's backends live
# through a run; the WAL writer and checkpointer are counted too).
db_ticks() {
  [ -n "${POSTGRES:-}" ] || { echo 0; return; }
  local p t=0
  for p in $(pgrep -x postgres); do
    t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$t"
}
# Bytes the process has caused to be written to storage so far (the WAL, checkpoints).
disk() { awk '/^write_bytes/ { print $2 }' "/proc/$1/io"; }
# Group commits so far: the count of the ledger's write-duration histogram.
commits() {
  curl -fs "$1/metrics" |
    awk '/^kamigate_ledger_write_duration_seconds_count/ { n += $2 } END { print n + 0 }'
}
# Per thread name: CPU ticks and context switches so far.
threads() {
  local comm stat switches
  for t in /proc/"$1"/task/*; do
    # A thread may end between the listing and the reads (the runtime's blocking pool).
    comm=$(tr ' ' _ <"$t/comm" 2>/dev/null) || continue
    stat=$(awk '{ print $14 + $15 }' "$t/stat" 2>/dev/null) || continue
    switches=$(awk '/ctxt_switches/ { s += $2 } END { print s }' "$t/status" 2>/dev/null) || continue
    printf '%s %s %s\n' "$comm" "$stat" "$switches"
  done | awk '{ c[$1] += $2; x[$1] += $3 } END { for (k in c) print k, c[k], x[k] }' | sort
}

# Waits until the ledger has every event of every SKU the gateway at <public url> serves.
all_caught_up() {
  local sku
  for sku in $(bench_skus); do caught_up "$1/v1/skus/$sku" "$MERCHANT"; done
}

# one <label> <binary> <durability>
one() {
  local label=$1 bin=$2 durability=$3 dir redis_port redis_pid kg_pid kg_public kg_admin
  dir=$(mktemp -d "$work/run.XXXX")
  start_redis "$dir"
  local rp=$redis_port redis_url=""
  [ "$ENGINE" = redis ] && redis_url="redis://127.0.0.1:$rp/1"
  start_kamigate "$bin" "$dir" "$durability" "$redis_url"
  local pid=$kg_pid public=$kg_public admin=$kg_admin
  local url="$public/v1/skus/sbs/claims" script=claim.lua
  if [ "$PER" -gt 1 ]; then url="$url/batch" script=claim_batch.lua; fi
  # A second of warm-up: connections, caches, the writer's first passes.
  TOKEN=$MERCHANT ORDER_PREFIX="warm-$RANDOM" BATCH=$PER wrk -t1 -c"$CONNS" -d1s \
    -s "benches/wrk/$script" "$url" >/dev/null
  all_caught_up "$public"
  # The warm-up sold every code (each can be sold and redeemed a million times).
  if [ "$KIND" = redeem ]; then url="$public/v1/redeem" script=redeem.lua; fi
  if [ "$KIND" = soldout ]; then
    sell_out; url="$public/v1/skus/gone/claims"
    if [ "$PER" -gt 1 ]; then url="$url/batch"; fi
  fi
  local r0 r1 d0 d1 c0 c1 p0 p1 out
  if [ "$COMMANDS" = 1 ] && [ "$ENGINE" = redis ]; then
    redis-cli -p "$rp" CONFIG RESETSTAT >/dev/null
  fi
  threads "$pid" >"$dir/t0"; r0=$(ticks "$redis_pid"); d0=$(disk "$pid"); p0=$(db_ticks)
  c0=$(commits "$admin")
  out=$(TOKEN=$MERCHANT ORDER_PREFIX="run-$RANDOM" BATCH=$PER SKU=sbs CODES=$CODES \
    wrk -t1 -c"$CONNS" -d"${SECS}s" --latency -s "benches/wrk/$script" "$url")
  all_caught_up "$public"
  threads "$pid" >"$dir/t1"; r1=$(ticks "$redis_pid"); d1=$(disk "$pid"); p1=$(db_ticks)
  c1=$(commits "$admin")
  local n hz
  n=$(awk -v per="$PER" '/requests in/ { print $1 * per }' <<<"$out"); hz=$(getconf CLK_TCK)
  # A run whose answers were not all 2xx measured something else: said on its line.
  local bad
  bad=$(awk '/Non-2xx/ { print "  non-2xx " $NF }' <<<"$out")
  local rate
  rate=$(awk -v per="$PER" '/^Requests\/sec/ { print $2 * per }' <<<"$out")
  echo "$round $label $durability $rate" >>"$work/rates"
  printf "%-3s %-6s %s/s %7.0f  p50 %8s  p99 %8s  redis us %6.1f  %s/commit %5.1f  disk KiB/%s %5.1f%s\n" \
    "$label" "$durability" "${KIND}s" "$rate" \
    "$(awk '$1 == "50%" { print $2 }' <<<"$out")" "$(awk '$1 == "99%" { print $2 }' <<<"$out")" \
    "$(awk -v a="$r0" -v b="$r1" -v n="$n" -v hz="$hz" 'BEGIN { print (b - a) * 1e6 / hz / n }')" \
    "$KIND" "$(awk -v a="$c0" -v b="$c1" -v n="$n" 'BEGIN { print (b > a ? n / (b - a) : 0) }')" \
    "$KIND" "$(awk -v a="$d0" -v b="$d1" -v n="$n" 'BEGIN { print (b - a) / 1024 / n }')" "$bad"
  if [ -n "${POSTGRES:-}" ]; then
    printf "      %-16s cpu us/%s %6.1f\n" postgres "$KIND" \
      "$(awk -v a="$p0" -v b="$p1" -v n="$n" -v hz="$hz" 'BEGIN { print (b - a) * 1e6 / hz / n }')"
  fi
  join "$dir/t0" "$dir/t1" | awk -v n="$n" -v hz="$hz" -v k="$KIND" '
    { printf "      %-16s cpu us/%s %6.1f  switches/%s %5.2f\n", $1, k, ($4 - $2) * 1e6 / hz / n, k, ($5 - $3) / n }'
  if [ "$COMMANDS" = 1 ] && [ "$ENGINE" = redis ]; then
    redis-cli -p "$rp" INFO commandstats | tr -d '\r' | awk -F'[_:=,]' -v n="$n" -v k="$KIND" '
      /^cmdstat_/ && $4 / n >= 0.001 {
        printf "      %-16s calls/%s %6.3f  us/%s %6.2f\n", $2, k, $4 / n, k, $6 / n }' |
      sort -k5 -rn
  fi
  kill "$pid" "$redis_pid"; wait "$pid" "$redis_pid" 2>/dev/null || true
}

echo "durable A/B: $ENGINE engine, ${SECS}s of wrk -t1 -c$CONNS ${KIND}s ($PER a request, $SKUS SKU(s)) per run ($(date -u '+%F %H:%M') UTC)"
echo "A = $A"
echo "B = $B"
for round in $(seq "$ROUNDS"); do
  echo "round $round"
  for side in A B; do
    bin=$A; [ "$side" = B ] && bin=$B
    for mode in $MODES; do one "$side" "$bin" "$mode"; done
  done
done

# Paired ratios per round, then their median (of an even count, the mean of the middle two).
ratios() { # <label> <numerator: side mode> <denominator: side mode>
  awk -v label="$1" -v num="$2" -v den="$3" '
    { rate[$1 " " $2 " " $3] = $4; if ($1 > rounds) rounds = $1 }
    END {
      n = 0; list = ""
      for (r = 1; r <= rounds; r++) {
        a = rate[r " " num]; b = rate[r " " den]
        if (a == "" || b == "" || b == 0) continue
        v[++n] = a / b; list = list sprintf(" %.2f", a / b)
      }
      if (n == 0) exit
      for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
      median = n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
      printf "  %-22s median %.2f  (rounds:%s)\n", label, median, list
    }' "$work/rates"
}
echo "paired ratios of ${KIND}s/s"
for mode in $MODES; do ratios "$mode: B ÷ A" "B $mode" "A $mode"; done
if [[ " $MODES " == *" engine "* && " $MODES " == *" ledger "* ]]; then
  for side in A B; do ratios "$side: ledger ÷ engine" "$side ledger" "$side engine"; done
fi
