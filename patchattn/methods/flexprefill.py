"""FlexPrefill-style adaptive sparse attention, chosen per head and per prompt.

For each head the attention of the last `last_q` queries is computed exactly (the estimate)
and also approximated from pooled queries and pooled key blocks. If the two block
distributions agree (sqrt of their Jensen-Shannon divergence below `tau`) the head's pattern
is predictable from pooled scores, so every query block keeps the smallest set of key blocks
whose pooled attention reaches `gamma` ("query-aware"). Otherwise the head is taken to be
vertical-slash shaped: from the estimate, the smallest sets of key columns and of diagonals
each reaching `gamma` of the mass are kept, and converted to the blocks that contain them.
The diagonal block and the first valid (sink) block are always kept. The result is a
`BlockSelection` (block granularity, as in FlexPrefill), executed by the block-sparse kernel.
"""

from typing import Annotated

import torch
from pydantic import Field

from .base import BlockSelection, Params, SparseMethod
from .block_topk import _block_means, mass_mask, pooled_block_probs
from .vertical_slash import estimate_vertical_slash
from ..kernels.reference import softcapped


class FlexPrefill(SparseMethod):
    name = "flexprefill"

    class Params(Params):
        block_size: Annotated[int, Field(ge=1, le=4096)] = 128
        gamma: Annotated[float, Field(gt=0, le=1)] = 0.9
        tau: Annotated[float, Field(ge=0)] = 0.1
        last_q: Annotated[int, Field(ge=1)] = 128

    def select(self, q, k, ctx):
        p = self.params
        bs = p.block_size
        vertical, slash = estimate_vertical_slash(q, k, ctx, p.last_q)  # [B,H,N] each
        k_blk = torch.div(ctx.k_pos, bs, rounding_mode="floor")
        first_k = ctx.k_first // bs
        nkb = ctx.k_last // bs - first_k + 1
        estimated = _normalise(_block_sum(vertical, k_blk - first_k, nkb))
        pooled = _last_rows_pooled(q, k, ctx, bs, p.last_q, nkb, first_k)
        query_aware = js_divergence(estimated, pooled).sqrt() < p.tau  # [B,H]

        first_q = ctx.q_first // bs
        nqb = ctx.q_last // bs - first_q + 1
        keep = torch.zeros(*q.shape[:2], nqb, nkb, dtype=torch.bool, device=q.device)
        if bool(query_aware.any()):
            keep |= mass_mask(pooled_block_probs(q, k, ctx, bs)[0], p.gamma) & query_aware[..., None, None]
        if not bool(query_aware.all()):
            columns = mass_mask(_normalise(vertical), p.gamma)
            diagonals = mass_mask(_normalise(slash), p.gamma)
            vs = lines_to_blocks(columns, diagonals, ctx, bs, first_q, nqb, first_k, nkb)
            keep |= vs & ~query_aware[..., None, None]
        q_blocks = first_q + torch.arange(nqb, device=q.device)
        k_blocks = first_k + torch.arange(nkb, device=q.device)
        sink_block = torch.div(ctx.kv_start, bs, rounding_mode="floor")[:, None, None, None]
        keep |= (q_blocks[:, None] == k_blocks[None, :]) | (k_blocks[None, None, None, :] == sink_block)
        self.last_query_aware = query_aware  # which heads took the query-aware branch (tests, notebooks)
        return BlockSelection(blocks=keep, block_size=bs, first_q_block=first_q, first_k_block=first_k)

    def expected_density(self, n: int) -> float:
        return float("nan")  # depends on the attention itself; measured, not predicted


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(-1, keepdim=True).clamp_min(1e-30)


def _block_sum(x: torch.Tensor, block_of: torch.Tensor, nb: int) -> torch.Tensor:
    out = torch.zeros(*x.shape[:-1], nb, dtype=x.dtype, device=x.device)
    return out.index_add_(-1, block_of, x)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log) of distributions along the last dim."""
    m = 0.5 * (p + q)

    def kl(a):
        return torch.where(a > 0, a * (a.clamp_min(1e-30).log() - m.clamp_min(1e-30).log()), 0.0).sum(-1)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp_min(0)


def _last_rows_pooled(q, k, ctx, bs, last_q, nkb, first_k):
    """Softmax over key blocks of (mean of the last `last_q` valid queries) x (block-mean keys)."""
    m = q.shape[-2]
    start = max(0, m - last_q)
    rows_valid = (ctx.q_pos[None, start:] >= ctx.kv_start[:, None]).to(torch.float32)  # [B,L]
    pq = (q[:, :, start:].float() * rows_valid[:, None, :, None]).sum(2)
    pq = pq / rows_valid.sum(-1).clamp_min(1)[:, None, None]  # [B,H,D]
    if ctx.layout is not None and ctx.k_first == 0:
        from ..kernels.triton_estimators import _block_means as sum_pool  # fp32 sums, no fp32 copy of k

        pk, counts = sum_pool(k, ctx.layout.kv_start.long(), bs, ctx.layout.max_kv_start)
        k_has = counts > 0  # [B,nkb]
    else:
        k_valid = ctx.k_pos[None, :] >= ctx.kv_start[:, None]
        pk, k_has, _ = _block_means(k.float(), ctx.k_pos, k_valid, bs)  # [B,H,nkb,D]
        k_has = k_has[:, 0]
    scores = softcapped(torch.einsum("bhd,bhkd->bhk", pq, pk.float()) * ctx.scale, ctx.softcap)
    k_start = (first_k + torch.arange(nkb, device=q.device)) * bs
    allowed = k_has & (k_start[None, :] <= ctx.q_last)  # [B,nkb]
    probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), -1)
    return probs.nan_to_num(0.0)


def lines_to_blocks(columns, diagonals, ctx, bs, first_q, nqb, first_k, nkb):
    """bool [B,H,nqb,nkb]: the blocks holding a kept column or a pair on a kept diagonal."""
    dev = columns.device
    k_blk = torch.div(ctx.k_pos, bs, rounding_mode="floor") - first_k
    col_blocks = _block_sum(columns.float(), k_blk, nkb) > 0  # [B,H,nkb]
    # Query block qb spans positions [p0, p1], key block kb keys [c0, c1]: diagonals p - j in
    # [p0 - c1, p1 - c0] cross the tile; any kept one there (prefix sums) keeps the block.
    qb_abs = first_q + torch.arange(nqb, device=dev)
    p0 = torch.clamp(qb_abs * bs, min=ctx.q_first)
    p1 = torch.clamp(qb_abs * bs + bs - 1, max=ctx.q_last)
    kb_abs = first_k + torch.arange(nkb, device=dev)
    c0 = torch.clamp(kb_abs * bs, min=ctx.k_first)
    c1 = torch.clamp(kb_abs * bs + bs - 1, max=ctx.k_last)
    n = diagonals.shape[-1]
    lo = (p0[:, None] - c1[None, :]).clamp(0, n)
    hi = (p1[:, None] - c0[None, :]).clamp(-1, n - 1)
    csum = torch.nn.functional.pad(diagonals.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
    flat = lambda t: t.reshape(1, 1, -1).expand(*csum.shape[:2], -1)  # noqa: E731
    hits = csum.gather(-1, flat(hi + 1)) - csum.gather(-1, flat(torch.minimum(lo, hi + 1)))
    diag_blocks = (hits > 0).view(*csum.shape[:2], nqb, nkb) & (hi >= lo)
    causal = (kb_abs[None, :] * bs) <= p1[:, None]
    return (col_blocks[:, :, None, :] | diag_blocks) & causal
