#!/usr/bin/env bash
# Redis's instructions per claimed order in `claims_batch`, under callgrind, for the scripts
# of one or more `lua/` directories (this tree's, or another commit's: `git archive` or
# `git show` its `lua/` into a directory).
#
#   benches/script_ir.sh [lua dir ...]    (default: lua/)
#
# For each directory: a `redis-server` of its own runs under callgrind; a gateway (the
# Redis engine, KAMIGATE_BIN or a release build of this tree) creates one SKU and imports
# its codes, and stops; the directory's prelude and scripts are loaded as a library of
# their own (`FUNCTION LOAD`) and CALLS calls of PER orders each are made twice, the second
# time counted (`callgrind_control`). Printed per order: all of `FCALL`, then the part in
# `redis.call` (the bridge and the commands), in the commands themselves, and in turning
# the script's reply into RESP. The Debian `redis-server` has no symbols for Lua's and the
# bridge's static functions: those are picked by address, valid for its 7.0.15 build only.
# Instruction counts do not depend on the machine's load, unlike rates.
#
# CODES (default 999) codes of SKU settings SKU_JSON (default: reusable, as in
# side_by_side.sh; '{}' for single-use codes, then CODES must cover 2 x CALLS x PER);
# HOLD=<ms> claims holds, USER_ID=<id> claims for a user. Needs valgrind, redis-cli, curl.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh

PER=${PER:-16} CALLS=${CALLS:-300} CODES=${CODES:-999} HOLD=${HOLD:-0} USER_ID=${USER_ID:-}
SKU_JSON=${SKU_JSON:-'{"max_issues":1000000,"max_uses":1000000}'}
if [ -z "${KAMIGATE_BIN:-}" ]; then
  cargo build --release --bin kamigate >&2
  KAMIGATE_BIN="${CARGO_TARGET_DIR:-target}/release/kamigate"
fi
[ $# -gt 0 ] || set -- lua
ADMIN=admin-token-script-ir-0001
MERCHANT=merchant-token-script-ir

# The library of directory $1: its prelude, then every script a function `kgbench_<name>`.
library() {
  python3 - "$1" <<'PY'
import os, sys
d = sys.argv[1]
out = ['#!lua name=kgbench\n', open(os.path.join(d, 'prelude.lua')).read(), '\n']
for f in sorted(os.listdir(d)):
    if f.endswith('.lua') and f != 'prelude.lua':
        out.append("redis.register_function('kgbench_%s', function(KEYS, ARGV)\nbegin(KEYS, ARGV)\n%s\nend)\n"
                   % (f[:-4], open(os.path.join(d, f)).read()))
sys.stdout.write(''.join(out))
PY
}

# CALLS FCALLs of PER new orders each, order ids starting with $1, as redis-cli input, for
# the scripts of lua dir $2 (whose calls end with a deadline, an hour on, as a gateway's do, if
# its prelude's begin takes one).
calls() {
  local deadline=0
  grep -q 'function begin(keys, argv)' "$2/prelude.lua" && deadline=1
  python3 - "$1" "$PER" "$CALLS" "$HOLD" "$USER_ID" "$(($(date +%s) * 1000))" "$deadline" <<'PY'
import sys
prefix, per, calls, hold, user, now = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6])
deadline = sys.argv[7] == '1'
parts = 'meta avail keys codes idx orders holds users redemptions counts events pools settled retired'
keys = ['kg:{ir}:' + p for p in parts.split()]
n = 0
for c in range(calls):
    args = [str(now + c)]
    for _ in range(per):
        n += 1
        args += ['%s-%d' % (prefix, n), '1', user or '""', hold, 'default', '1']
    if deadline:
        args.append(str(now + 3600000))
    print('FCALL kgbench_claims_batch', len(keys), *keys, *args)
PY
}

# Inclusive instructions of function $1 (a name, or 0x… for a static one) in tree file $2.
inclusive() {
  grep -m1 -F "*  ???:$1 [" "$2" | awk '{ gsub(",", "", $1); print $1 }'
}

# one <lua dir>
one() {
  local dir=$1 run rp public admin redis_pid pid out orders
  run=$(mktemp -d "$work/run.XXXX")
  rp=$(free_port); public=$(free_port); admin=$(free_port)
  out="$run/callgrind.out"
  valgrind --tool=callgrind --callgrind-out-file="$out" redis-server --port "$rp" \
    --bind 127.0.0.1 --save "" --appendonly no --dir "$run" >"$run/redis.log" 2>&1 &
  redis_pid=$!; pids+=("$redis_pid")
  for _ in $(seq 300); do redis-cli -p "$rp" ping >/dev/null 2>&1 && break; sleep 0.1; done
  {
    echo "listen = \"127.0.0.1:$public\""
    echo "admin_listen = \"127.0.0.1:$admin\""
    echo "data_dir = \"$run/data\""
    echo "admin_token = \"$ADMIN\""
    echo "merchant_token = \"$MERCHANT\""
    echo "shutdown_delay_ms = 0"
    echo "redis_url = \"redis://127.0.0.1:$rp/1\""
  } >"$run/kamigate.toml"
  RUST_LOG=warn "$KAMIGATE_BIN" serve --config "$run/kamigate.toml" >"$run/log" 2>&1 &
  pid=$!; pids+=("$pid")
  for _ in $(seq 600); do curl -fs -o /dev/null "http://127.0.0.1:$admin/readyz" && break; sleep 0.1; done
  curl -fs -X PUT "http://127.0.0.1:$admin/v1/skus/ir" -H "Authorization: Bearer $ADMIN" \
    -d "$SKU_JSON" >/dev/null
  seq 0 "$CODES" | sed 's/^/ir-/' | curl -fs -X POST \
    "http://127.0.0.1:$admin/v1/skus/ir/batches?batch_id=b1" -H "Authorization: Bearer $ADMIN" \
    -H 'content-type: text/plain' --data-binary @- >/dev/null
  caught_up "http://127.0.0.1:$public/v1/skus/ir" "$MERCHANT"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  library "$dir" | redis-cli -p "$rp" -x FUNCTION LOAD REPLACE >/dev/null
  # The first round warms up: the library's first calls, the hashes' growth.
  calls warm "$dir" | redis-cli -p "$rp" -n 1 >"$run/warm.out"
  callgrind_control -z "$redis_pid" >/dev/null 2>&1
  calls run "$dir" | redis-cli -p "$rp" -n 1 >"$run/run.out"
  callgrind_control -d "$redis_pid" >/dev/null 2>&1
  kill "$redis_pid"; wait "$redis_pid" 2>/dev/null || true
  if grep -q '^ERR\|^WRONGTYPE\|sold_out' "$run/run.out"; then
    echo "$dir: calls failed or sold out (see CODES):" >&2; grep -m3 '^ERR\|^WRONGTYPE\|sold_out' "$run/run.out" >&2
    return 1
  fi
  callgrind_annotate --tree=calling --inclusive=yes "$out.1" >"$run/tree" 2>/dev/null
  orders=$((CALLS * PER))
  printf '%-40s fcall %8.0f  redis.call %7.0f  commands %7.0f  reply %7.0f  Ir/order\n' "$dir" \
    "$(echo "$(inclusive fcallCommand "$run/tree") / $orders" | bc -l)" \
    "$(echo "$(inclusive 0x0000000000142a90 "$run/tree") / $orders" | bc -l)" \
    "$(echo "$(inclusive scriptCall "$run/tree") / $orders" | bc -l)" \
    "$(echo "$(inclusive 0x0000000000143530 "$run/tree") / $orders" | bc -l)"
}

echo "claims_batch under callgrind: $CALLS calls of $PER orders, SKU $SKU_JSON, hold $HOLD ms, user '${USER_ID}'"
for dir in "$@"; do one "$dir"; done
