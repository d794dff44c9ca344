#!/usr/bin/env bash
# One GPU session: the GPU tests, then the prefill benchmark in two parts (the acceptance lengths
# and TTFT first, so a time limit cuts the optional parts). Logs and JSON go to $OUT.
# Usage: OUT=/some/dir bash evals/bench/run_h100.sh [test-timeout-s] [bench-a-timeout-s] [bench-b-timeout-s] [profile-timeout-s]
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
timeout "${1:-170}" python3 -m pytest -m gpu tests/test_triton_kernels.py tests/test_dynamic_methods.py -x -q \
  -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest_gpu.log"
tail -5 "$OUT/pytest_gpu.log"
timeout "${2:-240}" python3 -m patchattn.evals.bench.prefill --seqlens 32k,128k --blocks 128 --break-even-seqlens "" --ttft-seqlens 128k --ttft-methods vertical_slash,vertical_slash_g64,block_topk,streaming \
  --out "$OUT/prefill_a.json" > "$OUT/bench_a.log" 2>&1
echo "bench a rc=$?" >> "$OUT/bench_a.log"
timeout "${3:-120}" python3 -m patchattn.evals.bench.prefill --seqlens 8k,64k --blocks 128 --ttft-seqlens '' --break-even-seqlens 4k,16k \
  --out "$OUT/prefill_b.json" > "$OUT/bench_b.log" 2>&1
echo "bench b rc=$?" >> "$OUT/bench_b.log"
tail -60 "$OUT/bench_a.log"
tail -40 "$OUT/bench_b.log"
# Where the patched TTFT loses time beyond its attention-only timings (per-operator CUDA time).
timeout "${4:-120}" python3 -m patchattn.evals.bench.profile_ttft --n 128k --layers 4 --method vertical_slash_g64 \
  --out "$OUT/ttft_profile.json" > "$OUT/ttft_profile.log" 2>&1
echo "profile rc=$?" >> "$OUT/ttft_profile.log"
tail -70 "$OUT/ttft_profile.log"
