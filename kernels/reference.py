"""Torch reference attention over an arbitrary keep-mask, computed in query chunks.

The keep-mask is produced a chunk of query rows at a time by a callback, so peak memory is
O(chunk x N) per head instead of O(N x N): a 16k-token prompt never materialises a full score
matrix. These functions are the CPU path and the oracle every faster kernel is tested against.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

# Upper bound on score-matrix elements per chunk (fp32: 4 bytes each -> 32 MiB per buffer).
_CHUNK_ELEMENTS = 8 * 1024 * 1024

RowMask = Callable[[int, int], torch.Tensor]  # (start, end) -> bool [B, H|1, end-start, Nk]


def _any(keep: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """keep.any(dim) as a max over bytes: 15-25x faster than Tensor.any on CPU for these masks."""
    return keep.view(torch.uint8).amax(dim=dim, keepdim=keepdim).bool()


def softcapped(scores: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    return scores if not softcap else softcap * torch.tanh(scores / softcap)


def masked_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float,
    softcap: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention over the pairs where `keep` is True (shapes [B,H,M,D], [B,H,N,D], keep [B,H|1,M,N]).

    Returns (out [B,H,M,D], lse [B,H,M]); rows with no kept key give 0 and -inf, never NaN.
    """
    scores = softcapped(torch.matmul(q, k.transpose(-1, -2)).float() * scale, softcap)
    scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    probs = torch.exp(scores - row_max)
    denom = probs.sum(dim=-1, keepdim=True)
    out = torch.matmul(probs.to(v.dtype), v) / denom.clamp_min(1e-30).to(v.dtype)
    out = torch.where(denom > 0, out, torch.zeros_like(out))
    lse = (row_max + torch.log(denom)).squeeze(-1)
    return out, lse


def masked_attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float,
) -> torch.Tensor:
    """`masked_softmax_attention`'s output (no lse, no softcap) through torch's fused SDPA with a
    boolean mask: about 3x faster on CPU (fp32, 9 heads x 2048 x 2048: 0.23 vs 0.77 s on 2 cores).
    Rows with no kept key give 0, as there (SDPA itself may return NaN for them)."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    return torch.where(_any(keep, -1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_mask: RowMask, scale: float,
    softcap: Optional[float] = None, chunk: Optional[int] = None, with_lse: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Masked attention in query chunks. q [B,H,M,D], k/v [B,H,N,D] (already per query head).

    Returns (out [B,H,M,D], lse [B,H,M], kept_pairs [B,H]) where kept_pairs counts the pairs
    the mask let through (for realized-density telemetry). with_lse=False (and no softcap) runs
    the chunks through `masked_attention_sdpa` and returns lse None: the patched models' CPU
    path, which needs no lse; `masked_softmax_attention` stays the oracle it is tested against.
    """
    b, h, m, _ = q.shape
    n = k.shape[-2]
    if chunk is None:
        chunk = max(16, _CHUNK_ELEMENTS // max(1, b * h * n))
    out = torch.empty_like(q)
    fused = not with_lse and not softcap
    lse = None if fused else torch.empty(b, h, m, dtype=torch.float32, device=q.device)
    kept = torch.zeros(b, h, dtype=torch.long, device=q.device)
    for start in range(0, m, chunk):
        end = min(m, start + chunk)
        keep = row_mask(start, end)
        # Skip key columns no row of the chunk keeps (the causal future, keys before a sliding
        # window): about half the work for causal prefill, and exact.
        used = _any(keep.flatten(0, 2), 0).nonzero()
        first, last = (int(used[0]), int(used[-1]) + 1) if used.numel() else (0, 1)
        keep = keep[..., first:last]
        qc, kc, vc = q[:, :, start:end], k[:, :, first:last], v[:, :, first:last]
        if fused:
            out[:, :, start:end] = masked_attention_sdpa(qc, kc, vc, keep, scale)
        else:
            out[:, :, start:end], lse[:, :, start:end] = masked_softmax_attention(qc, kc, vc, keep, scale, softcap)
        kept += keep.sum(dim=-1, dtype=torch.int32).sum(dim=-1, dtype=torch.int64).expand(b, h)  # 2x faster than one int64 sum
    return out, lse, kept


def dense_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Brute-force oracle for tests: GQA by repetition, the full mask at once, fp64 math."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).double()
    v = v.repeat_interleave(group, dim=1).double()
    scores = softcapped(q.double() @ k.transpose(-1, -2) * scale, softcap)
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ v).to(q.dtype)
