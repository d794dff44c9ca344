"""Dense attention: every causal pair (the baseline, and the per-head escape hatch)."""

from .base import AllPairs, SparseMethod


class Dense(SparseMethod):
    name = "dense"

    def select(self, q, k, ctx):
        return AllPairs()

    def expected_density(self, n: int) -> float:
        return 1.0
