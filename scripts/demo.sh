#!/usr/bin/env bash
# The main job end to end on the built-in default data (ml-100k). Called by `make demo` after
# set-up and a release build:
#   1. the ml-100k pipeline (prepare → train → index; a rerun skips finished stages),
#   2. the server on loopback,
#   3. recommendations for three users, next to the titles they watched last,
#   4. the health check,
#   5. a clean stop (SIGTERM: drain, flush the event log).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=${TWOTOWER_BIN:-${CARGO_TARGET_DIR:-target}/release/twotower}
work=${TWOTOWER_WORKDIR:-work/ml-100k}
pipeline=pipelines/ml-100k.toml
port=${TWOTOWER_PORT:-50051}
metrics_port=${TWOTOWER_METRICS_PORT:-9464}
url="http://127.0.0.1:$port"

stage() { printf '\n== %s\n' "$*"; }
t0=$SECONDS

stage "pipeline $pipeline into $work (training takes about 9 minutes on 2 cores the first time)"
"$bin" pipeline run "$pipeline" --workdir "$work"
t_pipeline=$(( SECONDS - t0 ))

stage "serve on $url (metrics on http://127.0.0.1:$metrics_port/metrics)"
t1=$SECONDS
"$bin" pipeline serve "$pipeline" --workdir "$work" -- \
  --addr "127.0.0.1:$port" --metrics-addr "127.0.0.1:$metrics_port" >"$work/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
until "$bin" health --addr "$url" >/dev/null 2>&1; do
  if ! kill -0 "$server" 2>/dev/null; then
    echo "the server exited; its log:" >&2; cat "$work/server.log" >&2; exit 1
  fi
  sleep 0.5
done
echo "   serving after $(( SECONDS - t1 )) s (log: $work/server.log)"

t2=$SECONDS
for user in 1 2 3; do
  stage "user $user"
  "$bin" recommend --addr "$url" --user "$user" -k 10 --history-from "$work/data" --history 5
done
t_recommend=$(( SECONDS - t2 ))

stage "health check"
"$bin" health --addr "$url"

stage "stop the server (SIGTERM)"
kill -TERM "$server"
wait "$server" && echo "   stopped cleanly" || { echo "   exit status $?" >&2; exit 1; }
trap - EXIT

stage "timings"
echo "   pipeline ${t_pipeline} s, serving start-up and recommendations $(( SECONDS - t1 )) s (recommend calls ${t_recommend} s), total $(( SECONDS - t0 )) s"
echo "   model, metrics and training_curves.png in $work/model; index versions in $work/index"
