#!/usr/bin/env bash
# One GPU session: the GPU tests, then the prefill benchmark (acceptance lengths first, so a time
# limit cuts the optional parts), then the vertical_slash TTFT with each slash loop and a profile.
# Logs and JSON go to $OUT.
# Usage: OUT=/some/dir bash evals/bench/run_h100.sh [test-timeout-s] [bench-a-timeout-s] [bench-b-timeout-s] [ttft-timeout-s]
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
timeout "${1:-170}" python3 -m pytest -m gpu tests/test_triton_kernels.py tests/test_dynamic_methods.py \
  tests/test_equivalence.py -q -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest_gpu.log"
tail -3 "$OUT/pytest_gpu.log"
B="python3 -m patchattn.evals.bench.prefill --blocks 128"
# a: 128k kernels (flex skipped: its compile dominates), the slash-loop variants, estimators, methods.
timeout "${2:-240}" $B --seqlens 128k --no-flex --densities 0.05,0.1 --ttft-seqlens '' --break-even-seqlens '' \
  --vs-variants vertical_slash_g64,vertical_slash_g64_weak_locality,vertical_slash_g64_flat,vertical_slash_g64_weak_locality_flat \
  --out "$OUT/prefill_a.json" > "$OUT/bench_a.log" 2>&1
echo "bench a rc=$?" >> "$OUT/bench_a.log"
grep "^|\|break-even" "$OUT/bench_a.log" | tail -40
# b: 32k / 64k with flex, and the break-even lengths.
timeout "${3:-200}" $B --seqlens 32k,64k --densities 0.1 --vs-variants vertical_slash_g64 --ttft-seqlens '' \
  --break-even-seqlens 8k,16k --out "$OUT/prefill_b.json" > "$OUT/bench_b.log" 2>&1
echo "bench b rc=$?" >> "$OUT/bench_b.log"
grep "^|\|break-even" "$OUT/bench_b.log" | tail -40
# TTFT (4 Llama-3-8B-shaped layers, 128k) with the per-segment and the flat slash loop.
for flat in 0 1; do
  PATCHATTN_VS_FLAT_SLASH=$flat timeout "${4:-100}" $B --seqlens '' --break-even-seqlens '' --ttft-seqlens 128k \
    --ttft-methods vertical_slash_g64,block_topk --out "$OUT/ttft_flat$flat.json" > "$OUT/ttft_flat$flat.log" 2>&1
  echo "ttft flat=$flat rc=$?"; grep TTFT "$OUT/ttft_flat$flat.log" | tail -1
done
