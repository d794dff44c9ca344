"""The plan: a versioned, per-layer / per-head JSON description of which attention runs where.

This module is the single place where the on-disk format is defined and validated. A plan is
produced offline (by hand or by `patchattn.calibrate`) and consumed by `patch_model`.

Layout (schema ``patchattn.plan/1``)::

    {
      "schema": "patchattn.plan/1",
      "model": {architecture, model_type, num_layers, num_q_heads, num_kv_heads, head_dim,
                sliding_window, sliding_window_layers, fingerprint, transformers_version},
      "calibration": {... free-form provenance ...} | null,
      "defaults": {"dense_below": 0, "decode": {"method": "dense"}},
      "layers": [
        {"method": "streaming", "params": {"sink": 4, "window": 512},
         "kv_heads": {"1": {"method": "dense"}},          # optional per-KV-head overrides
         "q_heads": {"5": {"method": "vertical_slash", ...}},  # optional per-q-head overrides
         "reuse_from": null},                               # layer reuse (reserved)
        ...
      ],
      "vision": null                                        # visual token pruning (reserved)
    }

Budgets that depend on the prompt length are either an int (tokens / blocks) or a rule
``{"scale": c, "power": p, "min": a, "max": b}`` meaning ``clamp(round(c * N**p), a, b)``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = "patchattn.plan/1"


class PlanError(ValueError):
    """A plan is malformed or does not fit the model it is applied to."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetRule(_Strict):
    """A length-dependent budget: ``clamp(round(scale * N**power), min, max)``."""

    scale: float = Field(gt=0)
    power: float = Field(default=1.0, ge=0, le=1)
    min: int = Field(default=0, ge=0)
    max: Optional[int] = Field(default=None, ge=0)

    def resolve(self, n: int) -> int:
        value = int(round(self.scale * float(n) ** self.power))
        value = max(value, self.min)
        return min(value, self.max) if self.max is not None else value


Budget = Union[int, BudgetRule]


def resolve_budget(budget: Budget, n: int) -> int:
    return budget.resolve(n) if isinstance(budget, BudgetRule) else int(budget)


class HeadSpec(_Strict):
    """One attention method and its parameters (validated against the method's registry entry)."""

    method: str
    params: Dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_method(self) -> "HeadSpec":
        from .methods import get_method  # late import: methods import this module

        method = get_method(self.method)  # raises PlanError naming unknown methods
        self.params = method.validate_params(self.params)
        return self

    def key(self) -> str:
        return json.dumps({"method": self.method, "params": self.params}, sort_keys=True)


class LayerSpec(HeadSpec):
    kv_heads: Dict[int, HeadSpec] = Field(default_factory=dict)
    q_heads: Dict[int, HeadSpec] = Field(default_factory=dict)
    # Layer reuse: take this layer's token selection from an earlier layer (validated to be
    # earlier; executed by the methods that support selection reuse).
    reuse_from: Optional[int] = Field(default=None, ge=0)


class DecodeSettings(_Strict):
    # Only dense decoding is implemented; the field exists so decode-phase sparsity (e.g. KV
    # selection) can be added without a format break.
    method: str = "dense"

    @field_validator("method")
    @classmethod
    def _only_dense(cls, v: str) -> str:
        if v != "dense":
            raise ValueError(f"defaults.decode.method={v!r} is not supported yet; expected 'dense'")
        return v


class Defaults(_Strict):
    dense_below: int = Field(default=0, ge=0, description="prompts shorter than this run dense")
    decode: DecodeSettings = Field(default_factory=DecodeSettings)


class ModelInfo(_Strict):
    architecture: str
    model_type: str
    num_layers: int = Field(gt=0)
    num_q_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    sliding_window: Optional[int] = None
    sliding_window_layers: List[int] = Field(default_factory=list)
    fingerprint: str
    transformers_version: str


class VisionSettings(_Strict):
    """Visual token pruning (reserved for VLM support): where, by which score, how many kept."""

    prune_after_layer: int = Field(ge=0)
    score: str
    keep: Union[int, float]


class Plan(_Strict):
    schema_: str = Field(default=SCHEMA_VERSION, alias="schema")
    model: ModelInfo
    calibration: Optional[Dict[str, Any]] = None
    defaults: Defaults = Field(default_factory=Defaults)
    layers: List[LayerSpec]
    vision: Optional[VisionSettings] = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _check_schema(cls, v: str) -> str:
        if v != SCHEMA_VERSION:
            raise ValueError(f"schema={v!r} is not supported; expected {SCHEMA_VERSION!r}")
        return v

    @model_validator(mode="after")
    def _check_shapes(self) -> "Plan":
        info = self.model
        if len(self.layers) != info.num_layers:
            raise ValueError(
                f"layers: plan lists {len(self.layers)} layers but model.num_layers={info.num_layers}"
            )
        if info.num_q_heads % info.num_kv_heads:
            raise ValueError("model.num_q_heads must be a multiple of model.num_kv_heads")
        for i, layer in enumerate(self.layers):
            for h in layer.kv_heads:
                if not 0 <= h < info.num_kv_heads:
                    raise ValueError(
                        f"layers[{i}].kv_heads: head {h} out of range; expected 0..{info.num_kv_heads - 1}"
                    )
            for h in layer.q_heads:
                if not 0 <= h < info.num_q_heads:
                    raise ValueError(
                        f"layers[{i}].q_heads: head {h} out of range; expected 0..{info.num_q_heads - 1}"
                    )
            if layer.reuse_from is not None and layer.reuse_from >= i:
                raise ValueError(f"layers[{i}].reuse_from={layer.reuse_from} must name an earlier layer")
        return self

    # ---------------------------------------------------------------- construction
    @classmethod
    def uniform(cls, model, method: str, params: Optional[dict] = None, **defaults) -> "Plan":
        """A plan that runs one method with one set of parameters on every layer and head."""
        info = model_info(model)
        layers = [{"method": method, "params": dict(params or {})} for _ in range(info.num_layers)]
        return cls.from_dict({"model": info.model_dump(), "layers": layers, "defaults": defaults})

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise PlanError(_format_validation_error(e)) from None

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Plan":
        text = Path(path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)

    def to_json(self) -> str:
        # Canonical form (fixed key order from the schema, sorted free-form dicts) so that
        # load -> save -> load is byte-identical and calibration output is reproducible.
        return json.dumps(_canonical(self.to_dict()), indent=2, sort_keys=False) + "\n"

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    # ---------------------------------------------------------------- lookup
    def head_spec(self, layer: int, q_head: int) -> HeadSpec:
        """The spec that governs one query head: q-head override > kv-head override > layer."""
        spec = self.layers[layer]
        if q_head in spec.q_heads:
            return spec.q_heads[q_head]
        group = self.model.num_q_heads // self.model.num_kv_heads
        kv = q_head // group
        if kv in spec.kv_heads:
            return spec.kv_heads[kv]
        return HeadSpec.model_construct(method=spec.method, params=spec.params)

    def check_model(self, model) -> None:
        """Raise PlanError naming the first field where the plan does not fit `model`."""
        actual = model_info(model)
        for field in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "model_type"):
            want, got = getattr(self.model, field), getattr(actual, field)
            if want != got:
                raise PlanError(f"plan is for another model: model.{field}={want!r} in the plan, but the model has {got!r}")
        if self.model.sliding_window_layers != actual.sliding_window_layers:
            raise PlanError(
                "plan is for another model: model.sliding_window_layers="
                f"{self.model.sliding_window_layers} in the plan, but the model has {actual.sliding_window_layers}"
            )
        if self.model.fingerprint != actual.fingerprint:
            raise PlanError(
                f"plan is for another model: model.fingerprint={self.model.fingerprint!r} in the plan, "
                f"but the model's attention config hashes to {actual.fingerprint!r}"
            )


def _canonical(obj):
    if isinstance(obj, dict):
        return {k: _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_canonical(v) for v in obj]
    return obj


def _format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "invalid plan: " + "; ".join(lines)


# -------------------------------------------------------------------- model description
def text_config(config):
    """The config that describes the decoder's attention (VLMs nest it as text_config)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _sliding_layers(cfg) -> List[int]:
    n = cfg.num_hidden_layers
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        return [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return list(range(n))
    return []


def model_info(model) -> ModelInfo:
    import transformers

    config = model.config
    cfg = text_config(config)
    num_q = cfg.num_attention_heads
    num_kv = getattr(cfg, "num_key_value_heads", None) or num_q
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_q
    sliding_layers = _sliding_layers(cfg)
    sliding = getattr(cfg, "sliding_window", None) if sliding_layers else None
    attention_config = {
        "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "num_q_heads": num_q,
        "num_kv_heads": num_kv,
        "head_dim": head_dim,
        "hidden_size": cfg.hidden_size,
        "sliding_window": sliding,
        "sliding_window_layers": sliding_layers,
        "softcap": getattr(cfg, "attn_logit_softcapping", None),
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        "rope": _jsonable(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_theta", None)),
    }
    digest = hashlib.sha256(json.dumps(attention_config, sort_keys=True, default=str).encode()).hexdigest()
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    return ModelInfo(
        architecture=archs[0],
        model_type=cfg.model_type,
        num_layers=cfg.num_hidden_layers,
        num_q_heads=num_q,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        sliding_window=sliding,
        sliding_window_layers=sliding_layers,
        fingerprint="sha256:" + digest[:16],
        transformers_version=transformers.__version__,
    )


def _jsonable(value):
    try:
        json.dumps(value, sort_keys=True)
        return value
    except TypeError:
        return str(value)
