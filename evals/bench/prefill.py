"""Prefill attention timings on CUDA: dense SDPA vs flex_attention vs the Triton sparse kernels.

    python evals/bench/prefill.py --out evals/bench/results/prefill_h100.json
    python evals/bench/prefill.py --quick          # sanity run, small shapes

Llama-3-8B attention shapes (B=1, Hq=32, Hkv=8, D=128, bf16). For each length N:
* dense SDPA (causal, enable_gqa) and our block-sparse kernel with every causal block listed;
* per density: random per-head block lists (diagonal block and block 0 always kept), timed with
  block_sparse_attention and with compiled flex_attention on the same block mask;
* vertical-slash end to end (last-64-query estimate, top-k, index build, kernel) on inputs with
  a distance-decaying attention pattern plus a few heavy key columns, so the estimate selects
  a local band and sink-like columns the way it does on real prompts;
* the estimators alone.
Times are medians of CUDA-event timings after warm-up; densities are realized pair fractions
of the causal triangle.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from patchattn import backends
from patchattn.kernels import triton_attention as ta
from patchattn.kernels.triton_estimators import antidiagonal_block_scores, last_q_scores, pooled_block_scores

HQ, HKV, D = 32, 8, 128
BLOCK = 64
DEV = "cuda"


# ----------------------------------------------------------------------------- timing


# How cuda_time measures (prefill / kernel_variants --timing): "synced" waits for each repetition
# before the next, so a call's host work (argument checks, allocations, the Triton launcher) is
# inside its time whenever the GPU waits for it; "queued" enqueues all repetitions first, so the
# host runs ahead and the events time the GPU work (what triton.testing.do_bench measures);
# "rested" is "synced" after 200 ms of idle GPU before each repetition, so the GPU boosts its
# clock as it does before a single profiled launch (clock_probe compares the three).
TIMING = {"synced": "median of CUDA-event timings after 150 ms of warm-up, each repetition synchronised",
          "queued": "median of CUDA-event timings after 150 ms of warm-up, repetitions enqueued back to back",
          "rested": "median of CUDA-event timings after warm-up, each repetition synchronised after 200 ms idle"}
TIMING_MODE = "synced"
# GPU milliseconds of fn() run before a synced or queued timing starts. On the H200 a kernel
# started on an idle GPU runs 10-12 % faster for its first 30-80 ms than after (clock_probe
# --trace: 32k block-sparse 0.80 ms for 40 repetitions, then 0.90 ms; clock_probe_trace_h200.json),
# while a kernel of SDPA's length is past that window after one repetition. Without this warm-up a
# short kernel's 40 repetitions fall inside the window and its ratio to SDPA looks 15 % better
# than the two compare at the same state.
STEADY_WARMUP_MS = 150.0


def cuda_time(fn, budget_ms: float = 800.0, min_reps: int = 3, max_reps: int = 40, warmup: int = 2,
              mode: str = None, steady_ms: float = STEADY_WARMUP_MS) -> float:
    """Median milliseconds of fn() over enough repetitions to fill about budget_ms, timed as
    `mode` says (a key of TIMING; None: TIMING_MODE). Before a synced or queued timing, fn() runs
    back to back until about `steady_ms` of GPU time has passed (STEADY_WARMUP_MS)."""
    mode = mode or TIMING_MODE
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def once():
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    first = once()
    if mode != "rested" and steady_ms > first:
        for _ in range(math.ceil(steady_ms / max(first, 1e-3)) - 1):
            fn()
        torch.cuda.synchronize()
    reps = max(min_reps, min(max_reps, int(budget_ms / max(first, 1e-3))))
    if mode == "synced":
        return statistics.median([once() for _ in range(reps)])
    if mode == "rested":
        times = []
        for _ in range(reps):
            time.sleep(0.2)
            times.append(once())
        return statistics.median(times)
    return statistics.median(queued_times(fn, reps))


def host_ms(fn, reps: int = 10) -> float:
    """Median host milliseconds to issue fn() onto an idle GPU queue (Python, argument checks,
    launches, and any device sync inside fn). Where it exceeds fn's GPU time, back-to-back calls
    are bound by the host: a queued timing then measures this, not the kernels."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def queued_times(fn, reps: int) -> list:
    """Milliseconds of each of `reps` calls of fn(), enqueued back to back with one sync at the end."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in events:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in events]


def interleaved_ratios(dense, sparse, density: float, rounds: int, budget_ms: float = 300.0, timer=None) -> dict:
    """sparse time / (density x dense time) over `rounds` rounds that each time dense, then
    sparse, back to back, so both sides of each ratio see the same clocks and temperature (SDPA
    runs at the power cap; a single pair of timings taken seconds apart moves by several %).
    Returns every round's ratio and their median, min and max."""
    timer = timer or (lambda fn: cuda_time(fn, budget_ms=budget_ms))
    ratios = []
    for _ in range(rounds):
        dense_ms = timer(dense)
        ratios.append(timer(sparse) / (density * dense_ms))
    return {"rounds": rounds, "ratios": ratios, "median": statistics.median(ratios), "min": min(ratios),
            "max": max(ratios)}


# ----------------------------------------------------------------------------- inputs


def random_inputs(n: int, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    mk = lambda h: torch.randn(1, h, n, D, device=DEV, dtype=torch.bfloat16, generator=g)  # noqa: E731
    return mk(HQ), mk(HKV), mk(HKV)


def structured_inputs(n: int, seed: int = 0, locality: float = 1.5):
    """Random q/k/v plus (a) a shared sinusoidal position code in q and k, whose dot product
    peaks at distance 0 and decays, and (b) a shared direction in q that 0.5% of keys carry.

    `locality` scales the position code: 1.5 gives a logit boost of about 6 at distance 0
    decaying to ~0 by distance ~3000 (slash scores fall off with distance, as in the
    vertical-slash heads of real LLMs); 0.6 gives a boost of about 1, below the noise of
    random q.k, so the top slash lines are scattered (the worst case for tile-based kernels)."""
    q, k, v = random_inputs(n, seed)
    pos = torch.arange(n, device=DEV, dtype=torch.float32)[:, None]
    freqs = torch.logspace(0, -3.5, 32, device=DEV)[None]
    code = torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs)], dim=-1) * locality  # [n, 64]
    q[..., :64] += code.to(q.dtype)
    k[..., :64] += code.to(k.dtype)
    g = torch.Generator(device=DEV).manual_seed(seed + 1)
    heavy = torch.rand(1, HKV, n, 1, device=DEV, generator=g) < 0.005
    q[..., 64:] += 0.5
    k[..., 64:] += heavy.to(k.dtype) * 0.5
    return q, k, v


def random_block_lists(n: int, density: float, seed: int = 0, block: int = BLOCK):
    """Per-head ascending key-block lists: diagonal + block 0 + Bernoulli picks so that about
    `density` of each query block's causal blocks are kept. Returns (index, count, pairs)."""
    nb = n // block
    g = torch.Generator(device=DEV).manual_seed(seed)
    qb = torch.arange(nb, device=DEV)[:, None]
    kb = torch.arange(nb, device=DEV)[None, :]
    p_extra = ((density * (qb + 1) - 2) / (qb - 1).clamp_min(1)).clamp(0, 1)
    pick = torch.rand(1, HQ, nb, nb, device=DEV, generator=g) < p_extra
    pick = (pick | (kb == 0) | (kb == qb)) & (kb <= qb)
    count = pick.sum(-1, dtype=torch.int32)
    maxk = int(count.max())
    index = torch.where(pick, kb, nb).to(torch.int32).sort(-1).values[..., :maxk].contiguous()
    del pick
    diag_pairs = block * (block + 1) // 2
    pairs = int(((count.long() - 1) * block * block + diag_pairs).sum())
    return index, count, pairs


def causal_pairs(n: int) -> int:
    return HQ * n * (n + 1) // 2


# ----------------------------------------------------------------------------- runners


def sdpa(q, k, v, backend=None):
    from torch.nn.attention import sdpa_kernel

    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def flex_block_mask(index, count, n, block=BLOCK):
    """The same block mask for flex_attention: the diagonal block partial (causal), the rest full.

    Built with BlockMask.from_kv_blocks straight from the lists: create_block_mask would
    evaluate a mask_mod on all N^2 token pairs."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = n // block
    partial_idx = torch.zeros(1, HQ, nb, nb, dtype=torch.int32, device=DEV)
    partial_idx[..., 0] = torch.arange(nb, device=DEV, dtype=torch.int32)
    full_idx = torch.zeros(1, HQ, nb, nb, dtype=torch.int32, device=DEV)
    full_cnt = (count - 1).contiguous()
    slots = torch.arange(index.shape[-1], device=DEV)
    full_idx[..., : index.shape[-1]] = torch.where(slots < full_cnt[..., None], index, 0)
    return BlockMask.from_kv_blocks(torch.ones_like(count), partial_idx, full_cnt, full_idx,
                                    BLOCK_SIZE=(block, block), mask_mod=lambda b, h, qi, ki: qi >= ki)


def vertical_slash_pipeline(q, k, v, n_vertical, n_slash, last_q=64, slash_group=1, block_m=64, flat=False):
    from patchattn.methods.vertical_slash import top_group_mask, top_mask

    n = q.shape[2]
    scale = D ** -0.5
    vert, slash = last_q_scores(q[:, :, -last_q:], k, scale=scale, q_positions=torch.arange(n - last_q, n, device=DEV))
    cols = top_mask(vert, n_vertical)
    cols[..., :4] = True  # attention sink
    diags = top_group_mask(slash, n_slash, slash_group)
    diags[..., :64] = True  # local window
    index = ta.vertical_slash_index(cols, diags, n_q=n, block_m=block_m, flat_slash_block_n=64 if flat else None,
                                    **vertical_slash_bounds(n_vertical, n_slash, slash_group))
    out, _ = ta.vertical_slash_attention(q, k, v, cols, diags, scale=scale, index=index, block_m=block_m)
    return out, (cols, diags, index)


def vertical_slash_bounds(n_vertical, n_slash, slash_group):
    """The list bounds `VerticalSlash.select` gives the kernel index, for this pipeline's masks
    (4 sink columns, a 64-diagonal local window)."""
    from patchattn.methods.vertical_slash import whole_groups

    return dict(max_columns=4 + n_vertical, max_diagonals=64 + whole_groups(n_slash, slash_group))


# ----------------------------------------------------------------------------- per-length benchmark


def bench_dense_and_block_sparse(n, densities, args, notes):
    """SDPA, then block-sparse (and flex) per density and tile size, then block-sparse with every block."""
    from torch.nn.attention import SDPBackend

    res = {"n": n}
    q, k, v = random_inputs(n)
    scale = D ** -0.5
    res["sdpa_ms"] = cuda_time(lambda: sdpa(q, k, v))
    try:
        res["sdpa_flash_ms"] = cuda_time(lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION))
    except Exception as e:  # noqa: BLE001 - record, keep going
        res["sdpa_flash_error"] = repr(e)[:200]
    causal = causal_pairs(n)

    flex = None
    if args.flex and n <= args.flex_max_n:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    elif args.flex:
        notes.append(f"flex_attention skipped at N={n} (--flex-max-n {args.flex_max_n})")

    for block in args.blocks:
        rows = []
        for density in densities:  # lowest density first: autotuning runs on the cheapest call
            index, count, pairs = random_block_lists(n, density, seed=int(density * 1000), block=block)
            row = {"density_target": density, "density": pairs / causal}
            run = lambda: ta.block_sparse_attention(q, k, v, index, count, scale=scale, block_m=block,  # noqa: E731
                                                    block_n=block)
            row["block_sparse_ms"] = cuda_time(run)
            row["target_ms"] = row["density"] * res["sdpa_ms"]
            row["ratio_vs_density_x_sdpa"] = row["block_sparse_ms"] / row["target_ms"]
            if args.ratio_rounds > 1:
                row["interleaved"] = interleaved_ratios(lambda: sdpa(q, k, v), run, row["density"], args.ratio_rounds)
            if flex is not None and block == args.flex_block:
                try:
                    row.update(time_flex(flex, q, k, v, index, count, n, scale, block))
                except Exception as e:  # noqa: BLE001
                    row["flex_error"] = repr(e)[:300]
                    flex = None
            rows.append(row)
            del index, count
        res[f"block_sparse_b{block}"] = rows
        res[f"block_sparse_b{block}_config"] = str(getattr(ta._block_sparse_tuned, "best_config", None))

        # Raw kernel efficiency: every causal block listed, against SDPA.
        nb = n // block
        full_index = torch.arange(nb, device=DEV, dtype=torch.int32).expand(1, HQ, nb, nb).contiguous()
        full_count = torch.arange(1, nb + 1, device=DEV, dtype=torch.int32).expand(1, HQ, nb).contiguous()
        run_all = lambda: ta.block_sparse_attention(q, k, v, full_index, full_count, scale=scale,  # noqa: E731
                                                    block_m=block, block_n=block)
        res[f"block_sparse_b{block}_all_blocks_ms"] = cuda_time(run_all)
        if n == args.diagnostics_n and block == args.blocks[0]:
            ta._MASK_EVERY_TILE = True
            res[f"block_sparse_b{block}_all_blocks_mask_every_tile_ms"] = cuda_time(run_all)
            ta._MASK_EVERY_TILE = False
        del full_index, full_count
    return res


def time_flex(flex, q, k, v, index, count, n, scale, block=BLOCK):
    """Compiled flex_attention on the same blocks; also its max |difference| from our kernel."""
    mask = flex_block_mask(index, count, n, block)
    res = {}
    for opts in ({"BLOCK_M": block, "BLOCK_N": block}, None):  # sparse blocks need matching tiles
        call = lambda: flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=True, kernel_options=opts)  # noqa: E731
        try:
            t0 = time.perf_counter()
            out = call()
            torch.cuda.synchronize()
            res["flex_first_call_s"] = time.perf_counter() - t0
            break
        except Exception as e:  # noqa: BLE001 - try the default tiles, then give up
            res[f"flex_error_{'opts' if opts else 'default'}"] = repr(e)[:300]
    else:
        raise RuntimeError(res)
    ours, _ = ta.block_sparse_attention(q, k, v, index, count, scale=scale, block_m=block, block_n=block)
    res["flex_vs_block_sparse_max_abs"] = float((out.float() - ours.float()).abs().max())
    res["flex_ms"] = cuda_time(call)
    return res


# Vertical-slash pipeline rows per length: key -> (input locality, slash_group, table label).
VS_VARIANTS = {  # name: (locality, slash_group, kernel block_m, flat slash tiles, label)
    "vertical_slash": (1.5, 1, 64, False, ""),
    "vertical_slash_weak_locality": (0.6, 1, 64, False, " (weak locality)"),
    "vertical_slash_g64": (1.5, 64, 64, False, " slash_group 64"),
    "vertical_slash_g64_weak_locality": (0.6, 64, 64, False, " slash_group 64 (weak locality)"),
    "vertical_slash_g64_m128": (1.5, 64, 128, False, " slash_group 64, block_m 128"),
    "vertical_slash_g64_weak_locality_m128": (0.6, 64, 128, False, " slash_group 64 (weak locality), block_m 128"),
    "vertical_slash_g64_flat": (1.5, 64, 64, True, " slash_group 64, flat slash tiles"),
    "vertical_slash_g64_weak_locality_flat": (0.6, 64, 64, True, " slash_group 64 (weak locality), flat slash tiles"),
}


def bench_vertical_slash(n, sdpa_ms, locality=1.5, slash_group=1, block_m=64, flat=False):
    """Vertical-slash end to end on structured inputs (estimate + top-k + index + kernel)."""
    q, k, v = structured_inputs(n, locality=locality)
    scale = D ** -0.5
    n_vertical, n_slash = max(64, int(0.01 * n)), max(64, int(0.03 * n))
    run = lambda: vertical_slash_pipeline(q, k, v, n_vertical, n_slash, slash_group=slash_group,  # noqa: E731
                                          block_m=block_m, flat=flat)
    _, (cols, diags, index) = run()  # also warms up
    vs = {"n_vertical": n_vertical, "n_slash": n_slash, "slash_group": slash_group, "block_m": block_m, "flat": flat}
    vs["end_to_end_ms"] = cuda_time(run)
    vs["index_ms"] = cuda_time(lambda: ta.vertical_slash_index(
        cols, diags, n_q=n, block_m=block_m, flat_slash_block_n=index.tile_block_n,
        **vertical_slash_bounds(n_vertical, n_slash, slash_group)))
    vs["kernel_ms"] = cuda_time(lambda: ta.vertical_slash_attention(q, k, v, cols, diags, scale=scale, index=index,
                                                                    block_m=block_m))
    best = getattr(ta._vertical_slash_tuned_n if flat else ta._vertical_slash_tuned, "best_config", None)
    vs["config"] = str(best)
    tile_n = index.tile_block_n or (best.kwargs.get("BLOCK_N", 64) if best is not None else 64)
    counts = ta.vertical_slash_pair_counts(cols, diags, n_q=n, index=index, block_n=tile_n)
    causal = causal_pairs(n)
    vs["density_kept"] = int(counts["kept"].sum()) / causal
    vs["density_computed"] = int(counts["computed"].sum()) / causal
    vs["end_to_end_vs_sdpa"] = vs["end_to_end_ms"] / sdpa_ms
    vs["kernel_vs_density_x_sdpa"] = vs["kernel_ms"] / (vs["density_kept"] * sdpa_ms)
    return vs


def bench_estimators(n, sdpa_ms):
    q, k, _ = structured_inputs(n)
    scale = D ** -0.5
    pos = torch.arange(n - 64, n, device=DEV)
    est = {"last_q64_ms": cuda_time(lambda: last_q_scores(q[:, :, -64:], k, scale=scale, q_positions=pos)),
           "pooled_bs64_ms": cuda_time(lambda: pooled_block_scores(q, k, block_size=64, scale=scale))}
    for stride in (8, 16):
        est[f"antidiag_bs128_s{stride}_ms"] = cuda_time(
            lambda: antidiagonal_block_scores(q, k, block_size=128, stride=stride, scale=scale / stride))
    return {key: {"ms": t, "pct_of_sdpa": 100 * t / sdpa_ms} for key, t in est.items()}


# Method configurations timed end to end through patchattn's own execution (sparse_attention:
# selection incl. estimators, kernel launch, telemetry), on the structured inputs.
METHODS = {
    "vertical_slash": {"vertical": {"scale": 0.01, "min": 64}, "slash": {"scale": 0.02, "min": 64}, "last_q": 64,
                       "sink": 4, "window": 64},
    "vertical_slash_g64": {"vertical": {"scale": 0.01, "min": 64}, "slash": {"scale": 0.02, "min": 64}, "last_q": 64,
                           "sink": 4, "window": 64, "slash_group": 64},
    "flexprefill": {"block_size": 128, "gamma": 0.9, "tau": 0.1, "last_q": 128},
    "xattention": {"block_size": 128, "stride": 16, "threshold": 0.9},
    "block_topk": {"block_size": 128, "top_k": {"scale": 0.05, "min": 8}},
    "streaming": {"sink": 64, "window": 4096},
}


def _method_name(key):
    """METHODS keys are method names, or NAME_VARIANT for a second configuration of one method."""
    from patchattn.methods import METHODS as REGISTERED

    return key if key in REGISTERED else key.rsplit("_", 1)[0]


def _layer_state(name, params):
    from patchattn.methods import get_method
    from patchattn.patching import HeadGroup, LayerState
    from patchattn.telemetry import LayerStats

    cls = get_method(_method_name(name))
    method = cls(cls.validate_params(params))
    return LayerState(0, [HeadGroup(method, torch.arange(HQ))], 0, "sdpa", LayerStats(0, [name] * HQ)), method


def bench_methods(n, sdpa_ms, names, q=None, k=None, v=None):
    """Per method: estimation (select) alone and the whole patched attention call."""
    from patchattn.methods.base import AttnContext
    from patchattn.patching import causal_lazy_mask, sparse_attention

    if q is None:
        q, k, v = structured_inputs(n)
    scale = D ** -0.5
    mask = causal_lazy_mask(1, n, n, device=torch.device(DEV))
    layout = backends.kernel_layout(mask, q, k, None)
    q_pos, k_pos = mask.positions()
    kv_heads = torch.arange(HQ, device=DEV) // (HQ // HKV)
    out = {}
    for name in names:
        state, method = _layer_state(name, METHODS[name])
        ctx = AttnContext(q_pos=q_pos, k_pos=k_pos, kv_start=mask.kv_start(), base_rows=mask.rows, scale=scale,
                          softcap=None, layer=0, layout=layout)
        try:
            call = lambda: sparse_attention(state, q, k, v, mask, scale=scale, softcap=None,  # noqa: E731
                                            sliding_window=None)
            call()  # compile / autotune
            state.stats.kept = [0] * HQ
            state.stats.valid = [0] * HQ
            call()
            density = sum(state.stats.kept) / sum(state.stats.valid)
            est = cuda_time(lambda: method.select(q, k[:, kv_heads], ctx), budget_ms=600)
            total = cuda_time(call, budget_ms=800)
            out[name] = {"estimate_ms": est, "total_ms": total, "host_ms": host_ms(call), "density": density,
                         "estimate_pct_of_sdpa": 100 * est / sdpa_ms, "speedup_vs_sdpa": sdpa_ms / total}
        except Exception as e:  # noqa: BLE001 - record, keep going
            out[name] = {"error": repr(e)[:300]}
        torch.cuda.empty_cache()
    return out


def bench_break_even(lengths, names):
    """Smallest tested length from which each method's patched attention beats dense SDPA."""
    rows = []
    for n in lengths:
        q, k, v = structured_inputs(n)
        sdpa_ms = cuda_time(lambda: sdpa(q, k, v), budget_ms=400)
        rows.append({"n": n, "sdpa_ms": sdpa_ms, "methods": bench_methods(n, sdpa_ms, names, q, k, v)})
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def break_even_table(rows, names):
    """Per method: the smallest tested N from which it beats SDPA at every tested length (None: never)."""
    table = {}
    for name in names:
        speed = sorted((r["n"], r["methods"].get(name, {}).get("speedup_vs_sdpa", 0.0)) for r in rows
                       if "methods" in r)
        best = None
        for n, sp in reversed(speed):
            if sp <= 1.0:
                break
            best = n
        table[name] = best
    return table


# Random-weight model shapes for TTFT: the Llama-3-8B, and SmolLM2-135M (the real model
# the accuracy evals use: 9 q / 3 kv heads of width 64, 7x less attention work per layer and token
# pair, so the kernels' fixed costs weigh more and its break-even length is longer).
SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, rope_theta=500000.0),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True),
}


def shaped_model(layers: int, shape: str = "llama3-8b"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=262144, attn_implementation="sdpa",
                      **SHAPES[shape])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV):
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def llama3_8b_shaped(layers: int):
    return shaped_model(layers, "llama3-8b")


def bench_ttft(lengths, layers, names, shape: str = "llama3-8b"):
    """Whole-prefill time (logits of the last token) of a random-weight model of `shape` (SHAPES)."""
    from patchattn import Plan, patch_model, stats, unpatch_model

    model = shaped_model(layers, shape)
    vocab = model.config.vocab_size
    rows = []
    for n in lengths:
        ids = torch.randint(0, vocab, (1, n), device=DEV)

        def prefill():
            with torch.no_grad():
                return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

        row = {"n": n, "dense_ms": cuda_time(prefill, budget_ms=3000, min_reps=3, max_reps=5, warmup=1)}
        for name in names:
            try:
                patch_model(model, Plan.uniform(model, _method_name(name), METHODS[name]))
                t = cuda_time(prefill, budget_ms=3000, min_reps=3, max_reps=5, warmup=1)
                density = stats(model).density
                row[name] = {"ms": t, "speedup": row["dense_ms"] / t, "density": density}
            except Exception as e:  # noqa: BLE001
                row[name] = {"error": repr(e)[:300]}
            finally:
                unpatch_model(model)
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"TTFT N={n}: " + json.dumps(row), flush=True)
    del model
    torch.cuda.empty_cache()
    return rows


def bench_length(n, densities, args, notes):
    res = bench_dense_and_block_sparse(n, densities, args, notes)
    torch.cuda.empty_cache()
    for key in args.vs_variants:
        locality, slash_group, block_m, flat, _ = VS_VARIANTS[key]
        res[key] = bench_vertical_slash(n, res["sdpa_ms"], locality=locality, slash_group=slash_group, block_m=block_m,
                                        flat=flat)
        torch.cuda.empty_cache()
    res["estimators"] = bench_estimators(n, res["sdpa_ms"])
    torch.cuda.empty_cache()
    res["methods"] = bench_methods(n, res["sdpa_ms"], args.methods)
    torch.cuda.empty_cache()
    return res


# ----------------------------------------------------------------------------- report


def block_sparse_cost_model(report):
    """Per N and tile: least-squares fit of block-sparse time = fixed + per_density * density over
    the timed densities. fixed is what a call costs beyond its pairs (per-program prologue and
    epilogue, list scans, masked diagonal tiles); per_density / SDPA is the kernel's cost per pair
    relative to SDPA's, the floor of `ratio_vs_density_x_sdpa` at any density."""
    fits = []
    for r in report["results"]:
        for key in [k for k in r if k.startswith("block_sparse_b") and k[14:].isdigit()]:
            pts = [(row["density"], row["block_sparse_ms"]) for row in r[key]]
            if len(pts) < 2:
                continue
            mx = sum(d for d, _ in pts) / len(pts)
            my = sum(t for _, t in pts) / len(pts)
            slope = sum((d - mx) * (t - my) for d, t in pts) / sum((d - mx) ** 2 for d, _ in pts)
            fits.append({"n": r["n"], "block": int(key[14:]), "fixed_ms": my - slope * mx,
                         "per_density_ms": slope, "per_pair_vs_sdpa": slope / r["sdpa_ms"],
                         "all_blocks_vs_sdpa": r.get(f"{key}_all_blocks_ms", float("nan")) / r["sdpa_ms"]})
    return fits


def print_tables(report):
    results = report["results"]
    fits = block_sparse_cost_model(report)
    if fits:
        print("\n| N | tile | fixed ms | per-pair cost vs SDPA | all blocks vs SDPA |")
        print("|---|---|---|---|---|")
        for f in fits:
            print(f"| {f['n']} | {f['block']} | {f['fixed_ms']:.2f} | {f['per_pair_vs_sdpa']:.2f} | "
                  f"{f['all_blocks_vs_sdpa']:.2f} |")
    print("\n| N | tile | density | block-sparse ms | SDPA ms | flex ms | ratio vs density x SDPA | interleaved median "
          "[min, max] |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for key in [k for k in r if k.startswith("block_sparse_b") and k[14:].isdigit()]:
            block = key[14:]
            allb = r.get(f"{key}_all_blocks_ms")
            if allb is not None:
                print(f"| {r['n']} | {block} | all blocks | {allb:.2f} | {r['sdpa_ms']:.2f} | | "
                      f"{allb / r['sdpa_ms']:.2f} | |")
            for row in r[key]:
                flex = f"{row['flex_ms']:.2f}" if "flex_ms" in row else row.get("flex_error", "-")[:30]
                rounds = row.get("interleaved")
                spread = (f"{rounds['median']:.3f} [{rounds['min']:.3f}, {rounds['max']:.3f}] ({rounds['rounds']})"
                          if rounds else "")
                print(f"| {r['n']} | {block} | {row['density']:.3f} | {row['block_sparse_ms']:.2f} | "
                      f"{r['sdpa_ms']:.2f} | {flex} | {row['ratio_vs_density_x_sdpa']:.2f} | {spread} |")
    print("\n| N | VS kept / computed density | end-to-end ms | index ms | kernel ms | e2e / SDPA |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for key, (*_, label) in [(k, v) for k, v in VS_VARIANTS.items() if k in r]:
            vs = r[key]
            print(f"| {r['n']}{label} | {vs['density_kept']:.3f} / "
                  f"{vs['density_computed']:.3f} | {vs['end_to_end_ms']:.2f} | {vs['index_ms']:.2f} | "
                  f"{vs['kernel_ms']:.2f} | {vs['end_to_end_vs_sdpa']:.3f} |")
    print("\n| N | estimator | ms | % of SDPA |")
    print("|---|---|---|---|")
    for r in results:
        for name, e in r["estimators"].items():
            print(f"| {r['n']} | {name} | {e['ms']:.2f} | {e['pct_of_sdpa']:.1f} |")
    print("\n| N | method | density | estimate ms | total ms | host ms | SDPA ms | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results + report.get("break_even_rows", []):
        for name, m in r.get("methods", {}).items():
            if "error" in m:
                print(f"| {r['n']} | {name} | error: {m['error'][:60]} | | | | | |")
            else:
                host = f"{m['host_ms']:.2f}" if "host_ms" in m else "-"  # runs before host_ms was recorded
                print(f"| {r['n']} | {name} | {m['density']:.3f} | {m['estimate_ms']:.2f} | {m['total_ms']:.2f} | "
                      f"{host} | {r['sdpa_ms']:.2f} | {m['speedup_vs_sdpa']:.2f} |")
    if "break_even" in report:
        print("\nbreak-even (dense below):", json.dumps(report["break_even"]))
    for row in report.get("ttft", []):
        cells = ", ".join(f"{k} {v['ms']:.0f} ms ({v['speedup']:.2f}x, density {v['density']:.3f})"
                          if isinstance(v, dict) and "ms" in v else f"{k} {v}" for k, v in row.items()
                          if k not in ("n", "dense_ms"))
        print(f"TTFT N={row['n']}: dense {row['dense_ms']:.0f} ms; {cells}")


def parse_lengths(text):
    """'8k,32k' -> [8192, 32768]; '' -> [] (skip that part of the run)."""
    return [int(float(t[:-1]) * 1024) if t.lower().endswith("k") else int(t) for t in text.split(",") if t]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", default="8k,32k,64k,128k", help="comma list, e.g. 8k,32k")
    parser.add_argument("--densities", default="0.05,0.1,0.2,0.3,0.5")
    parser.add_argument("--blocks", default="128,64", help="block sizes of the random block lists")
    parser.add_argument("--flex-block", type=int, default=128, help="block size at which flex_attention is timed")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods timed end to end")
    parser.add_argument("--vs-variants", default=",".join(VS_VARIANTS), help="vertical-slash pipeline rows (VS_VARIANTS)")
    parser.add_argument("--break-even-seqlens", default="4k,8k,16k")
    parser.add_argument("--ttft-seqlens", default="32k,128k")
    parser.add_argument("--ttft-layers", type=int, default=4)
    parser.add_argument("--ttft-shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--ttft-methods", default="vertical_slash,vertical_slash_g64,block_topk,streaming,flexprefill")
    parser.add_argument("--quick", action="store_true", help="4k,8k; two densities")
    parser.add_argument("--no-flex", dest="flex", action="store_false")
    parser.add_argument("--flex-max-n", type=int, default=128 * 1024)
    parser.add_argument("--diagnostics-n", type=int, default=32 * 1024,
                        help="length at which to also time the mask-every-tile variant")
    parser.add_argument("--timing", choices=sorted(TIMING), default="synced", help="see TIMING")
    parser.add_argument("--ratio-rounds", type=int, default=1,
                        help="also time each density row this many times interleaved with SDPA (interleaved_ratios)")
    parser.add_argument("--out", default="evals/bench/results/prefill_h100.json")
    parser.add_argument("--print", dest="print_json", metavar="JSON", help="print the tables of a saved run and exit")
    args = parser.parse_args(argv)
    if args.print_json:
        report = json.loads(Path(args.print_json).read_text())
        print_tables(report)
        return report
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    global TIMING_MODE
    TIMING_MODE = args.timing
    lengths = parse_lengths("4k,8k" if args.quick else args.seqlens)
    densities = [0.1, 0.5] if args.quick else [float(x) for x in args.densities.split(",")]
    args.blocks = [int(b) for b in args.blocks.split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    args.vs_variants = [m for m in args.vs_variants.split(",") if m]
    unknown = sorted(set(args.vs_variants) - set(VS_VARIANTS))
    if unknown:
        parser.error(f"unknown --vs-variants {unknown}; choose from {sorted(VS_VARIANTS)}")
    ttft_methods = [m for m in args.ttft_methods.split(",") if m]

    import triton

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "cuda": torch.version.cuda, "shape": {"B": 1, "Hq": HQ, "Hkv": HKV, "D": D, "dtype": "bfloat16"},
              "methods_params": {m: METHODS[m] for m in args.methods},
              "vs_block_m": backends.VS_BLOCK_M,  # the method path's vertical_slash kernel rows per program
              "vs_flat_slash": backends.VS_FLAT_SLASH,
              # what block_sparse_attention dispatches to for the benchmark's bf16 / d128 / 128-blocks
              "block_sparse_kernel": ta.block_sparse_kernel(torch.empty(1, 1, 1, D, dtype=torch.bfloat16, device=DEV),
                                                            128, 128),
              "timing": TIMING[args.timing], "notes": [], "results": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: out.write_text(json.dumps(report, indent=1))  # noqa: E731 - partial results survive a timeout
    t0 = time.time()
    for n in lengths:
        t1 = time.time()
        try:
            report["results"].append(bench_length(n, densities, args, report["notes"]))
            report["results"][-1]["wall_s"] = time.time() - t1
        except Exception as e:  # noqa: BLE001
            report["notes"].append(f"N={n} failed: {e!r}"[:400])
        save()
        print(f"N={n} done in {time.time() - t1:.0f}s", flush=True)
    if ttft_methods and args.ttft_seqlens:
        try:
            report["ttft_layers"], report["ttft_shape"] = args.ttft_layers, args.ttft_shape
            report["ttft"] = bench_ttft(parse_lengths(args.ttft_seqlens), args.ttft_layers, ttft_methods,
                                        args.ttft_shape)
        except Exception as e:  # noqa: BLE001
            report["notes"].append(f"TTFT failed: {e!r}"[:400])
        save()
    if args.break_even_seqlens:
        report["break_even_rows"] = bench_break_even(parse_lengths(args.break_even_seqlens), args.methods)
        report["break_even"] = break_even_table(report["break_even_rows"] + report["results"], args.methods)
        save()
    report["total_wall_s"] = time.time() - t0
    report["block_sparse_cost_model"] = block_sparse_cost_model(report)
    save()
    print_tables(report)
    return report


if __name__ == "__main__":
    main()
