# Shared by the bench scripts (sourced): a work dir removed on exit, the processes started
# into `pids` stopped on exit, a free loopback port, wrk required, and a wait for the ledger
# to catch up.
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
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
