#!/usr/bin/env bash
# One GPU call: the density sweep and fixed-cost table (`h200_sweep_and_fixed`) for the working
# tree's Gluon kernel and for each patched version of it, in the order given, so that every
# variant is timed against the same kernel in the same call (the spread between calls is larger
# than most of the differences timed; evals/bench/results/h200/README.md).
# VARIANTS="name=path/to.patch[,ENV=VALUE...] ..."; a name without a patch times the tree's kernel
# under those settings ("q3=,PATCHATTN_GLUON_Q_BUFFERS=3"); TESTS=name runs the Gluon kernel's GPU
# tests (every form) with that variant first (PYTEST_LIMIT seconds, default 150).
# The JSON and logs go into one archive, $OUT/patch_runs_h200.tar.gz (the device tool returns at
# most 8 files), written however the run ends.
# Usage: OUT=/some/dir VARIANTS="chain=evals/bench/results/h200/patches/gluon_chain.patch base=" \
#        bash evals/bench/run_patches_h200.sh          (wheels for pydantic in .whl/)
set -u
cd "$(dirname "$0")/../.."
ARCHIVE_DIR=${OUT:-/tmp/out}; VARIANTS=${VARIANTS:?name=patch pairs}; TESTS=${TESTS:-}
mkdir -p "$ARCHIVE_DIR"
OUT=$(mktemp -d)
. evals/bench/h200_lib.sh
h200_setup
TREE=$(mktemp)
cp kernels/gluon_attention.py "$TREE"
# the working tree's kernel back and the results packed, however the run ends
trap 'cp "$TREE" kernels/gluon_attention.py; tar czf "$ARCHIVE_DIR/patch_runs_h200.tar.gz" -C "$OUT" .' EXIT

use_variant() {  # $1: name=patch[,ENV=VALUE...]; prints the settings
  local spec=${1#*=} patch settings
  patch=${spec%%,*}; settings=""
  [ "$spec" != "$patch" ] && settings=${spec#*,}
  cp "$TREE" kernels/gluon_attention.py
  if [ -n "$patch" ] && ! patch -s kernels/gluon_attention.py < "$patch"; then
    echo "patch $patch failed" >&2; return 1
  fi
  echo "${settings//,/ }"
}

for v in $VARIANTS; do
  name=${v%%=*}
  [ "$name" = "$TESTS" ] || continue
  settings=$(use_variant "$v") || exit 1
  ([ -z "$settings" ] || export $settings
   h200_pytest "${PYTEST_LIMIT:-150}" "$OUT/pytest_gpu_${name}_h200.log" tests/test_triton_kernels.py \
     -k test_block_sparse_gluon_gpu)
done
for v in $VARIANTS; do
  name=${v%%=*}
  settings=$(use_variant "$v") || exit 1
  ([ -z "$settings" ] || export $settings; h200_sweep_and_fixed "$name")
done
