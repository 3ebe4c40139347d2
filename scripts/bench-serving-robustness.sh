#!/usr/bin/env bash
# Serving under overload, a soak, and event-log restarts after many recorded events, on the
# 1M-item index of pipelines/synthetic-1m.toml. Writes JSON reports and a summary to $OUT
# (default /tmp/robustness). Release build first (make build-release). About 30 minutes:
#   scripts/bench-serving-robustness.sh [WORKDIR]          # WORKDIR default /tmp/b1m (reused)
# Environment: SOAK_S (default 600), EVENTS (total recorded events for the restart test,
# default 10000000), SKIP_SOAK=1, SKIP_RESTART=1; SERVER_CPUS and LOAD_CPUS (taskset lists, e.g.
# 0 and 1) pin the server and the load generator apart, so that the generator's own scheduling
# does not count as server latency; NORMAL_RATE (default 2000) is the "normal" open-loop rate;
# MAX_IN_FLIGHT and ADMISSION_TARGET_MS (ms, or auto) set the server's admission control (docs/operations.md)
# for every run but the unlimited one; EXTRA_CONFIG holds more serving-config lines for those runs
# (e.g. EXTRA_CONFIG='grpc_thread_nice = 10'); OVERLOAD_AGAIN=1 follows the 3x run on the same
# server with 3x again at once (the limit already cut), normal load for 10 s and 3x once more,
# which tells how much of the admitted p99 is the overload's first queue.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=${TWOTOWER_BIN:-target/release/twotower}
work=${1:-/tmp/b1m}
out=${OUT:-/tmp/robustness}
soak_s=${SOAK_S:-600}
events_total=${EVENTS:-10000000}
addr=127.0.0.1:50071
metrics=127.0.0.1:9481
mkdir -p "$out"
say() { echo "bench-serving-robustness: $*" >&2; }

# --- data, model and index (reused when present) ---------------------------------------------
if [ ! -f "$work/w/index/CURRENT" ]; then
  say "building the 1M-item data, model and index in $work/w (pipelines/synthetic-1m.toml)"
  "$bin" pipeline run pipelines/synthetic-1m.toml --workdir "$work/w" --device cpu >&2
fi
data=$work/w/data model=$work/w/model index=$work/w/index

server_pid=""
ready_s=""
start_server() { # CONFIG_FILE LOG_FILE -> sets server_pid, and ready_s (seconds to SERVING)
  local config=$1 log=$2 t0
  t0=$(date +%s.%N)
  ${SERVER_CPUS:+taskset -c "$SERVER_CPUS"} "$bin" serve --model "$model" --index "$index" --data "$data" --addr "$addr" \
    --metrics-addr "$metrics" --event-log "$work/events.log" --config "$config" >/dev/null 2>"$log" &
  server_pid=$!
  until "$bin" health --addr "http://$addr" >/dev/null 2>&1; do
    kill -0 "$server_pid" 2>/dev/null || { say "server died: $(tail -3 "$log")"; exit 1; }
    sleep 0.1
  done
  ready_s=$(python3 -c "import time; print(round(time.time() - $t0, 2))")
}
stop_server() {
  kill -TERM "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
}
rss_mib() { awk -v f="$2" '$1 == f":" { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }
bench() { # NAME ARGS... -> $out/NAME.json
  local name=$1
  shift
  ${LOAD_CPUS:+taskset -c "$LOAD_CPUS"} "$bin" bench serve --addr "http://$addr" --users-from "$data" --out "$out/$name.json" "$@" >/dev/null
  python3 - "$out/$name.json" "$name" <<'EOF' >&2
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]}: {r['qps']:.0f}/s p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} max {r['max_ms']:.1f} ms, refused {r['refused']}, errors {r['errors']}, events/s {r['events_per_sec']:.0f}")
EOF
}

default_cfg=$out/serve-default.toml
unlimited_cfg=$out/serve-unlimited.toml
nocompact_cfg=$out/serve-nocompact.toml
: >"$default_cfg"
[ -n "${MAX_IN_FLIGHT:-}" ] && echo "max_in_flight = $MAX_IN_FLIGHT" >>"$default_cfg"
case "${ADMISSION_TARGET_MS:-}" in
  "") ;;
  *[!0-9]*) echo "admission_target_ms = \"$ADMISSION_TARGET_MS\"" >>"$default_cfg" ;; # "auto"
  *) echo "admission_target_ms = $ADMISSION_TARGET_MS" >>"$default_cfg" ;;
esac
[ -n "${EXTRA_CONFIG:-}" ] && printf '%s\n' "$EXTRA_CONFIG" >>"$default_cfg"
printf 'max_in_flight = 1000000\nadmission_target_ms = 0\n' >"$unlimited_cfg"
echo "compact_log_bytes = 0" >"$nocompact_cfg"

# --- soak: Recommend at 1,000/s and 5,000 events/s; RSS, anonymous memory and seen items every 10 s
if [ "${SKIP_SOAK:-0}" != 1 ]; then
  rm -f "$work/events.log"
  start_server "$default_cfg" "$out/serve-soak.log"
  bench warmup-soak --concurrency 32 --duration 20 --recorders 0
  # refused: RESOURCE_EXHAUSTED answers so far, all RPCs; compactions: successful ones, so that a
  # stall can be placed in time and set beside a compaction.
  echo "seconds,rss_mib,anon_mib,seen_items,refused,compactions" >"$out/soak-rss.csv"
  bench soak --rate 1000 --duration "$soak_s" --recorders 2 --record-batch 100 --record-rate 5000 &
  load=$!
  t=0
  while kill -0 "$load" 2>/dev/null; do
    scrape=$(curl -s "http://$metrics/metrics" || true)
    seen=$(awk '$1 == "twotower_seen_items" { print $2 }' <<<"$scrape")
    refused=$(awk '/^twotower_requests_total\{/ && /RESOURCE_EXHAUSTED/ { n += $2 } END { print n + 0 }' <<<"$scrape")
    compactions=$(awk '/^twotower_event_log_compactions_total\{/ && /result="ok"/ { n += $2 } END { print n + 0 }' <<<"$scrape")
    echo "$t,$(rss_mib "$server_pid" VmRSS),$(rss_mib "$server_pid" RssAnon),${seen:-},$refused,$compactions" >>"$out/soak-rss.csv"
    sleep 10
    t=$((t + 10))
  done
  wait "$load"
  stop_server
fi

# --- restart after many recorded events: with and without compaction --------------------------
restart_json=$out/restart.json
if [ "${SKIP_RESTART:-0}" != 1 ]; then
  rm -f "$work/events.log"
  start_server "$nocompact_cfg" "$out/serve-fill.log"
  recorded=0
  while [ "$recorded" -lt "$events_total" ]; do
    "$bin" bench serve --addr "http://$addr" --users-from "$data" --rate 1 --duration 15 \
      --recorders 4 --record-batch 1000 --out "$out/fill.json" >/dev/null
    recorded=$((recorded + $(python3 -c "import json; print(json.load(open('$out/fill.json'))['events_recorded'])")))
    say "recorded $recorded events"
  done
  stop_server
  log_bytes=$(stat -c %s "$work/events.log")
  cp "$work/events.log" "$work/events.full.log"
  start_server "$nocompact_cfg" "$out/serve-restart-full.log"
  s_full=$ready_s
  rss_full=$(rss_mib "$server_pid" VmHWM)
  stop_server
  start_server "$default_cfg" "$out/serve-restart-compacting.log"
  s_compacting=$ready_s
  rss_compacting=$(rss_mib "$server_pid" VmHWM)
  stop_server
  compacted_bytes=$(stat -c %s "$work/events.log")
  start_server "$default_cfg" "$out/serve-restart-compacted.log"
  s_compacted=$ready_s
  rss_compacted=$(rss_mib "$server_pid" VmHWM)
  stop_server
  cat >"$restart_json" <<EOF
{"events_recorded": $recorded, "log_bytes": $log_bytes, "compacted_bytes": $compacted_bytes,
 "restart_full_log": {"seconds_to_serving": $s_full, "peak_rss_mib": $rss_full},
 "restart_compacting": {"seconds_to_serving": $s_compacting, "peak_rss_mib": $rss_compacting},
 "restart_compacted": {"seconds_to_serving": $s_compacted, "peak_rss_mib": $rss_compacted}}
EOF
  cat "$restart_json" >&2
fi

# --- overload ----------------------------------------------------------------------------------
# Capacity is the closed loop of a server without an admission limit: with a limit below the
# callers, a closed loop measures the limit's refusals, not what the server can answer.
rm -f "$work/events.log"
start_server "$unlimited_cfg" "$out/serve-unlimited.log"
bench warmup-unlimited --concurrency 32 --duration 20 --recorders 0
bench closed --concurrency 32 --duration 20 --recorders 0
capacity=$(python3 -c "import json; print(int(json.load(open('$out/closed.json'))['qps']))")
bench overload-3x-unlimited --rate $((3 * capacity)) --duration 20 --recorders 0
unlimited_rss=$(rss_mib "$server_pid" VmHWM)
stop_server
rm -f "$work/events.log"
start_server "$default_cfg" "$out/serve-overload.log"
bench warmup --concurrency 32 --duration 20 --recorders 0
bench normal --rate "${NORMAL_RATE:-2000}" --duration 20 --recorders 0
bench overload-3x --rate $((3 * capacity)) --duration 20 --recorders 0
if [ "${OVERLOAD_AGAIN:-0}" = 1 ]; then
  bench overload-3x-again --rate $((3 * capacity)) --duration 20 --recorders 0
  bench normal-again --rate "${NORMAL_RATE:-2000}" --duration 10 --recorders 0
  bench overload-3x-after-normal --rate $((3 * capacity)) --duration 20 --recorders 0
fi
overload_rss=$(rss_mib "$server_pid" VmHWM)
stop_server
rm -f "$work/events.log"

python3 - "$out" "$overload_rss" "$unlimited_rss" <<'EOF' | tee "$out/summary.md"
import csv, json, os, sys
out, rss_limited, rss_unlimited = sys.argv[1], sys.argv[2], sys.argv[3]
r = lambda n: json.load(open(os.path.join(out, n + ".json")))
normal, closed, lim, unl = r("normal"), r("closed"), r("overload-3x"), r("overload-3x-unlimited")
print("| run | offered | admitted/s | p50 ms | p99 ms | refused | errors | server peak RSS MiB |")
print("|---|---|---|---|---|---|---|---|")
print(f"| closed loop, 32 callers, no limit (capacity) | | {closed['qps']:.0f} | {closed['p50_ms']:.2f} | {closed['p99_ms']:.2f} | {closed['refused']} | {closed['errors']} | |")
print(f"| normal: open loop | {normal['mode'].split(', ')[1]} | {normal['qps']:.0f} | {normal['p50_ms']:.2f} | {normal['p99_ms']:.2f} | {normal['refused']} | {normal['errors']} | |")
for name, x, rss in [(f"3x capacity, max_in_flight {os.environ.get('MAX_IN_FLIGHT', '64 (default)')}, admission_target_ms {os.environ.get('ADMISSION_TARGET_MS', 'auto (default)')}", lim, rss_limited), ("3x capacity, no limit (as before)", unl, rss_unlimited)]:
    print(f"| {name} | {lim['mode'].split(', ')[1]} | {x['qps']:.0f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {x['refused']} | {x['errors']} | {rss} |")
if os.environ.get("EXTRA_CONFIG"):
    print(f"\nserving config beside the limit: {os.environ['EXTRA_CONFIG']}")
print(f"\nadmitted p99 under 3x overload / normal p99: {lim['p99_ms'] / normal['p99_ms']:.2f}x (goal <= 2x)")
cpu = lambda x: f"{x.get('client_cpu_percent', float('nan')):.0f}%"
late = lambda x: f"{x.get('send_late_p99_ms', float('nan')):.2f} ms"
print(f"load generator CPU (% of one core, of {normal.get('client_cores', '?')}): normal {cpu(normal)}, 3x {cpu(lim)}, 3x without a limit {cpu(unl)}; "
      f"p99 of its sends' lateness: normal {late(normal)}, 3x {late(lim)}")
soak = os.path.join(out, "soak.json")
if os.path.exists(soak):
    s = json.load(open(soak))
    rows = list(csv.DictReader(open(os.path.join(out, "soak-rss.csv"))))
    after_warmup = [int(x["rss_mib"]) for x in rows if int(x["seconds"]) >= 60]
    drift = (after_warmup[-1] - after_warmup[0]) / after_warmup[0] if after_warmup else float("nan")
    print(f"\nsoak {s['duration_s']:.0f} s: {s['qps']:.0f} Recommend/s p99 {s['p99_ms']:.2f} ms, {s['events_per_sec']:.0f} events/s, "
          f"refused {s['refused']}, errors {s['errors']}, record refused {s.get('record_refused', 0)}, record errors {s['record_errors']}; "
          f"RSS {after_warmup[0] if after_warmup else '?'} -> {after_warmup[-1] if after_warmup else '?'} MiB after warm-up (drift {drift * 100:.1f}%, max {max(after_warmup) if after_warmup else '?'} MiB)")
    seen = [(int(x["seconds"]), float(x["seen_items"]), int(x["anon_mib"])) for x in rows if x.get("seen_items") and int(x["seconds"]) >= 60]
    if len(seen) > 1:
        (_, s0, a0), (_, s1, a1) = seen[0], seen[-1]
        print(f"seen items {s0:.0f} -> {s1:.0f} after warm-up (+{(s1 - s0) * 8 / 2**20:.1f} MiB at 8 bytes each); "
              f"anonymous memory {a0} -> {a1} MiB (+{a1 - a0}): {(a1 - a0) * 2**20 / max(s1 - s0, 1):.1f} bytes per new seen item")
EOF
