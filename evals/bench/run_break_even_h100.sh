#!/usr/bin/env bash
# One GPU call (about 4 minutes): the break-even picture that sets backends.KERNEL_BREAK_EVEN.
# Attention-only method timings with their host time at LENGTHS, 4-layer Llama-3-8B-shaped TTFT at
# TTFT_LENGTHS, and the 30-layer SmolLM2-135M-shaped TTFT at SMOL_LENGTHS (empty: skipped), for
# METHODS. NOSYNC_TEST=1 first runs the GPU test that a patched prefill never syncs the device.
# PATCHATTN_DENSE_BELOW=0: the kernels run at every length.
# Defaults are the 2026-12-07 run for vertical_slash / block_topk (h200/break_even_1207/); the other
# methods: METHODS=streaming,flexprefill,xattention LENGTHS=16k,24k,32k TTFT_LENGTHS=16k,32k SMOL_LENGTHS=""
# Usage: OUT=/some/dir [TAG=...] bash evals/bench/run_break_even_h100.sh   (wheels for pydantic in .whl/)
set -u
. "$(dirname "$0")/h200_lib.sh"
h200_begin
METHODS=${METHODS:-vertical_slash_g64,block_topk}
LENGTHS=${LENGTHS:-12k,16k,20k}
TTFT_LENGTHS=${TTFT_LENGTHS-$LENGTHS}
SMOL_LENGTHS=${SMOL_LENGTHS-16k,40k,48k}
TAG=${TAG:-break_even}
if [ "${NOSYNC_TEST:-1}" = 1 ]; then
  h200_pytest "${PYTEST_LIMIT:-90}" "$OUT/pytest_gpu_never_syncs_${GPU}.log" tests/test_dynamic_methods.py -k never_syncs
fi
export PATCHATTN_DENSE_BELOW=0
timeout "${PREFILL_LIMIT:-150}" python3 -m patchattn.evals.bench.prefill --timing queued --seqlens "" --vs-variants "" \
  --methods "$METHODS" --break-even-seqlens "$LENGTHS" \
  --ttft-seqlens "$TTFT_LENGTHS" --ttft-methods "$METHODS" \
  --out "$OUT/prefill_${TAG}_${GPU}.json" > "$OUT/prefill_${TAG}_${GPU}.log" 2>&1
echo "prefill rc=$?" >> "$OUT/prefill_${TAG}_${GPU}.log"
grep "^| [0-9]\|TTFT N=.*dense [0-9]\|break-even\|rc=" "$OUT/prefill_${TAG}_${GPU}.log"; echo "t=$(( $(date +%s) - T0 ))"
if [ -n "$SMOL_LENGTHS" ]; then h200_smollm2_ttft 80 "$SMOL_LENGTHS" ttft_smollm2_shape; fi
