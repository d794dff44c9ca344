#!/usr/bin/env bash
# One GPU call (about 9 minutes): every GPU test, then the short-prompt picture that sets the
# kernel backend's dense_below (backends.KERNEL_BREAK_EVEN): attention-only method timings with
# their host time at 16k / 24k / 32k, the 4-layer Llama-3-8B-shaped TTFT at the same lengths, and
# a host-side (CPU-sorted) profile of one patched 16k forward; then the 30-layer SmolLM2-135M-shaped
# TTFT at 8k / 16k / 32k. PATCHATTN_DENSE_BELOW=0 throughout: patched layers run their kernels at
# every length (the default thresholds would make the short rows dense).
# Usage: OUT=/some/dir bash evals/bench/run_short_h100.sh   (wheels for pydantic in .whl/)
set -u
. "$(dirname "$0")/h200_lib.sh"
h200_begin
[ "${PYTEST_LIMIT:-230}" = 0 ] || h200_pytest "${PYTEST_LIMIT:-230}" "$OUT/pytest_gpu_${GPU}.log" tests
export PATCHATTN_DENSE_BELOW=0
timeout 200 python3 -m patchattn.evals.bench.prefill --timing queued --seqlens "" --vs-variants "" \
  --methods vertical_slash_g64,block_topk --break-even-seqlens 16k,24k,32k \
  --ttft-seqlens 16k,24k,32k --ttft-methods vertical_slash_g64,block_topk \
  --out "$OUT/prefill_short_${GPU}.json" > "$OUT/prefill_short_${GPU}.log" 2>&1
echo "prefill rc=$?" >> "$OUT/prefill_short_${GPU}.log"
grep -v "^| N\|---" "$OUT/prefill_short_${GPU}.log" | tail -14; echo "t=$(( $(date +%s) - T0 ))"
timeout 90 python3 -m patchattn.evals.bench.profile_ttft --n 16k --layers 4 --method vertical_slash_g64 \
  --sort cpu --rows 30 --out "$OUT/profile_ttft_16k_cpu_${GPU}.json" > "$OUT/profile_ttft_16k_cpu_${GPU}.log" 2>&1
echo "profile rc=$?" >> "$OUT/profile_ttft_16k_cpu_${GPU}.log"
grep "wall\|rc=" "$OUT/profile_ttft_16k_cpu_${GPU}.log"; echo "t=$(( $(date +%s) - T0 ))"
h200_smollm2_ttft 100 8k,16k,32k ttft_smollm2_shape
