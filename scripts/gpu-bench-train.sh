#!/usr/bin/env bash
# Training benchmark on a lent GPU machine (the `device` tool), run against that machine's own
# PyTorch 2.11 libraries. Keep it under 5 minutes of device time.
#
# Here, first:
#   make build-release            # target/release/twotower
#   strip -o work/gpu/twotower target/release/twotower
#   target/release/twotower prepare --dataset ml-100k --out work/gpu/data
# Then run this script with the device tool, carrying work/gpu (binary + data, well under 64 MiB):
#   run(command="scripts/gpu-bench-train.sh", carry=["work/gpu"], timeout_s=300)
# Reports land in $OUT (bench-train-*.json) and are copied back.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=${TWOTOWER_BIN:-work/gpu/twotower}
data=${TWOTOWER_DATA:-work/gpu/data}
out=${OUT:-/tmp}

# The binary carries an rpath to this machine's libtorch cache, which does not exist there; the
# loader finds the GPU machine's PyTorch through LD_LIBRARY_PATH instead, and the binary loads
# libtorch_cuda.so from the same directory at start-up (towers::device::load_cuda_backend).
torch_dir=$(python3 -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("torch").origin))')
export LD_LIBRARY_PATH="$torch_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OMP_WAIT_POLICY=PASSIVE
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

cfg=pipelines/ml-100k.toml
amp=/tmp/ml-100k-amp.toml
sed 's/^\[train\]$/[train]\nmixed_precision = true/' "$cfg" >"$amp"

"$bin" bench train --data "$data" --config "$cfg" --device cpu --steps 30 --out "$out/bench-train-cpu.json"
for batch in 256 1024 4096; do
  "$bin" bench train --data "$data" --config "$cfg" --device cuda --steps 200 --batch-size "$batch" \
    --out "$out/bench-train-cuda-b$batch.json"
done
"$bin" bench train --data "$data" --config "$amp" --device cuda --steps 200 --batch-size 4096 \
  --out "$out/bench-train-cuda-b4096-amp.json"

# A full training run of the default pipeline on the GPU: wall time and test metrics.
start=$(date +%s)
timeout 200 "$bin" train --data "$data" --config "$cfg" --device cuda --out /tmp/model-cuda >/dev/null
echo "full ml-100k training on cuda: $(( $(date +%s) - start )) s"
cp /tmp/model-cuda/metrics.json "$out/train-cuda-metrics.json"
