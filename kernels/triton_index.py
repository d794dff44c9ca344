"""One Triton launch that turns a vertical_slash selection into the kernel's index and counts its
kept pairs.

`triton_attention.vertical_slash_index` and `vertical_slash_pair_counts` build the same result out
of about 160 torch operations (compactions, searches, segment bounds). Each is a launch with its
own host cost, so below ~32k a patched vertical_slash layer was bound by its host work, not by the
GPU (4.1-4.8 ms of host time per call at 16k, where dense SDPA takes 3.8 ms). This kernel does all
of it in one program per (batch, head) row (host time 1.4-2.4 ms per call, 1.57-2.50x SDPA at 16k
on H100: evals/bench/results/h100/fused_index_1207/); the torch functions stay the reference it is
tested against.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_attention import _INDEX_PAD, VerticalSlashIndex
from .triton_estimators import kv_start_tensor

_PAD = tl.constexpr(_INDEX_PAD)  # pads every list: sorts after any key index / diagonal
_CHUNK = 1024  # mask entries per step of the compaction loops
_QB_CHUNK = 256  # query blocks (or segments) per step of the search loops


@triton.jit
def _count_below(sorted_ptr, length, x, n_steps, RIGHT: tl.constexpr):
    """Per element of x: how many entries of the ascending sorted_ptr[0:length] are < x (RIGHT:
    <= x), i.e. torch.searchsorted(..., x, right=RIGHT). n_steps >= bit length of `length`."""
    lo = tl.zeros_like(x)
    hi = lo + length
    for _ in range(n_steps):
        active = lo < hi
        mid = (lo + hi) // 2
        val = tl.load(sorted_ptr + mid, mask=active, other=0).to(tl.int64)
        if RIGHT:
            go_right = val <= x
        else:
            go_right = val < x
        lo = tl.where(active & go_right, mid + 1, lo)
        hi = tl.where(active & (go_right == 0), mid, hi)
    return lo


@triton.jit
def _compact(mask_row, out_row, n, out_len, limit, offs, CHUNK: tl.constexpr):
    """Write the indices j < limit where mask_row[j] != 0, ascending, into out_row[0:out_len]
    (entries past out_len dropped) and pad the rest with _INDEX_PAD. Returns how many are kept,
    before the out_len bound."""
    count = tl.sum(tl.zeros([CHUNK], tl.int32), 0)  # an int32 scalar: loop-carried values keep one type
    for start in range(0, tl.minimum(n, limit), CHUNK):
        j = start + offs
        keep = (tl.load(mask_row + j, mask=j < n, other=0) != 0) & (j < limit)
        rank = count + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(out_row + rank, j.to(tl.int32), mask=keep & (rank < out_len))
        count += tl.sum(keep.to(tl.int32), 0)
    for start in range(0, out_len, CHUNK):
        s = start + offs
        tl.store(out_row + s, tl.full([CHUNK], _PAD, tl.int32), mask=(s >= count) & (s < out_len))
    return count


# Scalars that may equal 1 are not specialised: Triton would make them compile-time constants,
# which the int64 arithmetic below cannot convert.
@triton.jit(do_not_specialize=["sc_b", "sc_h", "sd_b", "sd_h", "n_heads", "n_k", "n_q", "q_offset", "window", "n_qb",
                               "v_len", "d_len", "v_steps", "d_steps"])
def _vs_index_kernel(
    ColMask, DiagMask, KvStart, VIdx, VLo, VMid, VHi, DIdx, SegLo, SegHi, SegFull, SegCnt, Kept,
    sc_b, sc_h, sd_b, sd_h, n_heads, n_k, n_q, q_offset, window, n_qb, v_len, d_len, v_steps, d_steps,
    BLOCK_M: tl.constexpr, HAS_WINDOW: tl.constexpr, CHUNK: tl.constexpr, QB_CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // n_heads
    h = pid % n_heads
    pid64 = pid.to(tl.int64)
    kvs = tl.load(KvStart + b).to(tl.int64)
    offs = tl.arange(0, CHUNK)
    v_row = VIdx + pid64 * v_len
    d_row = DIdx + pid64 * d_len
    seg_lo_row = SegLo + pid64 * d_len
    seg_hi_row = SegHi + pid64 * d_len
    p_lo = q_offset.to(tl.int64)
    p_hi = (n_q - 1 + q_offset).to(tl.int64)
    if HAS_WINDOW:
        win = window.to(tl.int64)
        diag_limit = window
    else:
        win = (n_k + n_q + tl.abs(q_offset) + 1).to(tl.int64)
        diag_limit = n_k

    # Kept columns, ascending; the vertical part of the kept pairs: column j is seen by the query
    # positions [max(j, p_lo), min(p_hi, j + win - 1)] when j >= kv_start.
    col_row = ColMask + b.to(tl.int64) * sc_b + h.to(tl.int64) * sc_h
    _compact(col_row, v_row, n_k, v_len, n_k, offs, CHUNK)
    # Kept diagonals, ascending (those at or past a sliding window can never be valid).
    diag_row = DiagMask + b.to(tl.int64) * sd_b + h.to(tl.int64) * sd_h
    _compact(diag_row, d_row, n_k, d_len, diag_limit, offs, CHUNK)
    tl.debug_barrier()  # the lists above are read back by every thread below

    kept = tl.zeros([CHUNK], tl.int64)
    for start in range(0, v_len, CHUNK):
        s = start + offs
        j = tl.load(v_row + s, mask=s < v_len, other=_PAD).to(tl.int64)
        rows = tl.minimum(j + win - 1, p_hi) - tl.maximum(j, p_lo) + 1
        kept += tl.where((j < _PAD) & (j >= kvs) & (rows > 0), rows, 0)

    # Segments: runs of kept diagonals less than BLOCK_M + 1 apart (they cover touching key ranges
    # for a block of BLOCK_M rows). A diagonal d also counts the valid keys [max(kv_start, p_lo - d),
    # p_hi - d] that no kept column covers.
    seg_lo_n = tl.sum(tl.zeros([CHUNK], tl.int32), 0)
    seg_hi_n = seg_lo_n
    for start in range(0, d_len, CHUNK):
        s = start + offs
        d = tl.load(d_row + s, mask=s < d_len, other=_PAD).to(tl.int64)
        prev = tl.load(d_row + s - 1, mask=(s >= 1) & (s < d_len), other=-_PAD).to(tl.int64)
        nxt = tl.load(d_row + s + 1, mask=s + 1 < d_len, other=_PAD).to(tl.int64)
        nxt = tl.where(s + 1 < d_len, nxt, 2 * _PAD)
        real = d < _PAD
        starts = real & (d - prev > BLOCK_M)
        ends = real & (nxt - d > BLOCK_M)
        rank = seg_lo_n + tl.cumsum(starts.to(tl.int32), 0) - 1
        tl.store(seg_lo_row + rank, d.to(tl.int32), mask=starts)
        rank = seg_hi_n + tl.cumsum(ends.to(tl.int32), 0) - 1
        tl.store(seg_hi_row + rank, d.to(tl.int32), mask=ends)
        seg_lo_n += tl.sum(starts.to(tl.int32), 0)
        seg_hi_n += tl.sum(ends.to(tl.int32), 0)
        hi = tl.minimum(tl.maximum(p_hi - d + 1, 0), n_k)  # exclusive
        lo = tl.minimum(tl.minimum(tl.maximum(tl.maximum(kvs, p_lo - d), 0), n_k), hi)
        in_cols = _count_below(v_row, v_len, hi, v_steps, False) - _count_below(v_row, v_len, lo, v_steps, False)
        kept += tl.where(real, hi - lo - in_cols, 0)
    for start in range(0, d_len, CHUNK):
        s = start + offs
        pad = tl.full([CHUNK], _PAD, tl.int32)
        tl.store(seg_lo_row + s, pad, mask=(s >= seg_lo_n) & (s < d_len))
        tl.store(seg_hi_row + s, pad, mask=(s >= seg_hi_n) & (s < d_len))
    tl.store(Kept + pid64, tl.sum(kept, 0))
    tl.debug_barrier()

    # A segment whose diagonals are all kept is a band (the kernel masks it by distance alone).
    for start in range(0, d_len, QB_CHUNK):
        s = start + tl.arange(0, QB_CHUNK)
        live = s < d_len
        lo = tl.load(seg_lo_row + s, mask=live, other=_PAD).to(tl.int64)
        hi = tl.load(seg_hi_row + s, mask=live, other=_PAD).to(tl.int64)
        run = _count_below(d_row, d_len, hi, d_steps, True) - _count_below(d_row, d_len, lo, d_steps, False)
        full = (lo < _PAD) & (run == hi - lo + 1)
        tl.store(SegFull + pid64 * d_len + s, full.to(tl.int32), mask=live)

    # Per query block: the slots of the columns it may see ([v_lo, v_hi); [v_lo, v_mid) lie at or
    # before its first row) and the leading segments that reach its keys.
    for start in range(0, n_qb, QB_CHUNK):
        qb = start + tl.arange(0, QB_CHUNK)
        live = qb < n_qb
        first = qb.to(tl.int64) * BLOCK_M
        first_pos = first + q_offset
        last_pos = tl.minimum(first + BLOCK_M, n_q) - 1 + q_offset
        k_min = tl.zeros_like(first_pos) + kvs
        if HAS_WINDOW:
            k_min = tl.maximum(k_min, first_pos - window + 1)
        v_lo = _count_below(v_row, v_len, k_min, v_steps, False)
        v_hi = _count_below(v_row, v_len, last_pos, v_steps, True)
        if HAS_WINDOW:  # a window's far edge moves with the row: every tile keeps its mask
            v_mid = v_lo
        else:
            v_mid = tl.maximum(_count_below(v_row, v_len, first_pos, v_steps, True), v_lo)
        seg_cnt = _count_below(seg_lo_row, d_len, last_pos - k_min, d_steps, True)
        seg_cnt = tl.where(last_pos >= k_min, seg_cnt, 0)
        slot = pid64 * n_qb + qb
        tl.store(VLo + slot, v_lo.to(tl.int32), mask=live)
        tl.store(VHi + slot, v_hi.to(tl.int32), mask=live)
        tl.store(VMid + slot, v_mid.to(tl.int32), mask=live)
        tl.store(SegCnt + slot, seg_cnt.to(tl.int32), mask=live)


def _mask_rows(mask: torch.Tensor, bsz: int, heads: int, n_k: int) -> Tuple[torch.Tensor, int, int]:
    """The mask as uint8 with unit stride along keys (broadcast batch / head dims keep stride 0,
    no copy) and its batch / head strides."""
    mask = mask.expand(bsz, heads, n_k)
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    elif mask.dtype != torch.uint8:
        mask = (mask != 0).view(torch.uint8)
    return mask, mask.stride(0), mask.stride(1)


def vertical_slash_index_and_kept(
    column_mask: torch.Tensor, diagonal_mask: torch.Tensor, *, n_q: int, q_offset: int = 0,
    kv_start: Optional[torch.Tensor] = None, sliding_window: Optional[int] = None, block_m: int = 64,
    max_columns: Optional[int] = None, max_diagonals: Optional[int] = None,
) -> Tuple[VerticalSlashIndex, torch.Tensor]:
    """`vertical_slash_index(...)` (no flat slash tiles) and `vertical_slash_pair_counts(...,
    index=...)["kept"]` for bool masks broadcastable to [B, H, Nk], in one launch; kept is int64
    [B, H]. Same bounds semantics: lists hold at most max_columns / max_diagonals entries."""
    bsz, heads = max(column_mask.shape[0], diagonal_mask.shape[0]), max(column_mask.shape[1], diagonal_mask.shape[1])
    n_k = column_mask.shape[-1]
    if diagonal_mask.shape[-1] != n_k:
        raise ValueError(f"column mask has {n_k} keys, diagonal mask {diagonal_mask.shape[-1]}")
    dev = column_mask.device
    cols, sc_b, sc_h = _mask_rows(column_mask, bsz, heads, n_k)
    diags, sd_b, sd_h = _mask_rows(diagonal_mask, bsz, heads, n_k)
    v_len = n_k if max_columns is None else max(1, min(max_columns, n_k))
    d_len = n_k if max_diagonals is None else max(1, min(max_diagonals, n_k))
    n_qb = triton.cdiv(n_q, block_m)
    rows = bsz * heads
    # One allocation for the int32 outputs (a few host microseconds each would add up again).
    flat = torch.empty(rows * (v_len + 4 * d_len + 4 * n_qb), dtype=torch.int32, device=dev)
    sizes = (v_len, d_len, d_len, d_len, d_len, n_qb, n_qb, n_qb, n_qb)
    v_idx, d_idx, seg_lo, seg_hi, seg_full, v_lo, v_mid, v_hi, seg_cnt = (
        part.view(bsz, heads, -1) for part in flat.split([rows * s for s in sizes]))
    kept = torch.empty(bsz, heads, dtype=torch.int64, device=dev)
    if rows:
        _vs_index_kernel[(rows,)](
            cols, diags, kv_start_tensor(kv_start, bsz, dev), v_idx, v_lo, v_mid, v_hi, d_idx, seg_lo, seg_hi,
            seg_full, seg_cnt, kept, sc_b, sc_h, sd_b, sd_h, heads, n_k, n_q, q_offset, int(sliding_window or 0),
            n_qb, v_len, d_len, v_len.bit_length(), d_len.bit_length(),
            BLOCK_M=block_m, HAS_WINDOW=sliding_window is not None, CHUNK=_CHUNK, QB_CHUNK=_QB_CHUNK, num_warps=4,
        )
    index = VerticalSlashIndex(v_idx, v_lo, v_hi, seg_lo, seg_hi, seg_cnt, block_m, seg_full, d_idx=d_idx,
                               v_mid=v_mid)
    return index, kept


__all__ = ["vertical_slash_index_and_kept"]
