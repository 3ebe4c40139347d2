#!/usr/bin/env bash
# What the second stage (co-occurrence re-rank, docs/architecture.md) costs a Recommend: the
# same model and index served with and without it, on the workdir of a pipeline whose model has
# one (pipelines/complete-journey.toml):
#   scripts/bench-second-stage.sh WORKDIR        # e.g. /tmp/cjp/w from `pipeline run --workdir`
# For each: a closed loop (CONCURRENCY callers, default 8) and an open loop at RATE/s (default
# 500), DURATION s each (default 20), Recommend only. SERVER_CPUS / LOAD_CPUS (taskset lists)
# pin the server and the load generator apart. Writes JSON reports and summary.md to $OUT
# (default /tmp/second-stage).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=${TWOTOWER_BIN:-target/release/twotower}
work=${1:?usage: scripts/bench-second-stage.sh WORKDIR}
out=${OUT:-/tmp/second-stage}
duration=${DURATION:-20}
concurrency=${CONCURRENCY:-8}
rate=${RATE:-500}
addr=127.0.0.1:50072
mkdir -p "$out"
say() { echo "bench-second-stage: $*" >&2; }

data=$work/data index=$work/index
python3 -c "import json,sys; sys.exit(0 if json.load(open('$work/model/model.json')).get('rerank') else 1)" ||
  { say "$work/model has no second stage (model.json has no rerank)"; exit 1; }
# The same towers without the second stage: a copy whose model.json has no `rerank`.
rm -rf "$out/towers"
cp -r "$work/model" "$out/towers"
python3 - "$out/towers/model.json" <<'EOF'
import json, sys
info = json.load(open(sys.argv[1]))
del info["rerank"]
json.dump(info, open(sys.argv[1], "w"), indent=2)
EOF

echo "| model | closed loop ($concurrency callers) Recommend/s | p50 ms | p99 ms | open loop $rate/s p50 ms | p99 ms | errors |" >"$out/summary.md"
echo "|---|---|---|---|---|---|---|" >>"$out/summary.md"
for variant in two-stages towers; do
  model=$work/model
  [ "$variant" = towers ] && model=$out/towers
  ${SERVER_CPUS:+taskset -c "$SERVER_CPUS"} "$bin" serve --model "$model" --index "$index" --data "$data" \
    --addr "$addr" --no-metrics >/dev/null 2>"$out/serve-$variant.log" &
  pid=$!
  until "$bin" health --addr "http://$addr" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { say "server died: $(tail -3 "$out/serve-$variant.log")"; exit 1; }
    sleep 0.2
  done
  load() { ${LOAD_CPUS:+taskset -c "$LOAD_CPUS"} "$bin" bench serve --addr "http://$addr" --users-from "$data" \
    --recorders 0 --inline-fraction 0 --duration "$duration" "$@" >/dev/null; }
  load --concurrency "$concurrency" --out "$out/$variant-warmup.json"
  load --concurrency "$concurrency" --out "$out/$variant-closed.json"
  load --rate "$rate" --out "$out/$variant-open.json"
  kill -TERM "$pid"
  wait "$pid" || true
  python3 - "$out" "$variant" <<'EOF' >>"$out/summary.md"
import json, sys
out, v = sys.argv[1:]
c = json.load(open(f"{out}/{v}-closed.json"))
o = json.load(open(f"{out}/{v}-open.json"))
print(f"| {v} | {c['qps']:,.0f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} | {o['p50_ms']:.2f} | {o['p99_ms']:.2f} | {c['errors'] + o['errors']} |")
EOF
  say "$variant done"
done
cat "$out/summary.md"
