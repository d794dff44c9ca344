"""What actually ran: per layer and head, realized density and dense fallbacks.

Realized density = computed query-key pairs / pairs the unpatched model computes (causal,
padding and sliding window applied), accumulated over prefill calls. Calls that ran the
original dense implementation are counted by reason: ``decode`` (one-query steps),
``short_prompt`` (shorter than the plan's dense_below) and ``dense_plan`` (every head of the
layer is dense in the plan; these count as density 1 in the totals). ``kernels`` counts, per
head group of a sparse prefill, the implementation that ran it: ``reference`` (chunked torch),
``triton_block_sparse``, ``gluon_block_sparse`` (the sm_90 kernel), ``gluon_ws_block_sparse``
(its warp-specialised variant), ``gluon_wsp_block_sparse`` (that variant's persistent form) or
``triton_vertical_slash``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch


@dataclass
class LayerStats:
    layer: int
    methods: List[str]  # per query head
    kept: List[int] = field(default_factory=list)  # per query head, summed over calls and batch
    valid: List[int] = field(default_factory=list)
    sparse_calls: int = 0
    fallbacks: Counter = field(default_factory=Counter)
    kernels: Counter = field(default_factory=Counter)

    def __post_init__(self):
        heads = len(self.methods)
        self.kept = self.kept or [0] * heads
        self.valid = self.valid or [0] * heads

    def record_sparse_prefill(self, kept: torch.Tensor, valid: torch.Tensor) -> None:
        """kept [B, H] pairs computed per head, valid [B] pairs of the base mask per row."""
        kept_h = kept.sum(0).tolist()
        total_valid = int(valid.sum())
        for h in range(len(self.methods)):
            self.kept[h] += int(kept_h[h])
            self.valid[h] += total_valid
        self.sparse_calls += 1

    def record_dense_prefill(self, valid: torch.Tensor) -> None:
        total_valid = int(valid.sum())
        for h in range(len(self.methods)):
            self.kept[h] += total_valid
            self.valid[h] += total_valid
        self.fallbacks["dense_plan"] += 1

    def record_fallback(self, reason: str) -> None:
        self.fallbacks[reason] += 1

    def head_density(self) -> List[Optional[float]]:
        return [k / v if v else None for k, v in zip(self.kept, self.valid)]


class Stats:
    """Telemetry of a patched model (from `patchattn.stats(model)`)."""

    def __init__(self, layers: Dict[int, LayerStats]):
        self.layers = [layers[i] for i in sorted(layers)]

    @property
    def density(self) -> Optional[float]:
        """Overall realized density of the prefill calls that followed the plan (None if none)."""
        kept = sum(sum(layer.kept) for layer in self.layers)
        valid = sum(sum(layer.valid) for layer in self.layers)
        return kept / valid if valid else None

    def _summed(self, counter: str) -> Counter:
        total = Counter()
        for layer in self.layers:
            total.update(getattr(layer, counter))
        return total

    @property
    def fallbacks(self) -> Counter:
        return self._summed("fallbacks")

    @property
    def kernels(self) -> Counter:
        return self._summed("kernels")

    @property
    def sparse_calls(self) -> int:
        return sum(layer.sparse_calls for layer in self.layers)

    def head_density(self) -> List[List[Optional[float]]]:
        return [layer.head_density() for layer in self.layers]

    def to_dict(self) -> dict:
        return {
            "density": self.density,
            "sparse_calls": self.sparse_calls,
            "fallbacks": dict(self.fallbacks),
            "kernels": dict(self.kernels),
            "layers": [
                {"layer": l.layer, "methods": l.methods, "density": l.head_density(),
                 "sparse_calls": l.sparse_calls, "fallbacks": dict(l.fallbacks), "kernels": dict(l.kernels)}
                for l in self.layers
            ],
        }

    def table(self) -> str:
        """Layers x heads realized density as text (method initials in the header row)."""
        lines = []
        for l in self.layers:
            cells = " ".join("  -  " if d is None else f"{d:5.3f}" for d in l.head_density())
            fb = ", ".join(f"{k}={v}" for k, v in sorted(l.fallbacks.items()))
            lines.append(f"layer {l.layer:3d} | {cells} | {fb}")
        density = self.density
        head = f"realized density: {density:.4f}" if density is not None else "realized density: - (no prefill ran the plan)"
        if self.kernels:
            head += "; ran on " + ", ".join(f"{k}={v}" for k, v in sorted(self.kernels.items()))
        return "\n".join([head] + lines)

    def __repr__(self) -> str:
        return (f"Stats(density={self.density}, sparse_calls={self.sparse_calls}, fallbacks={dict(self.fallbacks)}, "
                f"kernels={dict(self.kernels)})")


def stats(model) -> Stats:
    from .patching import patch_state

    return Stats({i: s.stats for i, s in patch_state(model).layers.items()})


def reset_stats(model) -> None:
    from .patching import patch_state

    for state in patch_state(model).layers.values():
        state.stats = LayerStats(state.layer, state.head_methods)
