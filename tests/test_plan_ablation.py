"""Plan variants of evals/bench/plan_ablation.py: each edit lands on exactly the heads it names."""

import pytest
import torch

from patchattn.evals.bench.plan_ablation import build_variant
from patchattn.plan import Plan
from conftest import STORIES, needs
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


def test_another_plan_file_as_base_or_replacement(model_and_plan, tmp_path):
    """plan=PATH takes the specs of another plan file; a file for another model is refused."""
    model, plan = model_and_plan
    other = tmp_path / "other.json"
    Plan.uniform(model, "block_topk", {"block_size": 8, "top_k": 2}).save(other)
    assert {m for row in _methods(build_variant(model, plan, f"plan={other}")) for m in row} == {"block_topk"}
    mixed = _methods(build_variant(model, plan, f"plan|layers:2-3->plan={other}"))
    assert mixed[0] == ["streaming"] * 4 and mixed[2] == ["block_topk"] * 4
    foreign = tmp_path / "foreign.json"
    Plan.uniform(tiny_model("qwen2"), "dense", {}).save(foreign)
    with pytest.raises(ValueError):
        build_variant(model, plan, f"plan={foreign}")


@pytest.mark.parametrize("bad", ["sparse@0.1", "plan|layers:0-1", "plan|nowhere->dense", "plan|all->vs"])
def test_bad_variant_strings_name_the_problem(model_and_plan, bad):
    model, plan = model_and_plan
    with pytest.raises(ValueError, match="expected"):
        build_variant(model, plan, bad)


def test_accuracy_by_depth_quarters():
    """Scores are grouped by the needle's depth quarter; depth 1.0 falls in the last quarter and a
    quarter without samples reads None."""
    from types import SimpleNamespace

    from patchattn.evals.bench.calibration_quality import accuracy_by_depth

    samples = [SimpleNamespace(depth=d) for d in (0.0, 0.1, 0.3, 0.8, 1.0, None)]
    scores = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert accuracy_by_depth(samples, scores) == [0.5, 1.0, None, 0.5]


def test_passkey_paired_statistics():
    """Wilson intervals and the exact McNemar test against values worked out by hand: only
    prompts where the plans disagree count, and p is the two-sided binomial tail."""
    from patchattn.evals.bench.calibration_quality import paired_exact_test, passkey_comparisons, wilson_interval

    lo, hi = wilson_interval(17, 20)
    assert (round(lo, 3), round(hi, 3)) == (0.640, 0.948)
    assert wilson_interval(0, 20)[0] == 0.0 and round(wilson_interval(0, 20)[1], 3) == 0.161
    # 2 discordant prompts, both for b: p = 2 * (1/2)^2 = 0.5; agreements do not matter
    assert paired_exact_test([1, 1, 0, 0, 1], [1, 1, 1, 1, 1]) == {"only_first": 0, "only_second": 2, "p": 0.5}
    # 6 vs 0: p = 2 / 64
    assert paired_exact_test([1] * 6 + [0] * 4, [0] * 10)["p"] == pytest.approx(2 / 64)
    assert paired_exact_test([1, 0], [1, 0])["p"] == 1.0
    with pytest.raises(ValueError, match="different lengths"):
        paired_exact_test([1], [1, 0])
    rows = {"calibrated": {"passkey_scores": {"8": [1.0] * 7 + [0.0]}},
            "uniform": {"passkey_scores": {"8": [0.0] * 2 + [1.0] * 6}}}
    (c,) = passkey_comparisons(rows, [8])
    assert (c["first_correct"], c["second_correct"], c["only_first"], c["only_second"]) == (7, 6, 2, 1)
    assert c["p"] == pytest.approx(1.0)  # 2 vs 1 of 3: 2 * P(X <= 1) = 2 * 4/8 -> capped at 1


def test_merge_split_run_parts(tmp_path):
    """--merge joins the rows of a run split by --rows into one table with the acceptance checks,
    keeps each row's device, and refuses parts that disagree on a setting, repeat a row, or whose
    uniform rows were matched to another density."""
    import json

    from patchattn.evals.bench.calibration_quality import main, merge_parts

    settings = {"model": "m", "plan": "p.json", "plan_calibration": {"recipe_hash": "h"}, "dtype": "float32",
                "text": "w.raw", "tokens": 64, "window": 32, "lengths": [8], "samples": 2, "seed": 1,
                "haystack": None, "torch": "2.x", "seconds": 1.0}

    def row(density, ppl, scores):
        return {"density": density, "ppl": ppl, "passkey": {"8": sum(scores) / len(scores)},
                "passkey_scores": {"8": scores}}

    gpu = {**settings, "device": "cuda", "gpu": "H100", "target_density": None, "matched": {},
           "rows": {"calibrated": row(0.23, 10.2, [1.0, 1.0])}}
    cpu = {**settings, "device": "cpu", "gpu": None, "target_density": 0.23,
           "matched": {"uniform_vertical_slash": {"scale": 0.1}, "uniform_streaming": {"scale": 0.1}},
           "rows": {"uniform_streaming": row(0.231, 12.0, [0.0, 0.0]),
                    "uniform_vertical_slash": row(0.229, 11.0, [1.0, 0.0])}}
    dense = {**settings, "device": "cpu", "gpu": None, "target_density": None, "matched": {},
             "rows": {"dense": row(1.0, 10.0, [0.0, 1.0])}}
    merged = merge_parts([cpu, gpu, dense], ["u.json", "c.json", "d.json"])
    assert list(merged["rows"]) == ["dense", "calibrated", "uniform_vertical_slash", "uniform_streaming"]
    assert merged["row_devices"]["calibrated"]["gpu"] == "H100" and merged["row_devices"]["dense"]["device"] == "cpu"
    assert merged["checks"] == {"density_le_0.25": True, "passkey_ge_dense": True, "ppl_within_3pct": True,
                                "beats_uniform_ppl": True, "beats_uniform_passkey": True}
    assert "| calibrated | 0.2300 | 1.00 | 10.200 | +2.00 % |" in merged["table"]
    with pytest.raises(ValueError, match="'seed' differs"):
        merge_parts([gpu, {**dense, "seed": 2}], ["c.json", "d.json"])
    with pytest.raises(ValueError, match="row 'dense' is in both d.json and e.json"):
        merge_parts([dense, dense], ["d.json", "e.json"])
    with pytest.raises(ValueError, match="matched to density 0.3"):
        merge_parts([gpu, {**cpu, "target_density": 0.3}], ["c.json", "u.json"])
    # the CLI writes the merged file
    names = []
    for name, part in (("c.json", gpu), ("u.json", cpu), ("d.json", dense)):
        (tmp_path / name).write_text(json.dumps(part))
        names.append(str(tmp_path / name))
    assert main(["--merge", ",".join(names), "--out", str(tmp_path / "all.json")]) == 0
    assert json.loads((tmp_path / "all.json").read_text())["checks"]["beats_uniform_passkey"] is True


def test_rescore_saved_completions(tmp_path):
    """--rescore rebuilds the samples from a result file's seed / lengths / count and scores its
    completions per depth quarter, without a model forward."""
    import json

    from patchattn.evals import synthetic
    from patchattn.evals.bench.plan_ablation import rescore
    from test_synthetic import WordTokenizer

    tok = WordTokenizer()
    samples = synthetic.generate_samples("passkey", tok, 400, 8, seed=5)
    # right answers for the first four (shallow) needles, then a wrong number, then words
    completions = [s.answers[0] if i < 4 else "12" if i == 4 else "no idea" for i, s in enumerate(samples)]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"seed": 5, "samples": 8, "lengths": [400],
                                "rows": {"plan": {"completions": {"400": completions}}}}))
    table = rescore([str(path)], tok)
    # 5 of 8 open with a number, 4 of those right
    assert "| run.json | `plan` | 400 | 0.50 | 1.00 / 1.00 / 0.00 / 0.00 | 0.62 | 0.80 |" in table, table


@needs(STORIES)
def test_evaluate_records_numeric_answers():
    """calibration_quality.evaluate reports, per length, the share of answers that open with a
    number and their accuracy, consistent with the passkey accuracy."""
    from patchattn import models
    from patchattn.evals import synthetic
    from patchattn.evals.bench.calibration_quality import evaluate

    model, tok = models.load(str(STORIES))
    samples = synthetic.generate_samples("passkey", tok, 200, 4, seed=3)
    row = evaluate(model, tok, None, "", 0, 0, {200: samples}, batch_size=4, progress=False)
    numeric = row["passkey_numeric_answers"]["200"]
    assert sum(row["passkey_scores"]["200"]) / 4 == row["passkey"]["200"]  # per prompt, for paired tests
    opens = [t.strip()[:1].isdigit() for t in row["completions"]["200"]]
    assert numeric["share"] == sum(opens) / 4
    if numeric["accuracy"] is not None:  # every correct answer opens with the number
        assert numeric["share"] * numeric["accuracy"] == pytest.approx(row["passkey"]["200"])


@needs(STORIES)
def test_first_token_margin_agrees_with_greedy_decoding():
    """A prompt's first-token margin is > 0 exactly where greedy decoding's first token is the
    answer's first token, and left padding in a batch does not change the margins."""
    from patchattn import models
    from patchattn.evals import synthetic
    from patchattn.evals.bench.calibration_quality import first_token_margins

    model, tok = models.load(str(STORIES))
    samples = synthetic.generate_samples("passkey", tok, 200, 4, seed=3)
    samples += synthetic.generate_samples("passkey", tok, 180, 2, seed=4)  # shorter: left-padded in the batch
    margins = first_token_margins(model, tok, samples)
    alone = [first_token_margins(model, tok, [s])[0] for s in samples]
    assert margins == pytest.approx(alone, abs=1e-4)
    for s, m in zip(samples, margins):
        first = tok(s.prompt + " " + s.answers[0])["input_ids"][len(tok(s.prompt)["input_ids"])]
        with torch.no_grad():
            out = model(**tok(s.prompt, return_tensors="pt"), logits_to_keep=1).logits[0, -1]
        assert (m > 0) == (int(out.argmax()) == first)
        # the margin is the answer token's logit minus the best other one's
        others = out.clone()
        others[first] = float("-inf")
        assert m == pytest.approx(float(out[first] - others.max()), abs=1e-4)
