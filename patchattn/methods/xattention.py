"""XAttention-style block-sparse attention: antidiagonal block scoring with a mass threshold.

Within each (query block, key block) tile, `stride`-spaced antidiagonals are summed (the score
of a reduced stride x stride cell is the sum of its antidiagonal's q.k products), a softmax over
reduced keys turns them into probabilities, and these are summed per tile (see
`kernels.triton_estimators.antidiagonal_block_scores`). Each query block keeps the smallest set
of key blocks whose normalised score reaches `threshold`, plus the diagonal block and the first
valid (sink) block. Antidiagonals cross both vertical and slash lines, so one cheap score sees
both patterns.
"""

from typing import Annotated

import torch
from pydantic import Field, model_validator

from .base import AllPairs, BlockSelection, Params, SparseMethod
from .block_topk import mass_mask


class XAttention(SparseMethod):
    name = "xattention"

    class Params(Params):
        block_size: Annotated[int, Field(ge=1, le=4096)] = 128
        stride: Annotated[int, Field(ge=1, le=128)] = 8
        threshold: Annotated[float, Field(gt=0, le=1)] = 0.9

        @model_validator(mode="after")
        def _stride_divides(self):
            if self.block_size % self.stride:
                raise ValueError("block_size must be a multiple of stride")
            return self

    def select(self, q, k, ctx):
        from ..kernels.triton_estimators import antidiagonal_block_scores

        p = self.params
        bs = p.block_size
        q_pos0, k_pos0 = ctx.q_first, ctx.k_first
        skip = (-q_pos0) % bs  # rows before the first block boundary: a partial block, kept dense
        if k_pos0 % bs or skip >= q.shape[-2]:
            return AllPairs()
        scores = antidiagonal_block_scores(
            q[:, :, skip:], k, block_size=bs, stride=p.stride, scale=ctx.scale / p.stride,
            kv_start=(ctx.kv_start - k_pos0), q_offset=q_pos0 + skip - k_pos0,
            impl="triton" if ctx.layout is not None else "torch")
        keep = mass_mask(scores, p.threshold)  # [B,H,nqb,nkb] in row-block order from `skip`
        first_q = (q_pos0 + skip) // bs
        if skip:
            keep = torch.cat([torch.ones_like(keep[:, :, :1]), keep], dim=2)
            first_q -= 1
        first_k = k_pos0 // bs
        nqb, nkb = keep.shape[-2:]
        q_blocks = first_q + torch.arange(nqb, device=q.device)
        k_blocks = first_k + torch.arange(nkb, device=q.device)
        sink_block = torch.div(ctx.kv_start, bs, rounding_mode="floor")[:, None, None, None]
        keep = keep | (q_blocks[:, None] == k_blocks[None, :]) | (k_blocks[None, None, None, :] == sink_block)
        return BlockSelection(blocks=keep, block_size=bs, first_q_block=first_q, first_k_block=first_k)

    def expected_density(self, n: int) -> float:
        return float("nan")  # depends on the attention itself; measured, not predicted
