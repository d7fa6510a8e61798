#!/usr/bin/env bash
# Import benchmark: N codes through `kamigate import` into the SQLite and the PostgreSQL
# ledger, warmed into a scratch redis-server; prints wall time and peak RSS of each run.
# Usage: benches/import.sh [N ...]   (default: 10000 1000000)
# KAMIGATE_BINS="a b": compare binaries, each size and ledger imported by each in turn (the
# default is a release build of this tree). Only figures of one run compare on a shared box.
# Needs: redis-server, a PostgreSQL server on 127.0.0.1:5432 (trust auth), GNU time.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${KAMIGATE_BINS:-}" ]; then
  cargo build --release --quiet
  KAMIGATE_BINS=target/release/kamigate
fi
read -r -a bins <<< "$KAMIGATE_BINS"
work=$(mktemp -d)
redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  --daemonize yes --pidfile "$work/redis.pid" --logfile "$work/redis.log"
cleanup() { kill "$(cat "$work/redis.pid")" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
export KAMIGATE_REDIS_URL="redis://127.0.0.1:$redis_port" RUST_LOG=warn
export KAMIGATE_ADMIN_TOKEN=bench-admin-token-000001 KAMIGATE_MERCHANT_TOKEN=bench-merchant-token-0001

create_sku() { # $1 = database url or empty, $2 = sku, $3 = binary, $4 = data dir
  local public admin pid bin=$3
  public=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  admin=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  KAMIGATE_DATABASE_URL="$1" KAMIGATE_DATA_DIR="$4" KAMIGATE_LISTEN="127.0.0.1:$public" \
    KAMIGATE_ADMIN_LISTEN="127.0.0.1:$admin" "$bin" serve 2>/dev/null &
  pid=$!
  for _ in $(seq 100); do curl -sf "127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.1; done
  curl -sf -X PUT "127.0.0.1:$admin/v1/skus/$2" -H "Authorization: Bearer $KAMIGATE_ADMIN_TOKEN" -d '{}' >/dev/null
  kill "$pid"; wait "$pid" || true
}

sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(10000 1000000)
for n in "${sizes[@]}"; do
  "${bins[0]}" gen --count "$n" --length 16 --group 4 > "$work/codes-$n.txt"
  for ledger in sqlite postgres; do
    for i in "${!bins[@]}"; do
      bin=${bins[$i]}
      data="$work/data-$n-$i"
      url=""
      if [ "$ledger" = postgres ]; then
        db="kg_bench_${n}_$i"
        PGOPTIONS=--client-min-messages=warning psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
        url="postgres://postgres@127.0.0.1:5432/$db"
      fi
      sku="bench-$ledger-$n-$i"
      create_sku "$url" "$sku" "$bin" "$data"
      /usr/bin/time -f "%e s wall, %M KiB peak RSS" -o "$work/time" \
        env KAMIGATE_DATABASE_URL="$url" KAMIGATE_DATA_DIR="$data" \
        "$bin" import "$work/codes-$n.txt" --sku "$sku" --batch b1 > "$work/out"
      echo "$bin: $ledger $n codes: $(head -1 "$work/out") — $(cat "$work/time")"
      if [ "$ledger" = postgres ]; then
        PGOPTIONS=--client-min-messages=warning psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $db"
      fi
    done
  done
done
