"""Each sparse method, at a budget that skips pairs, equals a brute-force masked softmax over
the mask it reports (fp32, random inputs, GQA, padding)."""

import pytest
import torch

from patchattn import get_method
from patchattn.kernels.reference import dense_reference
from patchattn.patching import causal_lazy_mask, run_method
from tiny_models import padded_causal_ctx, stable_seed

SPARSE = [
    ("streaming", {"sink": 2, "window": 7}),
    ("streaming", {"sink": 0, "window": {"scale": 0.1, "power": 1.0, "min": 3}}),
    ("vertical_slash", {"vertical": 5, "slash": 3, "last_q": 8, "sink": 1, "window": 4}),
    ("vertical_slash", {"vertical": {"scale": 0.05}, "slash": 2, "last_q": 16, "window": 8}),
    ("vertical_slash", {"vertical": 3, "slash": 9, "last_q": 8, "window": 2, "slash_group": 4}),
    ("block_topk", {"block_size": 8, "top_k": 2}),
    ("block_topk", {"block_size": 4, "gamma": 0.5}),
]
SHAPES = [  # batch, q heads, kv heads, prompt length, head dim, left padding of row 1
    (1, 4, 4, 64, 16, 0),
    (2, 6, 2, 97, 32, 13),
    (2, 8, 1, 130, 8, 40),
]


@pytest.mark.parametrize("method_name,params", SPARSE)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_method_matches_bruteforce(method_name, params, shape, softcap):
    b, h, hkv, n, d, pad = shape
    g = torch.Generator().manual_seed(stable_seed(method_name, shape))
    q, k, v = (torch.randn(b, hh, n, d, generator=g) for hh in (h, hkv, hkv))
    padding = torch.ones(b, n, dtype=torch.long)
    padding[-1, :pad] = 0
    method = get_method(method_name)(get_method(method_name).validate_params(params))
    mask = causal_lazy_mask(b, n, n, padding if pad else None)
    scale = d ** -0.5
    out, kept, keep = run_method(method, q, k, v, mask, scale=scale, softcap=softcap, return_mask=True)
    base = mask.rows(0, n).expand_as(keep)
    assert not (keep & ~base).any(), "a method kept a pair outside the causal/padding mask"
    assert (base & ~keep).any(), "budget was meant to skip pairs"
    expected = dense_reference(q, k, v, keep, scale, softcap)
    valid_rows = base.any(-1)
    diff = (out - expected)[valid_rows].abs().max().item()
    assert diff <= 1e-5, f"max abs diff {diff}"
    assert torch.equal(kept, keep.sum(dim=(-1, -2)).sum(0)), "telemetry must count exactly the kept pairs"


def test_vertical_slash_keeps_the_heavy_column():
    """A key that every query attends to strongly must be among the selected columns."""
    b, h, n, d = 1, 2, 80, 16
    q = torch.randn(b, h, n, d)
    k = torch.randn(b, h, n, d) * 0.1
    k[:, :, 37] = q.mean(dim=2) * 8  # key 37 aligns with all queries
    method = get_method("vertical_slash")({"vertical": 1, "slash": 0, "last_q": 8, "sink": 0, "window": 1})
    _, _, keep = run_method(method, q, k, k.clone(), causal_lazy_mask(b, n, n), scale=d ** -0.5, return_mask=True)
    assert keep[0, :, 60:, 37].all()


def test_slash_group_keeps_whole_aligned_groups_with_the_highest_sum():
    from patchattn.methods.vertical_slash import top_group_mask

    scores = torch.tensor([[0.0, 0.0, 0.9, 0.0, 0.3, 0.3, 0.3, 0.3, 0.1, 0.0]])
    # groups of 4: sums 0.9, 1.2, 0.1 (the last group is partial)
    assert top_group_mask(scores, 4, 4).tolist() == [[False] * 4 + [True] * 4 + [False] * 2]
    assert top_group_mask(scores, 5, 4).tolist() == [[True] * 8 + [False] * 2]  # ceil(5 / 4) = 2 groups
    assert top_group_mask(scores, 1, 1).tolist() == [[i == 2 for i in range(10)]]  # group 1: plain top-k
    method = get_method("vertical_slash")
    grouped = method(method.validate_params({"vertical": 0, "slash": 65, "sink": 0, "window": 1, "slash_group": 64}))
    assert grouped.expected_density(4096) > method(method.validate_params(
        {"vertical": 0, "slash": 65, "sink": 0, "window": 1})).expected_density(4096)


def test_block_topk_always_keeps_diagonal_and_sink_block():
    b, h, n, d = 2, 2, 64, 8
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    padding = torch.ones(b, n, dtype=torch.long)
    padding[1, :10] = 0  # row 1 starts at position 10: its sink block is block 1 (size 8)
    method = get_method("block_topk")({"block_size": 8, "top_k": 1})
    _, _, keep = run_method(method, q, k, v, causal_lazy_mask(b, n, n, padding), scale=0.3, return_mask=True)
    for i in range(n):
        assert keep[0, :, i, (i // 8) * 8].all()  # own (diagonal) block start is kept when causal
    assert keep[0, :, 40:, 0].all() and keep[1, :, 40:, 10].all()


@pytest.mark.parametrize("method_name,params", [(m, p) for m, p in SPARSE if m in ("streaming", "vertical_slash")])
@pytest.mark.parametrize("shape", SHAPES)
def test_column_diagonal_bounds_hold(method_name, params, shape):
    """The kernel index keeps at most `max_columns` / `max_diagonals` entries per row and would
    drop the rest: every row's kept columns and diagonals must fit the bounds the method gives
    (ties in the scores included: topk keeps exactly the budget)."""
    b, h, hkv, n, d, pad = shape
    g = torch.Generator().manual_seed(stable_seed("bounds", method_name, shape))
    q, k = torch.randn(b, h, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    k[:, :, : n // 3] = 0.0  # tied scores over a third of the keys
    _, _, ctx = padded_causal_ctx(b, n, pad, d ** -0.5)
    method = get_method(method_name)(get_method(method_name).validate_params(params))
    sel = method.select(q, k.repeat_interleave(h // hkv, dim=1), ctx)
    assert sel.max_columns is not None and sel.max_diagonals is not None
    assert int(sel.columns.sum(-1).max()) <= sel.max_columns
    assert int(sel.diagonals.sum(-1).max()) <= sel.max_diagonals


@pytest.mark.parametrize("q_len,kv_len,pad,window", [
    (37, 37, [0, 0], None), (37, 37, [0, 11], None), (20, 53, [5, 0], None),  # prefill after a cache
    (40, 40, [0, 9], 7), (16, 61, [3, 30], 12), (1, 30, [0, 4], None),
])
def test_valid_pairs_closed_form_counts_the_mask(q_len, kv_len, pad, window):
    """Telemetry's base-pair count (closed form from the mask's layout) equals the pairs the
    mask itself allows, for causal masks with left padding, a cache offset and a sliding window."""
    from patchattn import backends
    from patchattn.patching import _valid_pairs, causal_lazy_mask

    padding = torch.ones(2, kv_len, dtype=torch.long)
    for b, p in enumerate(pad):
        padding[b, :p] = 0
    mask = causal_lazy_mask(2, q_len, kv_len, padding if any(pad) else None, sliding_window=window)
    q, k = torch.zeros(2, 4, q_len, 8), torch.zeros(2, 2, kv_len, 8)
    assert backends.mask_layout(mask, q, k, window) is not None  # the closed form is what runs
    counted = mask.rows(0, q_len).sum(dim=(1, 2, 3))
    assert torch.equal(_valid_pairs(mask, q, k, window), counted)
