"""`patchattn eval`: greedy generation, dense vs patched results files (stories260k, real weights)."""

import json

import pytest
import torch

from conftest import STORIES, needs
from patchattn.evals.runner import eval_main, greedy_generate

pytestmark = needs(STORIES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # stories260k's matrices are tiny: a second OpenMP thread only adds barriers, and on shared
    # CI cores a descheduled thread stalls each of them (measured 3-10x slower under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_batched_eval_matches_unbatched(tmp_path, stories, plan_path):
    """Left-padded batches give the same completions as one prompt at a time, dense and patched,
    and the realized density is unchanged (padding is not counted as computed or valid pairs)."""
    import patchattn
    from patchattn.evals.runner import build_samples, evaluate

    model, tok = stories
    samples = build_samples(tok, ["passkey", "niah_single"], [300], n=3, seed=3)
    assert len({s.n_tokens for job in samples.values() for s in job}) > 1  # padding really happens
    plan = patchattn.Plan.load(plan_path)
    checkpoints = []
    runs = [evaluate(model, tok, samples, plan, batch_size=bs, max_new_tokens=5, progress=False,
                     checkpoint=checkpoints.append) for bs in (1, 3)]
    for one, batched in zip(*(r["samples"] for r in runs)):
        assert one["dense"]["completion"] == batched["dense"]["completion"]
        assert one["patched"]["completion"] == batched["patched"]["completion"]
    for one, batched in zip(*(r["results"] for r in runs)):
        assert (one["batch_size"], batched["batch_size"]) == (1, 3)
        assert batched["density"] == pytest.approx(one["density"], rel=1e-6)
        assert one["sparse_calls"] > 0 and batched["sparse_calls"] < one["sparse_calls"]
    # The dense-only checkpoint comes before the patched pass.
    assert [r["patched"] for r in checkpoints[0]["results"]] == [None, None]
    assert not patchattn.is_patched(model)


def test_resolve_batch_size():
    from patchattn.evals.runner import TOKENS_PER_BATCH, resolve_batch_size

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_batch_size("auto", cpu, 8192, 20) == 1
    assert resolve_batch_size("auto", cuda, 8192, 20) == TOKENS_PER_BATCH // 8192
    assert resolve_batch_size("auto", cuda, 2048, 20) == min(20, TOKENS_PER_BATCH // 2048)
    assert resolve_batch_size("auto", cuda, 512, 3) == 3  # never more than the samples
    assert resolve_batch_size("auto", cuda, 10 ** 6, 3) == 1
    assert resolve_batch_size(4, cpu, 8192, 20) == 4


def test_bad_arguments_fail_clearly(tmp_path, capsys, plan_path):
    base = ["--model", str(STORIES), "--samples", "1", "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as e:
        eval_main(base + ["--tasks", "passkey,nope", "--lengths", "256"])
    assert e.value.code == 2 and "unknown task(s) ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(base + ["--tasks", "passkey", "--lengths", "256", "--dtype", "float8"])
    assert "invalid choice" in capsys.readouterr().err
    # stories260k has a 512-token context: refuse before any timed work or output.
    assert eval_main(base + ["--tasks", "passkey", "--lengths", "256,1024"]) == 2
    err = capsys.readouterr().err
    assert "[1024] exceed the model's context of 512 tokens" in err
    assert not (tmp_path / "x").exists()
    assert eval_main(base + ["--tasks", "passkey", "--lengths", "256", "--plan", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert eval_main(base + ["--tasks", "passkey", "--lengths", "256", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_plan_for_another_model_fails_before_dense_pass(tmp_path, capsys):
    import patchattn
    from tiny_models import tiny_model

    other = tmp_path / "other.json"
    patchattn.Plan.uniform(tiny_model("llama"), "streaming", {"sink": 4, "window": 32}).save(other)
    rc = eval_main(["--model", str(STORIES), "--plan", str(other), "--tasks", "passkey", "--lengths", "256",
                    "--samples", "1", "--out", str(tmp_path / "o")])
    assert rc == 2 and "plan is for another model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_dense_below_cells_are_marked(stories):
    """Prompts below the plan's dense_below run dense: the cell says so instead of a density."""
    import patchattn
    from patchattn.evals.runner import build_samples, evaluate, markdown_table

    model, tok = stories
    plan = patchattn.Plan.uniform(model, "streaming", {"sink": 4, "window": 32}, dense_below=320)
    samples = build_samples(tok, ["passkey"], [256, 384], n=1)
    result = evaluate(model, tok, samples, plan, max_new_tokens=2, warmup=False, progress=False)
    short, long = result["results"]
    assert short["density"] is None and short["dense_fallback_share"] == 1.0
    assert short["patched"] == short["dense"]  # it really ran dense
    assert long["dense_fallback_share"] == 0.0 and 0 < long["density"] < 1
    table = markdown_table(result)
    assert "| 1 (all dense_below) |" in table and f"| {long['density']:.3f} |" in table


def test_prefill_repeats_time_the_same_forward(stories):
    """Repeated (timed) prefills do not change the completion; telemetry sees every forward."""
    import patchattn

    model, tok = stories
    prompt = "Once upon a time, there was a little dog named Max. He"
    once, _ = greedy_generate(model, tok, [prompt], 8)
    plan = patchattn.Plan.uniform(model, "streaming", {"sink": 2, "window": 4})
    with patchattn.patched(model, plan):
        calls = []
        for repeats in (1, 3):
            patchattn.reset_stats(model)
            texts, seconds = greedy_generate(model, tok, [prompt], 8, prefill_repeats=repeats)
            calls.append(patchattn.stats(model).sparse_calls)
            assert seconds > 0
        assert calls[1] == 3 * calls[0] > 0
    assert greedy_generate(model, tok, [prompt], 8, prefill_repeats=2)[0] == once
