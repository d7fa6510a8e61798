# Shared by the bench scripts (sourced): a work dir removed on exit, the processes started
# into `pids` stopped on exit, a free loopback port, wrk required, a wait for the ledger to
# catch up, the start of a scratch Redis and of a gateway stocked for the wrk scripts, and a
# SKU sold out on it.
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 1; }

work=$(mktemp -d)
pids=()
databases=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for db in "${databases[@]}"; do
    psql -q "$POSTGRES/postgres" -c "DROP DATABASE IF EXISTS $db" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits until the ledger has every event kamigate's engine wrote: the SKU view's `in_flight`
# is 0. With durability = "engine" answers do not wait for the writer, so a phase's CPU is
# counted up to here to include the writer's work it caused.
caught_up() { # <SKU view url> <merchant token>
  local body
  for _ in $(seq 600); do
    body=$(curl -fs "$1" -H "Authorization: Bearer $2") || true
    grep -q '"in_flight":0[,}]' <<<"$body" && return 0
    sleep 0.1
  done
  echo "the ledger never caught up: $body" >&2; return 1
}

# Starts a scratch redis-server (nothing persisted) with its files in <dir>, on a free port,
# and waits until it answers: sets redis_port and redis_pid (also added to `pids`).
start_redis() { # <dir>
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$1" \
    --daemonize no >"$1/redis.log" 2>&1 &
  redis_pid=$!; pids+=("$redis_pid")
  for _ in $(seq 200); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "redis-server on port $redis_port never answered" >&2; return 1
}

# The SKUs a gateway is stocked with: `sbs`, and with SKUS=N also `sbs1` … `sbs<N-1>`.
bench_skus() {
  echo sbs
  local i
  for i in $(seq 1 $((${SKUS:-1} - 1))); do echo "sbs$i"; done
}

# Starts a gateway as the benches run it: defaults, limits raised so they never trigger, the
# tokens $ADMIN and $MERCHANT, its data dir under <dir>; waits until it is ready and stocks
# SKU `sbs` with CODES codes that can each be issued and redeemed a million times, or as
# SKU_JSON sets (`{}`: single-use codes, a flash sale's stock; CODES must then outlast the
# run); with SKUS=N, N > 1, also SKUs `sbs1` … `sbs<N-1>` alike, for benches/wrk/claim.lua. Sets
# kg_pid (also added to `pids`), kg_public and kg_admin (base URLs). The ledger is SQLite in
# the data dir, or with POSTGRES set (a server's URL without a database, e.g.
# postgres://postgres@127.0.0.1:5432) a fresh database of that server, dropped on exit
# (ANALYZED=1: its events table analyzed while empty, see below).
start_kamigate() { # <binary> <dir> <durability> [redis url: none for the embedded engine]
  local bin=$1 dir=$2 durability=$3 redis_url=${4:-} public admin
  public=$(free_port); admin=$(free_port)
  local database=""
  if [ -n "${POSTGRES:-}" ]; then
    database=kg_bench_$$_$public
    psql -q "$POSTGRES/postgres" -c "CREATE DATABASE $database" >/dev/null
    databases+=("$database")
  fi
  {
    echo "listen = \"127.0.0.1:$public\""
    echo "admin_listen = \"127.0.0.1:$admin\""
    echo "data_dir = \"$dir/data\""
    echo "admin_token = \"$ADMIN\""
    echo "merchant_token = \"$MERCHANT\""
    echo "durability = \"$durability\""
    echo "shutdown_delay_ms = 0"
    [ -z "$redis_url" ] || echo "redis_url = \"$redis_url\""
    [ -z "$database" ] || echo "database_url = \"$POSTGRES/$database\""
    echo "[limits.public]"; echo "per_second = 10000000"; echo "burst = 10000000"
    echo "[limits.merchant]"; echo "per_second = 10000000"; echo "burst = 10000000"
    echo "[limits.failed_redemptions]"; echo "max_failures = 10000000"
  } >"$dir/kamigate.toml"
  RUST_LOG=warn "$bin" serve --config "$dir/kamigate.toml" >"$dir/log" 2>&1 &
  kg_pid=$!; pids+=("$kg_pid")
  kg_public="http://127.0.0.1:$public" kg_admin="http://127.0.0.1:$admin"
  local ready=0
  for _ in $(seq 200); do
    curl -fs -o /dev/null "$kg_admin/readyz" && { ready=1; break; }
    sleep 0.05
  done
  [ "$ready" = 1 ] || { echo "kamigate never became ready: see $dir/log" >&2; return 1; }
  local sku sku_json=${SKU_JSON:-'{"max_issues":1000000,"max_uses":1000000}'}
  for sku in $(bench_skus); do
    curl -fs -X PUT "$kg_admin/v1/skus/$sku" -H "Authorization: Bearer $ADMIN" \
      -d "$sku_json" >/dev/null
    seq 0 $((CODES - 1)) | sed "s/^/$sku-/" | curl -fs -X POST \
      "$kg_admin/v1/skus/$sku/batches?batch_id=b1" -H "Authorization: Bearer $ADMIN" \
      -H 'content-type: text/plain' --data-binary @- >/dev/null
  done
  # ANALYZED=1: the statistics of the fresh ledger's events table taken now, as autovacuum
  # takes them after a new ledger's first few dozen events.
  if [ -n "$database" ] && [ "${ANALYZED:-0}" = 1 ]; then
    psql -q "$POSTGRES/$database" -c "ANALYZE events"
  fi
}

# Creates SKU `gone` on the gateway started last, with one code, and claims it: every claim
# of it after that is a new order answered 409 ERR_SOLD_OUT.
sell_out() {
  curl -fs -X PUT "$kg_admin/v1/skus/gone" -H "Authorization: Bearer $ADMIN" \
    -d '{}' >/dev/null
  echo gone-0 | curl -fs -X POST "$kg_admin/v1/skus/gone/batches?batch_id=b1" \
    -H "Authorization: Bearer $ADMIN" -H 'content-type: text/plain' --data-binary @- >/dev/null
  curl -fs -X POST "$kg_public/v1/skus/gone/claims" \
    -H "Authorization: Bearer $MERCHANT" -d '{"order_id":"first"}' >/dev/null
}
