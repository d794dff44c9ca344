"""Synthetic long-context tasks: determinism, needle placement, prompt length, scoring."""

import re
from collections import Counter

import pytest

from conftest import SHARED, STORIES
from patchattn.evals import synthetic
from patchattn.evals.synthetic import DEFAULT_TASKS, TASKS, generate_samples, score

HAYSTACK_TASKS = ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "variable_tracking",
                  "niah_single_uuid", "niah_single_word"]
ESSAYS = SHARED / "corpora" / "paul_graham_essays"


class WordTokenizer:
    """Stand-in tokenizer: a BOS plus one token per word or punctuation mark."""

    def __call__(self, text, verbose=True, **_):
        return {"input_ids": [1] + [0] * len(re.findall(r"\w+|[^\w\s]", text))}


@pytest.fixture(scope="module")
def stories_tok():
    if not STORIES.exists():
        pytest.skip(f"{STORIES} not present (../shared assets)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES)


def _haystack_span(sample):
    """(start, end) character span of the haystack inside the prompt."""
    start = sample.prompt.index("\n\n") + 2
    end = sample.prompt.rindex("\n\n")
    return start, end


@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_same_samples(task):
    tok = WordTokenizer()
    a = generate_samples(task, tok, 1500, 3, seed=7)
    b = generate_samples(task, tok, 1500, 3, seed=7)
    c = generate_samples(task, tok, 1500, 3, seed=8)
    assert a == b
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert [s.answers for s in a] != [s.answers for s in c]


def test_depths_spread_evenly():
    assert synthetic.depths_for(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert synthetic.depths_for(1) == [0.5]
    samples = generate_samples("passkey", WordTokenizer(), 800, 5)
    assert [s.depth for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert generate_samples("common_words", WordTokenizer(), 800, 2)[0].depth is None


@pytest.mark.parametrize("haystack", [None, "essays"])
@pytest.mark.parametrize("task", HAYSTACK_TASKS)
def test_needle_in_prompt_at_stated_depth(task, haystack):
    if haystack == "essays":
        if not ESSAYS.exists():
            pytest.skip("essays corpus absent")
        haystack = ESSAYS
    for s in generate_samples(task, WordTokenizer(), 2000, 5, haystack=haystack):
        for needle in s.needles:
            assert s.prompt.count(needle) == 1, needle
        start, end = _haystack_span(s)
        realized = (s.prompt.index(s.needles[0]) - start) / (end - start)
        assert abs(realized - s.depth) < 0.03, (task, s.depth, realized)


def test_answers_are_in_the_context():
    tok = WordTokenizer()
    for task in ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "kv_retrieval"]:
        for s in generate_samples(task, tok, 1200, 3):
            for answer in s.answers:
                assert answer in s.prompt
    s = generate_samples("variable_tracking", tok, 1200, 1)[0]
    value = re.search(r"assigned the value (\d+)", s.prompt).group(1)
    assert f"VAR {s.answers[0]} = {value}." in s.prompt
    for prev, cur in zip(s.answers, s.answers[1:]):
        assert f"VAR {cur} = VAR {prev}." in s.prompt


def test_kv_retrieval_queries_a_unique_key():
    for s in generate_samples("kv_retrieval", WordTokenizer(), 2000, 4):
        key = re.search(r'Key: "([^"]+)"', s.prompt).group(1)
        assert s.prompt.count(f'"{key}": ') == 1
        assert s.needles == (f'"{key}": "{s.answers[0]}"',)


def test_common_words_are_the_most_frequent():
    for length in (600, 4000):
        s = generate_samples("common_words", WordTokenizer(), length, 1)[0]
        listing = s.prompt.split("\n")[1]
        counts = Counter(re.findall(r"\d+\. (\w+)", listing))
        top = {w for w, _ in counts.most_common(len(s.answers))}
        assert top == set(s.answers)
        rare = max(c for w, c in counts.items() if w not in s.answers)
        assert min(counts[w] for w in s.answers) > rare


@pytest.mark.parametrize("task", list(TASKS))
def test_prompt_length_within_2_percent_stories(task, stories_tok):
    for length in (640, 1024, 4096):
        for s in generate_samples(task, stories_tok, length, 3, seed=1):
            assert len(stories_tok(s.prompt)["input_ids"]) == s.n_tokens
            assert abs(s.n_tokens - length) <= 0.02 * length, (task, length, s.n_tokens)


def test_text_haystack_file_and_folder(tmp_path, stories_tok):
    (tmp_path / "a.txt").write_text("Alpha beta gamma. Delta epsilon zeta.\n\nEta theta iota. " * 30)
    (tmp_path / "LICENSE.txt").write_text("Permission is hereby granted " * 50)
    for haystack in (tmp_path, tmp_path / "a.txt"):
        s = generate_samples("passkey", stories_tok, 1024, 2, haystack=haystack)[1]
        assert "Delta epsilon" in s.prompt and "Permission" not in s.prompt
        assert abs(s.n_tokens - 1024) <= 20
    with pytest.raises(FileNotFoundError):
        generate_samples("passkey", stories_tok, 1024, 1, haystack=tmp_path / "missing")


def test_errors():
    with pytest.raises(ValueError, match="unknown task"):
        generate_samples("nope", WordTokenizer(), 1000, 1)
    with pytest.raises(ValueError, match="cannot size"):
        generate_samples("niah_multivalue", WordTokenizer(), 40, 1)
    with pytest.raises(ValueError, match="value_kind"):
        generate_samples("niah_single", WordTokenizer(), 1000, 1, value_kind="colour")


def test_score():
    s = generate_samples("passkey", WordTokenizer(), 600, 1)[0]
    key = s.answers[0]
    assert score("passkey", s, f" {key}. Remember it.") == 1.0
    assert score("passkey", s, f"\n{key}") == 1.0  # a leading newline is not the stop
    assert score("passkey", s, " 12345") == 0.0 or key == "12345"
    assert score("passkey", s, f" unsure\nThe pass key is {key}") == 0.0  # cut at the stop "\n"
    mv = generate_samples("niah_multivalue", WordTokenizer(), 800, 1, value_kind="word")[0]
    a, b = mv.answers[:2]
    assert score("niah_multivalue", mv, f" {a.upper()} and {b}") == 0.5  # case-insensitive, partial
    assert score("niah_multivalue", mv, ", ".join(mv.answers)) == 1.0
    assert score("passkey", {"answers": ["42"], "stop": ["\n"]}, "the answer is 42") == 1.0


@pytest.mark.slow
def test_prompt_length_within_2_percent_smollm2():
    from patchattn.evals.lm_eval_tasks import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    for task in DEFAULT_TASKS:
        for length in (2048, 8192):
            for s in generate_samples(task, tok, length, 2):
                assert abs(s.n_tokens - length) <= 0.02 * length, (task, length, s.n_tokens)
