#!/usr/bin/env bash
# One GPU call (about 8 minutes on an H200 or H100; result files end in _h100 / _h200): every GPU test, then 2 vs 3 Gluon q buffers (density
# sweep and fixed-cost table each), then the default-form prefill run that #5's acceptance reads
# (block-sparse vs SDPA and flex, vertical_slash / block_topk end to end, TTFT, break-even), then
# clock_probe's queued and hot timings at 32k / 64k (density 0.05 against SDPA, with SM clocks) and
# its repetition traces after a rest and after SDPA.
# QBUFFERS="3 2" (default) picks the q-buffer settings timed; QBUFFERS="" skips that part.
# BREAK_EVEN (default 16k) lists the extra lengths of the break-even table.
# PYTEST_LIMIT (default 170) bounds the test run; PYTEST_LIMIT=0 skips it.
# Usage: OUT=/some/dir bash evals/bench/run_final_h200.sh   (wheels for pydantic in .whl/)
set -u
. "$(dirname "$0")/h200_lib.sh"
h200_begin
[ "${PYTEST_LIMIT:-170}" = 0 ] || h200_pytest "${PYTEST_LIMIT:-170}" "$OUT/pytest_gpu_final_${GPU}.log" tests
for q in ${QBUFFERS-3 2}; do
  PATCHATTN_GLUON_Q_BUFFERS=$q h200_sweep_and_fixed "q${q}"
done
timeout 300 python3 -m patchattn.evals.bench.prefill --blocks 128 --timing queued --ratio-rounds 5 \
  --seqlens 128k,32k,64k \
  --densities 0.05,0.1 --flex-max-n 65536 --vs-variants vertical_slash_g64 --methods vertical_slash_g64,block_topk \
  --break-even-seqlens "${BREAK_EVEN:-16k}" --ttft-seqlens 128k --ttft-methods vertical_slash_g64,block_topk \
  --out "$OUT/prefill_final_default_${GPU}.json" > "$OUT/prefill_final_default_${GPU}.log" 2>&1
echo "prefill rc=$?" >> "$OUT/prefill_final_default_${GPU}.log"
grep -v "^| N\|---" "$OUT/prefill_final_default_${GPU}.log" | tail -40; echo "t=$(( $(date +%s) - T0 ))"
timeout 90 python3 -m patchattn.evals.bench.clock_probe --cases 32k:sdpa,32k:0.05,64k:sdpa,64k:0.05 \
  --modes queued,hot --trace 300 --out "$OUT/clock_probe_hot_${GPU}.json" 2>&1 | grep "^|\|^trace"; echo "t=$(( $(date +%s) - T0 ))"
