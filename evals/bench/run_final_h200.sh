#!/usr/bin/env bash
# One GPU call (about 8 minutes on an H200): every GPU test, then 2 vs 3 Gluon q buffers (density
# sweep and fixed-cost table each), then the default-form prefill run that #5's acceptance reads
# (block-sparse vs SDPA and flex, vertical_slash / block_topk end to end, TTFT, break-even).
# Usage: OUT=/some/dir bash evals/bench/run_final_h200.sh   (wheels for pydantic in .whl/)
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -1
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
timeout 170 python3 -m pytest -m gpu tests -q -p no:cacheprovider > "$OUT/pytest_gpu_final_h200.log" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest_gpu_final_h200.log"
grep -E "FAIL|passed|failed|rc=" "$OUT/pytest_gpu_final_h200.log" | tail -6; echo "t=$(( $(date +%s) - T0 ))"
for q in 3 2; do
  PATCHATTN_GLUON_Q_BUFFERS=$q timeout 75 python3 -m patchattn.evals.bench.prefill --blocks 128 --seqlens 32k,64k \
    --densities 0.05,0.1 --no-flex --methods "" --vs-variants "" --ttft-seqlens "" --break-even-seqlens "" \
    --timing queued --out "$OUT/prefill_density_sweep_q${q}_h200.json" 2>&1 | grep "^|" | grep -v "^| N\|---"
  PATCHATTN_GLUON_Q_BUFFERS=$q timeout 45 python3 -m patchattn.evals.bench.kernel_variants --seqlens 32k \
    --densities 0.05 --tables fixed --timing queued --out "$OUT/kernel_variants_fixed_q${q}_h200.json" 2>&1 \
    | grep "^|" | grep -v "^| N\|---"
  echo "q=$q t=$(( $(date +%s) - T0 ))"
done
timeout 180 python3 -m patchattn.evals.bench.prefill --blocks 128 --timing queued --seqlens 128k,32k,64k \
  --densities 0.05,0.1 --flex-max-n 65536 --vs-variants vertical_slash_g64 --methods vertical_slash_g64,block_topk \
  --break-even-seqlens 16k --ttft-seqlens 128k --ttft-methods vertical_slash_g64,block_topk \
  --out "$OUT/prefill_final_default_h200.json" > "$OUT/prefill_final_default_h200.log" 2>&1
echo "prefill rc=$?" >> "$OUT/prefill_final_default_h200.log"
grep -v "^| N\|---" "$OUT/prefill_final_default_h200.log" | tail -40; echo "t=$(( $(date +%s) - T0 ))"
