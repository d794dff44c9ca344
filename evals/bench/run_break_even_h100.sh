#!/usr/bin/env bash
# One GPU call (about 4 minutes) after the per-layer syncs were removed: the no-sync GPU test, then
# the break-even picture that sets backends.KERNEL_BREAK_EVEN: attention-only method timings at
# 12k / 16k / 20k with their host time, 4-layer Llama-3-8B-shaped TTFT at 12k / 16k / 20k, and the
# 30-layer SmolLM2-135M-shaped TTFT at 16k (a repeat of the A/B call's slow row) and 40k / 48k (where the width rule puts a 16k threshold).
# PATCHATTN_DENSE_BELOW=0: the kernels run at every length.
# Usage: OUT=/some/dir bash evals/bench/run_break_even_h100.sh   (wheels for pydantic in .whl/)
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
. evals/bench/h200_lib.sh
h200_setup
h200_pytest "${PYTEST_LIMIT:-90}" "$OUT/pytest_gpu_never_syncs_${GPU}.log" tests/test_dynamic_methods.py -k never_syncs
export PATCHATTN_DENSE_BELOW=0
timeout 150 python3 -m patchattn.evals.bench.prefill --timing queued --seqlens "" --vs-variants "" \
  --methods vertical_slash_g64,block_topk --break-even-seqlens 12k,16k,20k \
  --ttft-seqlens 12k,16k,20k --ttft-methods vertical_slash_g64,block_topk \
  --out "$OUT/prefill_break_even_${GPU}.json" > "$OUT/prefill_break_even_${GPU}.log" 2>&1
echo "prefill rc=$?" >> "$OUT/prefill_break_even_${GPU}.log"
grep "^| [0-9]\|TTFT N=.*dense [0-9]\|break-even\|rc=" "$OUT/prefill_break_even_${GPU}.log"; echo "t=$(( $(date +%s) - T0 ))"
h200_smollm2_ttft 80 16k,40k,48k ttft_smollm2_shape
