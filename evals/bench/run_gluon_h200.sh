#!/usr/bin/env bash
# One GPU call for the Gluon block-sparse kernels (about 5 minutes on an H200): their GPU tests
# against the fp32 oracle (per-item and warp-specialised), then Triton vs Gluon vs warp-specialised
# timings and the fixed-cost table with queued timing (host launch work outside the kernels'
# time), then the density sweep with queued timing. Logs and JSON go to $OUT.
# Usage: OUT=/some/dir bash evals/bench/run_gluon_h200.sh
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -m gpu tests/test_triton_kernels.py -k gluon -q -rA -p no:cacheprovider \
  > "$OUT/pytest_gpu_gluon.log" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest_gpu_gluon.log"
grep -E "PASS|FAIL|passed|failed|rc=" "$OUT/pytest_gpu_gluon.log" | tail -16
timeout 200 python3 -m patchattn.evals.bench.kernel_variants --seqlens 128k,32k --densities 0.05,0.1 \
  --tables gluon,fixed --timing queued --out "$OUT/kernel_variants_gluon_fixed.json" 2>&1 | grep "^|"
timeout 120 python3 -m patchattn.evals.bench.prefill --blocks 128 --seqlens 128k,32k --densities 0.05,0.1,0.2,0.5 \
  --no-flex --methods "" --vs-variants "" --ttft-seqlens "" --break-even-seqlens "" --timing queued \
  --out "$OUT/prefill_density_sweep_queued.json" 2>&1 | grep "^|"
