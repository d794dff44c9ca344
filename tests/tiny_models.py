"""Tiny random-weight decoders of the architectures patchattn supports (built from configs)."""

import zlib

import torch
import transformers

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
                              "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8, "attn_logit_softcapping": 20.0,
                                "final_logit_softcapping": 10.0, "query_pre_attn_scalar": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16,
                                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    "phi3": ("Phi3Config", {"num_key_value_heads": 2}),
}


# Gemma2 refuses SDPA in transformers 5.x (softcapping); it runs eager.
DEFAULT_IMPLEMENTATION = {"gemma2": "eager"}


def tiny_model(arch: str, attn_implementation: str = None):
    cls_name, extra = CONFIGS[arch]
    attn_implementation = attn_implementation or DEFAULT_IMPLEMENTATION.get(arch, "sdpa")
    config = getattr(transformers, cls_name)(**{**COMMON, **extra})
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval().float()


def left_padded_batch(lengths=(24, 17), vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, n - length:] = torch.randint(3, vocab, (length,), generator=g)
        mask[i, n - length:] = 1
    return ids, mask


def stable_seed(*parts) -> int:
    """A seed from test parameters that is the same in every run (Python's hash() of strings is
    salted per process, which made parametrised inputs, and so these tests, vary between runs)."""
    return zlib.crc32(repr(parts).encode())



def padded_causal_ctx(batch: int, n: int, pad: int, scale: float, device=None, estimator_layout: bool = False):
    """A causal n x n mask whose last batch row is left-padded by `pad` tokens, and the
    AttnContext a method's select() sees for it: (padding, mask, ctx). `estimator_layout` gives
    the ctx the minimal kernel layout (no sliding window, kv_start) that sends the estimators down
    their Triton path."""
    import types

    from patchattn.methods.base import AttnContext
    from patchattn.patching import causal_lazy_mask

    padding = torch.ones(batch, n, dtype=torch.long, device=device)
    padding[-1, :pad] = 0
    mask = causal_lazy_mask(batch, n, n, padding if pad else None,
                            device=None if device is None else torch.device(device))
    q_pos, k_pos = mask.positions()
    layout = (types.SimpleNamespace(sliding_window=None, kv_start=mask.kv_start().to(torch.int32))
              if estimator_layout else None)
    ctx = AttnContext(q_pos=q_pos, k_pos=k_pos, kv_start=mask.kv_start(), base_rows=mask.rows, scale=scale,
                      softcap=None, layer=0, layout=layout)
    return padding, mask, ctx
