"""`patchattn eval`: greedy generation, dense vs patched results files (stories260k, real weights)."""

import json

import pytest
import torch

from conftest import STORIES, needs
from patchattn.evals.runner import eval_main, greedy_generate

pytestmark = needs(STORIES)


@pytest.fixture(scope="module")
def stories():
    from patchattn import models

    return models.load(str(STORIES))


@pytest.fixture(scope="module")
def plan_path(stories, tmp_path_factory):
    import patchattn

    path = tmp_path_factory.mktemp("plan") / "plan.json"
    patchattn.Plan.uniform(stories[0], "streaming", {"sink": 4, "window": 32}).save(path)
    return path


def test_greedy_matches_generate_and_batching(stories):
    model, tok = stories
    prompts = ["Once upon a time, there was a little girl named Lily. She", "The cat sat on the"]
    singles = [greedy_generate(model, tok, [p], 10)[0][0] for p in prompts]
    batched, prefill_s = greedy_generate(model, tok, prompts, 10)
    assert batched == singles  # left padding + position ids reproduce the unpadded runs
    assert prefill_s > 0
    ids = tok(prompts[0], return_tensors="pt")
    ref = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    assert singles[0] == tok.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_greedy_stops_at_stop_sequence(stories):
    model, tok = stories
    text, _ = greedy_generate(model, tok, ["Tom and Lily went to the park. They"], 60, stop=(".",))
    assert "." not in text and text


def test_eval_dense_and_patched(tmp_path, plan_path, capsys):
    out = tmp_path / "out"
    rc = eval_main(["--model", str(STORIES), "--plan", str(plan_path), "--tasks", "passkey,niah_single",
                    "--lengths", "256,384", "--samples", "2", "--out", str(out),
                    "--max-new-tokens", "6"])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    cells = {(r["task"], r["length"]): r for r in result["results"]}
    assert set(cells) == {(t, n) for t in ("passkey", "niah_single") for n in (256, 384)}
    for r in cells.values():
        assert 0 <= r["dense"] <= 1 and 0 <= r["patched"] <= 1
        assert r["delta"] == pytest.approx(r["patched"] - r["dense"])
        assert 0 < r["density"] < 1  # window 32 of ~256-384 tokens
        assert r["prefill_s_dense"] > 0 and r["prefill_s_patched"] > 0
    assert cells[("passkey", 384)]["density"] < cells[("passkey", 256)]["density"]
    assert len(result["samples"]) == 8 and all(s["patched"]["completion"] is not None for s in result["samples"])
    table = (out / "results.md").read_text()
    assert "| passkey | 384 |" in table and "density" in table
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "| niah_single | 256 |" in capsys.readouterr().out


def test_eval_dense_only(tmp_path, stories):
    out = tmp_path / "dense"
    eval_main(["--model", str(STORIES), "--tasks", "passkey", "--lengths", "256", "--samples", "1",
               "--out", str(out), "--max-new-tokens", "4", "--no-warmup"])
    (row,) = json.loads((out / "results.json").read_text())["results"]
    assert row["patched"] is None and row["density"] is None and row["dense"] in (0.0, 1.0)
    assert "| passkey | 256 |" in (out / "results.md").read_text()
    assert torch.is_grad_enabled()
