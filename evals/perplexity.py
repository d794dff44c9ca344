"""Perplexity of a (possibly patched) model on a text, in non-overlapping windows."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm


def default_text() -> str:
    """English text available on any Python install (the stdlib's pydoc topic help)."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def read_text(path: Optional[str]) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace") if path else default_text()


def token_windows(tokenizer, text: str, max_tokens: int, window: int):
    """Token id windows of `window` tokens (BOS first when the tokenizer has one)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]
    bos = tokenizer.bos_token_id
    body = window - 1 if bos is not None else window
    return [([bos] if bos is not None else []) + ids[i:i + body] for i in range(0, len(ids), body)
            if len(ids[i:i + body]) > 1]


@torch.no_grad()
def perplexity(model, tokenizer, text: str, max_tokens: int = 8192, window: int = 4096, progress: bool = True) -> dict:
    """exp(mean next-token NLL) over windows; returns ppl, tokens scored, seconds."""
    nll, count, seconds = 0.0, 0, 0.0
    windows = token_windows(tokenizer, text, max_tokens, window)
    device = next(model.parameters()).device
    for ids in tqdm(windows, desc="perplexity", disable=not progress, leave=False):
        input_ids = torch.tensor([ids], device=device)
        start = time.perf_counter()
        logits = model(input_ids=input_ids).logits[0, :-1].float()
        if device.type == "cuda":  # kernels run asynchronously: time the work, not the launch
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        nll += torch.nn.functional.cross_entropy(logits, input_ids[0, 1:], reduction="sum").item()
        count += input_ids.shape[1] - 1
    return {"ppl": math.exp(nll / count), "tokens": count, "windows": len(windows), "seconds": seconds}
