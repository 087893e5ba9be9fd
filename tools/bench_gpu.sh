#!/usr/bin/env bash
# One full-size training step (random weights, bf16, SDPA, gradient checkpointing as the
# recipe sets it) per recipe on one GPU: tokens/s, TFLOP/s, MFU against the A100 bf16
# peak and the projected 8xA100 hours for one epoch of the stage's data
# (mllm.bench.benchmark.bench_step; figures and assumptions in docs/performance.md).
#
#   tools/bench_gpu.sh            # on a GPU machine, one JSON line per recipe
#   tools/bench_gpu.sh --tiny     # CPU check of the same path on the tiny config
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if [[ "${1:-}" == "--tiny" ]]; then
  exec "$PY" -m mllm bench step --config configs/tiny/tiny_llava_synthetic.py --device cpu \
    --steps 1 --batch-size 2 --text-tokens 20 --json
fi

RECIPES=(
  "convllava_vicuna7b_768_stage3 finetune"   # ConvLLaVA-768 + vicuna7b instruction tuning
  "llava15_vicuna7b_pretrain pretrain"
  "llava15_vicuna7b_finetune finetune"
  "llava15_vicuna13b_pretrain pretrain"     # the 13B pair compares with LLaVA-1.5's ~1 day
  "llava15_vicuna13b_finetune finetune"
)
# MG-LLaVA vicuna7b finetune (published ~23 h on 8xA100): runs once its config exists
# (mllm.models.mgllava is being written on another branch).
if [[ -f configs/mgllava/mgllava_vicuna7b_finetune.py ]]; then
  RECIPES+=("mgllava_vicuna7b_finetune finetune")
fi
for spec in "${RECIPES[@]}"; do
  read -r recipe stage <<< "$spec"
  "$PY" -m mllm bench step --config "$recipe" --stage "$stage" --device cuda --json
done
