#!/usr/bin/env bash
# One GPU call (about 7 minutes on an H200): the kernel GPU tests with the working tree's Gluon
# kernel, then an A/B of that kernel against another version of kernels/gluon_attention.py
# (BEFORE=path, e.g. `git show HEAD~1:kernels/gluon_attention.py > .ab/gluon_attention_before.py`):
# density sweep (32k / 64k, densities 0.05 / 0.1) and the fixed-cost table (32k) for each.
# VARIANT="NAME=VALUE ..." (optional): also the same pair for the working tree's kernel under those
# environment settings, as TAG_variant.
# Usage: OUT=/some/dir TAG=name BEFORE=path bash evals/bench/run_ab_h200.sh   (wheels for pydantic in .whl/)
set -u
TAG=${TAG:-ab}; BEFORE=${BEFORE:?a path to the other gluon_attention.py}; VARIANT=${VARIANT:-}
. "$(dirname "$0")/h200_lib.sh"
h200_begin
h200_pytest "${PYTEST_LIMIT:-200}" "$OUT/pytest_gpu_${TAG}_h200.log" tests/test_triton_kernels.py
AFTER=$(mktemp)
cp kernels/gluon_attention.py "$AFTER"
trap 'cp "$AFTER" kernels/gluon_attention.py' EXIT  # the working tree's kernel back, however the run ends
h200_sweep_and_fixed "${TAG}_after"
if [ -n "$VARIANT" ]; then (export $VARIANT; h200_sweep_and_fixed "${TAG}_variant"); fi
cp "$BEFORE" kernels/gluon_attention.py
h200_sweep_and_fixed "${TAG}_before"
