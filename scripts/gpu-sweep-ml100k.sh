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
torch_dir=$(python3 -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("torch").origin))')
export LD_LIBRARY_PATH="$torch_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 RUST_LOG=warn
base=pipelines/ml-100k.toml
sweep=/tmp/sweep && mkdir -p $sweep

# variant name, data dir, then lines appended to [train] / [train.tower].
variant() {
  local name=$1 data=$2 train=$3 tower=$4
  python3 - "$base" "$sweep/$name.toml" "$train" "$tower" <<'PY'
import sys, tomllib
src, dst, train, tower = sys.argv[1:]
text = open(src).read()
text = text.replace("[train]\n", "[train]\n" + train.replace(";", "\n") + "\n", 1)
text = text.replace("[train.tower]\n", "[train.tower]\n" + tower.replace(";", "\n") + "\n", 1)
# Later keys win in our configs only if the earlier ones are removed: drop duplicates.
seen, lines, section = set(), [], ""
for line in text.splitlines():
    s = line.strip()
    if s.startswith("["): section = s
    key = s.split("=")[0].strip() if "=" in s and not s.startswith("#") else None
    if key and (section, key) in seen: continue
    if key: seen.add((section, key))
    lines.append(line)
open(dst, "w").write("\n".join(lines) + "\n")
tomllib.loads(open(dst).read())
PY
  ( timeout 300 "$bin" train --data "$data" --config "$sweep/$name.toml" --device cuda \
      --out "$sweep/model-$name" >"$sweep/$name.log" 2>&1 || echo "failed: $name" >>"$sweep/$name.log" ) &
}
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
python3 - "$sweep" "$out/sweep.json" <<'PY'
import json, os, sys, glob
sweep, dst = sys.argv[1:]
rows = {}
for m in sorted(glob.glob(f"{sweep}/model-*/metrics.json")):
    name = m.split("model-")[1].split("/")[0]
    d = json.load(open(m))
    rows[name] = {k: {m: round(d[k][m], 4) for m in ("recall@10", "ndcg@10", "recall@50")} for k in ("test", "valid")}
    rows[name]["epochs"] = d["train"]["epochs"]; rows[name]["best_epoch"] = d["train"]["best_epoch"]
    rows[name]["seconds"] = round(d["train"]["seconds"], 1)
json.dump(rows, open(dst, "w"), indent=1)
for k, v in sorted(rows.items(), key=lambda kv: -kv[1]["test"]["recall@10"]):
    print(f'{k:10} test r@10 {v["test"]["recall@10"]:.4f} ndcg {v["test"]["ndcg@10"]:.4f} | valid r@10 {v["valid"]["recall@10"]:.4f} | epochs {v["epochs"]} best {v["best_epoch"]} {v["seconds"]} s')
PY
cat $sweep/*.log | grep -i "failed\|error" | head -20 || true
