# Shared by the scripts/gpu-sweep-*.sh settings sweeps (sourced, not run): runs one training
# variant of a pipeline file in the background on the GPU, and summarises every variant's
# metrics.json into one table.
#
# Needs: $bin (the twotower binary), $base (the pipeline file), $sweep (a scratch directory).

torch_dir=$(python3 -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("torch").origin))')
export LD_LIBRARY_PATH="$torch_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 RUST_LOG=warn
mkdir -p "$sweep"

# variant NAME DATA_DIR TRAIN_LINES TOWER_LINES [TIMEOUT_S]: the base pipeline with lines
# (';'-separated) put into [train] and [train.tower], later keys replacing earlier ones.
variant() {
  local name=$1 data=$2 train=$3 tower=$4 limit=${5:-300}
  python3 - "$base" "$sweep/$name.toml" "$train" "$tower" <<'PY'
import sys, tomllib
src, dst, train, tower = sys.argv[1:]
text = open(src).read()
text = text.replace("[train]\n", "[train]\n" + train.replace(";", "\n") + "\n", 1)
if "[train.tower]\n" not in text:
    text += "\n[train.tower]\n"
text = text.replace("[train.tower]\n", "[train.tower]\n" + tower.replace(";", "\n") + "\n", 1)
# The first occurrence of a key (the variant's) wins: drop later duplicates.
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
  ( timeout "$limit" "$bin" train --data "$data" --config "$sweep/$name.toml" --device cuda \
      --out "$sweep/model-$name" >"$sweep/$name.log" 2>&1 || echo "failed: $name" >>"$sweep/$name.log" ) &
}

# summarise OUT_JSON: one row per finished variant, best test recall@10 first.
summarise() {
  python3 - "$sweep" "$1" <<'PY'
import json, sys, glob
sweep, dst = sys.argv[1:]
keys = ("recall@10", "ndcg@10", "recall@50")
rows = {}
for m in sorted(glob.glob(f"{sweep}/model-*/metrics.json")):
    name = m.split("model-")[1].split("/")[0]
    d = json.load(open(m))
    row = {k: {m: round(d[k][m], 4) for m in keys} for k in ("test", "valid")}
    for b in ("baseline_popularity", "baseline_recent_popularity", "baseline_item_knn"):
        if d.get(b):
            row[b] = {m: round(d[b][m], 4) for m in keys}
    for k in ("cold_items", "warm_items"):
        if d.get(k):
            row[k] = {m: round(d[k][m], 4) for m in keys}
    row.update(epochs=d["train"]["epochs"], best_epoch=d["train"]["best_epoch"],
               seconds=round(d["train"]["seconds"], 1))
    rows[name] = row
json.dump(rows, open(dst, "w"), indent=1)
for k, v in sorted(rows.items(), key=lambda kv: -kv[1]["test"]["recall@10"]):
    t = v["test"]
    print(f'{k:14} test r@10 {t["recall@10"]:.4f} ndcg@10 {t["ndcg@10"]:.4f} r@50 {t["recall@50"]:.4f}'
          f' | valid r@10 {v["valid"]["recall@10"]:.4f} | epochs {v["epochs"]} best {v["best_epoch"]} {v["seconds"]} s')
for b in ("baseline_popularity", "baseline_recent_popularity", "baseline_item_knn"):
    v = next((r[b] for r in rows.values() if b in r), None)
    if v:
        print(f'{b:30} r@10 {v["recall@10"]:.4f} ndcg@10 {v["ndcg@10"]:.4f} r@50 {v["recall@50"]:.4f}')
PY
  grep -il "failed\|error" "$sweep"/*.log | head -20 || true
}
