#!/usr/bin/env bash
# Closed- and open-loop A/B of serving settings on the 1M-item index of scripts/bench-serving-robustness.sh:
#   scripts/ab-serving-settings.sh BIN CONFIG.toml NAME     (CONFIG "" for the defaults; reports in /tmp/ab-NAME-*.json)
set -euo pipefail
bin=$1; cfg=$2; name=$3
w=/tmp/b1m/w
rm -f /tmp/ab-events.log
$bin serve --model $w/model --index $w/index --data $w/data --addr 127.0.0.1:50091 --metrics-addr 127.0.0.1:9491 --event-log /tmp/ab-events.log ${cfg:+--config $cfg} >/dev/null 2>/tmp/ab-$name.log &
pid=$!
until $bin health --addr http://127.0.0.1:50091 >/dev/null 2>&1; do sleep 0.2; done
$bin bench serve --addr http://127.0.0.1:50091 --users-from $w/data --concurrency 32 --duration 20 --recorders 0 >/dev/null
for run in 1 2; do
  $bin bench serve --addr http://127.0.0.1:50091 --users-from $w/data --concurrency 32 --duration 20 --recorders 0 --out /tmp/ab-$name-closed$run.json >/dev/null
  $bin bench serve --addr http://127.0.0.1:50091 --users-from $w/data --rate 2000 --duration 20 --recorders 0 --out /tmp/ab-$name-open$run.json >/dev/null
done
kill -TERM $pid; wait $pid || true
python3 - $name <<'PY'
import json,sys
n=sys.argv[1]
for k in ["closed1","open1","closed2","open2"]:
    r=json.load(open(f"/tmp/ab-{n}-{k}.json"))
    print(n,k,f"{r['qps']:.0f}/s p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} refused {r.get('refused','-')} errors {r['errors']}")
PY
