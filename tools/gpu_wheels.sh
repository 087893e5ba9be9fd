#!/usr/bin/env bash
# Prepare the wheels tools/bench_gpu.sh installs on a GPU machine that has Python 3.12, a
# CUDA torch and transformers 5.x but not mllm's other imports (mmengine and its light
# dependencies), and no network. Pure-Python wheels, pinned to this checkout's .venv,
# downloaded for --python-version 3.12 (no dependencies resolved: mmengine's own pins pull
# opencv, which mllm does not import). The folder must fit the device tool's carry limit
# (64 MiB for all carried paths); it is a few MiB.
#
#   tools/gpu_wheels.sh [DIR]      # default work_dirs/gpu_wheels (git-ignored; carry it)
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-work_dirs/gpu_wheels}
PY=${PYTHON:-.venv/bin/python}
LIMIT_MIB=${LIMIT_MIB:-60}
# mllm's imports beyond torch + transformers (and theirs: numpy, pyyaml, regex, tokenizers,
# safetensors, huggingface_hub, tqdm, packaging, filelock, requests, pillow)
PACKAGES=(mmengine addict yapf platformdirs termcolor rich markdown-it-py mdurl pygments)
pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null)
  pins+=("$name${version:+==$version}")
done
mkdir -p "$DIR"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation py --abi none --platform any -d "$DIR" "${pins[@]}" || {
  echo "gpu_wheels: pip download failed for: ${pins[*]}" >&2; exit 1; }
size_kib=$(du -sk "$DIR" | cut -f1)
echo "gpu_wheels: $(ls "$DIR" | wc -l) wheels, $((size_kib / 1024)) MiB in $DIR"
if (( size_kib > LIMIT_MIB * 1024 )); then
  echo "gpu_wheels: $DIR is over ${LIMIT_MIB} MiB: it will not travel with the command" >&2
  exit 1
fi
