#!/usr/bin/env bash
# Quality sweep of training settings on ml-100k, run concurrently on a lent GPU (the `device`
# tool): each variant is `pipelines/ml-100k.toml` with a few settings changed. GPU kernels are
# not bit-identical to CPU ones, so a winner here is re-measured on CPU before it becomes a
# default (docs/benchmarks.md).
#
# Here, first:
#   make build-release && strip -o work/gpu/twotower target/release/twotower
#   target/release/twotower prepare --dataset ml-100k --out work/gpu/data
#   target/release/twotower prepare --dataset ml-100k --ties source --out work/gpu/data-src
#   target/release/twotower prepare --dataset ml-100k --ties source --min-count 1 --out work/gpu/data-src-mc1
# Then: run(command="scripts/gpu-sweep-ml100k.sh", carry=["work/gpu"], timeout_s=420)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=work/gpu/twotower
out=${OUT:-/tmp}
base=pipelines/ml-100k.toml
sweep=/tmp/sweep
source scripts/lib/sweep.sh

# Ties broken by item id (the default) against the source order (RecBole's protocol).
variant base-itemid work/gpu/data "" ""
d=work/gpu/data-src
variant base "$d" "" ""
variant seed2 "$d" "seed = 2" ""
variant negs1024 "$d" "extra_negatives = 1024" ""
variant wide "$d" "" "dim = 128;token_dim = 128;item_hidden = [512];user_hidden = [512];gru_hidden = 256"
variant reg "$d" "weight_decay = 0.001" "dropout = 0.2"
variant mincount1 work/gpu/data-src-mc1 "" ""
variant hist50 "$d" "" "history_len = 50"
variant temp10 "$d" "" "temperature = 0.1;learn_temperature = false"
variant lr4 "$d" "lr = 0.004;batch_size = 512;extra_negatives = 512" ""
variant nonegs "$d" "extra_negatives = 0" ""
wait
summarise "$out/sweep.json"
