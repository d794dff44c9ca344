"""vertical_slash's `spread_q`: rows spread over the prompt join the last `last_q` rows in the
vertical / slash estimate. spread_q=0 must select exactly what it did before; spread_q>0 must
equal a brute-force dense softmax of those rows, summed per column and per diagonal."""

import os
import subprocess
import sys

import pytest
import torch

from patchattn import get_method
from patchattn.kernels.reference import dense_reference, softcapped
from patchattn.methods.vertical_slash import estimate_vertical_slash, spread_rows
from patchattn.patching import run_method
from tiny_models import padded_causal_ctx, stable_seed

SHAPES = [  # batch, q heads, kv heads, prompt length, head dim, left padding of the last row
    (1, 4, 4, 64, 16, 0),
    (2, 6, 2, 97, 32, 13),
    (2, 8, 1, 130, 8, 40),
]


def _inputs(shape, *tag):
    b, h, hkv, n, d, pad = shape
    g = torch.Generator().manual_seed(stable_seed("spread", shape, *tag))
    q, k = torch.randn(b, h, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    padding, mask, ctx = padded_causal_ctx(b, n, pad, d ** -0.5)
    return q, k, padding, mask, ctx


def _original_estimate(q, k, ctx, last_q):
    """estimate_vertical_slash's torch path as it was before spread_q (frozen copy)."""
    m = q.shape[-2]
    start = max(0, m - last_q)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    rows_pos = ctx.q_pos[start:]
    scores = softcapped(torch.matmul(q[:, :, start:], k.transpose(-1, -2)).float() * ctx.scale, ctx.softcap)
    keep = ctx.base_rows(start, m)
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    vertical = probs.sum(dim=-2)
    n = ctx.kv_len
    diag = (rows_pos[:, None] - ctx.k_pos[None, :]).clamp(0, n - 1)
    slash = torch.zeros_like(vertical)
    slash.scatter_add_(-1, diag.reshape(1, 1, -1).expand(*probs.shape[:2], -1), probs.flatten(-2))
    return vertical, slash


def _brute(q, k, padding, rows, scale, softcap=None):
    """fp64 dense masked softmax of query rows `rows`, summed per key column and per diagonal."""
    b, h, n, _ = q.shape
    kk = k.double().repeat_interleave(h // k.shape[1], 1)
    s = softcapped(q.double() @ kk.transpose(-1, -2) * scale, softcap)
    vert = torch.zeros(b, h, n, dtype=torch.float64)
    slash = torch.zeros(b, h, n, dtype=torch.float64)
    for bi in range(b):
        for i in rows:
            ok = (torch.arange(n) <= i) & padding[bi].bool()
            if not ok.any():
                continue  # a padding row: no key, adds nothing
            p = torch.softmax(s[bi, :, i].masked_fill(~ok, float("-inf")), -1)
            vert[bi] += p
            for j in torch.nonzero(ok).flatten().tolist():
                slash[bi, :, i - j] += p[:, j]
    return vert, slash


def test_spread_rows_are_distinct_evenly_spaced_and_in_range():
    assert spread_rows(100, 4).tolist() == [12, 37, 62, 87]
    assert spread_rows(5, 64).tolist() == [0, 1, 2, 3, 4]  # fewer rows than asked: all of them
    for start, count in [(4032, 64), (33, 32), (1, 1), (130, 7)]:
        rows = spread_rows(start, count).tolist()
        assert len(rows) == min(start, count) and len(set(rows)) == len(rows)
        assert rows == sorted(rows) and 0 <= rows[0] and rows[-1] < start
        gaps = [b - a for a, b in zip(rows, rows[1:])]
        assert not gaps or max(gaps) - min(gaps) <= 1


def test_spread_q_defaults_to_zero():
    vs = get_method("vertical_slash")
    assert vs.validate_params({"vertical": 3, "slash": 3})["spread_q"] == 0
    with pytest.raises(Exception):
        vs.validate_params({"vertical": 3, "slash": 3, "spread_q": -1})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("last_q", [8, 64, 500])
def test_spread_zero_is_the_original_estimate(shape, last_q):
    """spread_q=0 (and the default) gives bit-identical scores and so the same selection."""
    q, k, _, _, ctx = _inputs(shape, last_q)
    ref_v, ref_s = _original_estimate(q, k, ctx, last_q)
    for args in [(last_q,), (last_q, 0)]:
        v, s = estimate_vertical_slash(q, k, ctx, *args)
        assert torch.equal(v, ref_v) and torch.equal(s, ref_s)
    vs = get_method("vertical_slash")
    params = {"vertical": 5, "slash": 3, "last_q": last_q, "sink": 1, "window": 4}
    a = vs(vs.validate_params(params)).select(q, k, ctx)
    b = vs(vs.validate_params({**params, "spread_q": 0})).select(q, k, ctx)
    assert torch.equal(a.columns, b.columns) and torch.equal(a.diagonals, b.diagonals)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("last_q,spread_q", [(8, 5), (16, 32), (4, 1000)])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_spread_scores_match_bruteforce(shape, last_q, spread_q, softcap):
    q, k, padding, _, ctx = _inputs(shape, last_q, spread_q, softcap)
    ctx.softcap = softcap
    n = q.shape[-2]
    start = n - last_q
    rows = spread_rows(start, spread_q).tolist() + list(range(start, n))
    if shape[-1]:  # some spread rows fall in the padding of the last batch row
        assert any(r < shape[-1] for r in rows)
    v, s = estimate_vertical_slash(q, k, ctx, last_q, spread_q)
    bv, bs = _brute(q, k, padding, rows, ctx.scale, softcap)
    assert torch.allclose(v.double(), bv, atol=1e-5) and torch.allclose(s.double(), bs, atol=1e-5)
    # every valid row counts once: the column sums add up to the number of rows with a key
    valid = torch.tensor([[r >= (padding[bi] == 0).sum() for r in rows] for bi in range(q.shape[0])])
    assert torch.allclose(v.sum(-1), valid.sum(-1, keepdim=True).float().expand_as(v.sum(-1)), atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_spread_selection_runs_and_matches_bruteforce_attention(shape):
    """The method with spread_q keeps only base-mask pairs and its output equals the dense
    softmax over the mask it reports."""
    q, k, _, mask, _ = _inputs(shape, "run")
    v = torch.randn_like(k)
    vs = get_method("vertical_slash")
    method = vs(vs.validate_params({"vertical": 5, "slash": 3, "last_q": 8, "sink": 1, "window": 4, "spread_q": 16}))
    out, kept, keep = run_method(method, q, k, v, mask, scale=shape[4] ** -0.5, return_mask=True)
    base = mask.rows(0, q.shape[-2]).expand_as(keep)
    assert not (keep & ~base).any() and (base & ~keep).any()
    expected = dense_reference(q, k, v, keep, shape[4] ** -0.5, None)
    assert (out - expected)[base.any(-1)].abs().max().item() <= 1e-5


_KERNEL_CHECK = r"""
import torch
from patchattn.methods.vertical_slash import estimate_vertical_slash
from tiny_models import padded_causal_ctx
torch.manual_seed(0)
for b, h, hkv, n, d, pad, last_q, spread_q in [(2, 4, 2, 200, 16, 30, 16, 40), (1, 2, 1, 300, 16, 0, 8, 150)]:
    q, k = torch.randn(b, h, n, d), torch.randn(b, hkv, n, d)
    _, _, torch_ctx = padded_causal_ctx(b, n, pad, d ** -0.5)
    _, _, kernel_ctx = padded_causal_ctx(b, n, pad, d ** -0.5, estimator_layout=True)
    tv, ts = estimate_vertical_slash(q, k, torch_ctx, last_q, spread_q)
    kv, ks = estimate_vertical_slash(q, k, kernel_ctx, last_q, spread_q)
    err = max((kv - tv).abs().max().item(), (ks - ts).abs().max().item())
    assert err < 1e-4, err
print("ok")
"""


def test_spread_kernel_path_matches_torch_path():
    """The Triton estimator (interpreter on CPU) on gathered, non-contiguous rows, in chunks of
    at most 128, gives the torch path's scores."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


def test_recipe_spread_q_reaches_the_plan_params_only_when_set():
    """A recipe's vertical_slash `spread_q` is profiled and written into each candidate's params;
    without it the candidates' params are unchanged (plans calibrated before keep their bytes)."""
    from patchattn.profiling import OptionSpace
    from patchattn.recipes import Candidates

    base = {"vertical": {"fractions": [0.01]}, "slash": {"fractions": [0.01]}}
    with_spread = OptionSpace.from_candidates(Candidates(vertical_slash={**base, "spread_q": 32}), 4096)
    without = OptionSpace.from_candidates(Candidates(vertical_slash=base), 4096)
    vs_spread = [s for s in with_spread.specs() if s["method"] == "vertical_slash"]
    vs_plain = [s for s in without.specs() if s["method"] == "vertical_slash"]
    assert vs_spread and all(s["params"]["spread_q"] == 32 for s in vs_spread)
    assert vs_plain and all("spread_q" not in s["params"] for s in vs_plain)
    # The params are valid for the method, so a plan holding them loads.
    get_method("vertical_slash").Params(**vs_spread[0]["params"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_spread_kernel_path_matches_torch_path_gpu(dtype):
    """On the GPU the Triton estimator's scores for the last and the spread rows (batch 2, left
    padding, GQA, 4096 keys, 64 + 200 rows: two chunks of spread rows) match the torch path on the
    same inputs within 1e-2 of the largest score."""
    g = torch.Generator(device="cuda").manual_seed(stable_seed("spread-gpu", str(dtype)))
    b, h, hkv, n, d = 2, 8, 2, 4096, 128
    q = torch.randn(b, h, n, d, device="cuda", generator=g).to(dtype)
    k = torch.randn(b, hkv, n, d, device="cuda", generator=g).to(dtype)
    _, _, torch_ctx = padded_causal_ctx(b, n, 300, d ** -0.5, device="cuda")
    _, _, kernel_ctx = padded_causal_ctx(b, n, 300, d ** -0.5, device="cuda", estimator_layout=True)
    tv, ts = estimate_vertical_slash(q.float(), k.float(), torch_ctx, 64, 200)
    kv, ks = estimate_vertical_slash(q, k, kernel_ctx, 64, 200)
    for got, want in ((kv, tv), (ks, ts)):
        assert (got.float() - want).abs().max().item() <= 1e-2 * want.abs().max().item()
