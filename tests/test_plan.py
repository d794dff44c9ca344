"""Plan schema: validation errors name the problem; plans round-trip byte-identically."""

import json

import pytest
import torch

from patchattn import Plan, PlanError, UnsupportedModelError, patch_model, patched, stats, unpatch_model
from patchattn.plan import model_info

from tiny_models import left_padded_batch, tiny_model


@pytest.fixture()
def model():
    return tiny_model("llama")


def _plan_dict(model, method="streaming", params=None):
    return Plan.uniform(model, method, params or {"sink": 4, "window": 16}).to_dict()


def test_round_trip_is_byte_identical(model, tmp_path):
    data = _plan_dict(model)
    vertical = {"scale": 0.02, "power": 0.5, "min": 8}
    data["layers"][1]["kv_heads"] = {"1": {"method": "vertical_slash", "params": {"vertical": vertical, "slash": 16}}}
    data["layers"][2]["q_heads"] = {"3": {"method": "block_topk", "params": {"gamma": 0.9}}}
    data["calibration"] = {"recipe": "hand-written", "z": [1, 2], "a": {"b": 1}}
    first = Plan.from_dict(data).save(tmp_path / "a.json")
    second = Plan.load(first).save(tmp_path / "b.json")
    assert first.read_bytes() == second.read_bytes()
    assert Plan.load(second).to_json() == first.read_text()
    assert json.loads(first.read_text())["schema"] == "patchattn.plan/1"


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["layers"].pop(), "layers: plan lists 2 layers but model.num_layers=3"),
    (lambda d: d["layers"][0].update(method="no_such_method"), "unknown method 'no_such_method'"),
    (lambda d: d["layers"][0]["params"].update(window=-3), "window"),
    (lambda d: d["layers"][0]["params"].pop("window"), "window: Field required"),
    (lambda d: d["layers"][0]["params"].update(stride=2), "stride: Extra inputs are not permitted"),
    (lambda d: d["layers"][0].update(kv_heads={"5": {"method": "dense"}}), "layers[0].kv_heads: head 5 out of range"),
    (lambda d: d.update(schema="patchattn.plan/0"), "schema='patchattn.plan/0' is not supported"),
    (lambda d: d["defaults"].update(dense_below=-1), "defaults.dense_below"),
    (lambda d: d["layers"][1].update(reuse_from=1), "layers[1].reuse_from=1 must name an earlier layer"),
    (lambda d: d["layers"][0].update(method="block_topk", params={"top_k": 2, "gamma": 0.5}),
     "exactly one of top_k or gamma"),
    (lambda d: d["layers"][0].update(method="block_topk", params={"gamma": 1.5}), "gamma"),
])
def test_bad_plan_errors_name_the_problem(model, mutate, message):
    data = _plan_dict(model)
    mutate(data)
    with pytest.raises(PlanError) as err:
        Plan.from_dict(data)
    assert message in str(err.value)


def test_plan_for_another_model_is_rejected(model):
    other = tiny_model("mistral")  # same layer/head counts, different attention config
    plan = Plan.uniform(other, "streaming", {"window": 8})
    with pytest.raises(PlanError, match="model_type='mistral' in the plan, but the model has 'llama'"):
        patch_model(model, plan)
    data = _plan_dict(model)
    data["model"]["num_kv_heads"] = 4
    data["layers"][0]["kv_heads"] = {}
    with pytest.raises(PlanError, match="model.num_kv_heads=4 in the plan, but the model has 2"):
        patch_model(model, Plan.from_dict(data))
    data = _plan_dict(model)
    data["model"]["fingerprint"] = "sha256:0000000000000000"
    with pytest.raises(PlanError, match="fingerprint='sha256:0000000000000000' in the plan"):
        patch_model(model, Plan.from_dict(data))
    assert not hasattr(model, "_patchattn_state")


def test_fingerprint_tracks_attention_config():
    a, b = tiny_model("llama"), tiny_model("llama")
    assert model_info(a).fingerprint == model_info(b).fingerprint
    b.config.rope_parameters = {"rope_type": "default", "rope_theta": 1234.0}
    assert model_info(a).fingerprint != model_info(b).fingerprint


def test_patch_is_idempotent_and_isolated(model):
    other = tiny_model("llama")
    ids, mask = left_padded_batch()
    plan = Plan.uniform(model, "streaming", {"sink": 1, "window": 3})
    with torch.no_grad():
        ref = other(input_ids=ids, attention_mask=mask).logits
        patch_model(model, plan)
        patch_model(model, plan)
        sparse = model(input_ids=ids, attention_mask=mask).logits
        assert other.config._attn_implementation == "sdpa"
        assert torch.equal(other(input_ids=ids, attention_mask=mask).logits, ref)
        assert (sparse - ref).abs().max() > 1e-3  # the window really drops pairs
        assert stats(model).density < 0.5
        unpatch_model(model)
        unpatch_model(model)
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)


def test_shared_config_module_without_plan_runs_original(model):
    """A second model built on the same config object keeps its own (original) attention."""
    import transformers

    twin = transformers.LlamaForCausalLM(model.config).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = twin(input_ids=ids, attention_mask=mask).logits
        patch_model(model, Plan.uniform(model, "streaming", {"sink": 1, "window": 3}))
        assert torch.equal(twin(input_ids=ids, attention_mask=mask).logits, ref)
        unpatch_model(model)


def test_patched_context_and_dense_below(model):
    ids, mask = left_padded_batch()
    plan = Plan.from_dict({**_plan_dict(model, params={"sink": 1, "window": 3}), "defaults": {"dense_below": 100}})
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with patched(model, plan):
            out = model(input_ids=ids, attention_mask=mask).logits
            s = stats(model)
        assert model.config._attn_implementation == "sdpa"
    assert torch.equal(out, ref)  # 24 tokens < dense_below: the original kernel ran
    assert s.density is None and s.fallbacks["short_prompt"] == 3


def test_unsupported_architecture_is_named():
    m = tiny_model("llama")
    m.model.layers[0].self_attn.layer_idx = 1  # two modules now claim layer 1
    with pytest.raises(UnsupportedModelError, match="two attention modules claim layer 1"):
        patch_model(m, Plan.uniform(m, "dense"))


def test_missing_files_give_a_named_error_not_a_traceback(tmp_path, capsys):
    from patchattn.cli import main
    from patchattn.models import resolve

    assert main(["inspect", str(tmp_path / "missing.plan.json")]) == 2
    assert "missing.plan.json" in capsys.readouterr().err
    for spec in (str(tmp_path / "no_model"), "./no_model", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="model folder not found"):
            resolve(spec)
    (tmp_path / "here").mkdir()
    assert resolve(str(tmp_path / "here")) == (str(tmp_path / "here"), None)
    assert resolve("org/name") == ("org/name", None)  # a hub id stays a hub id
