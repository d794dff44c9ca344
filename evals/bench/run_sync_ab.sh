#!/usr/bin/env bash
# One GPU call (about 6 minutes): the GPU tests of the kernel path (the no-sync check among them),
# then short-prompt timings with this checkout and with the files of commit 2da45b0 (before the
# per-layer syncs were removed, kept in stage/ab3/), in one call so both sides share the card:
# attention-only methods at 16k / 32k with their host time, 4-layer Llama-3-8B-shaped TTFT at
# 16k / 32k, 30-layer SmolLM2-135M-shaped TTFT at 8k / 16k / 32k / 64k. PATCHATTN_DENSE_BELOW=0: the
# kernels run at every length.
# Usage: OUT=/some/dir bash evals/bench/run_sync_ab.sh   (wheels in .whl/, old files in stage/ab3/)
set -u
. "$(dirname "$0")/h200_lib.sh"
h200_begin
h200_pytest "${PYTEST_LIMIT:-150}" "$OUT/pytest_gpu_sync_${GPU}.log" tests/test_dynamic_methods.py \
  tests/test_triton_kernels.py -k "${PYTEST_K:-never_syncs or kernel_backend or patched_model or vertical_slash_gpu or estimators_gpu}"
export PATCHATTN_DENSE_BELOW=0
short() {  # $1: tag
  timeout 100 python3 -m patchattn.evals.bench.prefill --timing queued --seqlens "" --vs-variants "" \
    --methods vertical_slash_g64,block_topk --break-even-seqlens 16k,32k \
    --ttft-seqlens 16k,32k --ttft-methods vertical_slash_g64,block_topk \
    --out "$OUT/prefill_short_$1_${GPU}.json" > "$OUT/prefill_short_$1_${GPU}.log" 2>&1
  echo "prefill rc=$?" >> "$OUT/prefill_short_$1_${GPU}.log"
  grep "^| [0-9]\|TTFT N=.*dense [0-9]\|rc=" "$OUT/prefill_short_$1_${GPU}.log" | tail -8
  h200_smollm2_ttft 70 8k,16k,32k,64k "ttft_smollm2_shape_$1"
}
short new
cp -r stage/ab3/* .
short old
