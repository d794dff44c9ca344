"""Common base of the sparse attention methods and the mask shapes they produce.

A method turns (queries, keys, the call's context) into a `Selection`: a description of which
query-key pairs to compute. Selections know how to expand a chunk of query rows into a boolean
keep-mask (the reference path and the test oracle) and carry the compact form (columns and
diagonals, or key blocks) that the Triton kernels consume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Type

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from ..plan import PlanError


@dataclass
class AttnContext:
    """What a method may look at for one attention call (one layer, a subset of heads)."""

    q_pos: torch.Tensor  # [M] absolute position of each query row
    k_pos: torch.Tensor  # [N] absolute position of each key
    kv_start: torch.Tensor  # [B] absolute position of the first valid (non-pad) key
    base_rows: Any  # (start, end) -> bool [B,1,C,N]: causal/padding/sliding-window mask
    scale: float
    softcap: Optional[float]
    layer: int
    # backends.KernelLayout when this call runs on the Triton kernels (methods may then use the
    # Triton estimators, which model the same causal / left-padding / window mask); else None.
    layout: Any = None
    # q_pos[0] / k_pos[0] known on the host (positions run consecutively from there). Reading them
    # from the tensors instead would sync a GPU; None: read them.
    q_start: Optional[int] = None
    k_start: Optional[int] = None

    @property
    def kv_len(self) -> int:
        return int(self.k_pos.numel())

    @property
    def q_first(self) -> int:
        return self.q_start if self.q_start is not None else int(self.q_pos[0])

    @property
    def q_last(self) -> int:
        return self.q_first + self.q_pos.numel() - 1

    @property
    def k_first(self) -> int:
        return self.k_start if self.k_start is not None else int(self.k_pos[0])

    @property
    def k_last(self) -> int:
        return self.k_first + self.k_pos.numel() - 1


class Selection:
    """Which pairs a method keeps, on top of the base (causal/padding/window) mask."""

    def rows(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """bool [B, H|1, len(q_pos), len(k_pos)]: pairs kept for these query rows."""
        raise NotImplementedError


@dataclass
class ColumnDiagonalSelection(Selection):
    """Keep key columns and diagonals (d = q_pos - k_pos): streaming and vertical-slash."""

    columns: torch.Tensor  # bool [B, H, N]: indexed by key index (k_pos - k_pos[0])
    diagonals: torch.Tensor  # bool [B, H, N]: indexed by d >= 0
    # Bounds on the columns / diagonals any (b, h) row keeps, known from the method's budgets
    # without reading the masks (no device sync): the kernel index is built at that length
    # instead of N. None: no bound. A bound must hold; the kernel would drop what exceeds it.
    max_columns: Optional[int] = None
    max_diagonals: Optional[int] = None

    def rows(self, q_pos, k_pos):
        cols = self.columns[:, :, None, :]  # [B,H,1,N]
        return cols | self._diagonal_rows(q_pos, k_pos)

    def _diagonal_rows(self, q_pos, k_pos) -> torch.Tensor:
        """bool [B,H,C,N]: diagonals[d] at d = q_pos - k_pos (clamped to the diagonals kept)."""
        last = self.diagonals.shape[-1] - 1
        c, n = q_pos.numel(), k_pos.numel()
        if c and n and _consecutive(q_pos) and _consecutive(k_pos):
            # d = off + i - t: row i reads the diagonals backwards from off + i, so every row is a
            # window of one sequence. A strided view of that sequence replaces the [C,N] index
            # gather (about half the time on CPU: 25 vs 55 ms for 9 heads x 1024 rows x 2048 keys);
            # rows come out in reverse, hence the flip.
            off = int(q_pos[0]) - int(k_pos[0])
            d = torch.arange(off + c - 1, off - n, -1, device=self.diagonals.device).clamp(0, last)
            seq = self.diagonals[:, :, d].contiguous()  # [B,H,C+N-1]
            windows = seq.as_strided((seq.shape[0], seq.shape[1], c, n), (seq.stride(0), seq.stride(1), 1, 1))
            return windows.flip(2)
        d = (q_pos[:, None] - k_pos[None, :]).clamp(0, last)  # [C,N]
        return self.diagonals[:, :, d]


def _consecutive(pos: torch.Tensor) -> bool:
    """Whether positions run pos[0], pos[0] + 1, ... (what prefill calls pass)."""
    return pos.numel() < 2 or bool((pos.diff() == 1).all())


@dataclass
class BlockSelection(Selection):
    """Keep (query block, key block) tiles; blocks are aligned to absolute positions."""

    blocks: torch.Tensor  # bool [B, H, nqb, nkb]
    block_size: int
    first_q_block: int  # absolute block id of blocks[..., 0, :]
    first_k_block: int
    # Bound on the key blocks any query block keeps, known from the method's budget (no device
    # sync): the kernel lists get that width. None: read from the mask (one sync).
    max_blocks: Optional[int] = None

    def rows(self, q_pos, k_pos):
        qb = torch.div(q_pos, self.block_size, rounding_mode="floor") - self.first_q_block
        kb = torch.div(k_pos, self.block_size, rounding_mode="floor") - self.first_k_block
        return self.blocks[:, :, qb][:, :, :, kb]


class AllPairs(Selection):
    def rows(self, q_pos, k_pos):
        return torch.ones(1, 1, q_pos.numel(), k_pos.numel(), dtype=torch.bool, device=q_pos.device)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SparseMethod:
    """One attention method: a name, a validated parameter model and a selection rule."""

    name: ClassVar[str]
    Params: ClassVar[Type[Params]] = Params
    # select() also takes k with fewer heads than q (GQA: query head h reads key head
    # h // (Hq / Hkv)), so a layer running it on every head need not copy one key head per
    # query head (1 GB per layer at 128k tokens for Llama-3-8B shapes).
    gqa_keys: ClassVar[bool] = False

    def __init__(self, params: Dict[str, Any]):
        self.params = self.Params(**params)

    @classmethod
    def validate_params(cls, params: Dict[str, Any]) -> Dict[str, Any]:
        """Check parameters; return them in canonical form (defaults filled in)."""
        try:
            return cls.Params(**params).model_dump(mode="json")
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg'].removeprefix('Value error, ')}"
                for err in e.errors()
            )
            raise PlanError(f"method {cls.name!r}: invalid params: {problems}") from None

    def select(self, q: torch.Tensor, k: torch.Tensor, ctx: AttnContext) -> Selection:
        """q [B,H,M,D] and k [B,H,N,D] for the heads this method runs on ([B,Hkv,N,D] when
        gqa_keys and the method runs on every head)."""
        raise NotImplementedError

    def expected_density(self, n: int) -> float:
        """Fraction of causal pairs computed at prompt length n (plan inspection, estimates)."""
        raise NotImplementedError


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def band_pairs(n: int, sink: int, window: int) -> int:
    """Causal pairs inside `window` diagonals plus the first `sink` columns (no double count)."""
    pairs = 0
    window = min(window, n)
    pairs += window * n - window * (window - 1) // 2  # diagonals 0..window-1
    for j in range(min(sink, n)):  # column j, rows j+window..n-1 not already counted
        pairs += max(0, n - j - window)
    return pairs
