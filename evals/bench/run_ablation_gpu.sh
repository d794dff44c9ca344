#!/usr/bin/env bash
# plan_ablation on a CUDA machine (fp32, torch reference path, every length patched), the GGUF
# staged in two parts because one call carries at most 64 MiB:
#   call 1 (carry .whl, stage/gguf_a): mkdir -p stage/gguf_hold && mv stage/gguf_a/gguf_part_aa stage/gguf_hold/
#   call 2 (carry .whl, stage/gguf_b, stage/wiki.test.raw, while the machine is still warm):
#     OUT=$OUT NAME=run VARIANTS="dense;plan;..." ABLATION_ARGS="--lengths 4096 --samples 100 ..." \
#       bash evals/bench/run_ablation_gpu.sh
# Later calls on the same warm machine find the assembled GGUF in stage/gguf_hold and skip step 2.
# Result: $OUT/NAME_${GPU}.json and .log; the table is printed.
set -u
source "$(dirname "$0")/h200_lib.sh"
h200_begin
h200_stage_smollm2
timeout "${LIMIT:-540}" python3 -m patchattn.evals.bench.plan_ablation --variants "$VARIANTS" ${ABLATION_ARGS:-} \
  --text stage/wiki.test.raw --out "$OUT/${NAME}_${GPU}.json" > "$OUT/${NAME}_${GPU}.log" 2>&1
echo "plan_ablation rc=$? t=$(( $(date +%s) - T0 ))" | tee -a "$OUT/${NAME}_${GPU}.log"
grep -v "Loading\|Converting\|it/s\]" "$OUT/${NAME}_${GPU}.log" | tail -70
