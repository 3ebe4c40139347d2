#!/usr/bin/env bash
# How much of the admitted p99 under a 3x overload is the overload's first queue: on one server,
# pinned apart from the load generator, warm-up, 1,000 Recommend/s, then 3x twice back to back
# (the second starts with the admission limit already cut), 1,000/s for 10 s, and 3x again.
#   RATE=7000 scripts/bench-overload-twice.sh [WORKDIR]   # WORKDIR as bench-serving-robustness.sh
# RATE: the 3x rate (three times the closed-loop capacity that script reports); SERVER_CPUS and
# LOAD_CPUS (default 0 and 1); TWOTOWER_BIN; OUT (default /tmp/overload-twice) gets one JSON report
# per run and prints a line for each.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=${TWOTOWER_BIN:-target/release/twotower}
work=${1:-/tmp/b1m}
w=$work/w
out=${OUT:-/tmp/overload-twice}
rate=${RATE:?set RATE to three times the closed-loop capacity}
addr=127.0.0.1:50072
mkdir -p "$out"
: >"$out/serve.toml"
rm -f "$work/twice-events.log"
taskset -c "${SERVER_CPUS:-0}" "$bin" serve --model "$w/model" --index "$w/index" --data "$w/data" \
  --addr "$addr" --metrics-addr 127.0.0.1:9482 --event-log "$work/twice-events.log" \
  --config "$out/serve.toml" >/dev/null 2>"$out/serve.log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -f "$work/twice-events.log"' EXIT
until "$bin" health --addr "http://$addr" >/dev/null 2>&1; do
  kill -0 "$pid" 2>/dev/null || { echo "server died: $(tail -3 "$out/serve.log")" >&2; exit 1; }
  sleep 0.1
done
run() { # NAME ARGS...
  local name=$1
  shift
  taskset -c "${LOAD_CPUS:-1}" "$bin" bench serve --addr "http://$addr" --users-from "$w/data" \
    --recorders 0 --out "$out/$name.json" "$@" >/dev/null
  python3 - "$out/$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]}: {r['qps']:.0f}/s p50 {r['p50_ms']:.2f} p90 {r['p90_ms']:.2f} p99 {r['p99_ms']:.2f} max {r['max_ms']:.1f} ms, refused {r['refused']}, errors {r['errors']}, generator late p99 {r.get('send_late_p99_ms', float('nan')):.2f} ms")
PY
}
run warmup --concurrency 32 --duration 20
run normal --rate 1000 --duration 20
run overload-first --rate "$rate" --duration 20
run overload-second --rate "$rate" --duration 20
run normal-again --rate 1000 --duration 10
run overload-after-pause --rate "$rate" --duration 20
