#!/usr/bin/env bash
# Time benchmarks/moe_layer.py and benchmarks/e2e.py on an older tree and on this one, in one run
# on one GPU, so a refactor can be shown to leave speed and losses unchanged.
#
#   git archive <rev> | (mkdir -p .before && tar -x -C .before)   # the older tree, untracked
#   bash benchmarks/before_after.sh .before [OUT_DIR]
#
# Prints each side's moe_layer table and e2e summary (tokens/s, MFU, final loss) and writes their
# JSON to OUT_DIR (default: benchmarks_before_after/). The e2e losses of the two sides should be
# identical when numerics did not change (same seed, same kernels).
set -u
BEFORE=${1:?usage: bash benchmarks/before_after.sh BEFORE_DIR [OUT_DIR]}
OUT_DIR=$(realpath -m "${2:-benchmarks_before_after}")
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
E2E=(--micro-batch-size 8 --global-batch-size 64 --cuda-graph-impl local --iters 12
     --log-interval 4)
for side in before after; do
  dir=.; [ "$side" = before ] && dir=$BEFORE
  (cd "$dir" && timeout 120 "$PY" benchmarks/moe_layer.py --json "$OUT_DIR/moe_layer_$side.json")
done
for side in before after; do
  dir=.; [ "$side" = before ] && dir=$BEFORE
  (cd "$dir" && timeout 180 "$PY" benchmarks/e2e.py "${E2E[@]}" --json "$OUT_DIR/e2e_$side.json" \
    | tail -n 1)
done
