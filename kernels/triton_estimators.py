"""Cheap importance estimators that feed the sparse kernels, with torch fallbacks.

* `last_q_scores`: attention of the last queries, summed per key column (vertical) and per
  diagonal d = pos - j (slash); the MInference vertical-slash estimate.
* `pooled_block_scores`: block-causal softmax of mean-pooled queries against mean-pooled keys.
* `antidiagonal_block_scores`: XAttention-style strided antidiagonal sums per block pair.

Each public function dispatches to Triton for CUDA tensors (or under TRITON_INTERPRET=1) and to
the torch version otherwise; `impl="torch" | "triton"` forces one. The torch versions define the
semantics. Query blocks are row-index blocks (rows [qb*bs, (qb+1)*bs)), the layout
`block_sparse_attention` consumes; query row i sits at key position i + q_offset, where q_offset
defaults to Nk - N (the queries are the last N positions).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import torch

try:  # Triton is optional: CPU installs use the torch versions.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without triton
    triton = None


# PATCHATTN_TRITON_AUTOTUNE=0 launches one fixed config instead of tuning (quick tests).
_AUTOTUNE = os.environ.get("PATCHATTN_TRITON_AUTOTUNE", "1") != "0"
# Tuning compiles and times every config once per key: with the per-power-of-two length bucket
# and a mixed-method plan that is minutes of warm-up (measured >2 min on an H100 for a first
# 4k forward). Below this many query rows a kernel call takes well under a millisecond and the
# best config gains little, so short prompts launch the fixed config without tuning.
_AUTOTUNE_MIN_N = int(os.environ.get("PATCHATTN_TRITON_AUTOTUNE_MIN_N", 16384))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning(n_q: int) -> bool:
    """Whether a launch over n_q query rows runs the autotuned kernel (the interpreter would
    re-run every config; short prompts take the fixed config, see _AUTOTUNE_MIN_N)."""
    return _AUTOTUNE and not _interpreting() and n_q >= _AUTOTUNE_MIN_N


def tune_bucket(n_q: int) -> int:
    """Autotuning key for the prompt length: its power of two, 1k .. 1M tokens."""
    return max(10, min(20, (n_q - 1).bit_length()))


def _use_triton(x: torch.Tensor, impl: Optional[str]) -> bool:
    if impl is not None:
        return impl == "triton"
    return triton is not None and (x.is_cuda or _interpreting())


def kv_start_tensor(kv_start, batch: int, device) -> torch.Tensor:
    """Per-batch first valid key index as an int32 [B] tensor (None: no padding)."""
    if kv_start is None:
        return torch.zeros(batch, dtype=torch.int32, device=device)
    if not torch.is_tensor(kv_start):
        kv_start = torch.tensor(kv_start)
    return kv_start.to(device=device, dtype=torch.int32).expand(batch).contiguous()


def _softcap(s: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    return s if not softcap else softcap * torch.tanh(s / softcap)


def _safe_softmax(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim in place of s; all -inf rows give zeros instead of NaN."""
    m = s.amax(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).min)
    s.sub_(m).exp_()
    return s.div_(s.sum(-1, keepdim=True).clamp_min(1e-30))


def _grouped_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [B,Hq,M,D] @ k [B,Hkv,N,D]^T in fp32 without repeating k: [B,Hq,M,N]."""
    b, hq, m, d = q.shape
    hkv = k.shape[1]
    s = torch.matmul(q.float().reshape(b, hkv, (hq // hkv) * m, d), k.float().transpose(-1, -2))
    return s.view(b, hq, m, -1)


# ============================================================================ last-q (vertical / slash)


def _positions(q_positions, batch: int, rows: int, device) -> torch.Tensor:
    pos = q_positions if torch.is_tensor(q_positions) else torch.tensor(list(q_positions))
    pos = pos.to(device=device, dtype=torch.int32)
    if pos.shape[-1] != rows:
        raise ValueError(f"q_positions has {pos.shape[-1]} entries for {rows} query rows")
    return pos.expand(batch, rows).contiguous()


def last_q_scores_torch(q_last, k, *, scale, q_positions, kv_start=None, softcap=None):
    b, hq, n_last, _ = q_last.shape
    n_k = k.shape[2]
    pos = _positions(q_positions, b, n_last, q_last.device).long()  # [B,L]
    kvs = kv_start_tensor(kv_start, b, q_last.device).long()
    j = torch.arange(n_k, device=q_last.device)
    keep = (j <= pos[..., None]) & (j >= kvs[:, None, None])  # [B,L,Nk]
    s = _softcap(_grouped_scores(q_last, k) * scale, softcap)
    p = _safe_softmax(s.masked_fill_(~keep[:, None], float("-inf")))
    vertical = p.sum(-2)
    diag = (pos[..., None] - j).clamp(0, n_k - 1)  # masked entries carry p = 0
    slash = torch.zeros_like(vertical).scatter_add_(
        -1, diag.reshape(b, 1, -1).expand(b, hq, -1), p.reshape(b, hq, -1))
    return vertical, slash


if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)

    @triton.jit
    def _lastq_tile(Q, K, q_base, k_base, sq_l, sk_n, rows, cols, offs_d, pos, kv_start, n_last, n_k, sm_scale,
                    softcap, HEAD_DIM: tl.constexpr, SOFTCAP: tl.constexpr):
        """Scores (log2 units) of the last-query rows against one key tile, -inf where invalid."""
        dmask = offs_d[None, :] < HEAD_DIM
        q = tl.load(Q + q_base + rows[:, None] * sq_l + offs_d[None, :], mask=(rows < n_last)[:, None] & dmask,
                    other=0.0)
        k = tl.load(K + k_base + cols[:, None] * sk_n + offs_d[None, :], mask=(cols < n_k)[:, None] & dmask,
                    other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        if SOFTCAP:
            s = softcap * (1.0 - 2.0 / (tl.exp2(s * (2.0 * LOG2E / softcap)) + 1.0))
        ok = (cols[None, :] <= pos[:, None]) & (cols[None, :] >= kv_start) & (cols[None, :] < n_k)
        ok = ok & (rows < n_last)[:, None]
        return tl.where(ok, s * LOG2E, float("-inf"))

    @triton.jit
    def _lastq_stats_kernel(
        Q, K, Pos, KvStart, MaxOut, SumOut,
        sq_b, sq_h, sq_l, sk_b, sk_h, sk_n, sp_b,
        n_last, n_k, n_heads, group, keys_per_split, sm_scale, softcap,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
        SOFTCAP: tl.constexpr,
    ):
        """Pass 1: per-row running max / exp-sum over one split of the keys (split-K)."""
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        rows = tl.arange(0, BLOCK_L)
        offs_d = tl.arange(0, BLOCK_D)
        pos = tl.load(Pos + b * sp_b + rows, mask=rows < n_last, other=0)
        kv_start = tl.load(KvStart + b)
        q_base = b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
        k_base = b.to(tl.int64) * sk_b + (h // group).to(tl.int64) * sk_h
        m_i = tl.full([BLOCK_L], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_L], tl.float32)
        lo = split * keys_per_split
        for n0 in range(lo, tl.minimum(lo + keys_per_split, n_k), BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            s = _lastq_tile(Q, K, q_base, k_base, sq_l, sk_n, rows, cols, offs_d, pos, kv_start, n_last, n_k,
                            sm_scale, softcap, HEAD_DIM, SOFTCAP)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        out = (pid_bh * tl.num_programs(1) + split) * BLOCK_L + rows
        tl.store(MaxOut + out, m_i)
        tl.store(SumOut + out, l_i)

    @triton.jit
    def _lastq_accum_kernel(
        Q, K, Pos, KvStart, Lse2, Vert, Slash,
        sq_b, sq_h, sq_l, sk_b, sk_h, sk_n, sp_b,
        n_last, n_k, n_heads, group, sm_scale, softcap,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
        SOFTCAP: tl.constexpr,
    ):
        """Pass 2: probabilities of one key tile; column sums stored, diagonal sums atomically added."""
        pid_bh = tl.program_id(0)
        n0 = tl.program_id(1) * BLOCK_N
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        rows = tl.arange(0, BLOCK_L)
        cols = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        pos = tl.load(Pos + b * sp_b + rows, mask=rows < n_last, other=0)
        kv_start = tl.load(KvStart + b)
        s = _lastq_tile(Q, K, b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h,
                        b.to(tl.int64) * sk_b + (h // group).to(tl.int64) * sk_h, sq_l, sk_n, rows, cols, offs_d,
                        pos, kv_start, n_last, n_k, sm_scale, softcap, HEAD_DIM, SOFTCAP)
        lse2 = tl.load(Lse2 + pid_bh * BLOCK_L + rows)  # +inf for rows without keys -> p = 0
        p = tl.exp2(s - lse2[:, None])
        out = pid_bh.to(tl.int64) * n_k
        tl.store(Vert + out + cols, tl.sum(p, 0), mask=cols < n_k)
        dist = pos[:, None] - cols[None, :]
        hit = (dist >= 0) & (cols[None, :] < n_k) & (rows < n_last)[:, None] & (p > 0.0)
        tl.atomic_add(Slash + out + dist, p, mask=hit, sem="relaxed")


def _last_q_triton(q_last, k, *, scale, q_positions, kv_start=None, softcap=None):
    b, hq, n_last, d = q_last.shape
    hkv, n_k = k.shape[1], k.shape[2]
    q_last = q_last if q_last.stride(-1) == 1 else q_last.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    pos = _positions(q_positions, b, n_last, q_last.device)
    kvs = kv_start_tensor(kv_start, b, q_last.device)
    block_l, block_d, block_n = max(16, triton.next_power_of_2(n_last)), max(16, triton.next_power_of_2(d)), 64
    if block_l > 128:
        raise ValueError("last_q_scores supports at most 128 query rows")
    meta = dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_N=block_n, SOFTCAP=bool(softcap))
    common = (*q_last.stride()[:3], *k.stride()[:3], pos.stride(0))
    cap = float(softcap or 0.0)

    # Split the keys so that about four programs per SM run pass 1 even for one sequence.
    sms = torch.cuda.get_device_properties(q_last.device).multi_processor_count if q_last.is_cuda else 1
    splits = max(1, min(triton.cdiv(n_k, block_n), triton.cdiv(4 * sms, b * hq)))
    per_split = triton.cdiv(triton.cdiv(n_k, splits), block_n) * block_n
    splits = triton.cdiv(n_k, per_split)
    part_max = torch.empty(b * hq, splits, block_l, dtype=torch.float32, device=q_last.device)
    part_sum = torch.empty_like(part_max)
    _lastq_stats_kernel[(b * hq, splits)](q_last, k, pos, kvs, part_max, part_sum, *common, n_last, n_k, hq,
                                          hq // hkv, per_split, scale, cap, **meta)
    m = part_max.amax(1, keepdim=True)
    total = (part_sum * torch.exp2(part_max - m)).sum(1)
    lse2 = torch.where(total > 0, m[:, 0] + torch.log2(total.clamp_min(1e-30)), float("inf")).contiguous()

    vertical = torch.empty(b, hq, n_k, dtype=torch.float32, device=q_last.device)
    slash = torch.zeros_like(vertical)
    _lastq_accum_kernel[(b * hq, triton.cdiv(n_k, block_n))](q_last, k, pos, kvs, lse2, vertical, slash, *common,
                                                            n_last, n_k, hq, hq // hkv, scale, cap, **meta)
    return vertical, slash


def last_q_scores(
    q_last: torch.Tensor, k: torch.Tensor, *, scale: float, q_positions: Union[torch.Tensor, Sequence[int]],
    kv_start: Optional[torch.Tensor] = None, softcap: Optional[float] = None, impl: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Vertical and slash scores [B, Hq, Nk] fp32 from the attention of the last queries.

    q_last [B, Hq, L, D] at absolute positions q_positions ([L] or [B, L]); causal and
    left-padding masks apply. vertical[j] = sum over rows of p(row, j); slash[d] = sum over rows
    of p(row, pos - d). Peak extra memory is O(B * Hq * Nk) on the Triton path.
    """
    fn = _last_q_triton if _use_triton(q_last, impl) else last_q_scores_torch
    return fn(q_last, k, scale=scale, q_positions=q_positions, kv_start=kv_start, softcap=softcap)


# ============================================================================ pooled blocks


def _block_means(x: torch.Tensor, first_valid: torch.Tensor, bs: int, max_pad: Optional[int] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean of rows >= first_valid[b] within each bs-row block of x [B,H,L,D] -> ([B,H,nb,D] fp32, count [B,nb]).

    Sums in fp32 straight from x's dtype (no fp32 copy of x), then removes the padded prefix.
    max_pad: a bound on first_valid known to the caller (None: read it, one device sync).
    """
    b, h, n, d = x.shape
    nb = -(-n // bs)
    full = n // bs
    sums = x.new_zeros(b, h, nb, d, dtype=torch.float32)
    if full:
        sums[:, :, :full] = x[:, :, : full * bs].reshape(b, h, full, bs, d).sum(3, dtype=torch.float32)
    if n % bs:
        sums[:, :, full] = x[:, :, full * bs:].sum(2, dtype=torch.float32)
    rows = torch.arange(n, device=x.device)
    if not b:
        pad = 0
    elif max_pad is None:
        pad = int(first_valid.max().clamp(0, n))
    else:
        pad = max(0, min(max_pad, n))
    if pad:  # subtract the left-padding rows (only the leading blocks hold any)
        pad_w = (rows[:pad] < first_valid[:, None]).to(torch.float32)  # [B,pad]
        pad_x = x[:, :, :pad].float() * pad_w[:, None, :, None]
        nbp = -(-pad // bs)
        pad_x = torch.nn.functional.pad(pad_x, (0, 0, 0, nbp * bs - pad))
        sums[:, :, :nbp] -= pad_x.reshape(b, h, nbp, bs, d).sum(3)
    valid = (rows[None] >= first_valid[:, None]).to(torch.float32)
    counts = torch.nn.functional.pad(valid, (0, nb * bs - n)).reshape(b, nb, bs).sum(-1)
    return sums / counts.clamp_min(1)[:, None, :, None], counts


def pooled_block_scores(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int, scale: float, kv_start: Optional[torch.Tensor] = None,
    q_offset: Optional[int] = None, softcap: Optional[float] = None, max_pad: Optional[int] = None,
) -> torch.Tensor:
    """Block-causal softmax of pooled scores, [B, Hq, ceil(N/bs), ceil(Nk/bs)] fp32.

    Query and key blocks are mean-pooled over their valid (non-padding) tokens; key block kb is
    allowed for query block qb when it holds a valid key and starts at or before the block's
    last query position. Query blocks with no valid row give a zero row. One memory-bound pass
    over q and k in torch (a Triton kernel would not move fewer bytes). max_pad: an upper bound
    on kv_start known to the caller, so that no device sync reads it (None: read).
    """
    b, hq, n_q, _ = q.shape
    n_k = k.shape[2]
    q_offset = n_k - n_q if q_offset is None else q_offset
    kvs = kv_start_tensor(kv_start, b, q.device).long()
    pq, q_count = _block_means(q, kvs - q_offset, block_size, None if max_pad is None else max_pad - q_offset)
    pk, k_count = _block_means(k, kvs, block_size, max_pad)
    s = _softcap(_grouped_scores(pq, pk) * scale, softcap)
    q_last = torch.clamp(torch.arange(pq.shape[2], device=q.device) * block_size + block_size, max=n_q) - 1
    allowed = (torch.arange(pk.shape[2], device=q.device) * block_size)[None, :] <= (q_last + q_offset)[:, None]
    allowed = allowed[None, None] & (k_count > 0)[:, None, None, :] & (q_count > 0)[:, None, :, None]
    return _safe_softmax(s.masked_fill_(~allowed, float("-inf")))


# ============================================================================ antidiagonal (XAttention)


def _antidiag_reduce(x: torch.Tensor, first_valid: torch.Tensor, stride: int, reverse: bool) -> torch.Tensor:
    """[B,H,L,D] -> [B,H,ceil(L/stride), stride*D]: stride consecutive rows side by side (reversed
    for queries so that row r of a query group meets row r of a key group on an antidiagonal);
    rows before first_valid[b] and past L are zero."""
    b, h, n, d = x.shape
    nr = -(-n // stride)
    rows = torch.arange(n, device=x.device)
    x = x.float() * (rows[None] >= first_valid[:, None]).float()[:, None, :, None]
    x = torch.nn.functional.pad(x, (0, 0, 0, nr * stride - n)).reshape(b, h, nr, stride, d)
    return (x.flip(3) if reverse else x).reshape(b, h, nr, stride * d)


def _antidiag_allowed(n_q, n_k, q_offset, kvs, stride, device):
    """Reduced-level validity [B, NRq, NRk] (see antidiagonal_block_scores)."""
    a = torch.arange(-(-n_q // stride), device=device)
    c = torch.arange(-(-n_k // stride), device=device)
    q_last = torch.clamp(a * stride + stride, max=n_q) - 1 + q_offset  # last position of the group
    causal = (c * stride)[None, :] <= q_last[:, None]
    key_ok = (c * stride + stride - 1)[None, :] >= kvs[:, None]  # group holds a valid key
    row_ok = q_last[None, :] >= kvs[:, None]  # group holds a non-padding query
    return causal[None] & key_ok[:, None, :] & row_ok[:, :, None]


def antidiagonal_block_scores_torch(q, k, *, block_size, stride, scale, kv_start=None, q_offset=None):
    b, hq, n_q, _ = q.shape
    n_k = k.shape[2]
    q_offset = n_k - n_q if q_offset is None else q_offset
    kvs = kv_start_tensor(kv_start, b, q.device).long()
    rq = _antidiag_reduce(q, kvs - q_offset, stride, reverse=True)
    rk = _antidiag_reduce(k, kvs, stride, reverse=False)
    s = _grouped_scores(rq, rk) * scale  # [B,Hq,NRq,NRk]
    allowed = _antidiag_allowed(n_q, n_k, q_offset, kvs, stride, q.device)[:, None]
    p = _safe_softmax(s.masked_fill_(~allowed, float("-inf")))
    per = block_size // stride
    nqb, nkb = -(-n_q // block_size), -(-n_k // block_size)
    p = torch.nn.functional.pad(p, (0, nkb * per - p.shape[-1], 0, nqb * per - p.shape[-2]))
    blocks = p.reshape(b, hq, nqb, per, nkb, per).sum((3, 5))
    return blocks / blocks.sum(-1, keepdim=True).clamp_min(1e-30)


if triton is not None:

    @triton.jit
    def _antidiag_tile(Q, K, q_base, k_base, sq_n, sk_n, red_rows, c0, offs_d, n_q, n_k, q_offset,
                       kv_start, sm_scale, HEAD_DIM: tl.constexpr, STRIDE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        """Scaled antidiagonal sums (log2 units) for reduced rows x reduced cols c0 .. c0 + BLOCK_N,
        summed over the stride offsets; -inf where not allowed."""
        red_cols = c0 + tl.arange(0, BLOCK_N)
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        dmask = offs_d[None, :] < HEAD_DIM
        for r in range(STRIDE):
            qt = red_rows * STRIDE + (STRIDE - 1 - r)
            kt = red_cols * STRIDE + r
            qm = (qt < n_q) & (qt + q_offset >= kv_start)
            km = (kt < n_k) & (kt >= kv_start)
            q = tl.load(Q + q_base + qt[:, None] * sq_n + offs_d[None, :], mask=qm[:, None] & dmask, other=0.0)
            k = tl.load(K + k_base + kt[:, None] * sk_n + offs_d[None, :], mask=km[:, None] & dmask, other=0.0)
            s += tl.dot(q, tl.trans(k))
        q_last = tl.minimum(red_rows * STRIDE + STRIDE, n_q) - 1 + q_offset
        ok = (red_cols[None, :] * STRIDE <= q_last[:, None]) & (red_cols[None, :] * STRIDE < n_k)
        ok = ok & (red_cols[None, :] * STRIDE + STRIDE - 1 >= kv_start) & (q_last >= kv_start)[:, None]
        ok = ok & (red_rows * STRIDE < n_q)[:, None]
        return tl.where(ok, s * (sm_scale * LOG2E), float("-inf"))

    @triton.jit
    def _antidiag_setup(KvStart, sq_b, sq_h, sk_b, sk_h, n_q, n_k, h0, n_chunk, group, q_offset,
                        STRIDE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program prologue of the antidiagonal kernels: which (batch, head h0 + i of this launch's
        n_chunk heads, reduced-row tile) this is, its base offsets, and the reduced-key range
        [lo, hi) it may see: from the group holding kv_start (aligned down to the tile width, which
        keeps key-block cells inside one tile) to the causal limit of its last row. Tiles run
        last-first (the longest rows first)."""
        pid_local = tl.program_id(0)  # b * n_chunk + i
        tile = tl.num_programs(1) - 1 - tl.program_id(1)
        b = pid_local // n_chunk
        h = h0 + pid_local % n_chunk
        red_rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        kv_start = tl.load(KvStart + b)
        q_base = b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
        k_base = b.to(tl.int64) * sk_b + (h // group).to(tl.int64) * sk_h
        n_red_q = (n_q + STRIDE - 1) // STRIDE
        last_row = tl.minimum(tile * BLOCK_M + BLOCK_M, n_red_q) - 1
        hi = (tl.minimum(last_row * STRIDE + STRIDE, n_q) - 1 + q_offset) // STRIDE + 1
        hi = tl.minimum(hi, (n_k + STRIDE - 1) // STRIDE)
        lo = (kv_start // STRIDE) // BLOCK_N * BLOCK_N
        return pid_local, tile, b, h, red_rows, offs_d, kv_start, q_base, k_base, n_red_q, lo, hi

    @triton.jit
    def _antidiag_kernel(
        Q, K, Lse2, Out, KvStart, Scratch,
        sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, so_b, so_h, so_q, ss_h, ss_q,
        n_q, n_k, n_heads, h0, n_chunk, group, q_offset, sm_scale, tune_bucket,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, STRIDE: tl.constexpr, PER_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACCUMULATE: tl.constexpr, MATERIALIZE: tl.constexpr,
    ):
        """ACCUMULATE=False: per reduced row, log2-sum-exp over its allowed reduced keys -> Lse2
        (MATERIALIZE: the scores also go to Scratch [B * n_chunk, NRq, NRk]).
        ACCUMULATE=True: probabilities summed into [query block, key block] cells -> Out, from the
        scores in Scratch (MATERIALIZE) or recomputed."""
        pid_local, tile, b, h, red_rows, offs_d, kv_start, q_base, k_base, n_red_q, lo, hi = _antidiag_setup(
            KvStart, sq_b, sq_h, sk_b, sk_h, n_q, n_k, h0, n_chunk, group, q_offset, STRIDE, BLOCK_D, BLOCK_M,
            BLOCK_N)
        lse_off = (b * n_heads + h).to(tl.int64) * n_red_q + red_rows
        n_red_k = (n_k + STRIDE - 1) // STRIDE
        scratch_rows = Scratch + pid_local.to(tl.int64) * ss_h + red_rows.to(tl.int64)[:, None] * ss_q
        if ACCUMULATE:
            lse2 = tl.load(Lse2 + lse_off, mask=red_rows < n_red_q, other=float("inf"))
        else:
            m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(lo, hi, BLOCK_N):
            red_cols = c0 + tl.arange(0, BLOCK_N)
            in_scratch = (red_rows < n_red_q)[:, None] & (red_cols < n_red_k)[None, :]
            if MATERIALIZE and ACCUMULATE:
                s = tl.load(scratch_rows + red_cols[None, :], mask=in_scratch, other=float("-inf"))
            else:
                s = _antidiag_tile(Q, K, q_base, k_base, sq_n, sk_n, red_rows, c0, offs_d, n_q, n_k, q_offset,
                                   kv_start, sm_scale, HEAD_DIM, STRIDE, BLOCK_M, BLOCK_N)
            if ACCUMULATE:
                p = tl.exp2(s - lse2[:, None])
                cell = tl.sum(tl.sum(tl.reshape(p, [BLOCK_M // PER_BLOCK, PER_BLOCK, BLOCK_N // PER_BLOCK,
                                                    PER_BLOCK]), 3), 1)
                qb = tile * (BLOCK_M // PER_BLOCK) + tl.arange(0, BLOCK_M // PER_BLOCK)
                kb = c0 // PER_BLOCK + tl.arange(0, BLOCK_N // PER_BLOCK)
                ptrs = Out + b.to(tl.int64) * so_b + h.to(tl.int64) * so_h + qb[:, None] * so_q + kb[None, :]
                n_qb = (n_q + PER_BLOCK * STRIDE - 1) // (PER_BLOCK * STRIDE)
                n_kb = (n_k + PER_BLOCK * STRIDE - 1) // (PER_BLOCK * STRIDE)
                tl.store(ptrs, cell, mask=(qb < n_qb)[:, None] & (kb < n_kb)[None, :])
            else:
                if MATERIALIZE:
                    tl.store(scratch_rows + red_cols[None, :], s, mask=in_scratch)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
                m_i = m_new
        if not ACCUMULATE:
            lse2 = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("inf"))
            tl.store(Lse2 + lse_off, lse2, mask=red_rows < n_red_q)


if triton is not None:
    _ANTIDIAG_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                         for m, n, w, st in ((64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 2),
                                             (128, 128, 8, 3))]
    _antidiag_tuned = triton.autotune(_ANTIDIAG_CONFIGS, key=["HEAD_DIM", "STRIDE", "PER_BLOCK", "ACCUMULATE",
                                                              "MATERIALIZE", "tune_bucket"])(_antidiag_kernel)

# The Triton path keeps the reduced scores of pass 1 in an fp32 scratch buffer, which pass 2 reads
# back instead of recomputing them (a memory pass instead of a second GEMM of N^2 D / stride
# FLOPs): heads run in chunks whose scratch fits this many bytes (PATCHATTN_ANTIDIAG_SCRATCH_MB,
# default 2 GiB: 8 heads at 128k, stride 16); when one head does not fit, pass 2 recomputes the
# scores. 0 always recomputes.
ANTIDIAG_SCRATCH_BYTES = int(os.environ.get("PATCHATTN_ANTIDIAG_SCRATCH_MB", 2048)) << 20


def _antidiag_head_chunk(batch: int, heads: int, n_red_q: int, n_red_k: int, device) -> int:
    """Heads per launch whose scratch fits ANTIDIAG_SCRATCH_BYTES, and on CUDA a quarter of the
    free memory (0: do not materialise; the results are the same either way)."""
    per_head = batch * n_red_q * n_red_k * 4
    budget = ANTIDIAG_SCRATCH_BYTES
    if budget and device.type == "cuda":
        budget = min(budget, torch.cuda.mem_get_info(device)[0] // 4)
    return min(heads, budget // max(per_head, 1))


def _antidiagonal_triton(q, k, *, block_size, stride, scale, kv_start=None, q_offset=None):
    b, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    q_offset = n_k - n_q if q_offset is None else q_offset
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    kvs = kv_start_tensor(kv_start, b, q.device)
    per = block_size // stride
    n_red_q, n_red_k = triton.cdiv(n_q, stride), triton.cdiv(n_k, stride)
    nqb, nkb = triton.cdiv(n_q, block_size), triton.cdiv(n_k, block_size)
    lse2 = torch.empty(b * hq, n_red_q, dtype=torch.float32, device=q.device)
    out = torch.zeros(b, hq, nqb, nkb, dtype=torch.float32, device=q.device)
    chunk = _antidiag_head_chunk(b, hq, n_red_q, n_red_k, q.device)
    materialize = chunk > 0
    chunk = chunk or hq
    scratch = (torch.empty(b * chunk, n_red_q, n_red_k, dtype=torch.float32, device=q.device) if materialize
               else lse2)  # unused pointer when recomputing
    ss = scratch.stride()[:2] if materialize else (0, 0)
    meta = dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), STRIDE=stride, PER_BLOCK=per,
                MATERIALIZE=materialize)
    for h0 in range(0, hq, chunk):
        n_chunk = min(chunk, hq - h0)
        grid = lambda meta: (b * n_chunk, triton.cdiv(n_red_q, meta["BLOCK_M"]))  # noqa: E731
        args = (q, k, lse2, out, kvs, scratch, *q.stride()[:3], *k.stride()[:3], *out.stride()[:3], *ss,
                n_q, n_k, hq, h0, n_chunk, hq // hkv, q_offset, scale, tune_bucket(n_q))
        # Pass 1 only stores, pass 2 only reads the scratch and stores: autotuning's repeated
        # launches are harmless.
        for accumulate in (False, True):
            if not autotuning(n_q):
                _antidiag_kernel[grid](*args, ACCUMULATE=accumulate, BLOCK_M=64, BLOCK_N=64, **meta, num_warps=4,
                                       num_stages=3)
            else:
                _antidiag_tuned[grid](*args, ACCUMULATE=accumulate, **meta)
    return out / out.sum(-1, keepdim=True).clamp_min(1e-30)


def antidiagonal_block_scores(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int, stride: int, scale: float,
    kv_start: Optional[torch.Tensor] = None, q_offset: Optional[int] = None, impl: Optional[str] = None,
) -> torch.Tensor:
    """XAttention-style block importance, [B, Hq, ceil(N/bs), ceil(Nk/bs)] fp32, rows summing to 1.

    Rows and keys are grouped `stride` at a time; reduced score (a, c) = scale * sum over r of
    q[a*stride + stride-1-r] . k[c*stride + r] (the antidiagonal of the stride x stride tile).
    Softmax runs over reduced keys with c*stride <= last position of group a (padding rows and
    keys contribute zero; key groups without a valid key are excluded), the probabilities are
    summed per (query block, key block) and each query block is normalised to sum to 1.
    XAttention uses scale = 1 / (sqrt(D) * stride). Needs block_size % stride == 0 and, on the
    Triton path, a power-of-two block_size // stride.
    impl: None (Triton on CUDA / under the interpreter, else torch), "torch" or "triton". The Triton
    path runs two passes (log-sum-exp, then probabilities); pass 2 reads pass 1's scores back from
    a scratch buffer (ANTIDIAG_SCRATCH_BYTES) instead of recomputing them. (A one-pass variant that
    kept per-row partial sums ran slower on an H100 at 128k: stride 16: 36.5 vs 28.0 ms.)
    """
    if block_size % stride:
        raise ValueError("block_size must be a multiple of stride")
    per = block_size // stride
    use_triton = _use_triton(q, impl) and per & (per - 1) == 0 and per <= 64
    if not use_triton:
        return antidiagonal_block_scores_torch(q, k, block_size=block_size, stride=stride, scale=scale,
                                               kv_start=kv_start, q_offset=q_offset)
    return _antidiagonal_triton(q, k, block_size=block_size, stride=stride, scale=scale, kv_start=kv_start,
                                q_offset=q_offset)


__all__ = ["last_q_scores", "pooled_block_scores", "antidiagonal_block_scores", "last_q_scores_torch",
           "antidiagonal_block_scores_torch"]
