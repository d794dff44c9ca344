"""Streaming (A-shape) attention: the first `sink` tokens plus a local window of `window`."""

from typing import Annotated, Union

import torch
from pydantic import Field

from ..plan import BudgetRule, resolve_budget
from .base import ColumnDiagonalSelection, Params, SparseMethod, band_pairs, causal_pairs

PositiveBudget = Union[Annotated[int, Field(ge=1)], BudgetRule]


def sink_columns(ctx, sink: int) -> torch.Tensor:
    """bool [B,1,N]: the first `sink` valid keys of each row of the batch (left padding aware)."""
    logical = ctx.k_pos[None, :] - ctx.kv_start[:, None]
    return ((logical >= 0) & (logical < sink))[:, None, :]


def local_diagonals(ctx, window: int) -> torch.Tensor:
    """bool [1,1,N]: diagonals d = 0..window-1 (the query itself and window-1 keys before it)."""
    return (torch.arange(ctx.kv_len, device=ctx.k_pos.device) < window)[None, None, :]


class Streaming(SparseMethod):
    name = "streaming"

    class Params(Params):
        sink: Annotated[int, Field(ge=0)] = 4
        window: PositiveBudget

    def select(self, q, k, ctx):
        window = resolve_budget(self.params.window, ctx.kv_len)
        return ColumnDiagonalSelection(
            columns=sink_columns(ctx, self.params.sink),
            diagonals=local_diagonals(ctx, window),
            max_columns=self.params.sink,
            max_diagonals=window,
        )

    def expected_density(self, n: int) -> float:
        window = resolve_budget(self.params.window, n)
        return band_pairs(n, self.params.sink, window) / causal_pairs(n)
