#!/usr/bin/env bash
# One GPU call (about 7 minutes on an H200): the kernel GPU tests with the working tree's Gluon
# kernel, then an A/B of that kernel against another version of kernels/gluon_attention.py
# (BEFORE=path, e.g. `git show HEAD~1:kernels/gluon_attention.py > .ab/gluon_attention_before.py`):
# density sweep (32k / 64k, densities 0.05 / 0.1) and the fixed-cost table (32k) for each.
# Usage: OUT=/some/dir TAG=name BEFORE=path bash evals/bench/run_ab_h200.sh   (wheels for pydantic in .whl/)
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; TAG=${TAG:-ab}; BEFORE=${BEFORE:?a path to the other gluon_attention.py}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -1
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
timeout 170 python3 -m pytest -m gpu tests/test_triton_kernels.py -q -p no:cacheprovider \
  > "$OUT/pytest_gpu_${TAG}_h200.log" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest_gpu_${TAG}_h200.log"
grep -E "FAIL|passed|failed|rc=" "$OUT/pytest_gpu_${TAG}_h200.log" | tail -6; echo "t=$(( $(date +%s) - T0 ))"
cp kernels/gluon_attention.py /tmp/gluon_attention_after.py
for v in after before; do
  if [ "$v" = before ]; then cp "$BEFORE" kernels/gluon_attention.py; else cp /tmp/gluon_attention_after.py kernels/gluon_attention.py; fi
  timeout 75 python3 -m patchattn.evals.bench.prefill --blocks 128 --seqlens 32k,64k \
    --densities 0.05,0.1 --no-flex --methods "" --vs-variants "" --ttft-seqlens "" --break-even-seqlens "" \
    --timing queued --out "$OUT/prefill_density_sweep_${TAG}_${v}_h200.json" 2>&1 | grep "^|" | grep -v "^| N\|---"
  timeout 45 python3 -m patchattn.evals.bench.kernel_variants --seqlens 32k \
    --densities 0.05 --tables fixed --timing queued --out "$OUT/kernel_variants_fixed_${TAG}_${v}_h200.json" 2>&1 \
    | grep "^|" | grep -v "^| N\|---"
  echo "$v t=$(( $(date +%s) - T0 ))"
done
cp /tmp/gluon_attention_after.py kernels/gluon_attention.py
