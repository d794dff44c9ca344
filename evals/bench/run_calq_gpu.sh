#!/usr/bin/env bash
# The issue-#3 held-out acceptance run (calibration_quality.py: the shipped budget plan vs dense and
# density-matched uniform vertical_slash / streaming plans; passkey at 4k and 8k, 20 samples each,
# held-out seed; wikitext-2 ppl, windows of 4096) on a CUDA machine, fp32 reference path. The GGUF
# is staged as for run_ablation_gpu.sh (call 1 the same; call 2 runs this script instead):
#   OUT=$OUT bash evals/bench/run_calq_gpu.sh [timeout-s] [extra calibration_quality args...]
# Result: $OUT/calibration_quality_${GPU}.json and .log; the table is printed.
set -u
source "$(dirname "$0")/h200_lib.sh"
h200_begin
h200_stage_smollm2
limit=${1:-540}; shift || true
timeout "$limit" python3 -m patchattn.evals.bench.calibration_quality \
  --plan patchattn/plans/smollm2-135m.budget.json --text stage/wiki.test.raw --tokens 8192 --window 4096 \
  --lengths 4096,8192 --samples 20 --batch-size 10 --no-progress "$@" \
  --out "$OUT/calibration_quality_${GPU}.json" > "$OUT/calibration_quality_${GPU}.log" 2>&1
echo "calibration_quality rc=$? t=$(( $(date +%s) - T0 ))" | tee -a "$OUT/calibration_quality_${GPU}.log"
grep -v "Loading\|Converting\|it/s\]" "$OUT/calibration_quality_${GPU}.log" | tail -40
