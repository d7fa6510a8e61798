#!/usr/bin/env bash
# Redis's instructions per read of the ledger writer, under callgrind, for the scripts of
# one or more `lua/` directories (this tree's, or another commit's: `git archive <commit>
# lua | tar -x -C <dir>`, then pass <dir>/lua).
#
#   benches/stream_ir.sh [lua dir ...]    (default: lua/)
#
# A busy writer's read, as a durable sale makes them: PER new entries (default 13, a durable
# commit's usual size) are added to a SKU's stream, then the read a gateway sends beside a
# commit (`stream.lua` 'read' with no sources, carrying the acknowledgements of the PER
# entries read last, then `XREADGROUP` of the new ones). One `redis-server` runs under
# callgrind; each directory's prelude and scripts are loaded as a library of their own; for
# each, 20 reads warm up and READS (default 500) are counted. Printed per read: the whole
# server (the XADDs and XREADGROUP included, the same for every directory) and `FCALL` of
# `stream.lua` alone. Instruction counts do not depend on the machine's load, unlike rates.
# Needs valgrind and redis-cli.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh

PER=${PER:-13} READS=${READS:-500}
[ $# -gt 0 ] || set -- lua

# The library of directory $1 under the name $2: its prelude, then every script a function.
library() {
  python3 - "$1" "$2" <<'PY'
import os, sys
d, name = sys.argv[1], sys.argv[2]
out = ['#!lua name=%s\n' % name, open(os.path.join(d, 'prelude.lua')).read(), '\n']
for f in sorted(os.listdir(d)):
    if f.endswith('.lua') and f != 'prelude.lua':
        out.append("redis.register_function('%s_%s', function(KEYS, ARGV)\nbegin(KEYS, ARGV)\n%s\nend)\n"
                   % (name, f[:-4], open(os.path.join(d, f)).read()))
sys.stdout.write(''.join(out))
PY
}

# Reads $3..$4 (numbered) of library $1 on SKU $2 as redis-cli input; read n acknowledges
# the entries of read n-1. Each call ends with a deadline an hour on, as a gateway's do.
reads() {
  python3 - "$1" "$2" "$3" "$4" "$PER" "$(($(date +%s) * 1000 + 3600000))" <<'PY'
import sys
lib, sku, first, last, per, deadline = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
ev, dead, meta = ('kg:{%s}:%s' % (sku, k) for k in ('events', 'dead', 'meta'))
if first == 1:
    print('HSET', meta, 'gen', 'g1')
prev = ['%d-%d' % (first - 1, k) for k in range(per)] if first > 1 else []
for i in range(first, last + 1):
    ids = ['%d-%d' % (i, k) for k in range(per)]
    for id in ids:
        print('XADD', ev, id, 't', 'claim', 'at', '1796693521918', 'order', 'o-' + id, 'ids', '11441')
    acks = ['g1', *prev] if prev else []
    print('FCALL %s_stream 3 %s %s %s read ledger c1 500 30000 ""' % (lib, ev, dead, meta),
          *acks, deadline)
    print('XREADGROUP GROUP ledger c1 COUNT 500 STREAMS', ev, '>')
    prev = ids
PY
}

dir=$(mktemp -d "$work/ir.XXXX")
port=$(free_port)
valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" \
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
  >"$dir/valgrind.log" 2>&1 &
vg=$!; pids+=("$vg")
for _ in $(seq 200); do redis-cli -p "$port" PING >/dev/null 2>&1 && break; sleep 0.3; done

echo "stream.lua reads under callgrind: $READS reads of $PER new entries each, acknowledging the last ($(date -u '+%F %H:%M') UTC)"
printf '%-40s %14s %14s\n' "lua dir" "server Ir/read" "FCALL Ir/read"
n=0
for lua in "$@"; do
  n=$((n + 1)); lib=kgir$n sku=ir$n
  library "$lua" "$lib" | redis-cli -p "$port" -x FUNCTION LOAD >/dev/null
  reads "$lib" "$sku" 1 20 | redis-cli -p "$port" >/dev/null
  reads "$lib" "$sku" 21 $((20 + READS)) >"$dir/in"
  callgrind_control -z "$vg" >/dev/null 2>&1
  redis-cli -p "$port" <"$dir/in" >/dev/null
  callgrind_control -d "$vg" >/dev/null 2>&1
  dump=$(ls -t "$dir"/cg.out.* | head -1)
  for _ in $(seq 50); do [ -s "$dump" ] && break; sleep 0.2; done
  total=$(awk '/^(summary|totals):/ { print $2; exit }' "$dump")
  fcall=$(callgrind_annotate --inclusive=yes "$dump" 2>/dev/null |
    awk '/fcallCommand/ { gsub(",", "", $1); print $1; exit }')
  printf '%-40s %14.0f %14.0f\n' "$lua" "$((total / READS))" "$((fcall / READS))"
done
kill "$vg"; wait "$vg" 2>/dev/null || true
