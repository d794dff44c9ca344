"""patch_model / unpatch_model: route a model's attention through a plan.

transformers 5.x dispatches attention by name: each attention module calls
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` and the model builds its masks with
``ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]``. We register one name,
``patchattn``, in both interfaces and point the decoder config at it. The per-layer plan lives on
the attention modules, so two models that share nothing but the global registry never affect
each other, and modules without plan state run the implementation they had before.

The mask function does not build a mask: it returns a `LazyMask` that remembers its arguments.
Sparse paths evaluate it a chunk of query rows at a time; dense paths (decode steps, short
prompts, all-dense layers) call the original implementation with the original mask, so they
are bit-for-bit the unpatched model.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import backends
from .kernels.reference import chunked_attention
from .methods import get_method
from .methods.base import AllPairs, AttnContext, SparseMethod
from .plan import Plan, PlanError, text_config
from .telemetry import LayerStats

IMPLEMENTATION = "patchattn"
_ORIGINAL_ATTR = "_patchattn_original_implementation"
_LAYER_ATTR = "_patchattn_layer"
_MODEL_ATTR = "_patchattn_state"


class UnsupportedModelError(ValueError):
    """The model's attention cannot be patched faithfully."""


# ------------------------------------------------------------------------------- masks
_SDPA_MASK_PARAMS = set(inspect.signature(sdpa_mask).parameters)


class LazyMask:
    """The arguments of one mask-interface call, evaluated on demand.

    `rows(start, end)` gives the boolean base mask (causal, padding, sliding window, whatever
    the model asked for) for a chunk of query rows; `original()` builds exactly the mask the
    unpatched implementation would have received.
    """

    def __init__(self, kwargs: dict):
        self.kwargs = kwargs
        self._original = None
        self._original_built = False
        self._kv_start = None
        self.layouts = {}  # backends.kernel_layout's answers for this mask, by call shape

    @property
    def shape(self):
        k = self.kwargs
        return (k["batch_size"], 1, k["q_length"], k["kv_length"])

    @property
    def device(self):
        return torch.device(self.kwargs.get("device", "cpu"))

    def original(self):
        if not self._original_built:
            name = getattr(self.kwargs.get("config"), _ORIGINAL_ATTR, None) or "sdpa"
            mask_fn = ALL_MASK_ATTENTION_FUNCTIONS[name] if name in ALL_MASK_ATTENTION_FUNCTIONS else sdpa_mask
            self._original = mask_fn(**self.kwargs)
            self._original_built = True
        return self._original

    def rows(self, start: int, end: int) -> torch.Tensor:
        k = dict(self.kwargs)
        k.update(q_length=end - start, q_offset=k.get("q_offset", 0) + start,
                 allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        return sdpa_mask(**{name: v for name, v in k.items() if name in _SDPA_MASK_PARAMS})

    def positions(self):
        k = self.kwargs
        device = self.device
        q_pos = torch.arange(k["q_length"], device=device) + k.get("q_offset", 0)
        k_pos = torch.arange(k["kv_length"], device=device) + k.get("kv_offset", 0)
        return q_pos, k_pos

    def kv_start(self) -> torch.Tensor:
        """Absolute position of each batch row's first valid key (left padding)."""
        if self._kv_start is None:
            k = self.kwargs
            padding = k.get("attention_mask")
            if padding is None:
                self._kv_start = torch.full((k["batch_size"],), k.get("kv_offset", 0), device=self.device)
            else:
                padding = padding.to(torch.bool)
                first = padding.int().argmax(dim=-1)
                self._kv_start = torch.where(padding.any(dim=-1), first, padding.shape[-1])
        return self._kv_start


def patchattn_mask(**kwargs) -> LazyMask:
    return LazyMask(kwargs)


def _tensor_context(mask: Optional[torch.Tensor], batch: int, q_len: int, kv_len: int, device, sliding_window):
    """Base mask from a materialised 4D mask (user-supplied) or, if None, plain causal."""
    q_pos = torch.arange(q_len, device=device) + (kv_len - q_len)
    k_pos = torch.arange(kv_len, device=device)
    if mask is None:
        def rows(start, end):
            d = q_pos[start:end, None] - k_pos[None, :]
            keep = d >= 0
            if sliding_window:
                keep &= d < sliding_window
            return keep[None, None]
        return rows, q_pos, k_pos, torch.zeros(batch, dtype=torch.long, device=device)
    if mask.shape[1] != 1:
        raise UnsupportedModelError("patchattn: per-head 4D attention masks are not supported")
    keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    keep = keep[..., -kv_len:]
    last_row = keep[:, 0, -1, :]
    kv_start = torch.where(last_row.any(-1), last_row.int().argmax(-1), kv_len)
    return (lambda start, end: keep[:, :, start:end]), q_pos, k_pos, kv_start


# ------------------------------------------------------------------------------- layer state
@dataclass
class HeadGroup:
    method: SparseMethod
    q_heads: torch.Tensor  # long [h]: query heads this method runs on
    _on_device: Dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    _whole_groups: Dict[int, bool] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_dense(self) -> bool:
        return self.method.name == "dense"

    def whole_kv_groups(self, group_size: int) -> bool:
        if group_size not in self._whole_groups:
            self._whole_groups[group_size] = backends.whole_kv_groups(self.q_heads, group_size)
        return self._whole_groups[group_size]

    def heads_on(self, device: torch.device) -> torch.Tensor:
        """q_heads on `device`, copied once: a pageable host-to-GPU copy synchronises the stream
        (torch's copy_ waits for it), which would stall every patched layer's prefill."""
        if device not in self._on_device:
            self._on_device[device] = self.q_heads.to(device)
        return self._on_device[device]


@dataclass
class LayerState:
    layer: int
    groups: List[HeadGroup]
    dense_below: int
    original: str
    stats: LayerStats
    head_methods: List[str] = field(default_factory=list)

    @property
    def all_dense(self) -> bool:
        return all(g.is_dense for g in self.groups)


def _layer_state(plan: Plan, layer: int, original: str) -> LayerState:
    info = plan.model
    by_spec: Dict[str, List[int]] = {}
    specs = {}
    head_methods = []
    for h in range(info.num_q_heads):
        spec = plan.head_spec(layer, h)
        key = spec.key()
        by_spec.setdefault(key, []).append(h)
        specs[key] = spec
        head_methods.append(spec.method)
    groups = [
        HeadGroup(get_method(specs[key].method)(specs[key].params), torch.tensor(heads, dtype=torch.long))
        for key, heads in by_spec.items()
    ]
    return LayerState(layer, groups, plan.defaults.dense_below, original,
                      LayerStats(layer, head_methods), head_methods)


# ------------------------------------------------------------------------------- attention
def original_attention(module, name: str):
    """The attention function the module used before patching."""
    default = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if name == "eager" or name is None:
        if default is None:
            raise UnsupportedModelError(f"{type(module).__name__}: no eager_attention_forward to fall back to")
        return default
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, default)


def _run_original(module, name, query, key, value, attention_mask, **kwargs):
    if isinstance(attention_mask, LazyMask):
        attention_mask = attention_mask.original()
    return original_attention(module, name)(module, query, key, value, attention_mask, **kwargs)


def patchattn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    **kwargs,
):
    """Attention for one layer following the plan; same contract as transformers' backends."""
    state: Optional[LayerState] = getattr(module, _LAYER_ATTR, None)
    passthrough = dict(dropout=dropout, scaling=scaling, **kwargs)
    if sliding_window is not None:
        passthrough["sliding_window"] = sliding_window
    if softcap is not None:
        passthrough["softcap"] = softcap
    if state is None:  # a module of another model sharing this config: behave as before
        name = getattr(module.config, _ORIGINAL_ATTR, "sdpa")
        return _run_original(module, name, query, key, value, attention_mask, **passthrough)

    q_len, kv_len = query.shape[-2], key.shape[-2]
    reason = None
    if q_len == 1:
        reason = "decode"
    elif kv_len < state.dense_below or kv_len < backends.kernel_dense_below(state, query):
        reason = "short_prompt"
    elif state.all_dense:
        reason = "dense_plan"
    if reason is not None:
        if reason == "dense_plan":
            state.stats.record_dense_prefill(_valid_pairs(attention_mask, query, key, sliding_window))
        else:
            state.stats.record_fallback(reason)
        return _run_original(module, state.original, query, key, value, attention_mask, **passthrough)

    if module.training and dropout > 0:
        raise NotImplementedError("patchattn: attention dropout during training is not supported")
    out = sparse_attention(state, query, key, value, attention_mask,
                           scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
                           softcap=softcap, sliding_window=sliding_window)
    return out.transpose(1, 2).contiguous(), None


def _base(attention_mask, query, key, sliding_window):
    batch, q_len, kv_len = query.shape[0], query.shape[-2], key.shape[-2]
    if isinstance(attention_mask, LazyMask):
        q_pos, k_pos = attention_mask.positions()
        return attention_mask.rows, q_pos, k_pos, attention_mask.kv_start()
    return _tensor_context(attention_mask, batch, q_len, kv_len, query.device, sliding_window)


def _first_positions(attention_mask, query, key):
    """(q_pos[0], k_pos[0]) of `_base`'s positions, on the host."""
    if isinstance(attention_mask, LazyMask):
        kw = attention_mask.kwargs
        return int(kw.get("q_offset", 0)), int(kw.get("kv_offset", 0))
    return key.shape[-2] - query.shape[-2], 0


def _valid_pairs(attention_mask, query, key, sliding_window) -> torch.Tensor:
    """Number of base-mask pairs per batch row (for density accounting of dense layers): in
    closed form for causal / left-padding / window masks, else summed over the mask's rows."""
    layout = backends.mask_layout(attention_mask, query, key, sliding_window)
    if layout is not None:
        return backends.base_pairs(layout)
    base_rows, q_pos, _, _ = _base(attention_mask, query, key, sliding_window)
    total = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    step = max(1, (1 << 24) // max(1, key.shape[-2]))
    for start in range(0, q_pos.numel(), step):
        total += base_rows(start, min(q_pos.numel(), start + step)).sum(dim=(1, 2, 3))
    return total


def sparse_attention(state: LayerState, query, key, value, attention_mask, *, scale, softcap, sliding_window):
    """Run every head group of a layer with its method; returns [B, H, M, D].

    Execution goes through the Triton kernels when `backends.kernel_layout` says they reproduce
    this call's base mask (CUDA tensors, causal + left padding [+ window]); otherwise, or for a
    selection without a kernel form, through the chunked torch reference.
    """
    base_rows, q_pos, k_pos, kv_start = _base(attention_mask, query, key, sliding_window)
    layout = backends.kernel_layout(attention_mask, query, key, sliding_window)
    q_start, k_start = _first_positions(attention_mask, query, key)
    ctx = AttnContext(q_pos=q_pos, k_pos=k_pos, kv_start=kv_start, base_rows=base_rows,
                      scale=scale, softcap=softcap, layer=state.layer, layout=layout,
                      q_start=q_start, k_start=k_start)
    group_size = query.shape[1] // key.shape[1]
    b, h, m, d = query.shape
    # Kernels write straight into [B, M, H, D] storage, so the caller's transpose is free.
    out = query.new_empty(b, m, h, d).transpose(1, 2)
    kept = torch.zeros(b, h, dtype=torch.long, device=query.device)
    q_pos0 = layout.q_offset if layout is not None else 0  # = q_pos[0], without a device sync
    for group in state.groups:
        heads = group.heads_on(query.device)
        kv_heads = torch.div(heads, group_size, rounding_mode="floor")
        every_head = heads.numel() == h  # q_heads are ascending, so this is query itself
        q = query if every_head else query[:, heads]
        gqa_keys = every_head and group.method.gqa_keys
        k = key if gqa_keys else key[:, kv_heads]  # else methods see one key head per query head
        selection = group.method.select(q, k, ctx)
        result = None
        if layout is not None:
            result = backends.run_group(selection, query, key, value, heads, layout, q_pos0, scale=scale,
                                        softcap=softcap, out=out if every_head else None,
                                        whole_groups=group.whole_kv_groups(group_size))
        if result is None:
            if isinstance(selection, AllPairs):
                row_mask = base_rows
            else:
                def row_mask(start, end, selection=selection):
                    return base_rows(start, end) & selection.rows(q_pos[start:end], k_pos)
            k = key[:, kv_heads] if gqa_keys else k
            o, _, kept_pairs = chunked_attention(q, k, value[:, kv_heads], row_mask, scale, softcap,
                                                 with_lse=False)
            state.stats.kernels["reference"] += 1
        else:
            o, kept_pairs, kernel = result
            state.stats.kernels[kernel] += 1
        if o is not out:
            out[:, heads] = o
        kept[:, heads] = kept_pairs.to(kept.dtype)
    valid = _valid_pairs(attention_mask, query, key, sliding_window)
    state.stats.record_sparse_prefill(kept, valid)
    return out


# ------------------------------------------------------------------------------- public API
def _register() -> None:
    AttentionInterface.register(IMPLEMENTATION, patchattn_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, patchattn_mask)


_register()


def attention_modules(model) -> Dict[int, torch.nn.Module]:
    """The decoder's self-attention modules by layer index."""
    cfg = text_config(model.config)
    found: Dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if getattr(module, "config", None) is not cfg or not isinstance(getattr(module, "layer_idx", None), int):
            continue
        if not type(module).__name__.endswith("Attention"):
            continue
        if module.layer_idx in found:
            raise UnsupportedModelError(f"two attention modules claim layer {module.layer_idx} ({name})")
        found[module.layer_idx] = module
    if len(found) != cfg.num_hidden_layers:
        raise UnsupportedModelError(
            f"unsupported architecture {type(model).__name__}: found {len(found)} attention modules with "
            f"layer_idx, expected num_hidden_layers={cfg.num_hidden_layers}"
        )
    for module in found.values():
        if hasattr(module, "sinks"):
            raise UnsupportedModelError(
                f"unsupported architecture {type(model).__name__}: learned attention sinks are not supported"
            )
    return found


@dataclass
class PatchState:
    plan: Plan
    original: str
    layers: Dict[int, LayerState]


def patch_model(model, plan: Plan):
    """Route `model`'s attention through `plan` (in place; returns the model). Idempotent."""
    if isinstance(plan, (str, bytes)) or hasattr(plan, "__fspath__"):
        plan = Plan.load(plan)
    if not isinstance(plan, Plan):
        raise TypeError(f"patch_model expects a Plan or a path to a plan JSON, got {type(plan).__name__}")
    plan.check_model(model)
    cfg = text_config(model.config)
    existing: Optional[PatchState] = getattr(model, _MODEL_ATTR, None)
    original = existing.original if existing else cfg._attn_implementation
    if original == IMPLEMENTATION:
        raise UnsupportedModelError("model config says 'patchattn' but the model carries no patch state")
    modules = attention_modules(model)
    layers = {i: _layer_state(plan, i, original) for i in modules}
    for i, module in modules.items():
        setattr(module, _LAYER_ATTR, layers[i])
    setattr(cfg, _ORIGINAL_ATTR, original)
    cfg._attn_implementation = IMPLEMENTATION
    setattr(model, _MODEL_ATTR, PatchState(plan, original, layers))
    return model


def unpatch_model(model):
    """Restore the implementation the model had before `patch_model` (no-op if not patched)."""
    state: Optional[PatchState] = getattr(model, _MODEL_ATTR, None)
    if state is None:
        return model
    cfg = text_config(model.config)
    for module in attention_modules(model).values():
        if hasattr(module, _LAYER_ATTR):
            delattr(module, _LAYER_ATTR)
    cfg._attn_implementation = state.original
    if hasattr(cfg, _ORIGINAL_ATTR):
        delattr(cfg, _ORIGINAL_ATTR)
    delattr(model, _MODEL_ATTR)
    return model


def is_patched(model) -> bool:
    return getattr(model, _MODEL_ATTR, None) is not None


def patch_state(model) -> PatchState:
    state = getattr(model, _MODEL_ATTR, None)
    if state is None:
        raise ValueError("model is not patched; call patch_model(model, plan) first")
    return state


@contextlib.contextmanager
def patched(model, plan: Plan):
    """Scoped patching: ``with patched(model, plan): model.generate(...)``."""
    previous = getattr(model, _MODEL_ATTR, None)
    patch_model(model, plan)
    try:
        yield model
    finally:
        unpatch_model(model)
        if previous is not None:
            patch_model(model, previous.plan)


def causal_lazy_mask(batch: int, q_len: int, kv_len: int, padding: Optional[torch.Tensor] = None,
                     sliding_window: Optional[int] = None, device=None) -> LazyMask:
    """The mask a causal LM builds for `q_len` new queries over `kv_len` keys (for direct use)."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    fn = sliding_window_causal_mask_function(sliding_window) if sliding_window else causal_mask_function
    if padding is not None:
        padding = padding.to(torch.bool)  # what transformers hands its mask functions
    return LazyMask(dict(batch_size=batch, q_length=q_len, kv_length=kv_len, q_offset=kv_len - q_len,
                         kv_offset=0, mask_function=fn, attention_mask=padding,
                         device=device or torch.device("cpu")))


def run_method(method: SparseMethod, query, key, value, mask: LazyMask, *, scale: float,
               softcap: Optional[float] = None, return_mask: bool = False):
    """Run one method on all heads of q [B,H,M,D], k/v [B,Hkv,N,D] (tests, calibration, benchmarks).

    Returns (out [B,H,M,D], kept_pairs [B,H]) and, if `return_mask`, the full keep mask
    [B,H,M,N] the method used (small inputs only: it is materialised).
    """
    state = LayerState(0, [HeadGroup(method, torch.arange(query.shape[1]))], 0, "sdpa",
                       LayerStats(0, [method.name] * query.shape[1]))
    out = sparse_attention(state, query, key, value, mask, scale=scale, softcap=softcap, sliding_window=None)
    kept = torch.tensor(state.stats.kept)
    if not return_mask:
        return out, kept
    group_size = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group_size, dim=1)
    q_pos, k_pos = mask.positions()
    q_start, k_start = _first_positions(mask, query, key)
    ctx = AttnContext(q_pos=q_pos, k_pos=k_pos, kv_start=mask.kv_start(), base_rows=mask.rows,
                      scale=scale, softcap=softcap, layer=0, q_start=q_start, k_start=k_start,
                      layout=backends.kernel_layout(mask, query, key, None))  # same estimators as the run
    selection = method.select(query, k, ctx)
    keep = mask.rows(0, q_pos.numel()) & selection.rows(q_pos, k_pos)
    return out, kept, keep.expand(query.shape[0], query.shape[1], -1, -1)
