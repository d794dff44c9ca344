"""lm-evaluation-harness model ``patchattn``: a Hugging Face model loaded by patchattn, then patched.

lm-eval 0.4.x finds models only in its own registry (it reads no ``lm_eval.models`` entry
points), so the model is registered when this module is imported. ``lm_eval_main`` runs lm-eval's
own CLI after that import::

    patchattn lm-eval --model patchattn \\
        --model_args pretrained=smollm2-135m,plan=plan.json --tasks patchattn_passkey_4k \\
        --include_path tasks/

model_args: ``pretrained`` (folder, hub id, .gguf path or alias such as ``smollm2-135m``),
``plan`` (plan JSON; absent = dense baseline), ``gguf_file``, ``dtype`` (default float32 on CPU,
bfloat16 on CUDA), plus any HFLM argument (``max_length``, ``batch_size``, ...). ``max_length``
defaults to the context + 128 tokens on rotary models, so prompts sized to the full context are
not left-truncated to make room for the answer.
"""

from __future__ import annotations

import logging
import sys
from typing import List, Optional

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from . import models
from .plan import Plan

log = logging.getLogger(__name__)

__all__ = ["PatchAttnLM", "lm_eval_main"]


def _device(device: Optional[str]) -> str:
    # lm-eval passes its --device (None unless given); fall back to what this machine has.
    if device and not (device.startswith("cuda") and not torch.cuda.is_available()):
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(dtype, device: str) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))


# Generation room past the model's context for prompts sized to the full context (the synthetic
# tasks' largest budget is 96 new tokens).
GENERATION_ROOM = 128


def _default_max_length(model) -> Optional[int]:
    """HFLM left-truncates prompts to max_length - max_gen_toks, which would cut the beginning
    (instructions, shallow needles) off a task sized to the model's full context. Rotary models
    decode a few dozen tokens past their trained context, so for them allow context + room;
    others (learned position tables) keep HFLM's own limit (None)."""
    cfg = model.config.get_text_config()
    rotary = getattr(cfg, "rope_theta", None) is not None or getattr(cfg, "rope_parameters", None)
    context = getattr(cfg, "max_position_embeddings", None)
    return context + GENERATION_ROOM if rotary and context else None


@register_model("patchattn")
class PatchAttnLM(HFLM):
    """HFLM over a model from ``patchattn.models.load``, patched with ``plan`` when one is given."""

    def __init__(self, pretrained: str, plan: Optional[str] = None, gguf_file: Optional[str] = None,
                 dtype=None, device: Optional[str] = None, **kwargs):
        from . import patch_model, reset_stats

        device = _device(device)
        model, tokenizer = models.load(str(pretrained), dtype=_dtype(dtype, device), device=device,
                                       gguf_file=gguf_file)
        self.plan_path = plan
        if plan:
            patch_model(model, Plan.load(plan))
            reset_stats(model)
        if kwargs.get("max_length") is None and (room := _default_max_length(model)):
            kwargs["max_length"] = room
        # HFLM takes a ready model object; it then ignores loading options such as revision.
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self.spec = str(pretrained)

    def get_model_info(self) -> dict:
        """Run metadata for lm-eval's results file (called after evaluation, so stats are final).

        Replaces HFLM's version, which asks the hub for a revision hash (no hub here).
        """
        info = {
            "model_spec": self.spec,
            "model_num_parameters": sum(p.numel() for p in self._model.parameters()),
            "model_dtype": str(self._model.dtype),
            "patchattn_plan": self.plan_path,
            "patchattn_density": None,
        }
        if self.plan_path:
            from . import stats

            info["patchattn_density"] = stats(self._model).density
            log.warning("patchattn: realized sparse-prefill density %s", info["patchattn_density"])
        return info


def lm_eval_main(argv: Optional[List[str]] = None) -> int:
    """lm-eval's CLI with the ``patchattn`` model registered; `argv` as after ``lm-eval``."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["lm-eval", *args]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(lm_eval_main())
