"""Budgets that cover every causal pair must reproduce the unpatched model exactly (fp32)."""

import pytest
import torch

from patchattn import Plan, patch_model, stats, unpatch_model

from tiny_models import CONFIGS, left_padded_batch, tiny_model

FULL_COVERAGE = {
    "dense": {},
    "streaming": {"sink": 0, "window": 10_000},
    "vertical_slash": {"vertical": 10_000, "slash": 10_000, "last_q": 4},
    "block_topk": {"block_size": 4, "top_k": 10_000},
    "block_topk_gamma": {"block_size": 4, "gamma": 1.0},
}


def _plan(model, name):
    method = "block_topk" if name.startswith("block_topk") else name
    return Plan.uniform(model, method, FULL_COVERAGE[name])


def _mixed_plan(model):
    """Different full-coverage methods on different KV heads and one q-head override."""
    plan = Plan.uniform(model, "streaming", FULL_COVERAGE["streaming"]).to_dict()
    for layer in plan["layers"]:
        layer["kv_heads"] = {"1": {"method": "block_topk", "params": FULL_COVERAGE["block_topk"]}}
        layer["q_heads"] = {"0": {"method": "vertical_slash", "params": FULL_COVERAGE["vertical_slash"]}}
    return Plan.from_dict(plan)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_forward_and_generate_match_unpatched(arch):
    model = tiny_model(arch)
    ids, mask = left_padded_batch()
    valid = mask.bool()
    gen = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
               pad_token_id=0)
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
        ref_gen = model.generate(input_ids=ids, attention_mask=mask, **gen)
        plans = {name: _plan(model, name) for name in FULL_COVERAGE}
        plans["mixed"] = _mixed_plan(model)
        for name, plan in plans.items():
            patch_model(model, plan)
            logits = model(input_ids=ids, attention_mask=mask).logits
            diff = (logits - ref_logits)[valid].abs().max().item()
            assert diff <= 1e-5, f"{arch}/{name}: forward max abs diff {diff}"
            out = model.generate(input_ids=ids, attention_mask=mask, **gen)
            assert torch.equal(out.sequences, ref_gen.sequences), f"{arch}/{name}: generated tokens differ"
            step_diff = max((a - b).abs().max().item() for a, b in zip(out.logits, ref_gen.logits))
            assert step_diff <= 1e-5, f"{arch}/{name}: generate logits max abs diff {step_diff}"
            s = stats(model)
            if name != "dense":
                assert s.sparse_calls > 0 and abs(s.density - 1.0) < 1e-12
            assert s.fallbacks["decode"] == 7 * model.config.num_hidden_layers  # 8 tokens: 1 prefill + 7 decode
            unpatch_model(model)
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(after, ref_logits), "unpatch_model must restore the original implementation exactly"


def test_sliding_window_layers_keep_their_window():
    """A sparse method on a sliding-window layer never attends beyond the window."""
    model = tiny_model("mistral")  # sliding_window=8 on every layer
    ids, mask = left_padded_batch((40, 40))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        patch_model(model, Plan.uniform(model, "streaming", {"sink": 4, "window": 10_000}))
        out = model(input_ids=ids, attention_mask=mask).logits
        density = stats(model).density
        unpatch_model(model)
    # Sinks lie outside the window for late rows, so they must be masked out by the window:
    # the result equals dense sliding-window attention.
    assert (out - ref).abs().max().item() <= 1e-5
    assert density == pytest.approx(1.0)


def test_eager_original_implementation():
    model = tiny_model("llama", attn_implementation="eager")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        patch_model(model, _plan(model, "vertical_slash"))
        out = model(input_ids=ids, attention_mask=mask).logits
        unpatch_model(model)
    assert (out - ref)[mask.bool()].abs().max().item() <= 1e-5
    assert model.config._attn_implementation == "eager"
