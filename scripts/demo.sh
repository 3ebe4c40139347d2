#!/usr/bin/env bash
# The main job end to end on the built-in default data (ml-100k). Called by `make demo` after
# set-up and a release build. A rerun skips stages whose outputs exist.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=${TWOTOWER_BIN:-target/release/twotower}
work=${TWOTOWER_WORKDIR:-work/ml-100k}

stage() { printf '\n== %s\n' "$*"; }
timed() { local t0=$SECONDS; "$@"; echo "   ($(( SECONDS - t0 )) s)"; }

stage "prepare ml-100k into $work/data"
if [ -f "$work/data/dataset.json" ]; then echo "   exists, skipped"; else
  timed "$bin" prepare --dataset ml-100k --out "$work/data"
fi

stage "train into $work/model (about 5-8 minutes on 2 cores)"
if [ -f "$work/model/model.json" ]; then echo "   exists, skipped"; else
  timed "$bin" train --data "$work/data" --out "$work/model" --config pipelines/ml-100k.toml
fi

stage "evaluate on the test split (full ranking)"
timed "$bin" eval --data "$work/data" --model "$work/model" --split test

echo
echo "demo: model and metrics in $work/model (training_curves.png, metrics.json)."
echo "demo: stopping here: index, serve and recommend are not built yet."
