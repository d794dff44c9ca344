"""Benchmark report helpers that run without a GPU (on saved or synthetic results)."""

import pytest

pytest.importorskip("triton")
from patchattn.evals.bench.prefill import block_sparse_cost_model, break_even_table  # noqa: E402


def test_cost_model_recovers_fixed_and_per_pair_cost():
    # time = 0.7 ms + 1.2 x density x SDPA (20 ms), at three densities, plus the all-blocks row
    rows = [{"density": d, "block_sparse_ms": 0.7 + 1.2 * d * 20.0} for d in (0.05, 0.1, 0.3)]
    report = {"results": [{"n": 32768, "sdpa_ms": 20.0, "block_sparse_b128": rows,
                           "block_sparse_b128_all_blocks_ms": 25.0, "block_sparse_b128_config": "x"}]}
    (fit,) = block_sparse_cost_model(report)
    assert fit["n"] == 32768 and fit["block"] == 128
    assert fit["fixed_ms"] == pytest.approx(0.7) and fit["per_pair_vs_sdpa"] == pytest.approx(1.2)
    assert fit["all_blocks_vs_sdpa"] == pytest.approx(1.25)


def test_cost_model_needs_two_densities():
    report = {"results": [{"n": 8192, "sdpa_ms": 1.0, "block_sparse_b64": [{"density": 0.1, "block_sparse_ms": 0.2}]}]}
    assert block_sparse_cost_model(report) == []


def test_break_even_is_the_shortest_length_winning_from_there_on():
    rows = [{"n": n, "methods": {"m": {"speedup_vs_sdpa": sp}}} for n, sp in ((8192, 0.5), (16384, 1.1), (32768, 0.9),
                                                                               (65536, 2.0))]
    assert break_even_table(rows, ["m", "absent"]) == {"m": 65536, "absent": None}
