#!/usr/bin/env bash
# The GPU kit: runs unattended in <= 8 minutes on one GPU (H200-sized) and writes JSON plus a
# log; every part has its own timeout and a failing part does not stop the others.
#
#   1. env        nvidia-smi, python, torch, transformers versions
#   2. gpu        `mllm bench gpu`: LLaVA-1.5-7B shapes, bf16, mllm (padding-free, answer-only
#                 head, planned recompute) vs XTuner's way (padded, full logits, full
#                 recompute) on the same batches, with / without recompute, SDPA vs
#                 flash-attention when installed; MFU vs the device's measured bf16 matmul
#                 peak; peak memory vs `mllm plan`. Full depth; if that fails, 16 layers.
#   3. step       `mllm bench step` of each recipe (projection), while time is left
#
#   tools/gpu_wheels.sh                      # here, once: work_dirs/gpu_wheels (~2 MiB)
#   OUT=/some/dir tools/bench_gpu.sh         # there (carry work_dirs/gpu_wheels)
#   tools/bench_gpu.sh --tiny                # the same parts on CPU with the tiny config
#   STEPS=0 tools/bench_gpu.sh               # part 2 alone (the recipe projections skipped)
#   ROUNDS=3 tools/bench_gpu.sh              # part 2 times every variant 3 times (default 2)
#
# Missing imports (mmengine and its light dependencies) are installed from the wheels folder
# into a temporary site directory: no network, nothing installed system-wide.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
OUT=${OUT:-work_dirs/bench_gpu}
WHEELS=${WHEELS:-work_dirs/gpu_wheels}
BUDGET_S=${BUDGET_S:-470}
STEPS=${STEPS:-1}
ROUNDS=${ROUNDS:-2}
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
mkdir -p "$OUT"
LOG="$OUT/bench_gpu.log"
: > "$LOG"
START=$(date +%s)
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import mmengine, addict, yapf, termcolor, rich' 2>/dev/null; then
  SITE=$(mktemp -d /tmp/mllm_site.XXXX)
  if ls "$WHEELS"/*.whl >/dev/null 2>&1 && "$PY" -m pip install --quiet --no-index --no-deps \
      --target "$SITE" "$WHEELS"/*.whl >> "$LOG" 2>&1; then
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH#$PWD}"
    log "installed $(ls "$WHEELS" | wc -l) wheels from $WHEELS into $SITE"
  else
    log "mmengine is missing and $WHEELS has no installable wheels (run tools/gpu_wheels.sh)"
  fi
fi

# run NAME SECONDS CMD...: stdout to $OUT/NAME.json, stderr to the log, bounded by the budget
run() {
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(left)
  if (( remaining < 20 )); then log "$name: skipped, ${remaining}s of the budget left"; return 1; fi
  (( limit > remaining )) && limit=$remaining
  log "$name: start (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.json" 2>> "$LOG"
  local rc=$?
  if (( rc == 0 )); then log "$name: ok"; else log "$name: FAILED rc=$rc$( (( rc == 124 )) && echo ' (timeout)')"; fi
  return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__, torch.cuda.is_available())'
} >> "$LOG" 2>&1

if (( TINY )); then
  run gpu 120 "$PY" -m mllm bench gpu --tiny --steps 2 --json
  run step_tiny 120 "$PY" -m mllm bench step --config configs/tiny/tiny_llava_synthetic.py \
    --device cpu --steps 1 --batch-size 2 --text-tokens 20 --json
else
  run gpu 300 "$PY" -m mllm bench gpu --rounds "$ROUNDS" --json \
    || run gpu_16_layers 200 "$PY" -m mllm bench gpu --llm-layers 16 --rounds "$ROUNDS" --json
  (( STEPS )) && for spec in "llava15_vicuna7b_finetune finetune" "llava15_vicuna7b_pretrain pretrain" \
              "convllava_vicuna7b_768_stage3 finetune" "llava15_vicuna13b_finetune finetune"; do
    read -r recipe stage <<< "$spec"
    run "step_$recipe" 60 "$PY" -m mllm bench step --config "$recipe" --stage "$stage" \
      --device cuda --json
  done
fi

# one summary line per part that produced JSON
"$PY" - "$OUT" <<'PYEOF' | tee -a "$LOG"
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], '*.json'))):
    try:
        r = json.loads(open(path).read().strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f'{os.path.basename(path)}: no result'); continue
    if 'variants' in r:
        print(f"{os.path.basename(path)}: {r['device']}, peak {r['matmul_peak_tflops']:.0f} TFLOP/s "
              f"measured; mllm step ({r.get('recipes_variant')}) / XTuner's = {r.get('mllm_step_over_xtuner', float('nan')):.3f} "
              f"(goal <= 0.75); worst-batch plan {r['plan']['checkpoint_layers']}/{r['plan']['llm_layers']}"
              f" layers, fused {r['plan'].get('fused', {}).get('checkpoint_layers')}"
              f" ({r['plan'].get('micro_batch_8', {}).get('checkpoint_layers')} and "
              f"{r['plan'].get('fused_micro_batch_8', {}).get('checkpoint_layers')} at micro-batch 8)")
        for name, v in r['variants'].items():
            print(f"  {name:<24} " + (v['error'] if 'error' in v else
                  f"step {v['step_s']:.3f}s ({v.get('over_xtuner', float('nan')):.3f}x)  "
                  f"{v['tokens_per_s']:.0f} tok/s  MFU {v['mfu']:.3f}  "
                  f"peak {v.get('peak_memory_gb', 0):.1f} GB (plan {v['plan_memory_gb']:.1f})  "
                  f"ckpt {v.get('checkpoint_layers_per_batch') or v['checkpoint_layers']}  rounds "
                  + ' '.join(f'{t:.3f}' for t in v.get('round_step_s', []))))
    else:
        mfu = (f"MFU {r['mfu']:.3f} of the measured peak" if 'mfu' in r
               else f"MFU(A100) {r.get('mfu_vs_a100', 0):.3f}")
        print(f"{os.path.basename(path)}: step {r.get('step_s', 0):.3f}s, {mfu}, "
              f"ckpt {r.get('checkpointed_layers')}, "
              f"{r.get('projected_hours_8xA100', 0):.1f} h an epoch on 8 x A100 (projected)")
PYEOF
log "done in $(( $(date +%s) - START ))s; results in $OUT"
