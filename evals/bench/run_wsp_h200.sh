#!/usr/bin/env bash
# One GPU call for the persistent (item-claiming) form of the warp-specialised Gluon kernel (about 6 minutes on
# an H200; 4-5 with SWEEP=64k,32k GPU_TESTS=0): the Gluon oracle tests (every form: per-item, ws,
# persistent with 3 and with 2 K stages), Triton vs the Gluon forms with queued timing at 32k / 64k /
# 128k, the density sweep with the persistent form, then the kernel, method and equivalence GPU
# tests with the persistent form on. Logs and JSON go to $OUT.
# Usage: OUT=/some/dir TAG=chained bash evals/bench/run_wsp_h200.sh  (TAG names the files;
# SWEEP=64k,32k limits the density sweep's lengths, GPU_TESTS=0 skips the last step)
set -u
OUT=${OUT:-/tmp/out}
TAG=${TAG:-wsp}
SWEEP=${SWEEP:-128k,64k,32k}
GPU_TESTS=${GPU_TESTS:-1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
timeout 170 python3 -m pytest -m gpu tests/test_triton_kernels.py -k gluon -q -rA -p no:cacheprovider \
  > "$OUT/pytest_gpu_gluon_${TAG}.log" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest_gpu_gluon_${TAG}.log"
grep -E "FAIL|passed|failed|rc=" "$OUT/pytest_gpu_gluon_${TAG}.log" | tail -12
timeout 200 python3 -m patchattn.evals.bench.kernel_variants --seqlens 128k,64k,32k --densities 0.05,0.1 \
  --tables gluon --timing queued --out "$OUT/kernel_variants_gluon_${TAG}.json" 2>&1 | grep "^|"
PATCHATTN_GLUON_PERSISTENT=1 timeout 110 python3 -m patchattn.evals.bench.prefill --blocks 128 \
  --seqlens "$SWEEP" --densities 0.05,0.1,0.2,0.5 --no-flex --methods "" --vs-variants "" \
  --ttft-seqlens "" --break-even-seqlens "" --timing queued --out "$OUT/prefill_density_sweep_${TAG}.json" 2>&1 | grep "^|"
[ "$GPU_TESTS" = 1 ] || exit 0
PATCHATTN_GLUON_PERSISTENT=1 timeout 220 python3 -m pytest -m gpu tests/test_triton_kernels.py \
  tests/test_dynamic_methods.py tests/test_equivalence.py -q -p no:cacheprovider > "$OUT/pytest_gpu_${TAG}_on.log" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest_gpu_${TAG}_on.log"
tail -3 "$OUT/pytest_gpu_${TAG}_on.log"
