"""Where a head group's attention runs: the Triton kernels or the torch reference.

The one place that decides the backend (`kernel_layout`) and translates a method's `Selection`
into kernel launches (`run_group`). Everything else in patchattn sees only selections.

* ``PATCHATTN_BACKEND=reference`` forces the chunked torch reference everywhere (debugging);
* ``PATCHATTN_BACKEND=triton`` forces the kernels even off CUDA (with ``TRITON_INTERPRET=1``: the
  CPU tests of this path);
* default ``auto``: kernels for CUDA tensors when Triton imports, the reference otherwise.

Kernels model the base mask as causal + left padding (+ optional sliding window) with keys at
indices 0..Nk-1; `kernel_layout` returns None (reference path) for any other base mask, so a
model with packed sequences, bidirectional or chunked attention, or a user-supplied 4D mask still
gets exact results.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from .methods.base import AllPairs, BlockSelection, ColumnDiagonalSelection, Selection

BACKEND_ENV = "PATCHATTN_BACKEND"
# Kernel launches by kind ("block", "vertical_slash"): lets tests prove the kernel path ran.
kernel_calls: Counter = Counter()
_CHOICES = ("auto", "reference", "triton")


def backend_choice() -> str:
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{BACKEND_ENV}={choice!r}; expected one of {', '.join(_CHOICES)}")
    return choice


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_enabled(device: torch.device) -> bool:
    choice = backend_choice()
    if choice == "reference":
        return False
    if choice == "triton":
        return _triton_available()
    return device.type == "cuda" and _triton_available()


# Query rows per program of the vertical_slash kernel. Taller tiles share each gathered column
# tile and each slash band between more rows, but compute more pairs off a band's diagonals.
VS_BLOCK_M = int(os.environ.get("PATCHATTN_VS_BLOCK_M", 64))
# PATCHATTN_VS_FLAT_SLASH=1: walk each query block's slash tiles in one loop over a precomputed
# tile list (the compiler can prefetch across segments) instead of a loop per segment. Off: slower
# on H200 end to end, 62.6 vs 40.8 ms at 128k, 8.8 vs 6.5 ms at 32k (h200/prefill_gluon_h200.json).
VS_FLAT_SLASH = os.environ.get("PATCHATTN_VS_FLAT_SLASH", "0") == "1"
# The vertical_slash index and kept-pair count come from one Triton launch
# (kernels/triton_index.py) instead of ~160 torch operations, whose host cost bound the layer
# below ~32k. PATCHATTN_VS_FUSED_INDEX=0 builds them with torch (benchmarks flip this module flag
# to time both). The flat slash loop always uses the torch index.
VS_FUSED_INDEX = os.environ.get("PATCHATTN_VS_FUSED_INDEX", "1") != "0"

# Prompt length below which a layer runs dense on the kernel backend, per method, from the H100
# benchmark (evals/bench/results/prefill_h100.json, "methods" rows). At 8k every method loses to
# SDPA (0.13x-0.27x: estimation, list building and launch overheads against a 1 ms dense call);
# at 32k the block kernel at density 0.1 (block_topk) wins 2.0x. Methods whose speed depends on
# how sparse their selection turns out (vertical_slash with scattered diagonals, flexprefill and
# xattention at gamma/threshold 0.9) did not win at any length on the synthetic inputs; they get
# the same 32k threshold, which is where the kernels win at the densities they are meant for.
# vertical_slash with slash_group=64 computes about what it keeps (128k: kept 0.036 of pairs,
# computed 0.054) and runs 7.3x faster than SDPA there (evals/bench/results/
# prefill_vs_slash_group_h100.json); with single diagonals it computes 0.455 and loses (0.70x).
# Re-measured on an H200 (evals/bench/results/h200/prefill_h200.json): at 16k vertical_slash
# (slash_group 64) runs 0.71x and block_topk 0.94x of SDPA, at 32k 2.48x and 2.40x: 32k stays.
# With the Gluon block kernel (h200/prefill_gluon_h200.json): 16k 0.98x / 0.72x, 32k 2.43x / 2.68x.
# With its warp-specialised variant (h200/prefill_gluon_ws_h200.json): 16k 1.00x / 1.06x, 32k
# 2.60x / 2.78x. block_topk's 16k margin is one run and 6 %, after 0.72x in the run before: 32k stays.
# With the FlashAttention-3-order Gluon kernel, two runs at 16k and 24k (h200/prefill_break_even_r{1,2}
# _h200.json): 16k 0.88-1.03x (vertical_slash) and 1.00-1.08x (block_topk), level with SDPA; 24k
# 1.88-1.94x and 1.82-2.05x. So both move to 24k; the methods not timed at 24k keep 32k.
# Once a patched layer stopped syncing the device (host work now overlaps the GPU's), one H100 and
# two H200 runs (h100/sync_ab_1207/, h200/break_even_1207/) gave, attention only: vertical_slash
# 1.02x / 0.89x / 0.90x at 16k and 1.93x / 1.41x at 20k; block_topk 0.82x at 12k, 1.61x / 1.44x /
# 1.40x at 16k; TTFT of 4 Llama-3-8B-shaped layers 1.09-1.17x at 16k for both. So vertical_slash
# moves to 20k and block_topk to 16k.
# With the one-launch vertical_slash index (kernels/triton_index.py; H100, h100/fused_index_1207/):
# vertical_slash attention only 1.57-2.50x at 16k over three runs (0.75x with the torch index in the
# same call), 0.98-1.47x at 12k; TTFT of 4 layers 1.16-1.17x at 16k, 1.05-1.10x at 12k: 16k.
# streaming (its selection takes the same index): 0.97-0.99x at 16k, 1.37x at 24k in two runs, TTFT
# 1.08x at 24k: 24k. flexprefill / xattention: 0.71x / 0.98x at 16k, 1.04x / 1.08x at 32k (density
# 0.73-0.76 on the structured inputs): they keep 32k. Their density follows the attention itself:
# on a random-weight model's near-uniform attention they keep ~0.90 of the pairs and its 32k TTFT
# ran 0.93x / 0.95x of dense.
# The plan's own dense_below applies on top. PATCHATTN_DENSE_BELOW=<int> overrides every entry.
KERNEL_BREAK_EVEN = {
    "streaming": 24576,
    "vertical_slash": 16384,
    "block_topk": 16384,
    "flexprefill": 32768,
    "xattention": 32768,
}


# KERNEL_BREAK_EVEN holds for Llama-3-8B's attention width (32 query heads x 128). A layer's dense
# attention costs about Hq x D x N^2, while what patching adds per layer (estimation, list
# building, some 200 host-side launches) grows at most linearly in N: a narrower model reaches
# the same attention time, and so the same gain, only at a longer prompt. Thresholds therefore
# scale by sqrt(BREAK_EVEN_WIDTH / (Hq x D)) for narrower layers; wider ones keep the measured
# value (not measured lower).
BREAK_EVEN_WIDTH = 32 * 128


def kernel_dense_below(state, query) -> int:
    """Length below which this layer should run dense on the kernel backend (0 off it)."""
    if not kernels_enabled(query.device) or backend_choice() == "triton":  # forced: always the kernels
        return 0
    override = os.environ.get("PATCHATTN_DENSE_BELOW")
    if override is not None:
        return int(override)
    measured = max((KERNEL_BREAK_EVEN.get(g.method.name, 0) for g in state.groups if not g.is_dense), default=0)
    return width_scaled_break_even(measured, query.shape[1] * query.shape[-1])


def width_scaled_break_even(length: int, width: int) -> int:
    """KERNEL_BREAK_EVEN `length` moved to a layer of attention width Hq x D (BREAK_EVEN_WIDTH)."""
    if width >= BREAK_EVEN_WIDTH or not length:
        return length
    return int(math.ceil(length * math.sqrt(BREAK_EVEN_WIDTH / width) / 1024)) * 1024


@dataclass
class KernelLayout:
    """The base mask in kernel terms: key j valid for query row i iff
    kv_start[b] <= j <= i + q_offset (and i + q_offset - j < sliding_window)."""

    q_offset: int
    kv_start: torch.Tensor  # int32 [B], key index of the first valid key
    sliding_window: Optional[int]
    n_q: int
    n_k: int
    max_kv_start: int = 0  # max of kv_start, on the host (estimators size their padding work by it)
    # base_pairs(self) and tile_pairs(self, bm, bn), kept: every layer of a forward shares the
    # layout (one per mask and shape).
    _base_pairs: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    _tile_pairs_by_shape: dict = field(default_factory=dict, repr=False, compare=False)


def kernel_layout(attention_mask, query, key, sliding_window) -> Optional[KernelLayout]:
    """KernelLayout when the kernels run this call and can reproduce its base mask exactly, else None."""
    if not kernels_enabled(query.device):
        return None
    return mask_layout(attention_mask, query, key, sliding_window)


def mask_layout(attention_mask, query, key, sliding_window) -> Optional[KernelLayout]:
    """The call's base mask in KernelLayout terms (causal + left padding [+ window]), or None for
    any other mask; on any device (pair counts use it in closed form).

    Worked out once per mask and call shape: the decoder's layers share one mask per forward,
    and checking a padding mask reads it back from the device (a sync)."""
    from .patching import LazyMask  # patching imports this module; import at call time

    if not isinstance(attention_mask, LazyMask):
        return None
    key_ = (query.shape[-2], key.shape[-2], sliding_window, query.device)
    cache = attention_mask.layouts
    if key_ not in cache:
        cache[key_] = _kernel_layout(attention_mask, query, key, sliding_window)
    return cache[key_]


def _kernel_layout(attention_mask, query, key, sliding_window) -> Optional[KernelLayout]:
    from transformers.masking_utils import causal_mask_function

    kw = attention_mask.kwargs
    n_q, n_k = query.shape[-2], key.shape[-2]
    if kw.get("kv_offset", 0) != 0 or kw["q_length"] != n_q or kw["kv_length"] != n_k:
        return None
    q_offset = int(kw.get("q_offset", 0))
    if q_offset < 0 or kw.get("local_size") is not None:
        return None
    padding = kw.get("attention_mask")
    kv_start = attention_mask.kv_start()
    max_kv_start = int(kw.get("kv_offset", 0))  # no padding: kv_start is that everywhere
    if padding is not None:
        # Kernels know left padding only: every key from the first valid one on must be valid.
        padding = padding.to(torch.bool)
        if padding.shape[-1] < n_k:
            return None
        j = torch.arange(n_k, device=padding.device)
        if not torch.equal(padding[:, :n_k], j[None, :] >= kv_start.to(padding.device)[:, None]):
            return None
        max_kv_start = int(kv_start.max())
    layout = KernelLayout(q_offset, kv_start.to(device=query.device, dtype=torch.int32).contiguous(),
                          sliding_window, n_q, n_k, max_kv_start)
    fn = kw.get("mask_function")
    if fn is causal_mask_function and sliding_window is None:
        return layout
    if sliding_window is None:
        return None
    # A sliding-window mask function is a fresh closure per call: check it on sampled rows.
    for start in {0, max(0, n_q // 2 - 8), max(0, n_q - 16)}:
        end = min(n_q, start + 16)
        if not torch.equal(attention_mask.rows(start, end), _layout_rows(layout, start, end, query.device)):
            return None
    return layout


def _layout_rows(layout: KernelLayout, start: int, end: int, device) -> torch.Tensor:
    i = torch.arange(start, end, device=device)[:, None] + layout.q_offset
    j = torch.arange(layout.n_k, device=device)[None, :]
    keep = (j <= i)[None] & (j[None] >= layout.kv_start.to(device).long()[:, None, None])
    if layout.sliding_window is not None:
        keep &= (i - j < layout.sliding_window)[None]
    return keep[:, None]


# ------------------------------------------------------------------------------- pair counting


def _prefix_pairs(t: torch.Tensor, c0: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """F(t) = sum over rows p <= t of |{j in [c0, c0 + length) : j <= p}| (int64, elementwise)."""
    m = (t - c0 + 1).clamp_min(0)
    m = torch.minimum(m, length)
    return m * (m + 1) // 2 + (t - (c0 + length - 1)).clamp_min(0) * length


def range_pairs(p0, p1, c0, c1, window: Optional[int]) -> torch.Tensor:
    """Base-valid pairs between query positions [p0, p1] and keys [c0, c1] (inclusive, broadcast)."""
    length = (c1 - c0 + 1).clamp_min(0)
    total = _prefix_pairs(p1, c0, length) - _prefix_pairs(p0 - 1, c0, length)
    if window is not None:  # remove keys at distance >= window: j <= p - window
        total = total - (_prefix_pairs(p1 - window, c0, length) - _prefix_pairs(p0 - 1 - window, c0, length))
    return total


def base_pairs(layout: KernelLayout) -> torch.Tensor:
    """Pairs of the base mask per batch row, int64 [B] (closed form: no N x N mask), worked out
    once per layout."""
    if layout._base_pairs is None:
        kvs = layout.kv_start.long()
        p0 = layout.q_offset  # Python ints: torch.tensor(..., device=cuda) would sync on its copy
        layout._base_pairs = range_pairs(p0, p0 + layout.n_q - 1, kvs, torch.full_like(kvs, layout.n_k - 1),
                                         layout.sliding_window)
    return layout._base_pairs


def tile_pairs(layout: KernelLayout, bm: int, bn: int) -> torch.Tensor:
    """Base-valid pairs of each (query row block, key block) tile, int64 [B, nqb, nkb], worked
    out once per layout and tile shape."""
    if (bm, bn) not in layout._tile_pairs_by_shape:
        layout._tile_pairs_by_shape[bm, bn] = _tile_pairs(layout, bm, bn)
    return layout._tile_pairs_by_shape[bm, bn]


def _tile_pairs(layout: KernelLayout, bm: int, bn: int) -> torch.Tensor:
    dev = layout.kv_start.device
    kvs = layout.kv_start.long()[:, None, None]
    r0 = torch.arange(0, layout.n_q, bm, device=dev)
    p0 = (r0 + layout.q_offset)[None, :, None]
    p1 = ((r0 + bm).clamp(max=layout.n_q) - 1 + layout.q_offset)[None, :, None]
    k0 = torch.arange(0, layout.n_k, bn, device=dev)
    c0 = torch.maximum(k0[None, None, :], kvs)
    c1 = ((k0 + bn).clamp(max=layout.n_k) - 1)[None, None, :]
    return range_pairs(p0, p1, c0, c1, layout.sliding_window)


# ------------------------------------------------------------------------------- selections -> kernels


def _kernel_tiles(block_size: int, q_offset: int, head_dim: int) -> Optional[Tuple[int, int]]:
    """(block_m, block_n) of kernel tiles nested inside the selection's blocks, or None."""
    top = TILE_MAX if head_dim <= 128 else 64  # 128 x 256 fp32 accumulators would spill
    for t in (128, 64, 32, 16):
        if t <= top and block_size % t == 0 and q_offset % t == 0:
            return t, t
    return None


# Largest kernel tile for selections with large blocks: on H100 (evals/bench/results/
# prefill_h100.json) 128 x 128 tiles beat 64 x 64 at every density from 32k tokens on, by up to
# 1.5x at density 0.1 (half the per-tile softmax bookkeeping and list reads).
TILE_MAX = 128


# Lists of unbounded selections (mass thresholds: xattention, flexprefill) up to this size take
# every row's full width instead of reading the longest row back (a device sync, which stalls
# the host's queue of the next layers while short prompts are host-bound). Larger lists come
# from long prompts, whose GPU work dwarfs one sync, and would cost memory (128 MiB at 128k
# tokens, 32 heads, 128-token blocks).
FULL_WIDTH_LIST_BYTES = 32 << 20


def lists_from_blocks(keep: torch.Tensor, max_count: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """bool [..., nkb] -> (ascending kept block ids int32 [..., maxk], count int32 [...]).

    A cumulative-sum scatter instead of a sort: O(elements). maxk is `max_count` (a bound on any
    row's kept blocks that the caller guarantees; rows past it would be cut), else the full width
    nkb while the list stays under FULL_WIDTH_LIST_BYTES, else read from the mask (one host sync).
    """
    count = keep.sum(-1, dtype=torch.int32)
    if max_count is not None:
        maxk = max(1, min(max_count, keep.shape[-1]))
        count = count.clamp(max=maxk)  # a broken bound drops blocks, never reads past the list
    elif keep.numel() * 4 <= FULL_WIDTH_LIST_BYTES:
        maxk = max(1, keep.shape[-1])
    else:
        maxk = max(1, int(count.max())) if count.numel() else 1
    slot = keep.cumsum(-1, dtype=torch.int32) - 1
    # Unkept entries land in a spill column, and so do ranks past a broken bound (an index error
    # inside a CUDA scatter would kill the process).
    slot = torch.where(keep, slot, maxk).clamp(max=maxk)
    index = torch.zeros(*keep.shape[:-1], maxk + 1, dtype=torch.int32, device=keep.device)
    ids = torch.arange(keep.shape[-1], device=keep.device, dtype=torch.int32).expand_as(slot)
    index.scatter_(-1, slot.long(), ids)
    return index[..., :maxk].contiguous(), count.contiguous()


def block_selection_lists(selection: BlockSelection, layout: KernelLayout, q_pos0: int, tiles: Tuple[int, int],
                          tile_pairs: torch.Tensor):
    """Kernel block lists for a BlockSelection: (index, count, keep_tiles [B,Hs,nqb,nkb]).

    `tile_pairs` is `tile_pairs(layout, *tiles)`: tiles without a base-valid pair are dropped."""
    bm, bn = tiles
    bs = selection.block_size
    dev = selection.blocks.device
    rows = (q_pos0 + torch.arange(0, layout.n_q, bm, device=dev)) // bs - selection.first_q_block
    cols = torch.arange(0, layout.n_k, bn, device=dev) // bs - selection.first_k_block
    keep = selection.blocks[:, :, rows][:, :, :, cols]
    keep = keep & (tile_pairs > 0)[:, None]
    # A kept block spans bs // bn kernel tiles per row of tiles.
    bound = None if selection.max_blocks is None else selection.max_blocks * max(1, bs // bn)
    index, count = lists_from_blocks(keep, bound)
    return index, count, keep


def _kept_block_pairs(keep: torch.Tensor, tile_pairs: torch.Tensor, heads: int) -> torch.Tensor:
    """Exact kept pairs [B, H] = sum of tile pair counts over kept tiles (chunked over heads)."""
    b, hs = keep.shape[:2]
    out = torch.empty(b, hs, dtype=torch.long, device=keep.device)
    step = max(1, (1 << 25) // max(1, keep[0, 0].numel() * b))  # int64 temporaries of <= 256 MiB
    for h in range(0, hs, step):
        out[:, h:h + step] = torch.where(keep[:, h:h + step], tile_pairs[:, None], 0).sum((-1, -2))
    return out.expand(b, heads) if hs == 1 else out


def whole_kv_groups(q_heads: torch.Tensor, group_size: int) -> bool:
    """Whether ascending query heads `q_heads` (host tensor) form whole GQA groups of `group_size`,
    so the kernels can read each key head once for its group (decided on the host: a device-side
    check would sync)."""
    per_kv = Counter(h // group_size for h in q_heads.tolist())
    return all(n == group_size for n in per_kv.values())


def _heads_for_kernel(query, key, value, heads: torch.Tensor, whole_groups: bool):
    """q, k, v for the kernels with native GQA where the group's heads allow it."""
    hq, hkv = query.shape[1], key.shape[1]
    g = hq // hkv
    if heads.numel() == hq:
        return query, key, value
    kv_of = torch.div(heads, g, rounding_mode="floor")
    if whole_groups:  # heads (ascending) hold each kv head's g query heads in order
        kv_once = kv_of[::g]
        return query[:, heads], key[:, kv_once], value[:, kv_once]
    return query[:, heads], key[:, kv_of], value[:, kv_of]  # partial groups: one kv head per q head


def run_group(selection: Selection, query, key, value, heads: torch.Tensor, layout: KernelLayout, q_pos0: int, *,
              scale: float, softcap: Optional[float], out: Optional[torch.Tensor] = None,
              whole_groups: Optional[bool] = None):
    """Attention for one head group on the kernels. Returns (out [B,h,M,D], kept pairs [B,h],
    the kernel's telemetry name) or None when this selection has no kernel form (the caller then
    runs the reference). whole_groups: `whole_kv_groups` of the heads (None: worked out here,
    which reads `heads` back from the device)."""
    from .kernels import triton_attention as ta

    if whole_groups is None:
        whole_groups = whole_kv_groups(heads.cpu(), query.shape[1] // key.shape[1])
    q, k, v = _heads_for_kernel(query, key, value, heads, whole_groups)
    h = q.shape[1]
    opts = dict(scale=scale, q_offset=layout.q_offset, kv_start=layout.kv_start,
                sliding_window=layout.sliding_window, softcap=softcap)
    if isinstance(selection, AllPairs):
        selection = BlockSelection(blocks=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device),
                                   block_size=1 << 40, first_q_block=0, first_k_block=0)
        tiles = _kernel_tiles(TILE_MAX, 0, q.shape[-1])  # one block covers everything: any tiling nests
    elif isinstance(selection, BlockSelection):
        tiles = _kernel_tiles(selection.block_size, q_pos0, q.shape[-1])
    elif isinstance(selection, ColumnDiagonalSelection):
        b, n = q.shape[0], layout.n_k
        cols = selection.columns.expand(b, h, n)
        diags = selection.diagonals.expand(b, h, n)
        if cols.shape[-1] != n or diags.shape[-1] != n:
            return None
        where = dict(n_q=layout.n_q, q_offset=layout.q_offset, kv_start=layout.kv_start,
                     sliding_window=layout.sliding_window)
        bounds = dict(max_columns=selection.max_columns, max_diagonals=selection.max_diagonals)
        if VS_FUSED_INDEX and not VS_FLAT_SLASH:
            from .kernels.triton_index import vertical_slash_index_and_kept

            index, kept = vertical_slash_index_and_kept(cols, diags, block_m=VS_BLOCK_M, **where, **bounds)
        else:
            index = ta.vertical_slash_index(cols, diags, block_m=VS_BLOCK_M,
                                            flat_slash_block_n=64 if VS_FLAT_SLASH else None, **where, **bounds)
            kept = ta.vertical_slash_pair_counts(cols, diags, index=index, computed=False, **where)["kept"]
        o, _ = ta.vertical_slash_attention(q, k, v, cols, diags, index=index, out=out, block_m=VS_BLOCK_M, **opts)
        kernel_calls["vertical_slash"] += 1
        return o, kept, "triton_vertical_slash"
    else:
        return None
    if tiles is None:
        return None
    bm, bn = tiles
    pairs = tile_pairs(layout, bm, bn)  # drops empty tiles and counts kept pairs
    index, count, keep = block_selection_lists(selection, layout, q_pos0, tiles, pairs)
    if index.shape[1] not in (1, h) and h % index.shape[1]:
        return None
    o, _ = ta.block_sparse_attention(q, k, v, index, count, block_m=bm, block_n=bn, out=out, **opts)
    kernel_calls["block"] += 1
    kernel = ta.block_sparse_kernel(q, bm, bn, softcap, layout.sliding_window)
    return o, _kept_block_pairs(keep, pairs, h), kernel
