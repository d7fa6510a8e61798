#!/usr/bin/env bash
# Instructions of whole claims and redemptions through `kamigate serve` (embedded engine,
# SQLite ledger, default durability) under callgrind, and the share of them that the crypto of
# codes at rest takes: `Keyring::open` (a claim opens the code it hands out) and
# `Keyring::digest` (a redemption keys its code's digest; twice without `sku`).
#
#   benches/at_rest_cpu.sh [N]    N claims, then N redemptions without `sku` (default 300)
#
# Counters are zeroed before each phase and dumped after it once the ledger has every event
# (`callgrind_control`), so a phase holds everything the gateway did for it: HTTP, limits,
# the engine's Lua, the event writer and the ledger's commits. Instruction counts do not
# depend on the machine's load, unlike rates. Needs valgrind, curl and python3;
# KAMIGATE_BIN picks the binary (default: a release build of this tree).
set -euo pipefail

N=${1:-300}
cd "$(dirname "$0")/.."
if [ -z "${KAMIGATE_BIN:-}" ]; then
  cargo build --release --bin kamigate >&2
  KAMIGATE_BIN="${CARGO_TARGET_DIR:-target}/release/kamigate"
fi
ADMIN=bench-admin-token-0000000001
MERCHANT=bench-merchant-token-00000001
work=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
public=$(free_port)
admin=$(free_port)
{
  echo "listen = \"127.0.0.1:$public\""
  echo "admin_listen = \"127.0.0.1:$admin\""
  echo "data_dir = \"$work/data\""
  echo "admin_token = \"$ADMIN\""
  echo "merchant_token = \"$MERCHANT\""
  echo "shutdown_delay_ms = 0"
  echo "[limits.public]"; echo "per_second = 10000000"; echo "burst = 10000000"
  echo "[limits.merchant]"; echo "per_second = 10000000"; echo "burst = 10000000"
  echo "[limits.failed_redemptions]"; echo "max_failures = 10000000"
} >"$work/kamigate.toml"

RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
  "$KAMIGATE_BIN" serve --config "$work/kamigate.toml" >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 600); do
  curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null || { cat "$work/log" >&2; exit 1; }

# One phase of requests: python3 drives them over one kept-alive connection each listener.
drive() {
  python3 - "$1" "$N" "$public" "$admin" "$ADMIN" "$MERCHANT" "$work/codes" <<'PY'
import http.client, json, random, sys, time
phase, n, public, admin, admin_token, merchant_token, codes_file = sys.argv[1:]
n = int(n)
pub = http.client.HTTPConnection("127.0.0.1", int(public))
adm = http.client.HTTPConnection("127.0.0.1", int(admin))
def call(conn, method, path, body, token=None, ctype="application/json"):
    headers = {"content-type": ctype}
    if token:
        headers["authorization"] = "Bearer " + token
    conn.request(method, path, body=body, headers=headers)
    reply = conn.getresponse()
    data = reply.read()
    if reply.status >= 300:
        sys.exit(f"{method} {path}: {reply.status} {data[:200]!r}")
    return json.loads(data)
def settled():
    while True:
        view = call(pub, "GET", "/v1/skus/bench", None, merchant_token)
        if view["in_flight"] == 0:
            return
        time.sleep(0.2)
if phase == "stock":
    call(adm, "PUT", "/v1/skus/bench", b"{}", admin_token)
    rng = random.Random(7)
    codes = ["%016d" % rng.randrange(10**15, 10**16) for _ in range(n)]
    call(adm, "POST", "/v1/skus/bench/batches?batch_id=b1", "\n".join(codes).encode(),
         admin_token, "text/plain")
    settled()
elif phase == "claims":
    sold = []
    for i in range(n):
        body = json.dumps({"order_id": f"o-{i}", "quantity": 1}).encode()
        sold.append(call(pub, "POST", "/v1/skus/bench/claims", body, merchant_token)["keys"][0]["code"])
    open(codes_file, "w").write("\n".join(sold))
    settled()
elif phase == "redemptions":
    for i, code in enumerate(open(codes_file).read().split("\n")):
        body = json.dumps({"code": code, "redeemer": f"u-{i}"}).encode()
        call(pub, "POST", "/v1/redeem", body)
    settled()
PY
}

drive stock
# The gateway's own sync (every 5 s) warms the new batch once more, opening and digesting
# each code for the global index: let it pass before anything is counted, so the phases hold
# only what their requests cost.
sleep 15
longest=0
for phase in claims redemptions; do
  callgrind_control -z "$pid" >/dev/null
  start=$(date +%s.%N)
  drive "$phase"
  callgrind_control -d "$phase" "$pid" >/dev/null
  took=$(python3 -c "print($(date +%s.%N) - $start)")
  echo "$phase $took" >>"$work/durations"
  longest=$(python3 -c "print(max($longest, $took))")
done
# What the gateway does meanwhile on its own (timers, sweeps, the writer's polls), slowed
# down under callgrind as the requests are: the rate of an idle phase as long as the longest.
callgrind_control -z "$pid" >/dev/null
start=$(date +%s.%N)
sleep "$longest"
callgrind_control -d idle "$pid" >/dev/null
echo "idle $(python3 -c "print($(date +%s.%N) - $start)")" >>"$work/durations"

# The dumps: cg.out.<n>, one per phase. Inclusive instructions of the crypto functions
# against the phase's total, and against the total less the idle rate over the phase's time
# (the requests' own work: the larger, so the more severe, share).
python3 - "$N" "$work" <<'PY'
import glob, re, subprocess, sys
n, work = int(sys.argv[1]), sys.argv[2]
took = dict((line.split()[0], float(line.split()[1])) for line in open(work + "/durations"))
phases = {}
for dump in glob.glob(work + "/cg.out.*"):
    name = re.search(r"^desc: Trigger: dump (\w+)", open(dump, errors="replace").read(), re.M)
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", dump],
                         capture_output=True, text=True).stdout
    total = int(re.search(r"^([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", out, re.M)[1].replace(",", ""))
    def inclusive(fn):
        # A function is listed once per source file of code inlined into it: sum them.
        rows = re.findall(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+\S*:" + re.escape(fn) + r"\s", out, re.M)
        return sum(int(r.replace(",", "")) for r in rows)
    phases[name[1]] = (total, inclusive("kamigate::secrets::Keyring::open"),
                       inclusive("kamigate::secrets::Keyring::digest"))
idle_rate = phases["idle"][0] / took["idle"]
print(f"idle: {idle_rate:,.0f} instructions a second (callgrind time)")
for phase in ("claims", "redemptions"):
    total, open_, digest = phases[phase]
    own = total - idle_rate * took[phase]
    crypto = open_ + digest
    print(f"{phase}: {total / n:,.0f} instructions each ({own / n:,.0f} less idle); "
          f"Keyring::open {open_ / n:,.0f}, Keyring::digest {digest / n:,.0f} each; "
          f"crypto share {100 * crypto / total:.2f} % ({100 * crypto / own:.2f} % less idle)")
PY
