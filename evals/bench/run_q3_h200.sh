#!/usr/bin/env bash
# GPU call: Gluon oracle tests (now with 3 q buffers), then 2 vs 3 q buffers: density sweep and fixed-cost table each.
set -u
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -1
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
timeout 100 python3 -m pytest -m gpu tests/test_triton_kernels.py -k gluon -q -rA -p no:cacheprovider \
  > "$OUT/pytest_gpu_gluon_q3_h200.log" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest_gpu_gluon_q3_h200.log"
grep -E "FAIL|passed|failed|rc=" "$OUT/pytest_gpu_gluon_q3_h200.log" | tail -6; echo "t=$(( $(date +%s) - T0 ))"
for q in 3 2; do
  PATCHATTN_GLUON_Q_BUFFERS=$q timeout 75 python3 -m patchattn.evals.bench.prefill --blocks 128 --seqlens 32k,64k \
    --densities 0.05,0.1 --no-flex --methods "" --vs-variants "" --ttft-seqlens "" --break-even-seqlens "" \
    --timing queued --out "$OUT/prefill_density_sweep_q${q}_h200.json" 2>&1 | grep "^|" | grep -v "^| N\|---"
  PATCHATTN_GLUON_Q_BUFFERS=$q timeout 45 python3 -m patchattn.evals.bench.kernel_variants --seqlens 32k --densities 0.05 \
    --tables fixed --timing queued --out "$OUT/kernel_variants_fixed_q${q}_h200.json" 2>&1 | grep "^|" | grep -v "^| N\|---"
  echo "q=$q t=$(( $(date +%s) - T0 ))"
done
