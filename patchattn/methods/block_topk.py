"""Block top-k attention: pool queries and keys into blocks, keep the best key blocks per query block.

Per query block either the `top_k` highest-scoring key blocks or the smallest set reaching
cumulative pooled-attention mass `gamma` are kept; the diagonal block and the first valid block
(the attention sink) are always kept.
"""

from typing import Annotated, Optional, Union

import torch
from pydantic import Field, model_validator

from ..kernels.reference import softcapped
from ..plan import BudgetRule, resolve_budget
from .base import BlockSelection, Params, SparseMethod, causal_pairs


class BlockTopK(SparseMethod):
    name = "block_topk"

    class Params(Params):
        block_size: Annotated[int, Field(ge=1, le=4096)] = 64
        top_k: Optional[Union[Annotated[int, Field(ge=1)], BudgetRule]] = None
        gamma: Optional[Annotated[float, Field(gt=0, le=1)]] = None

        @model_validator(mode="after")
        def _one_rule(self):
            if (self.top_k is None) == (self.gamma is None):
                raise ValueError("exactly one of top_k or gamma must be given")
            return self

    def select(self, q, k, ctx):
        bs = self.params.block_size
        probs, first_q, first_k = pooled_block_probs(q, k, ctx, bs)  # [B,H,nqb,nkb]
        bound = None  # gamma keeps as many blocks as the mass needs
        if self.params.gamma is not None:
            keep = mass_mask(probs, self.params.gamma)
        else:
            # top_k counts key blocks; budgets as rules resolve against the number of blocks.
            count = resolve_budget(self.params.top_k, probs.shape[-1])
            keep = _top_blocks(probs, count)
            bound = count + 2  # + the diagonal and the sink block
        nqb, nkb = probs.shape[-2:]
        q_blocks = first_q + torch.arange(nqb, device=q.device)
        k_blocks = first_k + torch.arange(nkb, device=q.device)
        diagonal = q_blocks[:, None] == k_blocks[None, :]
        sink_block = torch.div(ctx.kv_start, bs, rounding_mode="floor")[:, None, None, None]
        keep = keep | diagonal | (k_blocks[None, None, None, :] == sink_block)
        return BlockSelection(blocks=keep, block_size=bs, first_q_block=first_q, first_k_block=first_k,
                              max_blocks=bound)

    def expected_density(self, n: int) -> float:
        bs = self.params.block_size
        nb = -(-n // bs)
        if self.params.gamma is not None:
            return float("nan")  # depends on the attention itself; measured, not predicted
        k_blocks = min(nb, resolve_budget(self.params.top_k, nb) + 2)
        # Query block i can use at most i + 1 blocks.
        kept_blocks = sum(min(i + 1, k_blocks) for i in range(nb))
        return min(1.0, kept_blocks * bs * bs / 2 / causal_pairs(n) * (2 if nb > 1 else 1))


def _block_means(x: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, bs: int):
    """Mean of x [B,H,L,D] over valid rows within absolute-position blocks -> [B,H,nb,D]."""
    block = torch.div(pos, bs, rounding_mode="floor")
    first = int(block[0])
    idx = block - first
    nb = int(idx[-1]) + 1
    weights = valid.to(x.dtype)[:, None, :, None]  # [B,1,L,1]
    sums = torch.zeros(*x.shape[:2], nb, x.shape[-1], dtype=x.dtype, device=x.device)
    sums.index_add_(2, idx, x * weights)
    counts = torch.zeros(valid.shape[0], 1, nb, 1, dtype=x.dtype, device=x.device)
    counts.index_add_(2, idx, weights)
    return sums / counts.clamp_min(1), counts[:, :, :, 0] > 0, first


def pooled_block_attention(q, k, ctx, bs: int):
    """Softmax over key blocks of pooled-query x pooled-key scores, block-causal."""
    q_valid = ctx.q_pos[None, :] >= ctx.kv_start[:, None]
    k_valid = ctx.k_pos[None, :] >= ctx.kv_start[:, None]
    pq, q_has, first_q = _block_means(q.float(), ctx.q_pos, q_valid, bs)
    pk, k_has, first_k = _block_means(k.float(), ctx.k_pos, k_valid, bs)
    scores = softcapped(pq @ pk.transpose(-1, -2) * ctx.scale, ctx.softcap)
    q_blocks = first_q + torch.arange(pq.shape[2], device=q.device)
    k_blocks = first_k + torch.arange(pk.shape[2], device=q.device)
    allowed = (k_blocks[None, :] <= q_blocks[:, None])[None, None] & k_has[:, :, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs, first_q, first_k


def pooled_block_probs(q, k, ctx, bs: int):
    """`pooled_block_attention`, from the fused Triton estimator when this call runs on the kernels."""
    layout = ctx.layout
    # The layout's q_offset is q_pos[0] and its keys start at 0, known on the host (reading
    # q_pos back would sync the device).
    if layout is not None and layout.q_offset % bs == 0:
        # Kernel path: pooled sums straight from q/k's dtype (no fp32 copies of [B,H,N,D]);
        # same block-causal softmax, row blocks aligned with absolute blocks here.
        from ..kernels.triton_estimators import pooled_block_scores

        probs = pooled_block_scores(q, k, block_size=bs, scale=ctx.scale, kv_start=layout.kv_start,
                                    q_offset=layout.q_offset, softcap=ctx.softcap, max_pad=layout.max_kv_start)
        return probs, layout.q_offset // bs, 0
    return pooled_block_attention(q, k, ctx, bs)


def mass_mask(probs: torch.Tensor, gamma: float) -> torch.Tensor:
    """Smallest set of entries per row (highest first) whose mass reaches `gamma`."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the strictly higher-ranked entries
    keep_sorted = (before < gamma) & (sorted_p > 0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def _top_blocks(probs: torch.Tensor, count: int) -> torch.Tensor:
    count = min(count, probs.shape[-1])
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, probs.topk(count, dim=-1).indices, True)
    return keep & (probs > 0)
