"""FlexPrefill and XAttention: torch reference (selection + masked execution) against a
brute-force masked softmax, at budgets that skip pairs and at full budget (= dense).

GPU (`-m gpu`): the same methods through patch_model's kernel backend, bf16, against an fp32
masked softmax over the selection; and a Llama-shaped patched model, kernel vs reference backend.
"""

import pytest
import torch

from patchattn import get_method
from patchattn.kernels.reference import dense_reference
from patchattn.methods.flexprefill import js_divergence
from patchattn.patching import causal_lazy_mask, run_method
from tiny_models import stable_seed

SKIPPING = [
    ("flexprefill", {"block_size": 8, "gamma": 0.5, "tau": 10.0, "last_q": 8}),  # every head query-aware
    ("flexprefill", {"block_size": 4, "gamma": 0.1, "tau": 0.0, "last_q": 16}),  # every head vertical-slash
    ("flexprefill", {"block_size": 16, "gamma": 0.4, "tau": 0.25, "last_q": 16}),  # mixed by divergence
    ("xattention", {"block_size": 16, "stride": 4, "threshold": 0.5}),
    ("xattention", {"block_size": 8, "stride": 8, "threshold": 0.3}),
]
SHAPES = [  # batch, q heads, kv heads, prompt length, kv length, head dim, left padding of the last row
    (1, 4, 4, 64, 64, 16, 0),
    (2, 6, 2, 97, 97, 32, 13),
    (2, 8, 1, 70, 133, 8, 40),  # prefill after a cache (q_offset 63, not block aligned)
]


def _method(name, params):
    cls = get_method(name)
    return cls(cls.validate_params(params))


def _inputs(shape, seed):
    b, h, hkv, n_q, n_k, d, pad = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g)
    k, v = (torch.randn(b, hkv, n_k, d, generator=g) for _ in range(2))
    k[:, :, 5] += 2 * q.mean(2)[:, ::h // hkv]  # a heavy column, so the patterns are not uniform
    padding = torch.ones(b, n_k, dtype=torch.long)
    padding[-1, :pad] = 0
    return q, k, v, causal_lazy_mask(b, n_q, n_k, padding if pad else None)


def _run(method, q, k, v, mask, softcap):
    scale = q.shape[-1] ** -0.5
    out, kept, keep = run_method(method, q, k, v, mask, scale=scale, softcap=softcap, return_mask=True)
    base = mask.rows(0, q.shape[2]).expand_as(keep)
    assert not (keep & ~base).any(), "a method kept a pair outside the causal/padding mask"
    expected = dense_reference(q, k, v, keep, scale, softcap)
    rows = base.any(-1)
    assert (out - expected)[rows].abs().max().item() <= 1e-5
    assert torch.equal(kept, keep.sum(dim=(-1, -2)).sum(0)), "telemetry must count exactly the kept pairs"
    return keep, base


@pytest.mark.parametrize("name,params", SKIPPING)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_matches_bruteforce_at_skipping_budget(name, params, shape, softcap):
    q, k, v, mask = _inputs(shape, stable_seed(name, params, shape))
    keep, base = _run(_method(name, params), q, k, v, mask, softcap)
    assert (base & ~keep).any(), "budget was meant to skip pairs"


@pytest.mark.parametrize("name,params", [
    ("flexprefill", {"block_size": 8, "gamma": 1.0, "tau": 10.0, "last_q": 8}),
    ("flexprefill", {"block_size": 8, "gamma": 1.0, "tau": 0.0, "last_q": 8}),
    ("xattention", {"block_size": 16, "stride": 4, "threshold": 1.0}),
])
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_full_budget_is_dense(name, params, shape):
    q, k, v, mask = _inputs(shape, 7)
    keep, base = _run(_method(name, params), q, k, v, mask, None)
    assert torch.equal(keep, base)


def test_flexprefill_branch_follows_divergence():
    """tau = 0: no head is query-aware; tau = sqrt(ln 2) + eps (the divergence's upper bound): all are."""
    q, k, v, mask = _inputs((2, 6, 2, 97, 97, 32, 13), 3)
    for tau, expect in ((0.0, False), (0.84, True)):
        m = _method("flexprefill", {"block_size": 8, "gamma": 0.5, "tau": tau, "last_q": 8})
        run_method(m, q, k, v, mask, scale=32 ** -0.5)
        assert bool((m.last_query_aware == expect).all())


def test_js_divergence():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    js = js_divergence(p, q)
    assert js[0].abs() < 1e-7 and (js[1] - torch.log(torch.tensor(2.0))).abs() < 1e-6


def test_flexprefill_vertical_slash_branch_keeps_heavy_column_and_band():
    """A vertical-slash head (tau = 0) keeps the block of a key every query attends to, for all
    later query blocks, and the local band."""
    b, h, n, d = 1, 2, 96, 16
    q = torch.randn(b, h, n, d)
    k = torch.randn(b, h, n, d) * 0.1
    k[:, :, 37] = q.mean(dim=2) * 8
    m = _method("flexprefill", {"block_size": 8, "gamma": 0.5, "tau": 0.0, "last_q": 8})
    _, _, keep = run_method(m, q, k, k.clone(), causal_lazy_mask(b, n, n), scale=d ** -0.5, return_mask=True)
    assert keep[0, :, 40:, 37].all() and keep[0, :, 90, 89].all()


def test_xattention_keeps_heavy_block():
    b, h, n, d = 1, 2, 128, 16
    q = torch.randn(b, h, n, d)
    k = torch.randn(b, h, n, d) * 0.1
    k[:, :, 40:48] = q.mean(dim=2, keepdim=True) * 30
    m = _method("xattention", {"block_size": 16, "stride": 4, "threshold": 0.5})
    _, _, keep = run_method(m, q, k, k.clone(), causal_lazy_mask(b, n, n), scale=d ** -0.5, return_mask=True)
    assert keep[0, :, 64:, 40:48].all()
    assert (causal_lazy_mask(b, n, n).rows(0, n) & ~keep).any()  # and it does skip something


def test_invalid_params():
    from patchattn.plan import PlanError

    with pytest.raises(PlanError):
        get_method("xattention").validate_params({"block_size": 100, "stride": 8})
    with pytest.raises(PlanError):
        get_method("flexprefill").validate_params({"gamma": 0.0})


# ----------------------------------------------------------------------------- GPU: kernel backend


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,params", [
    ("flexprefill", {"block_size": 128, "gamma": 0.9, "tau": 0.1, "last_q": 128}),
    ("flexprefill", {"block_size": 64, "gamma": 0.5, "tau": 0.0, "last_q": 64}),
    ("xattention", {"block_size": 128, "stride": 8, "threshold": 0.9}),
    ("vertical_slash", {"vertical": 64, "slash": 64, "last_q": 64}),
    ("block_topk", {"block_size": 64, "top_k": 4}),
])
def test_kernel_backend_gpu(one_config, name, params):
    """bf16 through backends.run_group (GQA, left padding, batch 2) vs fp32 masked softmax."""
    from patchattn import backends

    torch.manual_seed(0)
    b, h, hkv, n, d = 2, 8, 2, 2048, 128
    q, k, v = (torch.randn(b, hh, n, d, device="cuda").to(torch.bfloat16) for hh in (h, hkv, hkv))
    padding = torch.ones(b, n, dtype=torch.long, device="cuda")
    padding[1, :300] = 0
    mask = causal_lazy_mask(b, n, n, padding, device=torch.device("cuda"))
    before = sum(backends.kernel_calls.values())
    out, kept, keep = run_method(_method(name, params), q, k, v, mask, scale=d ** -0.5, return_mask=True)
    assert sum(backends.kernel_calls.values()) > before, "kernel path did not run"
    ref = dense_reference(q.float(), k.float(), v.float(), keep, d ** -0.5).float()  # fp64 math inside
    rows = mask.rows(0, n).expand_as(keep).any(-1)
    err = ((out.float() - ref)[rows].norm() / ref[rows].norm()).item()
    assert err <= 1e-2, err
    assert torch.equal(kept.cpu(), keep.sum((-1, -2)).sum(0).cpu())
    assert not out.isnan().any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_patched_model_kernel_vs_reference_gpu(one_config, monkeypatch):
    """A patched Llama-shaped bf16 model gives the same logits and telemetry on both backends.

    The plan's selections do not depend on estimator numerics (streaming heads, dense heads of
    kv head 1 through the block kernel), so the backends differ only in bf16 rounding; with
    estimated selections, near-ties between the bf16 Triton and torch estimators pick slightly
    different pairs (run 3 on H100: 4% logits difference). The CPU interpreter test
    `patched_llama` checks estimated selections end to end in fp32.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from patchattn import backends, patch_model, stats
    from patchattn.plan import Plan
    from patchattn.telemetry import reset_stats

    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    plan = Plan.uniform(model, "streaming", {"sink": 4, "window": 700}).to_dict()
    plan["layers"][1]["kv_heads"] = {"1": {"method": "dense"}}
    patch_model(model, Plan.from_dict(plan))
    ids = torch.randint(0, 512, (2, 3000), device="cuda")
    am = torch.ones_like(ids)
    am[1, :123] = 0
    results = {}
    for choice in ("triton", "reference"):
        monkeypatch.setenv(backends.BACKEND_ENV, choice)
        reset_stats(model)
        before = sum(backends.kernel_calls.values())
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=am).logits.float()
        results[choice] = (logits, stats(model).density, sum(backends.kernel_calls.values()) - before,
                           stats(model).kernels)
    (lk, dk, ck, kk), (lr, dr, cr, kr) = results["triton"], results["reference"]
    assert ck == 3 and cr == 0  # layer 0: one vertical-slash launch; layer 1: streaming + dense groups
    # telemetry names a kernel for each of those groups, the reference for every group on the other run
    assert "triton_vertical_slash" in kk and sum(kk.values()) == 3 and "reference" not in kk, kk
    assert dict(kr) == {"reference": 3}, kr
    assert dk == dr and dk < 0.9
    valid = am.bool()
    err = ((lk - lr)[valid].norm() / lr[valid].norm()).item()
    assert err <= 2e-2, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,params", [
    ("vertical_slash", {"vertical": 64, "slash": 64, "last_q": 64, "slash_group": 64}),
    ("block_topk", {"block_size": 128, "top_k": 4}),
    ("streaming", {"sink": 4, "window": 256}),
    ("xattention", {"block_size": 128, "stride": 16, "threshold": 0.9}),
])
def test_kernel_prefill_never_syncs_gpu(one_config, monkeypatch, name, params):
    """The patched attention calls of a prefill on the kernels (batch 1, no padding) make no
    device sync: the host queues every layer's estimation, lists and kernels ahead of the GPU.
    Two syncs per layer (host-to-device copies of head ids and of a scalar) left the GPU idle
    while the host built the next layer's lists: 16k TTFT of 4 Llama-3-8B layers 0.96x of dense.
    Only the attention calls are checked: transformers 5.17's own mask preparation reads a value
    back once per forward (find_packed_sequence_indices), patched or not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from patchattn import backends, patch_model, patching, unpatch_model
    from patchattn.plan import Plan

    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 512, (1, 2048), device="cuda")
    monkeypatch.setenv("PATCHATTN_DENSE_BELOW", "0")
    checked = []
    unchecked = patching.sparse_attention

    def sparse_attention_without_sync(*args, **kwargs):
        if not check:  # the warm-up forward compiles the kernels and copies each layer's head ids once
            return unchecked(*args, **kwargs)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return unchecked(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            checked.append(True)

    monkeypatch.setattr(patching, "sparse_attention", sparse_attention_without_sync)
    patch_model(model, Plan.uniform(model, name, params))
    try:
        before = sum(backends.kernel_calls.values())
        with torch.no_grad():
            for check in (False, True):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
        assert sum(backends.kernel_calls.values()) >= before + 4  # 2 forwards x 2 layers on the kernels
        assert checked == [True, True]  # both layers of the second forward ran under the check
    finally:
        unpatch_model(model)
