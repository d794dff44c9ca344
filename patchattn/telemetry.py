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
from typing import Dict, List, Optional

import torch


class LayerStats:
    """One layer's counters. Pair counts arrive as device tensors and are summed on the device;
    they reach the host only when read (`kept`, `valid`), so a prefill on the GPU does not stop
    to synchronise once per layer for its telemetry."""

    def __init__(self, layer: int, methods: List[str], kept: Optional[List[int]] = None,
                 valid: Optional[List[int]] = None):
        self.layer = layer
        self.methods = methods  # per query head
        self._kept = list(kept) if kept else [0] * len(methods)  # per query head, over calls and batch
        self._valid = list(valid) if valid else [0] * len(methods)
        self._pending: Optional[tuple] = None  # (kept [H], valid []) device sums not yet on the host
        self.sparse_calls = 0
        self.fallbacks: Counter = Counter()
        self.kernels: Counter = Counter()

    def _add(self, kept_h: torch.Tensor, valid: torch.Tensor) -> None:
        kept_h, valid = kept_h.to(torch.long), valid.to(device=kept_h.device, dtype=torch.long)
        if self._pending is not None and self._pending[0].device != kept_h.device:
            self._flush()
        if self._pending is None:
            self._pending = (kept_h.clone(), valid.clone())
        else:
            self._pending[0].add_(kept_h)
            self._pending[1].add_(valid)

    def _flush(self) -> None:
        if self._pending is not None:
            kept_h, valid = self._pending[0].tolist(), int(self._pending[1])
            self._pending = None
            self._kept = [k + int(x) for k, x in zip(self._kept, kept_h)]
            self._valid = [v + valid for v in self._valid]

    @property
    def kept(self) -> List[int]:
        self._flush()
        return self._kept

    @kept.setter
    def kept(self, value: List[int]) -> None:
        self._flush()
        self._kept = list(value)

    @property
    def valid(self) -> List[int]:
        self._flush()
        return self._valid

    @valid.setter
    def valid(self, value: List[int]) -> None:
        self._flush()
        self._valid = list(value)

    def record_sparse_prefill(self, kept: torch.Tensor, valid: torch.Tensor) -> None:
        """kept [B, H] pairs computed per head, valid [B] pairs of the base mask per row."""
        self._add(kept.sum(0), valid.sum())
        self.sparse_calls += 1

    def record_dense_prefill(self, valid: torch.Tensor) -> None:
        total = valid.sum()
        self._add(total.expand(len(self.methods)), total)
        self.fallbacks["dense_plan"] += 1

    def record_fallback(self, reason: str) -> None:
        self.fallbacks[reason] += 1

    def head_density(self) -> List[Optional[float]]:
        return [k / v if v else None for k, v in zip(self.kept, self.valid)]

    def __repr__(self) -> str:
        return (f"LayerStats(layer={self.layer}, methods={self.methods}, kept={self.kept}, valid={self.valid}, "
                f"sparse_calls={self.sparse_calls}, fallbacks={dict(self.fallbacks)}, kernels={dict(self.kernels)})")


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
