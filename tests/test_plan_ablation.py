"""Plan variants of evals/bench/plan_ablation.py: each edit lands on exactly the heads it names."""

import pytest

from patchattn.evals.bench.plan_ablation import build_variant
from patchattn.plan import Plan
from tiny_models import tiny_model


def _methods(plan):
    return [[plan.head_spec(l, h).method for h in range(plan.model.num_q_heads)] for l in range(plan.model.num_layers)]


@pytest.fixture(scope="module")
def model_and_plan():
    model = tiny_model("llama")  # 3 layers x 4 q heads (2 kv heads)
    data = Plan.uniform(model, "streaming", {"sink": 1, "window": 4}).to_dict()
    data["layers"][1]["q_heads"] = {"2": {"method": "block_topk", "params": {"block_size": 8, "top_k": 2}}}
    data["calibration"] = {"retrieval_heads": [[2, 3]]}
    return model, Plan.from_dict(data)


def test_bases_and_selectors(model_and_plan):
    model, plan = model_and_plan
    assert _methods(build_variant(model, plan, "plan")) == _methods(plan)
    assert {m for row in _methods(build_variant(model, plan, "dense")) for m in row} == {"dense"}
    edited = _methods(build_variant(model, plan, "plan|method:block_topk->vs@0.1|layers:0-1->dense|retrieval->dense"))
    assert edited[0] == ["dense"] * 4
    assert edited[1] == ["streaming", "streaming", "vertical_slash", "streaming"]
    assert edited[2] == ["streaming"] * 3 + ["dense"]
    back = _methods(build_variant(model, plan, "stream@0.2|heads:1.2->plan"))
    assert back[1][2] == "block_topk" and back[0] == ["streaming"] * 4
    vs = build_variant(model, plan, "vs@0.25").head_spec(0, 0)
    assert vs.params["vertical"]["scale"] == 0.25 and vs.params["slash"]["scale"] == 0.25


@pytest.mark.parametrize("bad", ["sparse@0.1", "plan|layers:0-1", "plan|nowhere->dense", "plan|all->vs"])
def test_bad_variant_strings_name_the_problem(model_and_plan, bad):
    model, plan = model_and_plan
    with pytest.raises(ValueError, match="expected"):
        build_variant(model, plan, bad)
