#!/usr/bin/env bash
# One GPU call with the default Gluon kernel (about 6-9 minutes on an H200):
# every GPU test, then the full prefill benchmark with queued timing (kernels, flex to 64k,
# vertical_slash end to end, estimators, methods, break-even at 16k, TTFT at 128k), then the
# 64k density sweep. Logs and JSON go to $OUT.
# Usage: OUT=/some/dir TAG=wsp bash evals/bench/run_ws_h200.sh
set -u
OUT=${OUT:-/tmp/out}
TAG=${TAG:-ws}  # names the files (ws: the run of 2026-12-02 with the per-item warp-specialised default)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
timeout 240 python3 -m pytest -m gpu tests -q -p no:cacheprovider > "$OUT/pytest_gpu_${TAG}_default.log" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest_gpu_${TAG}_default.log"
tail -3 "$OUT/pytest_gpu_${TAG}_default.log"
B="python3 -m patchattn.evals.bench.prefill --blocks 128 --timing queued"
timeout 280 $B --seqlens 128k,32k,64k --densities 0.05,0.1 --flex-max-n 65536 \
  --vs-variants vertical_slash_g64,vertical_slash_g64_weak_locality \
  --methods vertical_slash_g64,xattention,flexprefill,block_topk --break-even-seqlens 16k \
  --ttft-seqlens 128k --ttft-methods vertical_slash_g64,block_topk \
  --out "$OUT/prefill_${TAG}.json" > "$OUT/prefill_${TAG}.log" 2>&1
echo "bench rc=$?" >> "$OUT/prefill_${TAG}.log"
grep "^|\|break-even\|rc=" "$OUT/prefill_${TAG}.log" | tail -70
timeout 60 $B --seqlens 64k --densities 0.05,0.1,0.2,0.5 --no-flex --methods "" --vs-variants "" \
  --ttft-seqlens "" --break-even-seqlens "" --out "$OUT/prefill_density_sweep_64k_${TAG}.json" 2>&1 | grep "^|"
