"""Calibration: profiling signals, recipes, allocation, provenance, determinism, CLI, heatmap."""

import json
from pathlib import Path

import pytest
import torch

from conftest import STORIES, needs
from patchattn import calibrate, patch_model, reset_stats, stats, unpatch_model
from patchattn.calibration import allocate_budget, calibrate_main, retrieval_options
from patchattn.methods import get_method
from patchattn.methods.base import AllPairs
from patchattn.plan import Plan
from patchattn.profiling import (OptionSpace, _causal_ctx, capture, dense_rows, layer_option_stats,
                                 sample_rows)
from patchattn.recipes import RecipeError, load_recipe

TINY = {
    "name": "tiny", "kind": "budget", "target_density": 0.55, "reference_length": 128,
    "candidates": {
        "dense": True,
        "streaming": {"sink": 4, "window": {"fractions": [0.1, 0.25, 0.5], "powers": [1.0, 0.5], "min": 4}},
        "vertical_slash": {"vertical": {"fractions": [0, 0.05, 0.15]}, "slash": {"fractions": [0, 0.05, 0.15]},
                           "last_q": 16, "window": 8},
        "block_topk": {"block_size": 16, "top_k": {"fractions": [0.25, 0.5], "min": 1}},
    },
    "profiling": {"rows": 24, "last_rows": 6, "check_prompts": 2, "verify_prompts": 1},
}

WORDS = ("once upon a time there was a little girl named lily she liked to play in the park with her dog "
         "one day the sun was hot and the sky was blue so they went to the lake to swim and have fun").split()


def story_prompts(n=3, words=160):
    """Deterministic TinyStories-like texts (word order shuffled per prompt by a seeded rng)."""
    import random

    out = []
    for i in range(n):
        rng = random.Random(i)
        out.append(" ".join(rng.choice(WORDS) for _ in range(words)) + ".")
    return out


@pytest.fixture(scope="module")
def stories():
    from patchattn.models import load

    if not STORIES.exists():  # every test that takes this fixture needs ../shared
        pytest.skip(f"{STORIES} not present (../shared assets)")
    return load(str(STORIES))


def tiny_calibrate(model, tok, **kw):
    args = dict(prompts=story_prompts(), recipe=TINY, lengths=[64, 128], check_length=96, samples=3, seed=0,
                progress=False)
    args.update(kw)
    return calibrate(model, tok, **args)


# ----------------------------------------------------------------------------- profiling
def test_option_stats_match_real_methods():
    """Bucketed recall and exact pair counts equal brute force over the methods' own masks."""
    torch.manual_seed(0)
    h, n, d = 2, 200, 8
    q, k = torch.randn(h, n, d), torch.randn(h, n, d) * 1.5
    k[:, :2] += 2.0  # sink-like keys so vertical selections are not trivial
    recipe = load_recipe(TINY)
    space = OptionSpace.from_candidates(recipe.candidates, 128)
    rows = sample_rows(n, 24, 6, torch.Generator().manual_seed(0))
    got = layer_option_stats(space, q, k, rows, 0.35, None)
    ctx = _causal_ctx(n, "cpu", 0.35, None, 0)
    probs = dense_rows(q, k, rows, 0.35, None)
    causal = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    for i, spec in enumerate(space.specs()):
        sel = get_method(spec["method"])(spec["params"]).select(q[None], k[None], ctx)
        full = causal[None].expand(h, -1, -1) if isinstance(sel, AllPairs) else \
            sel.rows(torch.arange(n), torch.arange(n))[0].expand(h, -1, -1) & causal
        density = full.sum((1, 2)).double() / causal.sum()
        recall = (probs * full[:, rows]).sum(-1).mean(-1).double()
        assert torch.equal(density, got["density"][:, i]), spec
        torch.testing.assert_close(recall, got["recall"][:, i], atol=1e-5, rtol=0)
    assert len(space) == got["recall"].shape[1] == 1 + 3 * 2 + 3 * 3 + 2  # dense, windows x powers, v x s, top_k


def test_capture_restores_model_and_keeps_outputs():
    from tiny_models import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 40))
    before = model(input_ids=ids).logits
    seen = []
    with capture(model, lambda layer, q, k, v, scale, softcap: seen.append((layer, tuple(q.shape), tuple(k.shape)))):
        inside = model(input_ids=ids).logits
        assert model.config._attn_implementation == "patchattn_profile"
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model.config, "_patchattn_profile_original")
    torch.testing.assert_close(inside, before)
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][1] == (1, 4, 40, 16) and seen[0][2] == (1, 2, 40, 16)


# ----------------------------------------------------------------------------- recipes
def test_shipped_recipes_load():
    for name in ("budget", "vertical-slash", "retrieval-heads"):
        assert load_recipe(name).name == name


def test_recipe_errors_name_the_bad_key():
    bad = json.loads(json.dumps(TINY))
    bad["candidates"]["streaming"]["windw"] = bad["candidates"]["streaming"].pop("window")
    with pytest.raises(RecipeError, match=r"candidates\.streaming\.windw"):
        load_recipe(bad)
    bad = json.loads(json.dumps(TINY))
    bad["candidates"]["block_topk"]["top_k"]["fractions"] = [1.5]
    with pytest.raises(RecipeError, match=r"candidates\.block_topk\.top_k.*fractions"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="target_density: required"):
        load_recipe({k: v for k, v in TINY.items() if k != "target_density"})
    with pytest.raises(RecipeError, match="unknown recipe 'no-such-recipe'"):
        load_recipe("no-such-recipe")


# ----------------------------------------------------------------------------- allocation
def test_allocate_budget_respects_target_and_is_optimal_on_small_case():
    import itertools

    g = torch.Generator().manual_seed(1)
    m, o = 4, 5
    cost = torch.rand(m, o, generator=g, dtype=torch.float64).sort(1).values
    loss = torch.rand(m, o, generator=g, dtype=torch.float64).sort(1, descending=True).values
    allowed = torch.ones(m, o, dtype=torch.bool)
    for target in (0.3, 0.45, 0.6, 0.8):
        choice = allocate_budget(loss, cost, allowed, target)
        assert float(cost[torch.arange(m), choice].mean()) <= target + 1e-9
        best = min(sum(loss[i, c] for i, c in enumerate(combo)) for combo in itertools.product(range(o), repeat=m)
                   if sum(cost[i, c] for i, c in enumerate(combo)) / m <= target + 1e-9)
        got = float(loss[torch.arange(m), choice].sum())
        # Lagrangian + greedy fill is near-optimal on this multiple-choice knapsack.
        assert got <= float(best) + 0.25, (target, got, float(best))
    with pytest.raises(RecipeError, match="cannot reach target_density"):
        allocate_budget(loss, cost, allowed, float(cost.min(1).values.mean()) * 0.9)


# ----------------------------------------------------------------------------- end to end
@needs(STORIES)
def test_retrieval_options_query_aware():
    from patchattn.recipes import Retrieval

    specs = [{"method": "dense"}, {"method": "streaming"}, {"method": "vertical_slash"}, {"method": "vertical_slash"}]
    recall = torch.tensor([[1.0, 0.99, 0.95, 0.985],   # a vertical_slash option keeps 0.98
                           [1.0, 0.99, 0.90, 0.95],    # none does: the best vertical_slash one
                           [1.0, 0.99, 0.97, 0.97]])   # tie: both
    allowed = torch.ones(3, 4, dtype=torch.bool)
    plain = retrieval_options(recall, allowed, specs, Retrieval(min_recall=0.98))
    assert plain.tolist() == [[True, True, False, True], [True, True, False, False], [True, True, False, False]]
    aware = retrieval_options(recall, allowed, specs, Retrieval(min_recall=0.98, query_aware=True))
    assert aware.tolist() == [[False, False, False, True], [False, False, False, True], [False, False, True, True]]
    # a head whose layer allows no vertical_slash option (sliding window: dense only) keeps its options
    only_dense = torch.tensor([[True, False, False, False]] * 3)
    kept = retrieval_options(recall, only_dense, specs, Retrieval(min_recall=0.98, query_aware=True))
    assert kept.tolist() == plain.tolist()


def test_calibrate_deterministic_and_provenance(stories, tmp_path):
    model, tok = stories
    a = tiny_calibrate(model, tok)
    b = tiny_calibrate(model, tok)
    a.save(tmp_path / "a.json"), b.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert Plan.load(tmp_path / "a.json").to_json() == a.to_json()
    cal = a.calibration
    assert cal["recipe"]["name"] == "tiny" and cal["recipe"]["hash"].startswith("sha256:")
    assert cal["prompts"]["hash"].startswith("sha256:") and cal["prompts"]["count"] == 3
    assert cal["lengths"] == [64, 128] and cal["check_length"] == 96 and cal["seed"] == 0
    assert cal["model"]["fingerprint"] == a.model.fingerprint and cal["model"]["weights"].startswith("sha256:")
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    for key in ("recall", "kl", "density", "check_recall", "check_density", "verify_recall", "fidelity_error"):
        grid = cal["heads"][key]
        assert len(grid) == layers and all(len(row) == heads for row in grid), key
    assert "timing" not in cal
    # Another seed samples other rows: provenance and plan follow the inputs.
    assert tiny_calibrate(model, tok, seed=1).calibration["seed"] == 1
    # record_timing adds the only varying field; without it the plan is the same bytes.
    timed = tiny_calibrate(model, tok, record_timing=True)
    assert timed.calibration["timing"]["total_s"] > 0
    del timed.calibration["timing"]
    assert timed.to_json() == a.to_json()


@needs(STORIES)
def test_budget_plan_meets_target_and_realized_density_matches(stories):
    model, tok = stories
    plan = tiny_calibrate(model, tok, samples=1, prompts=story_prompts(1, 200))
    cal = plan.calibration
    for n in ("64", "128"):
        assert cal["expected_density"][n] <= TINY["target_density"] + 1e-9
    assert len(cal["methods"]) >= 2  # a real per-head allocation, not one uniform spec
    ids = tok(story_prompts(1, 200)[0]).input_ids[:128]
    patch_model(model, plan)
    try:
        reset_stats(model)
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        realized = stats(model).density
    finally:
        unpatch_model(model)
    # Same prompt, same length: only upstream sparse layers can shift the selections.
    assert realized == pytest.approx(cal["expected_density"]["128"], abs=0.03)


@needs(STORIES)
def test_unreachable_targets_raise(stories):
    model, tok = stories
    with pytest.raises(RecipeError, match="cannot reach target_density=0.02"):
        tiny_calibrate(model, tok, target_density=0.02)
    strict = dict(TINY, kind="target_recall", target_recall=0.999999, target_density=None)
    strict["candidates"] = dict(TINY["candidates"], dense=False)
    with pytest.raises(RecipeError, match="target_recall=0.999999 not reachable"):
        tiny_calibrate(model, tok, recipe=strict)
    ok = dict(strict, target_recall=0.9)
    ok["candidates"] = dict(TINY["candidates"], dense=True)
    plan = tiny_calibrate(model, tok, recipe=ok)
    recall = torch.tensor(plan.calibration["heads"]["recall"])
    assert plan.calibration["recipe"]["kind"] == "target_recall"
    # Each head's worst-length recall reaches the target, so the mean over lengths does too.
    assert float(recall.min()) >= 0.9 - 1e-4


@needs(STORIES)
def test_cli_writes_plan_timing_and_heatmap(tmp_path):
    import yaml

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in story_prompts()))
    out = tmp_path / "plans" / "new" / "plan.json"  # folders that do not exist yet are created
    rc = calibrate_main(["--model", str(STORIES), "--recipe", str(recipe), "--prompts", str(prompts),
                         "--lengths", "64,128", "--samples", "2", "--out", str(out), "--device", "cpu",
                         "--png", str(tmp_path / "figs" / "heads.png"), "--no-progress"])
    assert rc == 0
    plan = Plan.load(out)
    assert plan.calibration["prompts"]["source"] == "prompts.jsonl" and plan.calibration["check_length"] == 96
    assert json.loads((out.parent / "plan.json.timing.json").read_text())["total_s"] > 0
    assert (tmp_path / "figs" / "heads.png").read_bytes()[:4] == b"\x89PNG"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(TINY, objectiv="kl")))
    assert calibrate_main(["--model", str(STORIES), "--recipe", str(bad), "--prompts", str(prompts),
                           "--lengths", "64,128", "--out", str(tmp_path / "x.json"), "--no-progress"]) == 2


def test_cli_rejects_unusable_output_paths_before_calibrating(tmp_path, capsys, monkeypatch):
    import patchattn.models

    def no_load(*a, **k):
        raise AssertionError("the output path should be checked before the model loads")

    monkeypatch.setattr(patchattn.models, "load", no_load)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [(["--out", str(tmp_path)], "--out", "is a folder"),
             (["--out", str(blocker / "plan.json")], "--out", "is not a folder"),
             (["--out", str(tmp_path / "p.json"), "--png", str(tmp_path)], "--png", "is a folder")]
    for extra, flag, why in cases:
        assert calibrate_main(["--model", "unused", "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert flag in err and why in err, err


@needs(STORIES)
def test_profile_cache_reallocates_without_forwards(stories, tmp_path, monkeypatch):
    import patchattn.calibration as calibration

    model, tok = stories
    first = tiny_calibrate(model, tok, cache=tmp_path)
    assert len(list(tmp_path.glob("profile-*.pt"))) == 1

    def no_forwards(*a, **k):
        raise AssertionError("profile should come from the cache")

    monkeypatch.setattr(calibration, "profile_prompt", no_forwards)
    again = tiny_calibrate(model, tok, cache=tmp_path)
    assert again.to_json() == first.to_json()
    looser = tiny_calibrate(model, tok, cache=tmp_path, target_density=0.8)
    assert looser.calibration["expected_density"]["128"] > first.calibration["expected_density"]["128"]


# ----------------------------------------------------------------------------- prompt sources
@needs(STORIES)
def test_synthetic_prompts_end_with_their_question_and_spread_needle_depths(stories):
    from patchattn.calibration import load_prompts

    _, tok = stories
    ids, desc = load_prompts(tok, None, 400, 6, 0)
    assert desc.startswith("synthetic(") and [len(x) for x in ids] == [400] * 6
    texts = [tok.decode(x) for x in ids]
    # passkey, niah_single, niah_multikey in turn; each prompt keeps the question at its end
    # (the rows that retrieve the needle), not a haystack cut mid-way.
    for i, text in enumerate(texts):
        end = "The pass key is" if i % 3 == 0 else "mentioned in the provided text is"
        assert text.rstrip().endswith(end), (i, text[-60:])
    # The two passkey prompts hold their needles at depth 0 and 1 (not both near the start).
    import re

    for text in (texts[0], texts[3]):
        assert len(re.findall(r"The pass key is \d+\. Remember it", text)) == 1
    first, last = (t.index("The pass key is") / len(t) for t in (texts[0], texts[3]))
    assert first < 0.3 and last > 0.8, (first, last)
    assert load_prompts(tok, "synthetic", 400, 6, 0) == (ids, desc)
    # At 256 tokens niah_multikey's instructions do not fit: the other tasks share the prompts.
    short, _ = load_prompts(tok, None, 256, 4, 0)
    assert len(short) == 4 and all(len(x) == 256 for x in short)


@needs(STORIES)
def test_mixed_prompt_sources_split_and_interleave(stories, tmp_path):
    from patchattn.calibration import load_prompts

    _, tok = stories
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(story_prompts(4, 400)):
        (corpus / f"s{i}.txt").write_text(text)
    alone, alone_desc = load_prompts(tok, str(corpus), 400, 3, 0)
    synth, _ = load_prompts(tok, None, 400, 2, 0)
    mixed, desc = load_prompts(tok, f"{corpus},synthetic", 400, 5, 0)
    # 5 prompts: 3 from the corpus (the first source takes the remainder), 2 synthetic, alternating.
    assert mixed == [alone[0], synth[0], alone[1], synth[1], alone[2]]
    assert desc == f"{alone_desc}[3]+synthetic(passkey,niah_single,niah_multikey;seed=0)[2]"
    with pytest.raises(ValueError, match="listed twice"):
        load_prompts(tok, f"{corpus},{corpus}", 400, 4, 0)
    with pytest.raises(ValueError, match="cannot be split between 2 sources"):
        load_prompts(tok, f"{corpus},synthetic", 400, 1, 0)
    with pytest.raises(ValueError, match="empty source"):
        load_prompts(tok, f"{corpus},", 400, 2, 0)
    # A path that itself contains a comma is one source.
    odd = tmp_path / "a,b"
    odd.mkdir()
    (odd / "s.txt").write_text(story_prompts(1, 400)[0])
    assert load_prompts(tok, str(odd), 400, 1, 0)[1] == "a,b"
    # End to end: the calibration records the mix as its prompt source.
    plan = tiny_calibrate(stories[0], tok, prompts=f"{corpus},synthetic", lengths=[128, 400], check_length=256,
                          samples=2)
    assert plan.calibration["prompts"]["source"].endswith("+synthetic(passkey,niah_single,niah_multikey;seed=0)[1]")
    assert plan.calibration["prompts"]["count"] == 2


# ----------------------------------------------------------------------------- last-row weighting
def test_kl_last_is_the_kl_of_the_last_rows():
    torch.manual_seed(0)
    h, n, d = 2, 200, 8
    q, k = torch.randn(h, n, d), torch.randn(h, n, d) * 1.5
    space = OptionSpace.from_candidates(load_recipe(TINY).candidates, 128)
    rows = sample_rows(n, 24, 6, torch.Generator().manual_seed(0))
    full = layer_option_stats(space, q, k, rows, 0.35, None, last_rows=6)
    last = layer_option_stats(space, q, k, rows[-6:], 0.35, None)
    torch.testing.assert_close(full["kl_last"], last["kl"])
    assert not torch.equal(full["kl_last"], full["kl"])
    assert torch.equal(layer_option_stats(space, q, k, rows, 0.35, None)["kl_last"], torch.zeros_like(full["kl"]))


def test_last_weight_recipe_errors_name_the_key():
    with pytest.raises(RecipeError, match=r"profiling\.last_weight"):
        load_recipe(dict(TINY, profiling=dict(TINY["profiling"], last_weight=1.5)))
    with pytest.raises(RecipeError, match=r"profiling.*last_weight: needs last_rows > 0"):
        load_recipe(dict(TINY, profiling=dict(TINY["profiling"], last_rows=0, last_weight=0.5)))
    with pytest.raises(RecipeError, match="profiling.last_weight: weights the kl objective"):
        load_recipe(dict(TINY, objective="recall", profiling=dict(TINY["profiling"], last_weight=0.5)))
    # Unset, the option leaves the hash of existing recipes (and shipped plans' provenance) alone.
    assert "last_weight" not in json.dumps(load_recipe("budget").model_dump(exclude_none=True)["profiling"])
    weighted = load_recipe(dict(TINY, profiling=dict(TINY["profiling"], last_weight=0.5)))
    assert weighted.digest() != load_recipe(TINY).digest()


@needs(STORIES)
def test_last_weight_reallocates_from_one_profile(stories, tmp_path, monkeypatch):
    import patchattn.calibration as calibration

    model, tok = stories

    def recipe(w):
        return dict(TINY, profiling=dict(TINY["profiling"], last_weight=w))

    plain = tiny_calibrate(model, tok, cache=tmp_path)
    monkeypatch.setattr(calibration, "profile_prompt", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("last_weight must not need new forwards")))
    # The last rows' natural share of the rows gives back the plain objective's allocation.
    share = TINY["profiling"]["last_rows"] / TINY["profiling"]["rows"]
    same = tiny_calibrate(model, tok, cache=tmp_path, recipe=recipe(share))
    assert same.layers == plain.layers
    only_last = tiny_calibrate(model, tok, cache=tmp_path, recipe=recipe(1.0))
    assert only_last.layers != plain.layers
    assert only_last.calibration["recipe"]["hash"] != plain.calibration["recipe"]["hash"]


# ----------------------------------------------------------------------------- layer sensitivity
def test_sensitivity_recipe_errors_name_the_key():
    with pytest.raises(RecipeError, match=r"sensitivity\.prompts"):
        load_recipe(dict(TINY, sensitivity={"prompts": 0}))
    with pytest.raises(RecipeError, match=r"sensitivity\.temper"):
        load_recipe(dict(TINY, sensitivity={"temper": 1.5}))
    with pytest.raises(RecipeError, match="sensitivity: converts the kl or recall objective"):
        load_recipe(dict(TINY, objective="output", sensitivity={}))
    with pytest.raises(RecipeError, match="sensitivity: weights the objective of budget recipes"):
        load_recipe(dict(TINY, kind="target_recall", target_recall=0.9, sensitivity={}))
    no_vs = {k: v for k, v in TINY["candidates"].items() if k != "vertical_slash"}
    with pytest.raises(RecipeError, match="sensitivity: its probe is a vertical_slash candidate"):
        load_recipe(dict(TINY, candidates=no_vs, sensitivity={}))
    # Unset, it leaves existing recipes' hashes alone; set, it changes the hash.
    assert load_recipe(dict(TINY, sensitivity=None)).digest() == load_recipe(TINY).digest()
    assert load_recipe(dict(TINY, sensitivity={})).digest() != load_recipe(TINY).digest()


def test_sensitivity_weights():
    from patchattn.calibration import sensitivity_weights

    e2e = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=torch.float64)
    local = torch.tensor([1.0, 1.0, 0.0, 4.0], dtype=torch.float64)
    w = sensitivity_weights(e2e, local)
    # damage per unit of local loss: 0.1, 0.4, (untouched layer: mean of the others 0.2), 0.05
    raw = torch.tensor([0.1, 0.4, (0.1 + 0.4 + 0.05) / 3, 0.05], dtype=torch.float64)
    torch.testing.assert_close(w, raw / raw.mean())
    assert abs(float(w.mean()) - 1.0) < 1e-12
    # temper t: the ratios raised to t before normalising (0.5: the spread shrinks to its root)
    half = sensitivity_weights(e2e, local, temper=0.5)
    root = raw[[0, 1, 3]].sqrt()
    root = torch.tensor([root[0], root[1], root.mean(), root[2]], dtype=torch.float64)
    torch.testing.assert_close(half, root / root.mean())
    assert float(half.max() / half.min()) < float(w.max() / w.min())


@needs(STORIES)
def test_layer_sensitivity_measures_end_to_end_kl(stories):
    """The per-layer KL is zero for a probe that keeps every pair, equals the KL of patching that
    one layer by hand (a full forward: the replayed dense prefix changes nothing) for a sparse
    probe, and is positive somewhere; the local losses are the probe's per-head kl / lost mass on
    the same rows; the layers' own forwards are back afterwards."""
    from patchattn.calibration import build_plan, decoder_layers, layer_sensitivity
    from patchattn.patching import patched
    from patchattn.profiling import verify_plan

    model, tok = stories
    rcp = load_recipe(dict(TINY, sensitivity={"prompts": 1}))
    ids = [tok(t)["input_ids"] for t in story_prompts(1)]
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    keep_all = {"method": "streaming", "params": {"sink": 4, "window": {"scale": 4.0, "power": 1.0, "min": 0}}}
    e2e, local_kl, local_lost = layer_sensitivity(model, ids, keep_all, 96, rcp, 0, False)
    assert float(e2e.abs().max()) < 1e-9  # fp32 sums of the kept mass: 1 to ~1e-7
    assert float(local_kl.abs().max()) < 1e-6 and float(local_lost.abs().max()) < 1e-6
    probe = {"method": "vertical_slash", "params": {"vertical": {"scale": 0.05}, "slash": {"scale": 0.05},
                                                    "last_q": 16, "window": 8}}
    kl, local_kl, local_lost = layer_sensitivity(model, ids, probe, 96, rcp, 0, False)
    assert bool((kl > 0).any()) and bool((kl >= -1e-12).all())
    layers = decoder_layers(model)
    assert len(layers) == n_layers and all("forward" not in layer.__dict__ for layer in layers)
    layer = int(kl.argmax())
    assert layer > 0  # a probed layer with a replayed prefix
    rows = sample_rows(96, 24, 6, torch.Generator().manual_seed(0 * 7919 + 0 + 0x5E45))
    everywhere = build_plan(model, [[probe] * n_heads for _ in range(n_layers)], {})
    probed = verify_plan(model, everywhere, ids[0][:96], rows)
    torch.testing.assert_close(local_kl, probed["kl"])
    torch.testing.assert_close(local_lost, 1 - probed["recall"])
    assert float(local_kl.min()) >= 0 and float(local_kl.max()) > 0
    x = torch.tensor([ids[0][:96]])
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=x, use_cache=False).logits[0, rows].double(), -1)
        dense = {"method": "dense", "params": {}}
        specs = [[probe if l == layer else dense] * n_heads for l in range(n_layers)]
        with patched(model, build_plan(model, specs, {})):
            lp = torch.log_softmax(model(input_ids=x, use_cache=False).logits[0, rows].double(), -1)
    torch.testing.assert_close(kl[layer], (ref.exp() * (ref - lp)).sum(-1).mean(), rtol=1e-6, atol=1e-9)


@needs(STORIES)
def test_sensitivity_recipe_reweights_and_caches(stories, tmp_path, monkeypatch):
    import patchattn.calibration as calibration

    model, tok = stories
    plain = tiny_calibrate(model, tok, cache=tmp_path)
    weighted = tiny_calibrate(model, tok, cache=tmp_path, recipe=dict(TINY, sensitivity={"prompts": 2}))
    info = weighted.calibration["layer_sensitivity"]
    n_layers = model.config.num_hidden_layers
    assert info["length"] == 64 and info["prompts"] == 2 and info["probe"]["method"] == "vertical_slash"
    assert len(info["kl"]) == len(info["weight"]) == n_layers
    assert abs(sum(info["weight"]) / n_layers - 1.0) < 1e-3
    assert "layer_sensitivity" not in plain.calibration
    assert weighted.layers != plain.layers  # the weights moved the allocation
    # Re-allocation from the cache needs no forward of any kind, and gives the same bytes.
    for name in ("profile_prompt", "layer_sensitivity"):
        monkeypatch.setattr(calibration, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("cached")))
    again = tiny_calibrate(model, tok, cache=tmp_path, recipe=dict(TINY, sensitivity={"prompts": 2}))
    assert again.to_json() == weighted.to_json()



def test_shipped_plan_records_the_hash_of_the_shipped_recipe():
    """Options added to the recipe schema keep the hash of recipes that leave them unset, so the
    shipped plan's provenance still names the shipped recipe (a rerun reproduces it)."""
    import patchattn

    shipped = Path(patchattn.__file__).parent / "plans" / "smollm2-135m.budget.json"
    plan = json.loads(shipped.read_text())
    assert plan["calibration"]["recipe"]["hash"] == load_recipe("budget").digest()
    vs = TINY["candidates"]["vertical_slash"]  # spread_q: 0 is the unset hash, any other value a new one
    same = dict(TINY, candidates=dict(TINY["candidates"], vertical_slash=dict(vs, spread_q=0)))
    other = dict(TINY, candidates=dict(TINY["candidates"], vertical_slash=dict(vs, spread_q=16)))
    assert load_recipe(same).digest() == load_recipe(TINY).digest() != load_recipe(other).digest()


# ----------------------------------------------------------------------------- answers stage
def test_answers_recipe_errors_name_the_key():
    with pytest.raises(RecipeError, match=r"answers\.prompts"):
        load_recipe(dict(TINY, answers={"prompts": 0}))
    with pytest.raises(RecipeError, match=r"answers\.min_depth"):
        load_recipe(dict(TINY, answers={"min_depth": 1.5}))
    with pytest.raises(RecipeError, match="answers: revises the dense heads of budget recipes"):
        load_recipe(dict(TINY, kind="target_recall", target_recall=0.9, answers={}))
    no_vs = {k: v for k, v in TINY["candidates"].items() if k != "vertical_slash"}
    with pytest.raises(RecipeError, match="answers: heads switch to a vertical_slash candidate"):
        load_recipe(dict(TINY, candidates=no_vs, answers={}))
    assert load_recipe(dict(TINY, answers=None)).digest() == load_recipe(TINY).digest()
    assert load_recipe(dict(TINY, answers={})).digest() != load_recipe(TINY).digest()


ANSWERS = {"length": 200, "prompts": 2, "min_gain": 0.0, "max_nll_increase": 1.0}


@needs(STORIES)
def test_answers_stage_switches_the_heads_that_raise_the_margin(stories):
    """Every dense head of the allocated plan is tried; a head's gain is the margin change a
    full forward of the plan with that head switched gives (the replayed prefix changes
    nothing); heads gaining more than min_gain run the probe in the result, the others stay."""
    from patchattn.calibration import build_plan
    from patchattn.evals import synthetic
    from patchattn.patching import patched
    from patchattn.profiling import answer_margins, answer_token

    model, tok = stories
    plain = tiny_calibrate(model, tok)
    plan = tiny_calibrate(model, tok, recipe=dict(TINY, answers=ANSWERS))
    info = plan.calibration["answers"]
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    dense = [(l, h) for l in range(n_layers) for h in range(n_heads) if plain.head_spec(l, h).method == "dense"]
    assert sorted(info["gains"]) == sorted(f"{l}.{h}" for l, h in dense)
    switched = {(l, h) for l, h in info["switched"]}
    assert switched == {(l, h) for l, h in dense if info["gains"][f"{l}.{h}"] > 0}
    assert switched and len(switched) < len(dense)  # this tiny case has both kinds
    for l, h in dense:
        spec = plan.head_spec(l, h)
        if (l, h) in switched:
            assert spec.method == info["probe"]["method"]
            assert all(spec.params[k] == v for k, v in info["probe"]["params"].items())
        else:
            assert spec.method == "dense"
    samples = [s for s in synthetic.generate_samples("passkey", tok, 200, 8, seed=20_000) if s.depth >= 0.5][:2]
    assert info["depths"] == [round(s.depth, 4) for s in samples]

    def margin(p):
        total = 0.0
        for s in samples:
            ids = torch.tensor([tok(s.prompt)["input_ids"]])
            with patched(model, p), torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            total += float(answer_margins(logits, [answer_token(tok, s.prompt, s.answers[0])])[0])
        return total / len(samples)

    def with_probe(heads):
        table = [[dict(method=sp.method, params=sp.params) for sp in (plain.head_spec(l, h) for h in range(n_heads))]
                 for l in range(n_layers)]
        for l, h in heads:
            table[l][h] = info["probe"]
        return build_plan(model, table, {})

    assert info["base_margin"] == pytest.approx(margin(plain), abs=1e-4)
    later = max(dense)  # a head whose layer has a replayed prefix
    assert later[0] > 0
    assert info["gains"][f"{later[0]}.{later[1]}"] == pytest.approx(margin(with_probe([later])) - margin(plain), abs=2e-4)
    assert plan.calibration["expected_density"]["128"] < plain.calibration["expected_density"]["128"]


@needs(STORIES)
def test_answers_stage_undoes_switches_that_cost_text_loss(stories):
    """With no next-token loss allowed, switches are undone (smallest gain first) until the text
    loss does not rise: the record shows a loss no higher than the allocated plan's."""
    model, tok = stories
    free = tiny_calibrate(model, tok, recipe=dict(TINY, answers=ANSWERS)).calibration["answers"]
    assert free["nll"]["switched"] > free["nll"]["allocated"]  # the switches cost text loss here
    strict = tiny_calibrate(model, tok, recipe=dict(TINY, answers=dict(ANSWERS, max_nll_increase=0.0)))
    info = strict.calibration["answers"]
    assert len(info["switched"]) < len(free["switched"])
    assert info["nll"]["switched"] <= info["nll"]["allocated"]
    by_gain = sorted(free["switched"], key=lambda lh: -free["gains"][f"{lh[0]}.{lh[1]}"])
    assert sorted(info["switched"]) == sorted(by_gain[:len(info["switched"])])
