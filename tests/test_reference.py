"""The CPU execution path (fused SDPA over the keep-mask, strided diagonal masks) against the
oracle it replaces in patched models: `masked_softmax_attention` and an index gather."""

import pytest
import torch

from patchattn.kernels.reference import chunked_attention, masked_attention_sdpa, masked_softmax_attention
from patchattn.methods.base import ColumnDiagonalSelection


def _inputs(b, h, m, n, d, density, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, r, d, generator=g) for r in (m, n, n))
    keep = torch.rand(b, h, m, n, generator=g) < density
    keep[:, :, 0] = False  # a row that keeps no key
    return q, k, v, keep


@pytest.mark.parametrize("b,h,m,n,d,density", [(1, 1, 5, 9, 8, 0.5), (2, 3, 33, 70, 16, 0.2), (2, 4, 64, 64, 32, 0.9)])
def test_sdpa_path_equals_the_oracle(b, h, m, n, d, density):
    q, k, v, keep = _inputs(b, h, m, n, d, density, seed=m * n)
    expected, _ = masked_softmax_attention(q, k, v, keep, d ** -0.5)
    out = masked_attention_sdpa(q, k, v, keep, d ** -0.5)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))  # no kept key: 0, not NaN
    assert (out - expected).abs().max().item() <= 1e-5
    # a mask shared by the heads (broadcast over H)
    shared = keep[:, :1]
    expected, _ = masked_softmax_attention(q, k, v, shared, d ** -0.5)
    assert (masked_attention_sdpa(q, k, v, shared, d ** -0.5) - expected).abs().max().item() <= 1e-5


def test_chunked_attention_without_lse_matches_with_lse():
    q, k, v, keep = _inputs(2, 3, 50, 50, 16, 0.3, seed=7)
    causal = torch.ones(50, 50, dtype=torch.bool).tril()
    keep &= causal

    def row_mask(start, end):
        return keep[:, :, start:end]

    out, lse, kept = chunked_attention(q, k, v, row_mask, 0.25, chunk=16)
    fast, no_lse, kept_fast = chunked_attention(q, k, v, row_mask, 0.25, chunk=16, with_lse=False)
    assert no_lse is None and lse is not None
    assert (fast - out).abs().max().item() <= 1e-5
    assert torch.equal(kept, kept_fast) and torch.equal(kept, keep.sum(dim=(-1, -2)))
    # softcap has no fused form: with_lse=False then still takes the oracle and returns lse
    _, capped_lse, _ = chunked_attention(q, k, v, row_mask, 0.25, softcap=20.0, with_lse=False)
    assert capped_lse is not None


@pytest.mark.parametrize("b,h,n,c,q0,n_diag", [(2, 3, 50, 17, 20, 50), (1, 2, 300, 100, 150, 300),
                                               (1, 1, 7, 1, 6, 7), (2, 2, 40, 40, 0, 11), (1, 3, 64, 10, 70, 64)])
def test_strided_diagonal_rows_equal_the_gather(b, h, n, c, q0, n_diag):
    g = torch.Generator().manual_seed(n * c + q0)
    sel = ColumnDiagonalSelection(columns=torch.rand(b, h, n, generator=g) < 0.2,
                                  diagonals=torch.rand(b, h, n_diag, generator=g) < 0.3)
    k_pos = torch.arange(n) + 3
    for q_pos in (torch.arange(q0, q0 + c), torch.arange(q0, q0 + 2 * c, 2)):  # consecutive, then not
        d = (q_pos[:, None] - k_pos[None, :]).clamp(0, n_diag - 1)
        expected = sel.columns[:, :, None, :] | sel.diagonals[:, :, d]
        assert torch.equal(sel.rows(q_pos, k_pos), expected)


def test_layer_stats_sum_on_the_device_until_read():
    from patchattn.telemetry import LayerStats

    st = LayerStats(3, ["vertical_slash"] * 2)
    st.record_sparse_prefill(torch.tensor([[5, 7], [1, 2]]), torch.tensor([10, 10]))
    st.record_dense_prefill(torch.tensor([4, 6]))
    st.record_sparse_prefill(torch.tensor([[1, 1]]), torch.tensor([3]))
    assert st._pending is not None  # nothing read yet: no host conversion happened
    assert st.kept == [5 + 1 + 10 + 1, 7 + 2 + 10 + 1] and st.valid == [33, 33]
    assert st._pending is None and st.sparse_calls == 2 and st.fallbacks["dense_plan"] == 1
    assert st.head_density() == [17 / 33, 20 / 33]
    st.kept = [0, 0]  # benchmarks reset the counters between timings
    st.record_sparse_prefill(torch.tensor([[2, 3]]), torch.tensor([4]))
    assert st.kept == [2, 3] and st.valid == [37, 37]
    dense_first = LayerStats(0, ["dense"] * 3)  # a broadcast first entry must still take in-place sums
    dense_first.record_dense_prefill(torch.tensor([4, 6]))
    dense_first.record_sparse_prefill(torch.tensor([[1, 2, 3]]), torch.tensor([5]))
    assert dense_first.kept == [11, 12, 13] and dense_first.valid == [15, 15, 15]
