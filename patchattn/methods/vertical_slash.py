"""Vertical-slash attention (MInference-style), chosen online per head and per prompt.

The last `last_q` queries are scored against all keys; their attention mass summed per key
column gives the vertical scores and summed per diagonal (d = q_pos - k_pos) gives the slash
scores. The top `vertical` columns and top `slash` diagonals are kept for every query, plus
`sink` first tokens and a `window`-wide local band.

`slash_group` > 1 selects diagonals in aligned groups of that many (scores summed per group,
ceil(slash / slash_group) groups kept). A lone diagonal costs the tile kernel a whole
query-block x key-tile of scores for one kept pair per row; a group of 64 adjacent diagonals
fills its tiles at least half, so the kernel computes at most about twice what it keeps.

`spread_q` > 0 adds that many query rows evenly spaced over the rows before the last `last_q`
to the scored rows (each row's softmax sums to 1, so every sampled row counts once). The columns
and diagonals the last rows attend to serve the early rows badly (SmolLM2-135M, wikitext windows
of 4096, uniform density 0.235: +19 % perplexity), and perplexity needs every row.
"""

from typing import Annotated, Union

import torch
from pydantic import Field

from ..kernels.reference import softcapped
from ..plan import BudgetRule, resolve_budget
from .base import ColumnDiagonalSelection, Params, SparseMethod, band_pairs, causal_pairs
from .streaming import local_diagonals, sink_columns

Budget = Union[Annotated[int, Field(ge=0)], BudgetRule]


class VerticalSlash(SparseMethod):
    name = "vertical_slash"
    gqa_keys = True  # the estimator reads GQA keys directly (kernel) or repeats them itself (torch)

    class Params(Params):
        vertical: Budget
        slash: Budget
        last_q: Annotated[int, Field(ge=1)] = 64
        sink: Annotated[int, Field(ge=0)] = 4
        window: Annotated[int, Field(ge=1)] = 64
        slash_group: Annotated[int, Field(ge=1)] = 1
        # Extra rows spread over the prompt (0: only the last `last_q` rows, as before).
        spread_q: Annotated[int, Field(ge=0)] = 0

    def select(self, q, k, ctx):
        n = ctx.kv_len
        p = self.params
        vertical_scores, slash_scores = estimate_vertical_slash(q, k, ctx, p.last_q, p.spread_q)
        vertical, slash = resolve_budget(p.vertical, n), resolve_budget(p.slash, n)
        columns = sink_columns(ctx, p.sink) | top_mask(vertical_scores, vertical)
        diagonals = local_diagonals(ctx, p.window) | top_group_mask(slash_scores, slash, p.slash_group)
        # The union of at most sink + vertical columns, and of window + whole slash groups.
        return ColumnDiagonalSelection(columns=columns, diagonals=diagonals, max_columns=p.sink + vertical,
                                       max_diagonals=p.window + whole_groups(slash, p.slash_group))

    def expected_density(self, n: int) -> float:
        # Upper bound: selected columns and diagonals counted as if disjoint and full length;
        # a column of key j spans n - j rows, so take the mean length n / 2.
        p = self.params
        band = band_pairs(n, p.sink, p.window)
        slash = whole_groups(resolve_budget(p.slash, n), p.slash_group)
        extra = (resolve_budget(p.vertical, n) + slash) * n / 2
        return min(1.0, (band + extra) / causal_pairs(n))


def whole_groups(count: int, group: int) -> int:
    """Diagonals kept for a slash budget of `count`: ceil(count / group) whole groups."""
    return -(-count // group) * group


def top_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """bool mask of the `count` highest entries along the last dim (ties broken by topk)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    count = min(count, scores.shape[-1])
    if count > 0:
        mask.scatter_(-1, scores.topk(count, dim=-1).indices, True)
    return mask


def top_group_mask(scores: torch.Tensor, count: int, group: int) -> torch.Tensor:
    """bool mask keeping the ceil(count / group) aligned groups of `group` entries with the
    highest summed score (the whole last group may be partial)."""
    if group == 1:
        return top_mask(scores, count)
    n = scores.shape[-1]
    pad = (-n) % group
    sums = torch.nn.functional.pad(scores, (0, pad)).unflatten(-1, (-1, group)).sum(-1)
    keep = top_mask(sums, -(-count // group))
    return keep.repeat_interleave(group, dim=-1)[..., :n]


def estimate_vertical_slash(q, k, ctx, last_q: int, spread_q: int = 0):
    """Attention of the last `last_q` query rows, summed per key column and per diagonal; with
    `spread_q` > 0 also of `spread_q` rows evenly spaced over the rows before them."""
    m = q.shape[-2]
    start = max(0, m - last_q)
    vertical, slash = _row_scores(q[:, :, start:], k, ctx, ctx.q_pos[start:], lambda: ctx.base_rows(start, m))
    if spread_q > 0 and start > 0:
        rows = spread_rows(start, spread_q, q.device)
        for c in range(0, rows.numel(), 128):  # the kernel estimator takes at most 128 rows a call
            chunk = rows[c:c + 128]
            v, s = _row_scores(q[:, :, chunk], k, ctx, ctx.q_pos[chunk],
                               lambda: _gathered_base_rows(ctx, chunk.tolist()))
            vertical += v
            slash += s
    return vertical, slash


def spread_rows(start: int, count: int, device=None) -> torch.Tensor:
    """min(count, start) row indices in [0, start), ascending, evenly spaced (interval midpoints;
    at most one per unit of spacing start / count >= 1, so distinct). Built on `device`: no
    host-to-device copy on the kernel path."""
    count = min(count, start)
    return (2 * torch.arange(count, device=device) + 1) * start // (2 * count)


def _row_scores(q_rows, k, ctx, rows_pos, base_rows):
    """Vertical and slash scores of the query rows q_rows [B,H,L,D] at positions rows_pos [L];
    base_rows() gives their causal / padding mask [B|1,1,L,N] (a padding row, with no key, adds 0)."""
    layout = ctx.layout
    if layout is not None and layout.sliding_window is None and q_rows.shape[-2] <= 128:
        # Kernel path: the fused Triton estimator (same causal + left-padding semantics, no
        # [B, H, last_q, N] score tensor).
        from ..kernels.triton_estimators import last_q_scores

        return last_q_scores(q_rows, k, scale=ctx.scale, q_positions=rows_pos,
                             kv_start=layout.kv_start, softcap=ctx.softcap, impl="triton")
    if k.shape[1] != q_rows.shape[1]:  # GQA keys (gqa_keys): one key head per query head for the matmul
        k = k.repeat_interleave(q_rows.shape[1] // k.shape[1], dim=1)
    scores = softcapped(torch.matmul(q_rows, k.transpose(-1, -2)).float() * ctx.scale, ctx.softcap)
    keep = base_rows()  # [B,1,L,N]
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    vertical = probs.sum(dim=-2)  # [B,H,N]
    n = ctx.kv_len
    diag = (rows_pos[:, None] - ctx.k_pos[None, :]).clamp(0, n - 1)  # [L,N]; masked probs are 0
    slash = torch.zeros_like(vertical)
    slash.scatter_add_(-1, diag.reshape(1, 1, -1).expand(*probs.shape[:2], -1), probs.flatten(-2))
    return vertical, slash


def _gathered_base_rows(ctx, rows: list) -> torch.Tensor:
    """ctx's base mask (causal, padding, window) for the sorted row indices `rows`: one
    base_rows call per run of consecutive rows."""
    runs = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1])
    parts = [ctx.base_rows(a, b) for a, b in runs]
    batch = max(p.shape[0] for p in parts)
    return torch.cat([p.expand(batch, *p.shape[1:]) for p in parts], dim=-2)
