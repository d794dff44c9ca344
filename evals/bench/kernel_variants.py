"""A/B timings of kernel implementation switches on CUDA, same inputs, one table.

    python -m patchattn.evals.bench.kernel_variants --seqlens 32k,128k --out results/kernel_variants.json

Rows (Llama-3-8B attention shapes, bf16, as in prefill.py):
* block-sparse (random per-head lists, blocks of 128) at each density, and with every causal
  block, under each program order (`triton_attention.KV_MAJOR`: kv-head-major vs
  heads-fastest), with the autotuned kernel tile, then with each tile of --tiles forced;
* the vertical-slash kernel (slash_group 64, structured and weak-locality inputs) under each order;
* the antidiagonal estimator with pass 2 reading pass 1's scores from scratch vs recomputing them
  (`triton_estimators.ANTIDIAG_SCRATCH_BYTES`);
* with `--tables ...,tma`: the block-sparse kernel (autotuned tile) with pointer loads vs TMA
  tensor-descriptor loads (`triton_attention.TMA`), random lists at each density and every
  causal block, with the TFLOP/s of the computed pairs;
* with `--tables ...,softmax`: the block-sparse kernel's softmax modes (`block_sparse_attention`'s
  `softmax=`): exact and the two timing diagnostics no_exp / mma_only (wrong outputs), which show
  how much of the tile loop the softmax costs. Each mode is autotuned;
* with `--tables ...,gluon`: the Triton block-sparse kernel (autotuned) vs the Gluon sm_90 kernel
  (`triton_attention.GLUON`, kernels/gluon_attention.py), its warp-specialised variant
  (`gluon_attention.WARP_SPECIALIZED`) and that variant's persistent form
  (`gluon_attention.PERSISTENT`), random lists at each density and every causal block, with
  TFLOP/s and the max |difference| of their outputs from the Triton kernel's (saved runs of
  2026-12-02 hold the persistent variant of commit c8f7f4c instead, removed: 0.82-0.93x of the
  Triton kernel);
* with `--tables ...,fixed`: where a call's fixed cost goes. Both kernels on lists of one block
  per query block (the masked diagonal, or the unmasked block 0: the per-program cost with one
  tile), and on the random lists of each density against lists with the same count per query
  block but contiguous, ending at the diagonal (scattered vs sequential K/V tiles).
Each row also records the max |difference| between the variants' outputs (same math, other
order of work: expected at rounding level).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from patchattn.evals.bench import prefill
from patchattn.evals.bench.prefill import (
    D, TIMING, causal_pairs, cuda_time, parse_lengths, random_block_lists, random_inputs, sdpa, structured_inputs,
    vertical_slash_pipeline,
)
from patchattn.kernels import triton_attention as ta
from patchattn.kernels import triton_estimators as te

ORDERS = {"kv_major": True, "heads_fastest": False}
LOADS = {"pointer": False, "tma": True}
TABLES = ("orders", "antidiagonal", "tma", "softmax", "gluon", "fixed", "listorder")
KERNELS = {"triton": False, "gluon": True}
SOFTMAX_ROWS = ("exact", "no_exp", "mma_only")
# Columns a saved report may hold: "lazy" (lazy rescaling) was timed on 2026-12-02 and dropped.
_SOFTMAX_COLUMNS = ("exact", "lazy", "no_exp", "mma_only")


def _max_diff(a, b):
    return float((a.float() - b.float()).abs().max())


def _per_flag(fn, flag, variants):
    """{variant: (ms, output, block-sparse tuned config)} with the module flag ta.<flag> set per
    variant (restored after)."""
    saved = getattr(ta, flag)
    out = {}
    try:
        for name, value in variants.items():
            setattr(ta, flag, value)
            result = fn()  # compile / autotune this variant
            out[name] = (cuda_time(fn), result, str(getattr(ta._block_sparse_tuned, "best_config", None)))
    finally:
        setattr(ta, flag, saved)
    return out


def _per_order(fn):
    return _per_flag(fn, "KV_MAJOR", ORDERS)


def _order_row(label, timed, reference_ms):
    (a, out_a, _), (b, out_b, _) = timed["kv_major"], timed["heads_fastest"]
    return {"row": label, "kv_major_ms": a, "heads_fastest_ms": b, "speedup": b / a,
            "max_abs_diff": _max_diff(out_a, out_b), "reference_ms": reference_ms}


def every_causal_block(n, block, heads):
    """Block lists (index, count) that hold every causal block of each query block."""
    nb = n // block
    index = torch.arange(nb, device="cuda", dtype=torch.int32).expand(1, heads, nb, nb).contiguous()
    count = torch.arange(1, nb + 1, device="cuda", dtype=torch.int32).expand(1, heads, nb).contiguous()
    return index, count


def bench_orders(n, densities, block, tiles=()):
    q, k, v = random_inputs(n)
    scale = D ** -0.5
    sdpa_ms = cuda_time(lambda: sdpa(q, k, v))
    rows = []
    causal = causal_pairs(n)
    for density in densities:
        index, count, pairs = random_block_lists(n, density, seed=int(density * 1000), block=block)
        timed = _per_order(lambda: ta.block_sparse_attention(q, k, v, index, count, scale=scale, block_m=block,
                                                             block_n=block)[0])
        row = _order_row(f"block_sparse density {pairs / causal:.3f}", timed, pairs / causal * sdpa_ms)
        row["density"] = pairs / causal
        row["config"] = str(getattr(ta._block_sparse_tuned, "best_config", None))
        rows.append(row)
        for tile in tiles:
            timed = _per_order(lambda: ta.block_sparse_attention(q, k, v, index, count, scale=scale, block_m=block,
                                                                 block_n=block, tile=tile)[0])
            rows.append({**_order_row(f"block_sparse density {pairs / causal:.3f} tile {tile[0]}x{tile[1]}", timed,
                                      pairs / causal * sdpa_ms), "density": pairs / causal})
        del index, count
    full_index, full_count = every_causal_block(n, block, q.shape[1])
    timed = _per_order(lambda: ta.block_sparse_attention(q, k, v, full_index, full_count, scale=scale, block_m=block,
                                                         block_n=block)[0])
    rows.append({**_order_row("block_sparse all blocks", timed, sdpa_ms), "density": 1.0,
                 "config": str(getattr(ta._block_sparse_tuned, "best_config", None))})
    del full_index, full_count, q, k, v
    torch.cuda.empty_cache()

    for locality, label in ((1.5, "structured"), (0.6, "weak locality")):
        q, k, v = structured_inputs(n, locality=locality)
        n_vertical, n_slash = max(64, int(0.01 * n)), max(64, int(0.03 * n))
        _, (cols, diags, index) = vertical_slash_pipeline(q, k, v, n_vertical, n_slash, slash_group=64)
        timed = _per_order(lambda: ta.vertical_slash_attention(q, k, v, cols, diags, scale=scale, index=index,
                                                               block_m=64)[0])
        kept = int(ta.vertical_slash_pair_counts(cols, diags, n_q=n)["kept"].sum()) / causal
        rows.append({**_order_row(f"vertical_slash g64 kernel ({label})", timed, kept * sdpa_ms), "density": kept})
        del q, k, v, cols, diags, index
        torch.cuda.empty_cache()
    return sdpa_ms, rows


def sdpa_time(n):
    q, k, v = random_inputs(n)
    return cuda_time(lambda: sdpa(q, k, v))


def _tma_row(label, timed, pairs, reference_ms):
    (a, out_a, cfg_a), (b, out_b, cfg_b) = timed["pointer"], timed["tma"]
    tflop = 4 * D * pairs / 1e12  # q.k and p.v: 2 x D multiply-adds per computed pair
    return {"row": label, "pointer_ms": a, "tma_ms": b, "speedup": a / b, "max_abs_diff": _max_diff(out_a, out_b),
            "reference_ms": reference_ms, "pointer_tflops": tflop / (a / 1e3), "tma_tflops": tflop / (b / 1e3),
            "pointer_config": cfg_a, "tma_config": cfg_b}


def timed_lists(n, densities, block, heads):
    """(label, index, count, pairs) for a random list at each density, then every causal block;
    made one at a time, so only one set of lists is alive (at 128k each takes ~128 MB)."""
    causal = causal_pairs(n)
    for density in densities:
        index, count, pairs = random_block_lists(n, density, seed=int(density * 1000), block=block)
        yield f"block_sparse density {pairs / causal:.3f}", index, count, pairs
        del index, count  # before the next set is made
    yield ("block_sparse all blocks", *every_causal_block(n, block, heads), causal)


def bench_tma(n, densities, block, sdpa_ms):
    """Pointer loads vs TMA descriptors in the block-sparse kernel, each autotuned."""
    q, k, v = random_inputs(n)
    scale = D ** -0.5
    causal = causal_pairs(n)
    used = ta._tma_usable(q, k, v)  # else both variants run the pointer loads
    rows = []
    for label, index, count, pairs in timed_lists(n, densities, block, q.shape[1]):
        timed = _per_flag(lambda: ta.block_sparse_attention(q, k, v, index, count, scale=scale, block_m=block,
                                                            block_n=block)[0], "TMA", LOADS)
        rows.append({**_tma_row(label, timed, pairs, pairs / causal * sdpa_ms), "density": pairs / causal,
                     "tma_used": used})
        del index, count
    del q, k, v
    torch.cuda.empty_cache()
    return rows


def bench_softmax(n, densities, block, sdpa_ms):
    """Per list (random at each density, and every causal block): ms and TFLOP/s of each softmax
    mode, autotuned per mode (the diagnostics' outputs are wrong by design and not compared)."""
    q, k, v = random_inputs(n)
    scale = D ** -0.5
    causal = causal_pairs(n)
    rows = []
    for label, index, count, pairs in timed_lists(n, densities, block, q.shape[1]):
        row = {"row": label, "density": pairs / causal, "reference_ms": pairs / causal * sdpa_ms}
        for mode in SOFTMAX_ROWS:
            fn = lambda: ta.block_sparse_attention(q, k, v, index, count, scale=scale, block_m=block,  # noqa: E731
                                                   block_n=block, softmax=mode)[0]
            fn()  # compile / autotune this mode
            ms = cuda_time(fn)
            row[mode] = {"ms": ms, "tflops": 4 * D * pairs / 1e12 / (ms / 1e3),
                         "config": str(getattr(ta._block_sparse_tuned, "best_config", None))}
        rows.append(row)
        del index, count
    del q, k, v
    torch.cuda.empty_cache()
    return rows


def bench_gluon(n, densities, block, sdpa_ms):
    """The Triton kernel vs the Gluon sm_90 kernel, its warp-specialised variant and that
    variant's persistent form on the same lists."""
    from patchattn.kernels import gluon_attention as ga
    from patchattn.kernels.gluon_attention import sm90_usable

    q, k, v = random_inputs(n)
    scale = D ** -0.5
    causal = causal_pairs(n)
    used = sm90_usable(q, block, block, None, None)  # else both variants run the Triton kernel
    rows = []
    for label, index, count, pairs in timed_lists(n, densities, block, q.shape[1]):
        run = lambda: ta.block_sparse_attention(q, k, v, index, count, scale=scale, block_m=block,  # noqa: E731
                                                block_n=block)[0]
        timed = {}
        saved = ga.WARP_SPECIALIZED, ga.PERSISTENT, ga.WSP_K_STAGES
        try:  # the per-item kernel, the warp-specialised variant, its persistent form (the default) with
            # its default K stages (3 where they fit) and with 2
            for name, ws, persistent, k_stages in (("gluon", False, False, 3), ("gluon_ws", True, False, 3),
                                                   ("gluon_wsp", True, True, 3), ("gluon_wsp_k2", True, True, 2)):
                ga.WARP_SPECIALIZED, ga.PERSISTENT, ga.WSP_K_STAGES = ws, persistent, k_stages
                timed.update(_per_flag(run, "GLUON", KERNELS if name == "gluon" else {name: True}))
        finally:
            ga.WARP_SPECIALIZED, ga.PERSISTENT, ga.WSP_K_STAGES = saved
        (a, out_a, _), (b, out_b, _) = timed["triton"], timed["gluon"]
        tflop = 4 * D * pairs / 1e12
        row = {"row": label, "density": pairs / causal, "reference_ms": pairs / causal * sdpa_ms,
               "triton_ms": a, "gluon_ms": b, "speedup": a / b, "triton_tflops": tflop / (a / 1e3),
               "gluon_tflops": tflop / (b / 1e3), "max_abs_diff": _max_diff(out_a, out_b), "gluon_used": used,
               "ws_used": used and block == 128}  # else the per-item Gluon kernel ran for both forms
        for prefix in ("ws", "wsp", "wsp_k2"):
            ms, out, _ = timed[f"gluon_{prefix}"]
            row.update({f"{prefix}_ms": ms, f"{prefix}_speedup": a / ms, f"{prefix}_max_abs_diff": _max_diff(out_a, out)})
        rows.append(row)
        del index, count
    del q, k, v
    torch.cuda.empty_cache()
    return rows


def structure_lists(n, densities, block, heads):
    """(label, index, count, pairs) for the fixed-cost table: one block per query block (its
    diagonal, then block 0), then per density the random lists and the same counts as one
    contiguous run of blocks ending at the diagonal."""
    nb = n // block
    qb = torch.arange(nb, device="cuda", dtype=torch.int32)
    one = torch.ones(1, heads, nb, device="cuda", dtype=torch.int32)
    diag_pairs = heads * nb * block * (block + 1) // 2
    yield "diagonal block only", qb.expand(1, heads, nb)[..., None].contiguous(), one, diag_pairs
    first = torch.zeros(1, heads, nb, 1, device="cuda", dtype=torch.int32)
    yield "block 0 only", first, one, heads * (nb - 1) * block * block + heads * block * (block + 1) // 2
    for label, index, count, pairs in timed_lists(n, densities, block, heads):
        if "all blocks" in label:
            break
        yield f"{label} random", index, count, pairs
        run = torch.arange(index.shape[-1], device="cuda", dtype=torch.int32)
        start = (qb[:, None] - count[..., None] + 1)  # [1, H, nb, 1]
        contiguous = (start + run).clamp(0, nb - 1).to(torch.int32).contiguous()
        yield f"{label} contiguous", contiguous, count, pairs
        del run, start, contiguous


def bench_fixed(n, densities, block, sdpa_ms):
    """The Triton kernel and the default Gluon kernel (for 128-row blocks the persistent
    warp-specialised form; saved runs before 2026-12-02's fourth session hold the per-item
    warp-specialised kernel, and kernel_variants_gluon_ws_fixed_h200.json the per-item Gluon
    kernel) on the lists of `structure_lists`; per program: the call's time spread over the
    programs one SM runs."""
    q, k, v = random_inputs(n)
    scale = D ** -0.5
    causal = causal_pairs(n)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    programs = q.shape[1] * (n // block)
    rows = []
    for label, index, count, pairs in structure_lists(n, densities, block, q.shape[1]):
        run = lambda: ta.block_sparse_attention(q, k, v, index, count, scale=scale, block_m=block,  # noqa: E731
                                                block_n=block)[0]
        timed = _per_flag(run, "GLUON", KERNELS)
        row = {"row": label, "density": pairs / causal, "reference_ms": pairs / causal * sdpa_ms,
               "tiles": int(count.sum()), "programs": programs}
        for name, (ms, _, _) in timed.items():
            row[f"{name}_ms"] = ms
            row[f"{name}_us_per_program"] = ms * 1e3 * sms / programs
        rows.append(row)
    del q, k, v
    torch.cuda.empty_cache()
    return rows


def rotated_left(index, count):
    """Each list's entries [1, count) then entry 0 (padding entries copied as they are): the
    persistent Gluon kernel, which runs entry count - 1 first, then runs the original order."""
    j = torch.arange(index.shape[-1], device=index.device)
    last = (count.long() - 1)[..., None]
    src = torch.where(j < last, j + 1, torch.where(j == last, 0, j))
    return index.gather(-1, src).contiguous()


def bench_list_order(n, densities, block, sdpa_ms):
    """The default kernel with the diagonal run first (ascending lists) vs last (rotated lists)."""
    q, k, v = random_inputs(n)
    scale = D ** -0.5
    causal = causal_pairs(n)
    rows = []
    for label, index, count, pairs in timed_lists(n, densities, block, q.shape[1]):
        timed = {}
        for name, idx in (("diagonal_first", index), ("diagonal_last", rotated_left(index, count))):
            fn = lambda idx=idx: ta.block_sparse_attention(q, k, v, idx, count, scale=scale,  # noqa: E731
                                                           block_m=block, block_n=block)[0]
            out = fn()
            timed[name] = (cuda_time(fn), out)
            del idx
        (a, out_a), (b, out_b) = timed["diagonal_first"], timed["diagonal_last"]
        rows.append({"row": label, "density": pairs / causal, "reference_ms": pairs / causal * sdpa_ms,
                     "diagonal_first_ms": a, "diagonal_last_ms": b, "speedup": b / a,
                     "max_abs_diff": _max_diff(out_a, out_b)})
        del index, count, timed
    del q, k, v
    torch.cuda.empty_cache()
    return rows


def bench_antidiagonal(n, sdpa_ms, strides):
    q, k, _ = structured_inputs(n)
    scale = D ** -0.5
    rows = []
    saved = te.ANTIDIAG_SCRATCH_BYTES
    try:
        for stride in strides:
            res = {}
            for name, budget in (("scratch", saved), ("recompute", 0)):
                te.ANTIDIAG_SCRATCH_BYTES = budget
                fn = lambda: te.antidiagonal_block_scores(q, k, block_size=128, stride=stride,  # noqa: E731
                                                          scale=scale / stride)
                out = fn()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                fn()
                res[name] = (cuda_time(fn), out, torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated())
            rows.append({"row": f"antidiagonal stride {stride}", "scratch_ms": res["scratch"][0],
                         "recompute_ms": res["recompute"][0], "speedup": res["recompute"][0] / res["scratch"][0],
                         "scratch_pct_of_sdpa": 100 * res["scratch"][0] / sdpa_ms,
                         "recompute_pct_of_sdpa": 100 * res["recompute"][0] / sdpa_ms,
                         "scratch_peak_extra_mb": res["scratch"][2] / 2 ** 20,
                         "max_abs_diff": _max_diff(res["scratch"][1], res["recompute"][1])})
    finally:
        te.ANTIDIAG_SCRATCH_BYTES = saved
    return rows


def _markdown(header, cells):
    """Print a markdown table: header is a list of column names, cells an iterable of rows (none:
    no table)."""
    cells = list(cells)
    if not cells:
        return
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in cells:
        print("| " + " | ".join(row) + " |")


def print_table(report):
    _markdown(["N", "row", "kv-major ms", "heads-fastest ms", "speedup", "ratio vs density x SDPA (kv-major)",
               "max diff", "tuned config"],
              ([str(r["n"]), row["row"], f"{row['kv_major_ms']:.2f}", f"{row['heads_fastest_ms']:.2f}",
                f"{row['speedup']:.2f}", f"{row['kv_major_ms'] / row['reference_ms']:.2f}",
                f"{row['max_abs_diff']:.1e}", row.get("config", "")]
               for r in report["results"] for row in r.get("orders", [])))
    _markdown(["N", "estimator", "scratch ms (% SDPA)", "recompute ms (% SDPA)", "scratch peak MiB", "max diff"],
              ([str(r["n"]), row["row"], f"{row['scratch_ms']:.2f} ({row['scratch_pct_of_sdpa']:.1f} %)",
                f"{row['recompute_ms']:.2f} ({row['recompute_pct_of_sdpa']:.1f} %)",
                f"{row['scratch_peak_extra_mb']:.0f}", f"{row['max_abs_diff']:.1e}"]
               for r in report["results"] for row in r.get("antidiagonal", [])))
    _markdown(["N", "pointer loads vs TMA", "pointer ms", "TMA ms", "speedup", "TFLOP/s pointer / TMA",
               "ratio vs density x SDPA (TMA)", "max diff", "tuned config (TMA)"],
              ([str(r["n"]), row["row"] + ("" if row["tma_used"] else " (TMA not usable: both pointer)"),
                f"{row['pointer_ms']:.2f}", f"{row['tma_ms']:.2f}", f"{row['speedup']:.2f}",
                f"{row['pointer_tflops']:.0f} / {row['tma_tflops']:.0f}", f"{row['tma_ms'] / row['reference_ms']:.2f}",
                f"{row['max_abs_diff']:.1e}", row["tma_config"]]
               for r in report["results"] for row in r.get("tma", [])))
    gluon = [(r["n"], row) for r in report["results"] for row in r.get("gluon", [])]
    # Further variants of a run: the warp-specialised kernel and its persistent form ("wsp", and
    # "wsp_k2" with 2 K stages where "wsp" has 3, runs from the fifth session of 2026-12-02 on; saved
    # runs of 2026-12-02 hold the static-stride form of commit 786f9fc, and "persistent", the
    # removed per-item one of c8f7f4c).
    extras = [k for k in ("ws", "wsp", "wsp_k2", "persistent") if any(f"{k}_ms" in row for _, row in gluon)]
    _markdown(["N", "Triton vs Gluon (sm_90)", "Triton ms", "Gluon ms", "speedup", "TFLOP/s Triton / Gluon",
               "ratio vs density x SDPA (Gluon)", "max diff",
               *(c for x in extras for c in (f"{x} ms", "speedup", f"ratio ({x})", "max diff"))],
              ([str(n), row["row"] + ("" if row["gluon_used"] else " (Gluon not usable: both Triton)"),
                f"{row['triton_ms']:.2f}", f"{row['gluon_ms']:.2f}", f"{row['speedup']:.2f}",
                f"{row['triton_tflops']:.0f} / {row['gluon_tflops']:.0f}",
                f"{row['gluon_ms'] / row['reference_ms']:.2f}", f"{row['max_abs_diff']:.1e}",
                *(c for x in extras for c in (f"{row[x + '_ms']:.2f}", f"{row[x + '_speedup']:.2f}",
                                               f"{row[x + '_ms'] / row['reference_ms']:.2f}",
                                               f"{row[x + '_max_abs_diff']:.1e}"))]
               for n, row in gluon))
    _markdown(["N", "lists (fixed cost)", "density", "tiles", "Triton ms", "Gluon ms", "us per program Triton / Gluon",
               "Gluon / (density x SDPA)"],
              ([str(r["n"]), row["row"], f"{row['density']:.3f}", str(row["tiles"]), f"{row['triton_ms']:.2f}",
                f"{row['gluon_ms']:.2f}", f"{row['triton_us_per_program']:.2f} / {row['gluon_us_per_program']:.2f}",
                f"{row['gluon_ms'] / row['reference_ms']:.2f}"]
               for r in report["results"] for row in r.get("fixed", [])))
    _markdown(["N", "list order (default kernel)", "diagonal first ms", "diagonal last ms", "speedup",
               "ratio vs density x SDPA (first / last)", "max diff"],
              ([str(r["n"]), row["row"], f"{row['diagonal_first_ms']:.2f}", f"{row['diagonal_last_ms']:.2f}",
                f"{row['speedup']:.3f}", f"{row['diagonal_first_ms'] / row['reference_ms']:.2f} / "
                f"{row['diagonal_last_ms'] / row['reference_ms']:.2f}", f"{row['max_abs_diff']:.1e}"]
               for r in report["results"] for row in r.get("listorder", [])))
    softmax = [(r["n"], row) for r in report["results"] for row in r.get("softmax", [])]
    modes = [m for m in _SOFTMAX_COLUMNS if any(m in row for _, row in softmax)]
    _markdown(["N", "softmax modes", *(f"{m} ms (TFLOP/s)" for m in modes), "exact / (density x SDPA)",
               "mma_only / (density x SDPA)"],
              ([str(n), row["row"], *(f"{row[m]['ms']:.2f} ({row[m]['tflops']:.0f})" for m in modes),
                f"{row['exact']['ms'] / row['reference_ms']:.2f}", f"{row['mma_only']['ms'] / row['reference_ms']:.2f}"]
               for n, row in softmax))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", default="32k,128k")
    parser.add_argument("--densities", default="0.1")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--strides", default="16,8")
    parser.add_argument("--tiles", default="128x128,64x64", help="kernel tiles also timed forced (untuned)")
    parser.add_argument("--tables", default="orders,antidiagonal", help=f"which to time, of {','.join(TABLES)}")
    parser.add_argument("--timing", choices=sorted(TIMING), default="synced", help="see prefill.TIMING")
    parser.add_argument("--out", default="evals/bench/results/kernel_variants.json")
    parser.add_argument("--print", dest="print_json", metavar="JSON", help="print the tables of a saved run and exit")
    args = parser.parse_args(argv)
    if args.print_json:
        report = json.loads(Path(args.print_json).read_text())
        print_table(report)
        return report
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    prefill.TIMING_MODE = args.timing
    import triton

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "timing": TIMING[args.timing], "results": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles.split(",") if t]
    densities = [float(x) for x in args.densities.split(",")]
    tables = [t for t in args.tables.split(",") if t]
    if set(tables) - set(TABLES):
        parser.error(f"--tables: unknown {sorted(set(tables) - set(TABLES))}, choose from {','.join(TABLES)}")
    for n in parse_lengths(args.seqlens):
        t0 = time.time()
        if "orders" in tables:
            sdpa_ms, orders = bench_orders(n, densities, args.block, tiles)
            result = {"n": n, "sdpa_ms": sdpa_ms, "orders": orders}
        else:
            result = {"n": n, "sdpa_ms": sdpa_time(n)}
        report["results"].append(result)
        out.write_text(json.dumps(report, indent=1))
        strides = [int(s) for s in args.strides.split(",")]
        benches = {"antidiagonal": lambda: bench_antidiagonal(n, result["sdpa_ms"], strides),
                   **{name: lambda fn=fn: fn(n, densities, args.block, result["sdpa_ms"])
                      for name, fn in (("tma", bench_tma), ("softmax", bench_softmax), ("gluon", bench_gluon),
                                       ("fixed", bench_fixed), ("listorder", bench_list_order))}}
        for name, bench in benches.items():  # in TABLES order; saved after each, so a time limit keeps them
            if name in tables:
                result[name] = bench()
                out.write_text(json.dumps(report, indent=1))
        result["wall_s"] = time.time() - t0
        out.write_text(json.dumps(report, indent=1))
        print(f"N={n} done in {time.time() - t0:.0f}s", flush=True)
    print_table(report)
    return report


if __name__ == "__main__":
    main()
