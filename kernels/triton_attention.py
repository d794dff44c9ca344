"""Triton sparse-attention kernels: block-sparse and vertical-slash (MInference-style) prefill.

Both kernels share one contract (see `kernels.reference` for the torch oracle):

* q [B, Hq, N, D], k/v [B, Hkv, Nk, D], Hq % Hkv == 0; query head h reads kv head h // (Hq // Hkv)
  directly (no repeat_kv copy).
* Query row i sits at absolute key position i + q_offset. Pair (i, j) is base-valid when
  j <= i + q_offset, j >= kv_start[b] and, with a sliding window w, (i + q_offset) - j < w.
* Optional softcap: s = softcap * tanh(s / softcap) on the scaled scores.
* Rows with no kept key return out = 0 and lse = -inf; every output element is written.

The online softmax runs in base 2 (exp2) with the running max seeded at a large finite negative
number, so tiles whose scores are all masked (-inf) never produce inf - inf = NaN.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_estimators import _interpreting, autotuning, kv_start_tensor, tune_bucket

LOG2E = tl.constexpr(1.4426950408889634)
_INDEX_PAD = 1 << 30  # sorts after every real key index / diagonal


# Retune per head_dim / block shape / softcap and per power-of-two query length (tune_bucket),
# not for every prompt length.
_TUNE_KEY = ["HEAD_DIM", "BLOCK_M", "BLOCK_N", "SOFTCAP", "KV_MAJOR", "tune_bucket"]
# Diagnostic switch for benchmarks: apply the element mask on every tile, not only edge tiles.
_MASK_EVERY_TILE = False
# Program order (see _program_setup): kv-head-major unless PATCHATTN_KV_MAJOR=0 (benchmarks flip
# this module flag to time both orders).
KV_MAJOR = os.environ.get("PATCHATTN_KV_MAJOR", "1") != "0"
# Block-sparse kernel: fetch the q / K / V tiles with Hopper TMA (tensor descriptors) instead of
# per-element pointers, where _tma_usable allows it (PATCHATTN_TMA=1; off until timed faster;
# benchmarks and tests flip this module flag).
TMA = os.environ.get("PATCHATTN_TMA", "0") == "1"
# Block-sparse attention on Hopper through the Gluon kernel (kernels/gluon_attention.py: the next
# tile's q.K^T overlaps this tile's softmax) where `sm90_usable` accepts the inputs. On by default:
# on H200 its default form for 128-row blocks (warp-specialised) runs 1.17-1.40x this Triton
# kernel's speed over two runs, the per-item form 0.90-1.22x (evals/bench/results/h200/README.md).
# PATCHATTN_GLUON=0 turns it off; benchmarks and tests flip this module flag.
GLUON = os.environ.get("PATCHATTN_GLUON", "1") != "0"
# Block-sparse kernel's softmax: "exact" is the kernel. "no_exp" and "mma_only" are timing
# diagnostics with WRONG outputs that measure how much of the tile loop the softmax costs:
# no_exp drops the exponentials (p = shifted scores), mma_only keeps only the two matrix
# products. Only an explicit `softmax=` argument of block_sparse_attention selects them
# (kernel_variants --tables softmax). Measured and dropped (H200, 2026-12-02): FlashAttention-4's
# lazy rescaling (rescale only when a row max grows past 8 log2 units) ran 0.87-0.94x of exact:
# its block-wide max and branch per tile cost more than the accumulator multiply it saves.
SOFTMAX_MODES = {"exact": 0, "no_exp": 1, "mma_only": 2}

# Hopper-oriented search space; BLOCK_M / BLOCK_N are fixed by the caller's block layout.
_ATTN_CONFIGS = [
    triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (4, 3), (8, 2), (8, 3), (4, 1), (8, 1))
]
_TILE_N_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=c.num_warps, num_stages=c.num_stages)
                   for n in (64, 128) for c in _ATTN_CONFIGS]
# Block-sparse: the kernel's tile (BLOCK_M rows x BLOCK_N keys) may be a fraction of the lists'
# blocks (LIST_M x LIST_N): smaller tiles leave room for two programs per SM, whose prologues,
# epilogues and softmax then overlap the other's matrix work.
_BLOCK_TILE_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                       for m, n, w, st in ((128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3),
                                           (128, 64, 4, 3), (64, 128, 4, 2), (64, 128, 4, 3), (64, 64, 4, 2),
                                           (64, 64, 4, 3), (64, 64, 4, 4))]
_BLOCK_TUNE_KEY = ["HEAD_DIM", "LIST_M", "LIST_N", "SOFTCAP", "KV_MAJOR", "USE_TMA", "SOFTMAX_MODE", "tune_bucket"]
_SMEM_BUDGET = 200 * 1024  # untuned launches: H100 allows 227 KB per block; leave room for scratch
# Autotuning may try configs up to the hardware limit (a config that does not fit is skipped by
# the autotuner): 128 x 128 tiles with 3 stages need ~224 KB at head_dim 128.
_SMEM_BUDGET_TUNED = 227 * 1024
# Whether a launch tunes (PATCHATTN_TRITON_AUTOTUNE, PATCHATTN_TRITON_AUTOTUNE_MIN_N): see
# triton_estimators.autotuning, shared by every autotuned kernel.


def _tile_n(meta: dict) -> int:
    return meta["BLOCK_N"]


def _smem_bytes(stages: int, block_m: int, tile_n: int, block_d: int, elem: int) -> int:
    """Rough shared memory of one program: the q tile plus `stages` K and V tiles."""
    return (block_m + 2 * stages * tile_n) * block_d * elem


def _prune_configs(configs, named_args, **meta):
    elem = named_args["Q"].element_size()

    def smem(c):
        m = {**meta, **c.kwargs}
        return _smem_bytes(c.num_stages, m["BLOCK_M"], _tile_n(m), m["BLOCK_D"], elem)

    if "LIST_M" in meta:  # block-sparse: kernel tiles must divide the list's blocks
        lm, ln = meta["LIST_M"], meta["LIST_N"]
        configs = ([c for c in configs if lm % c.kwargs["BLOCK_M"] == 0 and ln % c.kwargs["BLOCK_N"] == 0]
                   # lists of smaller blocks than any searched tile: the lists' own blocks as the tile
                   or [triton.Config({"BLOCK_M": lm, "BLOCK_N": ln}, num_warps=c.num_warps, num_stages=c.num_stages)
                       for c in _ATTN_CONFIGS])
    fits = [c for c in configs if smem(c) <= _SMEM_BUDGET_TUNED]
    deep = [c for c in fits if c.num_stages > 1]  # single-stage only when nothing deeper fits
    return deep or fits or [min(configs, key=smem)]


def _autotuned(kernel, configs, extra_key=(), key=_TUNE_KEY):
    return triton.autotune(configs, key=key + list(extra_key),
                           prune_configs_by={"early_config_prune": _prune_configs})(kernel)


# ----------------------------------------------------------------------------- shared device code


@triton.jit
def _scaled_scores(q, k, sm_scale, softcap, SOFTCAP: tl.constexpr):
    """q [BM, BD] x k [BN, BD] -> (scores, multiplier): scores * multiplier are the scaled
    (optionally softcapped) scores in log2 units. Without softcap the scale stays a multiplier
    that `_online_step` folds into the exponent's FMA (one op per score less)."""
    s = tl.dot(q, tl.trans(k))
    if SOFTCAP:
        x = s * (sm_scale / softcap)
        # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates cleanly to +-1 when exp over/underflows.
        s = (softcap * LOG2E) * (1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0))
        return s, 1.0
    return s, sm_scale * LOG2E


@triton.jit
def _base_valid(pos, cols, kv_start, n_keys, window, HAS_WINDOW: tl.constexpr):
    """Causal / left-padding / key-range / sliding-window validity, [BM, BN] bool."""
    ok = (cols[None, :] <= pos[:, None]) & (cols[None, :] >= kv_start) & (cols[None, :] < n_keys)
    if HAS_WINDOW:
        ok = ok & (pos[:, None] - cols[None, :] < window)
    return ok


@triton.jit
def _online_step(s, c, v, m_i, l_i, acc, SOFTMAX_MODE: tl.constexpr):
    """Fold one score tile into the running softmax state: s * c (c > 0) are the scores in log2
    units, masked entries -inf. SOFTMAX_MODE: see SOFTMAX_MODES (0 exact; 1 and 2 are timing
    diagnostics with wrong outputs)."""
    if SOFTMAX_MODE == 2:
        acc = acc + tl.dot(s.to(v.dtype), v)
        l_i = l_i + 1.0
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * c)
        alpha = tl.exp2(m_i - m_new)
        if SOFTMAX_MODE == 1:
            p = s * c - m_new[:, None]
        else:
            p = tl.exp2(s * c - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _store_rows(Out, Lse, out_base, lse_base, offs_m, offs_d, n_q, so_n, acc, m_i, l_i,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Normalise and write a row tile; empty rows get out = 0, lse = -inf."""
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / LOG2E, float("-inf"))
    row_ok = offs_m < n_q
    o_mask = row_ok[:, None]
    if BLOCK_D != HEAD_DIM:
        o_mask = o_mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(Out + out_base + offs_m[:, None] * so_n + offs_d[None, :], out.to(Out.dtype.element_ty), mask=o_mask)
    tl.store(Lse + lse_base + offs_m, lse, mask=row_ok)


@triton.jit
def _load_rows(ptr, rows, offs_d, stride_row, row_mask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASKED: tl.constexpr):
    """Load [len(rows), BLOCK_D] rows; the mask is compiled out for interior tiles."""
    ptrs = ptr + rows[:, None] * stride_row + offs_d[None, :]
    if MASKED:
        m = row_mask[:, None]
        if BLOCK_D != HEAD_DIM:
            m = m & (offs_d[None, :] < HEAD_DIM)
        return tl.load(ptrs, mask=m, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _head_rows_descriptor(base, n_b, n_h, n_rows, s_b, s_h, s_n, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """TMA descriptor over a whole [B, H, rows, HEAD_DIM] tensor, read BLOCK_ROWS rows of one head
    at a time. Its bounds are the tensor's, so rows past `n_rows` and columns past HEAD_DIM come
    back as zeros, as the masked pointer loads give them."""
    return tl.make_tensor_descriptor(base, shape=[n_b, n_h, n_rows, HEAD_DIM], strides=[s_b, s_h, s_n, 1],
                                     block_shape=[1, 1, BLOCK_ROWS, BLOCK_D])


@triton.jit
def _load_head_rows(src, b, head, row0, rows, offs_d, stride_row, row_mask, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows `rows` = row0 + [0, BLOCK_ROWS) of head (b, head) as [BLOCK_ROWS, BLOCK_D]: src is the
    head's base pointer (`_load_rows`), or with USE_TMA a `_head_rows_descriptor`, which needs no
    mask (the copy engine zero-fills outside the tensor)."""
    # if / else, not an early return: triton 3.6 still compiles the code after a constexpr branch
    # that returns, which would do pointer arithmetic on a descriptor.
    if USE_TMA:
        tile = tl.reshape(src.load([b, head, row0, 0]), [BLOCK_ROWS, BLOCK_D])
    else:
        tile = _load_rows(src, rows, offs_d, stride_row, row_mask, HEAD_DIM, BLOCK_D, MASKED)
    return tile


# ----------------------------------------------------------------------------- block-sparse kernel


@triton.jit
def _program_setup(Q, K, V, KvStart, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, n_q, n_k, n_heads, group,
                   q_offset, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, KV_MAJOR: tl.constexpr, USE_TMA: tl.constexpr):
    """Which (batch, query head, kv head, query block) this program owns, its q tile and where its
    K/V rows come from: its kv head's base pointers, or (USE_TMA) descriptors over all of K / V.

    Programs start in launch order (axis 0 fastest). KV_MAJOR: all query blocks of one (batch,
    kv head), longest first, with the G query heads of each block side by side, before the next
    kv head: the ~one wave of resident programs then reads a single kv head's K/V, so a tile that
    several of them select is served from L2 instead of HBM (random sparse lists are otherwise
    HBM-bound). Otherwise: heads fastest, then query blocks from the last (longest).
    """
    n_kv = n_heads // group
    if KV_MAJOR:
        n_qb = tl.num_programs(1)
        lin = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        g = lin % group
        rest = lin // group
        qb = n_qb - 1 - rest % n_qb
        bk = rest // n_qb  # b * Hkv + kv head
        b = bk // n_kv
        kvh = bk % n_kv
        h = kvh * group + g
        pid_bh = b * n_heads + h
    else:
        pid_bh = tl.program_id(0)
        qb = tl.num_programs(1) - 1 - tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        kvh = h // group

    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    pos = offs_m + q_offset
    kv_start = tl.load(KvStart + b)
    first_pos = qb * BLOCK_M + q_offset
    last_pos = tl.minimum(qb * BLOCK_M + BLOCK_M, n_q) - 1 + q_offset

    if USE_TMA:
        n_b = tl.num_programs(0) // n_heads  # the grid's axis 0 is B * Hq in both orders
        q_src = _head_rows_descriptor(Q, n_b, n_heads, n_q, sq_b, sq_h, sq_n, HEAD_DIM, BLOCK_M, BLOCK_D)
        k_src = _head_rows_descriptor(K, n_b, n_kv, n_k, sk_b, sk_h, sk_n, HEAD_DIM, BLOCK_N, BLOCK_D)
        v_src = _head_rows_descriptor(V, n_b, n_kv, n_k, sv_b, sv_h, sv_n, HEAD_DIM, BLOCK_N, BLOCK_D)
    else:
        q_src = Q + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
        k_src = K + b.to(tl.int64) * sk_b + kvh.to(tl.int64) * sk_h
        v_src = V + b.to(tl.int64) * sv_b + kvh.to(tl.int64) * sv_h
    q = _load_head_rows(q_src, b, h, qb * BLOCK_M, offs_m, offs_d, sq_n, offs_m < n_q, HEAD_DIM, BLOCK_D, BLOCK_M,
                        True, USE_TMA)
    return pid_bh, qb, b, h, kvh, offs_m, offs_n, offs_d, pos, kv_start, first_pos, last_pos, q, k_src, v_src


@triton.jit
def _block_tile(q, k_src, v_src, b, kvh, idx_base, t, offs_n, offs_d, pos, kv_start, n_k, window, sk_n, sv_n,
                sm_scale, softcap, m_i, l_i, acc, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
                EVEN_N: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr, SOFTMAX_MODE: tl.constexpr):
    """Fold key tile t (tile t % SUB_N of listed block t // SUB_N) into the softmax state; MASKED
    applies the base mask (also to the rows past n_k, which both load paths read as zeros)."""
    kb = tl.load(idx_base + t // SUB_N) * SUB_N + t % SUB_N
    n0 = kb * BLOCK_N
    cols = n0 + offs_n
    live = cols < n_k
    k = _load_head_rows(k_src, b, kvh, n0, cols, offs_d, sk_n, live, HEAD_DIM, BLOCK_D, BLOCK_N,
                        MASKED and not EVEN_N, USE_TMA)
    v = _load_head_rows(v_src, b, kvh, n0, cols, offs_d, sv_n, live, HEAD_DIM, BLOCK_D, BLOCK_N,
                        MASKED and not EVEN_N, USE_TMA)
    s, c = _scaled_scores(q, k, sm_scale, softcap, SOFTCAP)
    if MASKED:
        s = tl.where(live[None, :] & _base_valid(pos, cols, kv_start, n_k, window, HAS_WINDOW), s, float("-inf"))
    return _online_step(s, c, v, m_i, l_i, acc, SOFTMAX_MODE)


@triton.jit
def _block_sparse_fwd(
    Q, K, V, Out, Lse, BlockIdx, BlockCnt, KvStart,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
    si_b, si_h, si_q, sc_b, sc_h,
    n_q, n_k, n_heads, group, idx_group, q_offset, sm_scale, softcap, window, tune_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LIST_M: tl.constexpr, LIST_N: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, EVEN_N: tl.constexpr, MASK_ALL: tl.constexpr,
    KV_MAJOR: tl.constexpr, USE_TMA: tl.constexpr, SOFTMAX_MODE: tl.constexpr,
):
    """One program: BLOCK_M query rows (a 1 / (LIST_M // BLOCK_M) slice of one listed query
    block) against its list's key blocks, walked BLOCK_N keys at a time. USE_TMA: tiles are
    fetched through tensor descriptors (see `_tma_usable` for when the launcher sets it)."""
    SUB_N: tl.constexpr = LIST_N // BLOCK_N
    (pid_bh, qb, b, h, kvh, offs_m, offs_n, offs_d, pos, kv_start, first_pos, last_pos, q, k_src,
     v_src) = _program_setup(Q, K, V, KvStart, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, n_q, n_k,
                             n_heads, group, q_offset, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, KV_MAJOR, USE_TMA)
    list_qb = qb // (LIST_M // BLOCK_M)
    idx_h = h // idx_group  # block lists may be given per kv head (shared by the group)
    idx_base = BlockIdx + b.to(tl.int64) * si_b + idx_h.to(tl.int64) * si_h + list_qb.to(tl.int64) * si_q
    count = tl.load(BlockCnt + b * sc_b + idx_h * sc_h + list_qb)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Lists are ascending, so blocks that need the element mask (crossing kv_start or the window's
    # far edge: low block ids; crossing the diagonal or n_k: high ids) sit at the two ends. Find
    # them with short scalar scans and run the interior with a mask-free, branch-free loop that
    # the compiler can software-pipeline.
    t_hi = count
    scanning = t_hi > 0
    while scanning:
        n_hi = tl.load(idx_base + t_hi - 1) * LIST_N + LIST_N - 1
        scanning = (n_hi > first_pos) | (n_hi >= n_k) | MASK_ALL
        t_hi = tl.where(scanning, t_hi - 1, t_hi)
        scanning = scanning & (t_hi > 0)
    t_lo = 0
    scanning = t_lo < t_hi
    while scanning:
        n_lo = tl.load(idx_base + t_lo) * LIST_N
        scanning = n_lo < kv_start
        if HAS_WINDOW:
            scanning = scanning | (last_pos - n_lo >= window)
        t_lo = tl.where(scanning, t_lo + 1, t_lo)
        scanning = scanning & (t_lo < t_hi)
    # Key tiles of the last listed block that start past this program's last row hold no valid
    # pair (a slice of rows above the diagonal block): skip them.
    t_end = count * SUB_N
    if SUB_N > 1:
        if count > 0:
            first_key = tl.load(idx_base + count - 1) * LIST_N
            live_keys = tl.minimum(tl.maximum(last_pos + 1 - first_key, 0), LIST_N)
            t_end = t_end - SUB_N + (live_keys + BLOCK_N - 1) // BLOCK_N
            t_end = tl.maximum(t_end, t_hi * SUB_N)
    for t in range(0, t_lo * SUB_N):
        m_i, l_i, acc = _block_tile(q, k_src, v_src, b, kvh, idx_base, t, offs_n, offs_d, pos, kv_start, n_k,
                                    window, sk_n, sv_n, sm_scale, softcap, m_i, l_i, acc, HEAD_DIM, BLOCK_D,
                                    BLOCK_N, SUB_N, SOFTCAP, HAS_WINDOW, EVEN_N, True, USE_TMA, SOFTMAX_MODE)
    for t in range(t_lo * SUB_N, t_hi * SUB_N):
        m_i, l_i, acc = _block_tile(q, k_src, v_src, b, kvh, idx_base, t, offs_n, offs_d, pos, kv_start, n_k,
                                    window, sk_n, sv_n, sm_scale, softcap, m_i, l_i, acc, HEAD_DIM, BLOCK_D,
                                    BLOCK_N, SUB_N, SOFTCAP, HAS_WINDOW, EVEN_N, False, USE_TMA, SOFTMAX_MODE)
    for t in range(t_hi * SUB_N, t_end):
        m_i, l_i, acc = _block_tile(q, k_src, v_src, b, kvh, idx_base, t, offs_n, offs_d, pos, kv_start, n_k,
                                    window, sk_n, sv_n, sm_scale, softcap, m_i, l_i, acc, HEAD_DIM, BLOCK_D,
                                    BLOCK_N, SUB_N, SOFTCAP, HAS_WINDOW, EVEN_N, True, USE_TMA, SOFTMAX_MODE)

    _store_rows(Out, Lse, b.to(tl.int64) * so_b + h.to(tl.int64) * so_h, pid_bh.to(tl.int64) * n_q,
                offs_m, offs_d, n_q, so_n, acc, m_i, l_i, HEAD_DIM, BLOCK_D)


_block_sparse_tuned = _autotuned(_block_sparse_fwd, _BLOCK_TILE_CONFIGS, key=_BLOCK_TUNE_KEY)


# ----------------------------------------------------------------------------- vertical-slash kernel


@triton.jit
def _slash_tile(q, k_base, v_base, ColMask, DiagMask, row_base, n0, k_hi, d_lo, d_hi, full, offs_n, offs_d, pos,
                kv_start, n_k, window, sk_n, sv_n, sm_scale, softcap, m_i, l_i, acc, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Keys [n0, n0 + BLOCK_N) of one slash segment [d_lo, d_hi] (last key k_hi): fold in exactly
    the pairs on a kept diagonal whose column is not already counted by the vertical part."""
    cols = n0 + offs_n
    live = cols <= k_hi
    k = _load_rows(k_base, cols, offs_d, sk_n, live, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(v_base, cols, offs_d, sv_n, live, HEAD_DIM, BLOCK_D, True)
    s, c = _scaled_scores(q, k, sm_scale, softcap, SOFTCAP)
    dist = pos[:, None] - cols[None, :]
    in_vertical = tl.load(ColMask + row_base + cols, mask=live, other=1)
    if full != 0:
        # A band needs no per-pair lookup of the diagonal mask (the common case), nor the base
        # mask: 0 <= d_lo <= dist <= d_hi puts the key at or before the row (causal), inside the
        # window (the index drops diagonals >= window) and at or before k_hi; keys start at
        # k_lo >= kv_start. (Rows past n_q may reach past k_hi: zero keys, rows never stored.)
        keep = (dist >= d_lo) & (dist <= d_hi)
    else:
        ok = live[None, :] & _base_valid(pos, cols, kv_start, n_k, window, HAS_WINDOW)
        keep = ok & (tl.load(DiagMask + row_base + dist, mask=ok & (dist < n_k), other=0) != 0)
    keep = keep & (in_vertical == 0)[None, :]
    return _online_step(tl.where(keep, s, float("-inf")), c, v, m_i, l_i, acc, 0)


@triton.jit
def _column_tile(q, k_base, v_base, col_list, t, v_hi, offs_n, offs_d, pos, kv_start, n_k, window, sk_n, sv_n,
                 sm_scale, softcap, m_i, l_i, acc, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, MASKED: tl.constexpr):
    """Fold list slots [t, t + BLOCK_N) of the kept columns (gathered keys) into the softmax
    state; MASKED applies the base mask and the list's end v_hi (compiled out for tiles of
    columns that every row of the block sees)."""
    slot = t + offs_n
    live = slot < v_hi
    if MASKED:
        cols = tl.load(col_list + slot, mask=live, other=0)
    else:
        cols = tl.load(col_list + slot)
    k = _load_rows(k_base, cols, offs_d, sk_n, live, HEAD_DIM, BLOCK_D, MASKED)
    v = _load_rows(v_base, cols, offs_d, sv_n, live, HEAD_DIM, BLOCK_D, MASKED)
    s, c = _scaled_scores(q, k, sm_scale, softcap, SOFTCAP)
    if MASKED:
        s = tl.where(live[None, :] & _base_valid(pos, cols, kv_start, n_k, window, HAS_WINDOW), s, float("-inf"))
    return _online_step(s, c, v, m_i, l_i, acc, 0)


@triton.jit
def _vertical_slash_fwd(
    Q, K, V, Out, Lse, VIdx, VLo, VMid, VHi, SegLo, SegHi, SegCnt, SegFull, ColMask, DiagMask, KvStart,
    TileSeg, TileN0, TileCnt,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
    n_q, n_k, n_q_blocks, n_heads, group, q_offset, sm_scale, softcap, window, n_tile_slots, v_len, seg_len,
    tune_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, FLAT_SLASH: tl.constexpr, KV_MAJOR: tl.constexpr,
):
    (pid_bh, qb, b, h, _, offs_m, offs_n, offs_d, pos, kv_start, first_pos, last_pos, q, k_base,
     v_base) = _program_setup(Q, K, V, KvStart, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, n_q, n_k,
                              n_heads, group, q_offset, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, KV_MAJOR, False)
    row_base = pid_bh.to(tl.int64) * n_k  # [B, Hq, Nk] masks (contiguous)
    col_base = pid_bh.to(tl.int64) * v_len  # [B, Hq, Lc] kept columns
    seg_base = pid_bh.to(tl.int64) * seg_len  # [B, Hq, Ld] slash segments
    qb_slot = pid_bh.to(tl.int64) * n_q_blocks + qb  # [B, Hq, nqb] per-block ranges

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Vertical part: the kept columns this query block can see, gathered BLOCK_N at a time.
    # Columns [v_lo, v_mid) lie at or before the block's first row, so every row sees them: whole
    # tiles of those skip the per-pair mask; the rest (the diagonal's edge, the last partial tile)
    # are masked.
    v_lo = tl.load(VLo + qb_slot)
    v_hi = tl.load(VHi + qb_slot)
    v_open = v_lo + (tl.load(VMid + qb_slot) - v_lo) // BLOCK_N * BLOCK_N
    for t in range(v_lo, v_open, BLOCK_N):
        m_i, l_i, acc = _column_tile(q, k_base, v_base, VIdx + col_base, t, v_hi, offs_n, offs_d, pos, kv_start, n_k,
                                     window, sk_n, sv_n, sm_scale, softcap, m_i, l_i, acc, HEAD_DIM, BLOCK_D, SOFTCAP,
                                     HAS_WINDOW, False)
    for t in range(v_open, v_hi, BLOCK_N):
        m_i, l_i, acc = _column_tile(q, k_base, v_base, VIdx + col_base, t, v_hi, offs_n, offs_d, pos, kv_start, n_k,
                                     window, sk_n, sv_n, sm_scale, softcap, m_i, l_i, acc, HEAD_DIM, BLOCK_D, SOFTCAP,
                                     HAS_WINDOW, True)

    # Slash part: each segment of nearby kept diagonals [d_lo, d_hi] covers one contiguous key
    # range for this query block, walked in BLOCK_N tiles.
    if FLAT_SLASH:
        # One loop over this block's precomputed (segment, first key) tiles of all segments, so
        # the compiler can prefetch across segment boundaries (segments are often 2-3 tiles).
        n_t = tl.load(TileCnt + qb_slot)
        t_base = qb_slot * n_tile_slots
        for t in range(0, n_t):
            si = tl.load(TileSeg + t_base + t)
            n0 = tl.load(TileN0 + t_base + t)
            d_lo = tl.load(SegLo + seg_base + si)
            d_hi = tl.load(SegHi + seg_base + si)
            full = tl.load(SegFull + seg_base + si)
            k_hi = tl.minimum(last_pos - d_lo, n_k - 1)  # inclusive
            m_i, l_i, acc = _slash_tile(q, k_base, v_base, ColMask, DiagMask, row_base, n0, k_hi, d_lo, d_hi, full,
                                        offs_n, offs_d, pos, kv_start, n_k, window, sk_n, sv_n, sm_scale, softcap,
                                        m_i, l_i, acc, HEAD_DIM, BLOCK_D, SOFTCAP, HAS_WINDOW)
    else:
        k_min = kv_start
        if HAS_WINDOW:
            k_min = tl.maximum(k_min, first_pos - window + 1)
        n_seg = tl.load(SegCnt + qb_slot)
        for si in range(0, n_seg):
            d_lo = tl.load(SegLo + seg_base + si)
            d_hi = tl.load(SegHi + seg_base + si)
            full = tl.load(SegFull + seg_base + si)  # every diagonal of [d_lo, d_hi] kept: a band
            k_lo = tl.maximum(first_pos - d_hi, k_min)
            k_hi = tl.minimum(last_pos - d_lo, n_k - 1)  # inclusive
            for n0 in range(k_lo, k_hi + 1, BLOCK_N):
                m_i, l_i, acc = _slash_tile(q, k_base, v_base, ColMask, DiagMask, row_base, n0, k_hi, d_lo, d_hi,
                                            full, offs_n, offs_d, pos, kv_start, n_k, window, sk_n, sv_n, sm_scale,
                                            softcap, m_i, l_i, acc, HEAD_DIM, BLOCK_D, SOFTCAP, HAS_WINDOW)

    _store_rows(Out, Lse, b.to(tl.int64) * so_b + h.to(tl.int64) * so_h, pid_bh.to(tl.int64) * n_q,
                offs_m, offs_d, n_q, so_n, acc, m_i, l_i, HEAD_DIM, BLOCK_D)


_vertical_slash_tuned = _autotuned(_vertical_slash_fwd, _TILE_N_CONFIGS, ["FLAT_SLASH"])  # BLOCK_N tuned too
_vertical_slash_tuned_n = _autotuned(_vertical_slash_fwd, _ATTN_CONFIGS, ["FLAT_SLASH"])  # caller fixed BLOCK_N


# ----------------------------------------------------------------------------- host helpers


def _check_qkv(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"expected q [B,Hq,N,D], k/v [B,Hkv,Nk,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, _, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or hq % k.shape[1] != 0:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)}")
    # Kernels take any strides except along head_dim (HF hands over [B,N,H,D] transposes).
    return [t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)]


def _outputs(q, out):
    b, h, n, d = q.shape
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must have shape {tuple(q.shape)} and unit stride on head_dim")
    return out, torch.empty(b, h, n, dtype=torch.float32, device=q.device)


def _tma_compatible(t: torch.Tensor) -> bool:
    """TMA's layout rules: a 16-byte aligned base, unit stride on the last dim, every other stride a
    positive multiple of 16 bytes (e.g. head_dim 12 in fp16, 24-byte rows, fails)."""
    elem = t.element_size()
    return (t.numel() > 0 and t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and all(s > 0 and s * elem % 16 == 0 for s in t.stride()[:-1]))


def _tma_usable(*tensors: torch.Tensor) -> bool:
    """Whether the block-sparse kernel can read these tensors through TMA descriptors: Hopper or
    newer NVIDIA GPUs (ROCm reports its own capability numbers), or the interpreter (tests), and
    layouts TMA accepts. Otherwise the pointer loads run; the caller sees no difference."""
    dev = tensors[0].device
    if dev.type == "cuda":
        if torch.version.hip is not None or torch.cuda.get_device_capability(dev)[0] < 9:
            return False
    elif not _interpreting():
        return False
    return all(_tma_compatible(t) for t in tensors)


def _tma_scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    # Caching-allocator blocks are 512-byte aligned, beyond the 128 bytes descriptors need.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _current_allocator():
    """Triton's global-scratch allocator as set now; None when unset (or this triton does not say)."""
    try:
        from triton.runtime import _allocation

        current = _allocation._allocator
        current = current.get() if hasattr(current, "get") else current  # a ContextVar; a module global before
        return None if isinstance(current, _allocation.NullAllocator) else current
    except (ImportError, AttributeError):
        return None


def _ensure_tma_allocator():
    """Device-side descriptors are written to per-launch global scratch that triton requests from
    its allocator, unset by default: install one unless the user has. Checked on every TMA launch,
    since triton keeps the allocator per context (thread), not per process."""
    if _current_allocator() is None:
        triton.set_allocator(_tma_scratch)


def _launch(kernel_tuned, kernel_raw, grid, q, *args, untuned: dict, tuned: bool = True, **meta):
    """Run the autotuned kernel, or (interpreter / autotuning off / short prompt / tuned=False)
    one fitting config with the `untuned` meta-parameters. grid: a tuple or a function of meta."""
    if tuned and autotuning(q.shape[2]):
        kernel_tuned[grid](q, *args, **meta)
        return
    meta = {**meta, **untuned}
    smem = lambda st: _smem_bytes(st, meta["BLOCK_M"], _tile_n(meta), meta["BLOCK_D"], q.element_size())  # noqa: E731
    stages = next((st for st in (3, 2) if smem(st) <= _SMEM_BUDGET), 1)
    warps = 8 if meta["BLOCK_M"] * _tile_n(meta) >= 128 * 128 and not _interpreting() else 4
    kernel_raw[grid if not callable(grid) else grid(meta)](q, *args, **meta, num_warps=warps, num_stages=stages)


def _softmax_mode(name: str) -> int:
    if name not in SOFTMAX_MODES:
        raise ValueError(f"softmax={name!r}: expected one of {', '.join(SOFTMAX_MODES)}")
    return SOFTMAX_MODES[name]


def _common_meta(d: int, block_m: int, softcap, sliding_window):
    return dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m, SOFTCAP=bool(softcap),
                HAS_WINDOW=sliding_window is not None, KV_MAJOR=KV_MAJOR)


# ----------------------------------------------------------------------------- public API


def block_sparse_kernel(q: torch.Tensor, block_m: int, block_n: int, softcap=None, sliding_window=None, tile=None,
                        softmax: str = "exact") -> str:
    """Which kernel `block_sparse_attention` runs for these arguments: "gluon_block_sparse" (the
    sm_90 Gluon kernel, when GLUON is on and it takes the inputs), "gluon_ws_block_sparse" (its
    warp-specialised variant, one program per item: PATCHATTN_GLUON_PERSISTENT=0),
    "gluon_wsp_block_sparse" (that variant's persistent form, the default for 128-row blocks) or
    "triton_block_sparse"."""
    if GLUON and tile is None and softmax == "exact":
        from .gluon_attention import sm90_usable, ws_usable, wsp_usable

        if sm90_usable(q, block_m, block_n, softcap, sliding_window):
            if wsp_usable(block_m):
                return "gluon_wsp_block_sparse"
            return "gluon_ws_block_sparse" if ws_usable(block_m) else "gluon_block_sparse"
    return "triton_block_sparse"


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor, block_count: torch.Tensor, *,
    scale: float, q_offset: int = 0, kv_start: Optional[torch.Tensor] = None, sliding_window: Optional[int] = None,
    softcap: Optional[float] = None, block_m: int = 64, block_n: int = 64, out: Optional[torch.Tensor] = None,
    tile: Optional[Tuple[int, int]] = None, softmax: str = "exact",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention over listed key blocks per query block.

    block_index int32 [B, Hb, ceil(N/block_m), MAXK] holds ascending key-block ids (keys
    [kb*block_n, (kb+1)*block_n)), the first block_count[b, h, qb] of them valid. Hb is Hq
    (per-head lists) or Hkv (one list shared by each GQA group). Returns (out, lse fp32).
    tile: the kernel's (rows, keys) per step, dividing (block_m, block_n); autotuned when None on
    long prompts, else the lists' blocks.
    softmax: "exact", or a timing diagnostic of SOFTMAX_MODES (wrong outputs; benchmarks only).
    """
    mode = _softmax_mode(softmax)
    q, k, v = _check_qkv(q, k, v)
    bsz, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    n_qb = triton.cdiv(n_q, block_m)
    hb = block_index.shape[1]
    if block_index.shape[:3] != (bsz, hb, n_qb) or hq % hb != 0 or block_count.shape != (bsz, hb, n_qb):
        raise ValueError(f"block_index {tuple(block_index.shape)} / block_count {tuple(block_count.shape)} "
                         f"do not match [B={bsz}, H, {n_qb}, MAXK]")
    out, lse = _outputs(q, out)
    if n_q == 0:
        return out, lse
    block_index = block_index.to(torch.int32)
    if block_index.stride(-1) != 1:
        block_index = block_index.contiguous()
    block_count = block_count.to(torch.int32).contiguous()
    kvs = kv_start_tensor(kv_start, bsz, q.device)
    if tile is not None and (block_m % tile[0] or block_n % tile[1]):
        raise ValueError(f"tile {tile} must divide the list blocks ({block_m}, {block_n})")
    if block_sparse_kernel(q, block_m, block_n, softcap, sliding_window, tile, softmax).startswith("gluon"):
        from . import gluon_attention

        gluon_attention.block_sparse_attention_sm90(q, k, v, block_index, block_count, kvs, out, lse, scale=scale,
                                                    q_offset=q_offset, block_m=block_m, block_n=block_n)
        return out, lse
    fixed = tile or (block_m, block_n)
    meta = _common_meta(d, block_m, softcap, sliding_window)
    del meta["BLOCK_M"]  # a tuned (or given) tile; the lists' blocks are LIST_M x LIST_N
    use_tma = TMA and _tma_usable(q, k, v)
    if use_tma and q.is_cuda:
        _ensure_tma_allocator()
    _launch(
        _block_sparse_tuned, _block_sparse_fwd, lambda m: (bsz * hq, triton.cdiv(n_q, m["BLOCK_M"])),
        q, k, v, out, lse, block_index, block_count, kvs,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *block_index.stride()[:3], *block_count.stride()[:2],
        n_q, n_k, hq, hq // hkv, hq // hb, q_offset, scale, float(softcap or 0.0), int(sliding_window or 0),
        tune_bucket(n_q), LIST_M=block_m, LIST_N=block_n, EVEN_N=n_k % block_n == 0, MASK_ALL=_MASK_EVERY_TILE,
        untuned=dict(BLOCK_M=fixed[0], BLOCK_N=fixed[1]), tuned=tile is None, USE_TMA=use_tma, SOFTMAX_MODE=mode,
        **meta,
    )
    return out, lse


@dataclass
class VerticalSlashIndex:
    """Index form of (column_mask, diagonal_mask) for one query layout (all tensors on-device).

    v_idx is [B, H, Lc] and d_idx / seg_lo / seg_hi / seg_full are [B, H, Ld] int32, padded
    with 2**30 past their valid entries (Lc / Ld: at most Nk, or the caller's bound on kept
    columns / diagonals); v_lo, v_hi, seg_cnt are [B, H, nqb] int32 ranges per query block.
    """

    v_idx: torch.Tensor  # kept columns, ascending
    v_lo: torch.Tensor  # first v_idx slot a query block can see
    v_hi: torch.Tensor  # one past the last
    seg_lo: torch.Tensor  # runs of kept diagonals closer than block_m apart: [seg_lo, seg_hi]
    seg_hi: torch.Tensor
    seg_cnt: torch.Tensor  # leading segments that reach this query block's valid keys
    block_m: int
    seg_full: Optional[torch.Tensor] = None  # [B, H, Nk] int32: segment i keeps all its diagonals
    # Optional flat slash tiles (flat_slash_block_n): per query block, the (segment, first key)
    # of every BLOCK_N tile of its segments, [B, H, nqb, T] int32, and their count [B, H, nqb].
    tile_seg: Optional[torch.Tensor] = None
    tile_n0: Optional[torch.Tensor] = None
    tile_cnt: Optional[torch.Tensor] = None
    tile_block_n: Optional[int] = None
    d_idx: Optional[torch.Tensor] = None  # [B, H, Ld] int32: kept diagonals, ascending
    # [B, H, nqb] int32: slots [v_lo, v_mid) hold columns that every row of the block sees
    # (none past its first row, no sliding window), so the kernel skips their mask.
    v_mid: Optional[torch.Tensor] = None


def _sorted_kept(mask: torch.Tensor, values: Optional[torch.Tensor] = None, length: Optional[int] = None
                 ) -> torch.Tensor:
    """The indices where mask is True (or `values` there, which must ascend along the last dim),
    in ascending order, then _INDEX_PAD; int64 [..., L], no host sync. A cumsum + scatter
    compaction: linear, where a sort of [B, H, N] cost ~0.6 ms per call at 128k x 32 heads.

    length: L, an upper bound on the kept entries of any row that the caller guarantees (default
    the mask's length). Later steps then work on L entries instead of N (at 128k a
    vertical_slash row keeps a few thousand columns / diagonals of 131072)."""
    n = mask.shape[-1]
    # At least one slot: an empty CUDA tensor has a null data pointer, which Triton refuses as a
    # kernel argument (streaming with sink 0 keeps no column).
    length = n if length is None else max(1, min(length, n))
    kept_upto = mask.cumsum(-1, dtype=torch.int32)
    # Kept entries go to their rank, everything else to one spill slot past the end (so do ranks
    # past a broken bound: an index error inside a CUDA scatter would kill the process).
    slot = torch.where(mask, kept_upto - 1, length).clamp(max=length).long()
    values = torch.arange(n, device=mask.device).expand(mask.shape) if values is None else values.long()
    out = torch.full((*mask.shape[:-1], length + 1), _INDEX_PAD, dtype=torch.long, device=mask.device)
    return out.scatter_(-1, slot, torch.where(mask, values, _INDEX_PAD))[..., :length].contiguous()


def _block_positions(n_q: int, q_offset: int, block_m: int, device):
    first = torch.arange(0, n_q, block_m, device=device)
    last = torch.clamp(first + block_m, max=n_q) - 1
    return first + q_offset, last + q_offset


def _segment_tiles(seg_lo, seg_hi, seg_cnt, first_pos, last_pos, k_min, n_k: int, block_n: int):
    """The bounds of _vertical_slash_fwd's per-segment slash loop: for each query block and each
    of the S segments given (seg_lo / seg_hi [B, H, S], seg_cnt [B, H, nqb], k_min [B, H, nqb]),
    the first key visited and the number of BLOCK_N tiles walked (0 for unused segments), both
    [B, H, nqb, S] int64."""
    lo = seg_lo[..., None, :].long()  # [B, H, 1, S]
    hi = seg_hi[..., None, :].long()
    k_lo = torch.maximum(first_pos[:, None] - hi, k_min[..., None])  # [B, H, nqb, S]
    k_hi = (last_pos[:, None] - lo).clamp(max=n_k - 1)
    used = torch.arange(lo.shape[-1], device=lo.device) < seg_cnt[..., None]
    return k_lo, torch.where(used & (k_hi >= k_lo), (k_hi - k_lo + block_n) // block_n, 0)


def _flat_slash_tiles(seg_lo, seg_hi, seg_cnt, first_pos, last_pos, k_min, n_k: int, block_n: int):
    """Per query block, the BLOCK_N tiles the kernel's segment loop would walk, flattened into one
    list: (segment index, first key) [B, H, nqb, T] int32 and the count [B, H, nqb] int32. One host
    sync (the longest list sets T)."""
    n_seg = int(seg_cnt.max()) if seg_cnt.numel() else 0
    b, h, nqb = seg_cnt.shape
    if n_seg == 0:
        empty = torch.zeros(b, h, nqb, 1, dtype=torch.int32, device=seg_cnt.device)
        return empty, empty.clone(), torch.zeros_like(seg_cnt, dtype=torch.int32)
    k_lo, n_tiles = _segment_tiles(seg_lo[..., :n_seg], seg_hi[..., :n_seg], seg_cnt, first_pos, last_pos, k_min,
                                   n_k, block_n)
    ends = n_tiles.cumsum(-1)
    count = ends[..., -1]
    slots = max(1, int(count.max()))
    t = torch.arange(slots, device=k_lo.device).expand(b, h, nqb, slots).contiguous()
    seg = torch.searchsorted(ends, t, right=True).clamp(max=n_seg - 1)  # first segment ending past t
    n0 = k_lo.gather(-1, seg) + (t - (ends - n_tiles).gather(-1, seg)) * block_n
    return seg.to(torch.int32), n0.to(torch.int32), count.to(torch.int32)


def vertical_slash_index(
    column_mask: torch.Tensor, diagonal_mask: torch.Tensor, *, n_q: int, q_offset: int = 0,
    kv_start: Optional[torch.Tensor] = None, sliding_window: Optional[int] = None, block_m: int = 64,
    flat_slash_block_n: Optional[int] = None, max_columns: Optional[int] = None,
    max_diagonals: Optional[int] = None,
) -> VerticalSlashIndex:
    """Convert bool column/diagonal masks [B, H, Nk] to the kernel's index form, on their device.

    flat_slash_block_n: also list every slash tile per query block (the kernel then walks them in
    one loop with that key tile width instead of a loop per segment).
    max_columns / max_diagonals: upper bounds on the columns / diagonals any (b, h) row keeps
    (`ColumnDiagonalSelection` carries them); the lists then have that length instead of Nk. A
    bound below the true count drops entries, so methods give bounds that hold by construction."""
    bsz, h, n_k = column_mask.shape
    dev = column_mask.device
    kvs = kv_start_tensor(kv_start, bsz, dev).long()[:, None, None]  # [B,1,1]
    first_pos, last_pos = _block_positions(n_q, q_offset, block_m, dev)

    # Lowest key any row of the block may see, and the highest.
    k_min = kvs.expand(bsz, 1, first_pos.numel())
    if sliding_window is not None:
        k_min = torch.maximum(k_min, (first_pos - sliding_window + 1)[None, None])
    k_max = last_pos[None, None].expand_as(k_min)

    v_idx = _sorted_kept(column_mask, length=max_columns)
    v_lo = torch.searchsorted(v_idx, k_min.expand(bsz, h, -1).contiguous())
    v_hi = torch.searchsorted(v_idx, k_max.expand(bsz, h, -1).contiguous(), right=True)
    if sliding_window is None:
        v_mid = torch.maximum(torch.searchsorted(v_idx, first_pos.expand(bsz, h, -1).contiguous(), right=True), v_lo)
    else:  # a window's far edge moves with the row: every tile keeps its mask
        v_mid = v_lo

    diag = diagonal_mask
    if sliding_window is not None:  # diagonals at or past the window can never be valid
        diag = diag & (torch.arange(n_k, device=dev) < sliding_window)
    d = _sorted_kept(diag, length=max_diagonals)
    # Diagonals d < d' cover touching key ranges for a block of block_m rows iff d' - d <= block_m.
    big = torch.full_like(d[..., :1], -_INDEX_PAD)
    gap_before = d - torch.cat([big, d[..., :-1]], dim=-1)
    gap_after = torch.cat([d[..., 1:], big.neg() * 2], dim=-1) - d
    real = d < _INDEX_PAD
    seg_lo = _sorted_kept(real & (gap_before > block_m), d)
    seg_hi = _sorted_kept(real & (gap_after > block_m), d)
    # A segment reaches the block iff its highest key last_pos - d_lo >= k_min.
    seg_cnt = torch.searchsorted(seg_lo, (k_max - k_min).expand(bsz, h, -1).contiguous(), right=True)
    seg_cnt = torch.where(k_max >= k_min, seg_cnt, torch.zeros_like(seg_cnt))

    # Segments whose diagonals are all kept (bands such as the local window) are masked by
    # comparing distances instead of looking each pair's diagonal up.
    # Kept diagonals inside [seg_lo, seg_hi], counted on the sorted list (no pass over Nk).
    run = torch.searchsorted(d, seg_hi, right=True) - torch.searchsorted(d, seg_lo)
    seg_full = (seg_lo < _INDEX_PAD) & (run == seg_hi - seg_lo + 1)

    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    index = VerticalSlashIndex(i32(v_idx), i32(v_lo), i32(v_hi), i32(seg_lo), i32(seg_hi), i32(seg_cnt), block_m,
                               i32(seg_full), d_idx=i32(d), v_mid=i32(v_mid))
    if flat_slash_block_n:
        index.tile_seg, index.tile_n0, index.tile_cnt = _flat_slash_tiles(
            seg_lo, seg_hi, seg_cnt, first_pos, last_pos, k_min.expand(bsz, h, -1), n_k, flat_slash_block_n)
        index.tile_block_n = flat_slash_block_n
    return index


def vertical_slash_pair_counts(
    column_mask: torch.Tensor, diagonal_mask: torch.Tensor, *, n_q: int, q_offset: int = 0,
    kv_start: Optional[torch.Tensor] = None, sliding_window: Optional[int] = None,
    index: Optional[VerticalSlashIndex] = None, block_n: int = 64, computed: Optional[bool] = None,
) -> dict:
    """Realized pair counts per (b, h), all int64 [B, H]:

    kept: base-valid pairs selected by a column or a diagonal (each once);
    base: base-valid pairs (the dense causal count, for density = kept / base);
    computed: pairs in the score tiles the kernel evaluates (needs `index`; by default counted
    whenever `index` is given).

    kept is counted on the sorted lists of kept columns and diagonals (the index's, when given):
    per row a search of each diagonal's key range among the columns, so a layer's accounting
    costs no pass over [B, H, Nk] beyond building those lists.
    """
    bsz, h, n_k = column_mask.shape
    dev = column_mask.device
    kvs = kv_start_tensor(kv_start, bsz, dev).long()[:, None, None]
    win = sliding_window if sliding_window is not None else n_k + n_q + abs(q_offset) + 1
    p_lo, p_hi = q_offset, n_q - 1 + q_offset  # query positions
    j = torch.arange(n_k, device=dev)

    # Column j is seen by queries at positions [max(j, p_lo), min(p_hi, j + win - 1)].
    col_rows = (torch.clamp(j + win - 1, max=p_hi) - torch.clamp(j, min=p_lo) + 1).clamp_min(0)
    col_rows = torch.where(j[None, None] >= kvs, col_rows, 0)  # [B,1,Nk]
    base = col_rows.sum(-1).expand(bsz, h)
    if index is not None and index.d_idx is not None:
        cols, diags = index.v_idx.long(), index.d_idx.long()
    else:
        cols, diags = _sorted_kept(column_mask), _sorted_kept(diagonal_mask & (j < win))
    real_col = cols < _INDEX_PAD
    vertical = torch.where(real_col, col_rows.expand(bsz, h, n_k).gather(-1, cols.clamp(max=n_k - 1)), 0).sum(-1)

    # Diagonal d covers keys [max(kv_start, p_lo - d), p_hi - d]; count those not in a column
    # (columns below a key = its insertion point in the sorted column list).
    d = diags.clamp(max=n_k)
    hi = (p_hi - d + 1).clamp(0, n_k)  # exclusive
    lo = torch.minimum(torch.maximum(kvs, p_lo - d).clamp(0, n_k), hi)
    in_cols = torch.searchsorted(cols, hi) - torch.searchsorted(cols, lo)
    free = torch.where(diags < _INDEX_PAD, hi - lo - in_cols, 0)
    counts = dict(kept=vertical + free.sum(-1), base=base)
    if computed is None:
        computed = index is not None
    if computed:
        if index is None:
            raise ValueError("computed pair counts need the kernel's index")
        counts["computed"] = _computed_pairs(index, n_q, n_k, q_offset, kvs, sliding_window, block_n)
    return counts


def _computed_pairs(index: VerticalSlashIndex, n_q, n_k, q_offset, kvs, sliding_window, block_n):
    """Pairs in evaluated tiles, mirroring the kernel's loop bounds (per head to bound memory)."""
    bm = index.block_m
    first_pos, last_pos = _block_positions(n_q, q_offset, bm, index.v_lo.device)
    rows = (last_pos - first_pos + 1)[None]  # [1, nqb]
    chunks = ((index.v_hi - index.v_lo).long().clamp_min(0) + block_n - 1) // block_n
    vertical = (chunks * rows).sum(-1) * block_n
    k_min = kvs[:, 0].expand(-1, first_pos.numel())  # [B, nqb]
    if sliding_window is not None:
        k_min = torch.maximum(k_min, first_pos[None] - sliding_window + 1)
    slash = torch.zeros_like(vertical)
    n_seg = int(index.seg_cnt.max()) if index.seg_cnt.numel() else 0
    for hh in range(index.v_lo.shape[1]):
        one = slice(hh, hh + 1)
        _, tiles = _segment_tiles(index.seg_lo[:, one, :n_seg], index.seg_hi[:, one, :n_seg], index.seg_cnt[:, one],
                                  first_pos, last_pos, k_min[:, None], n_k, block_n)  # [B, 1, nqb, S]
        slash[:, hh] = (tiles[:, 0] * rows[..., None]).sum((-1, -2)) * block_n
    return vertical + slash


def vertical_slash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, column_mask: torch.Tensor, diagonal_mask: torch.Tensor, *,
    scale: float, q_offset: int = 0, kv_start: Optional[torch.Tensor] = None, sliding_window: Optional[int] = None,
    softcap: Optional[float] = None, index: Optional[VerticalSlashIndex] = None, block_m: int = 64,
    block_n: Optional[int] = None, out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-exact attention over base-valid pairs whose column or diagonal is kept.

    column_mask / diagonal_mask: bool, broadcastable to [B, Hq, Nk]; diagonal d = (i + q_offset) - j. Pass a
    precomputed `index` (from vertical_slash_index with the same arguments) to reuse it.
    block_m sets the query-block layout of the index; the key tile width block_n is autotuned
    (64 or 128) unless given.
    """
    q, k, v = _check_qkv(q, k, v)
    bsz, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    try:  # masks may broadcast over batch / heads ([1, 1, Nk] for a shared pattern)
        column_mask = column_mask.to(torch.bool).expand(bsz, hq, n_k)
        diagonal_mask = diagonal_mask.to(torch.bool).expand(bsz, hq, n_k)
    except RuntimeError as e:
        raise ValueError(f"masks must broadcast to [B, Hq, Nk] = {(bsz, hq, n_k)}") from e
    out, lse = _outputs(q, out)
    if n_q == 0:
        return out, lse
    if index is None:
        index = vertical_slash_index(column_mask, diagonal_mask, n_q=n_q, q_offset=q_offset, kv_start=kv_start,
                                     sliding_window=sliding_window, block_m=block_m)
    elif index.block_m != block_m or tuple(index.v_lo.shape[:2]) != (bsz, hq):
        raise ValueError("index was built for a different block_m or [B, Hq]")
    kvs = kv_start_tensor(kv_start, bsz, q.device)
    n_qb = triton.cdiv(n_q, block_m)
    v_mid = index.v_mid if index.v_mid is not None else index.v_lo  # unknown: mask every column tile
    seg_full = index.seg_full if index.seg_full is not None else torch.zeros_like(index.seg_lo)
    col_u8 = column_mask.contiguous().view(torch.uint8)
    diag_u8 = diagonal_mask.contiguous().view(torch.uint8)
    flat = index.tile_cnt is not None
    if flat:  # the tiles were cut at the index's key tile width
        if block_n not in (None, index.tile_block_n):
            raise ValueError(f"block_n={block_n} but the index's slash tiles are {index.tile_block_n} keys wide")
        block_n = index.tile_block_n
        tiles = (index.tile_seg, index.tile_n0, index.tile_cnt)
    else:
        tiles = (index.seg_cnt,) * 3  # unused
    fixed_n = dict(BLOCK_N=block_n) if block_n else {}
    _launch(
        _vertical_slash_tuned_n if block_n else _vertical_slash_tuned, _vertical_slash_fwd, (bsz * hq, n_qb),
        q, k, v, out, lse, index.v_idx, index.v_lo, v_mid, index.v_hi, index.seg_lo, index.seg_hi, index.seg_cnt,
        seg_full, col_u8, diag_u8, kvs, *tiles,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        n_q, n_k, n_qb, hq, hq // hkv, q_offset, scale, float(softcap or 0.0), int(sliding_window or 0),
        index.tile_seg.shape[-1] if flat else 0, index.v_idx.shape[-1], index.seg_lo.shape[-1], tune_bucket(n_q),
        untuned=dict(BLOCK_N=block_n or 64), **fixed_n,
        FLAT_SLASH=flat, **_common_meta(d, block_m, softcap, sliding_window),
    )
    return out, lse


__all__ = [
    "block_sparse_attention", "vertical_slash_attention", "vertical_slash_index", "vertical_slash_pair_counts",
    "VerticalSlashIndex",
]
