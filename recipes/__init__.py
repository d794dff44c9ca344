"""Calibration recipes (YAML) shipped with patchattn; `patchattn.recipes` locates them by name.

A recipe says *what* calibration optimises and over which candidate head configurations:

- ``kind: budget`` -- one global ``target_density``; per-head options are allocated by a
  Lagrangian search over every head's loss-vs-density curve (``budget.yaml``).
- ``kind: target_recall`` -- every head gets the cheapest candidate whose attention recall
  reaches ``target_recall`` at every calibration length (``vertical-slash.yaml``).
- ``kind: retrieval_heads`` -- heads whose top attention copies the needle are kept dense, the
  rest run one fixed cheap spec (``retrieval-heads.yaml``).

Candidate budgets are families ``{fractions, powers, min, max}``: fraction ``f`` at power ``p``
is the BudgetRule ``scale = f * R**(1-p)``, ``power = p`` with ``R = reference_length`` (in key
blocks for block_topk), i.e. the budget is ``f * R`` tokens at the reference length and scales as
``N**p`` elsewhere. Offering several powers lets calibration pick how each head's budget grows
with the prompt length from its behaviour at two or more lengths.

    recipe = load_recipe("budget")              # a shipped recipe, by name
    recipe = load_recipe("my/recipe.yaml")      # or a path
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from patchattn.plan import BudgetRule, HeadSpec, PlanError

HERE = Path(__file__).resolve().parent


class RecipeError(ValueError):
    """A recipe is malformed, unknown, or cannot reach its target."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetFamily(_Strict):
    fractions: List[float] = Field(min_length=1)
    powers: List[float] = Field(default_factory=lambda: [1.0], min_length=1)
    min: int = Field(default=0, ge=0)
    max: Optional[int] = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _ranges(self):
        for f in self.fractions:
            if not 0 <= f <= 1:
                raise ValueError(f"fractions: {f} is outside [0, 1]")
        for p in self.powers:
            if not 0 <= p <= 1:
                raise ValueError(f"powers: {p} is outside [0, 1]")
        return self

    def rules(self, reference: float) -> List[Union[int, BudgetRule]]:
        """The candidate budgets (a fraction of 0 is the plain int 0: BudgetRule needs scale > 0)."""
        out: List[Union[int, BudgetRule]] = []
        for f in self.fractions:
            if f == 0:
                if self.min == 0 and 0 not in out:
                    out.append(0)
                continue
            for p in (self.powers if f < 1 else [1.0]):
                scale = float(f"{f * reference ** (1 - p):.6g}")  # short, stable JSON
                rule = BudgetRule(scale=scale, power=p, min=self.min, max=self.max)
                if rule not in out:
                    out.append(rule)
        return out


class StreamingCandidates(_Strict):
    sink: int = Field(default=4, ge=0)
    window: BudgetFamily


class VerticalSlashCandidates(_Strict):
    vertical: BudgetFamily
    slash: BudgetFamily
    last_q: int = Field(default=64, ge=1)
    sink: int = Field(default=4, ge=0)
    window: int = Field(default=64, ge=1)
    spread_q: int = Field(default=0, ge=0)  # vertical_slash's rows spread over the prompt


class BlockTopKCandidates(_Strict):
    block_size: int = Field(default=64, ge=1, le=4096)
    top_k: BudgetFamily


class Candidates(_Strict):
    dense: bool = True
    streaming: Optional[StreamingCandidates] = None
    vertical_slash: Optional[VerticalSlashCandidates] = None
    block_topk: Optional[BlockTopKCandidates] = None

    @model_validator(mode="after")
    def _some(self):
        if not (self.streaming or self.vertical_slash or self.block_topk):
            raise ValueError("no sparse candidates: give at least one of streaming, vertical_slash, block_topk")
        return self


class Profiling(_Strict):
    """How attention is sampled: `rows` query rows per prompt and length, of which the last
    `last_rows` positions (the rows closest to generation) and the rest uniformly random."""

    rows: int = Field(default=128, ge=8)
    last_rows: int = Field(default=32, ge=0)
    check_prompts: int = Field(default=2, ge=1, description="prompts whose stats are also taken at the check length")
    verify_prompts: int = Field(default=1, ge=0, description="prompts re-run through the real methods at the check length")
    last_weight: Optional[float] = Field(default=None, ge=0, le=1, description=(
        "share of the kl objective given to the last_rows rows (the rows that produce an answer), the rest "
        "to the other sampled rows; None: every sampled row weighs the same (last_rows / rows for the last)"))

    @model_validator(mode="after")
    def _fit(self):
        if self.last_rows > self.rows:
            raise ValueError(f"last_rows={self.last_rows} exceeds rows={self.rows}")
        if self.last_weight is not None:
            if self.last_rows == 0:
                raise ValueError("last_weight: needs last_rows > 0")
            if self.last_rows == self.rows and self.last_weight < 1:
                raise ValueError(f"last_weight: every sampled row is a last row (last_rows = rows = {self.rows})")
        return self


class Retrieval(_Strict):
    """Retrieval-head detection on synthetic needle prompts (evals/synthetic.py)."""

    task: str = "passkey"
    samples: int = Field(default=4, ge=1)
    length: int = Field(default=2048, ge=128)
    threshold: float = Field(default=0.1, ge=0, le=1, description="retrieval score that makes a head a retrieval head")
    min_recall: float = Field(default=0.98, ge=0, le=1, description="budget recipes: retrieval heads must keep this recall")
    query_aware: bool = Field(default=False, description=(
        "budget recipes: retrieval heads take a vertical_slash option (key columns chosen by the prompt's last "
        "queries), never dense or static patterns; the best-recall one when none keeps min_recall"))


class Sensitivity(_Strict):
    """End-to-end weighting of the per-head objective, one weight per layer (budget recipes).

    Per-head attention losses are local: a diffuse head loses much softmax mass under any sparse
    pattern, yet the model's predictions may hardly notice, while another layer's small loss
    moves them a lot. For each layer, every head of that layer runs the `probe` option (the
    vertical_slash candidate closest to the target density) with all other layers dense; the
    next-token KL against the dense model on the sampled rows, divided by that layer's summed
    per-head loss under the same probe on the same rows, converts the layer's local loss into
    end-to-end damage. Costs about (layers / 2 + 1) x prompts forwards at `length` (the dense
    layers before the probed one are replayed, not recomputed)."""

    prompts: int = Field(default=2, ge=1, description="calibration prompts the per-layer forwards run on")
    length: Optional[int] = Field(default=None, ge=16, description=(
        "tokens per prompt for the per-layer forwards (prompts are cut to it; at most the longest "
        "calibration length); default: the shortest calibration length"))
    temper: float = Field(default=1.0, gt=0, le=1, description=(
        "exponent on the weights before they are normalised: 1 uses the measured damage ratios, smaller "
        "values shrink their spread (a few noisy layers then take less of the budget)"))


class Answers(_Strict):
    """Dense heads that talk the model out of answering (budget recipes).

    After the allocation, every head it left dense (and allowed the probe) is tried alone as the
    vertical_slash candidate with equal vertical and slash budgets closest to the target density,
    on synthetic needle prompts with known answers: the change of the right answer's first-token
    margin (its logit minus the best other token's) is the head's gain. Heads gaining more than
    `min_gain` are switched together; while the switched plan raises the mean next-token loss on
    the first `text_tokens` tokens of the first calibration prompt by more than
    `max_nll_increase` nats over the allocated plan, the smallest-gain switch is undone.
    Why: on SmolLM2-135M single dense heads of layer 0 move long repetitive prompts toward
    answers in words ("a special key that ...") instead of the number the model found, the same
    way on every prompt, and cost no perplexity as vertical_slash. Costs, per prompt, about one
    forward at `length` per dense head (layers before the head's are replayed, not recomputed),
    plus two or more text forwards. Gains are measured one head at a time; their sum is not
    re-measured."""

    task: str = "passkey"
    prompts: int = Field(default=1, ge=1, description="needle prompts (their needles in the last part, see min_depth)")
    length: Optional[int] = Field(default=None, ge=64, description=(
        "tokens per needle prompt; default: the shortest calibration length"))
    min_depth: float = Field(default=0.5, ge=0, le=1, description=(
        "needle depth (0: start, 1: end of the context) of the prompts used: late needles are where plans differ"))
    min_gain: float = Field(default=0.02, ge=0, description="mean margin gain (logits) that makes a head a switch")
    max_nll_increase: float = Field(default=0.005, ge=0, description=(
        "most the switches may add to the mean next-token loss, in nats (0.005: about +0.5 % perplexity)"))
    text_tokens: int = Field(default=2048, ge=16, description="tokens of the calibration prompt the text loss is taken on")


class Recipe(_Strict):
    name: str
    kind: Literal["budget", "target_recall", "retrieval_heads"]
    description: str = ""
    reference_length: int = Field(default=8192, ge=16)
    candidates: Optional[Candidates] = None
    # kl: mean -log(recall) (profiling.last_weight reweights the last rows); recall: mean lost
    # mass; output: lost mass x value spread x |W_o head|
    objective: Literal["kl", "recall", "output"] = "kl"
    target_density: Optional[float] = Field(default=None, gt=0, le=1)
    target_recall: Optional[float] = Field(default=None, gt=0, le=1)
    max_density: Optional[float] = Field(default=None, gt=0, le=1)
    retrieval: Optional[Retrieval] = None
    others: Optional[Dict[str, Any]] = None  # retrieval_heads: spec of the non-retrieval heads
    profiling: Profiling = Field(default_factory=Profiling)
    sensitivity: Optional[Sensitivity] = None
    answers: Optional[Answers] = None

    @model_validator(mode="after")
    def _kind_fields(self):
        need = {"budget": ["candidates", "target_density"], "target_recall": ["candidates", "target_recall"],
                "retrieval_heads": ["retrieval", "others"]}[self.kind]
        for key in need:
            if getattr(self, key) is None:
                raise ValueError(f"{key}: required for kind={self.kind!r}")
        if self.sensitivity is not None and self.kind != "budget":
            raise ValueError(f"sensitivity: weights the objective of budget recipes, not kind={self.kind!r}")
        if self.sensitivity is not None and self.objective == "output":
            raise ValueError("sensitivity: converts the kl or recall objective's per-head loss, not objective='output'")
        if self.sensitivity is not None and not (self.candidates and self.candidates.vertical_slash):
            raise ValueError("sensitivity: its probe is a vertical_slash candidate; give candidates.vertical_slash")
        if self.answers is not None and self.kind != "budget":
            raise ValueError(f"answers: revises the dense heads of budget recipes, not kind={self.kind!r}")
        if self.answers is not None and not (self.candidates and self.candidates.vertical_slash):
            raise ValueError("answers: heads switch to a vertical_slash candidate; give candidates.vertical_slash")
        if self.profiling.last_weight is not None and self.objective != "kl":
            raise ValueError(f"profiling.last_weight: weights the kl objective, not objective={self.objective!r}")
        if self.others is not None:
            try:
                HeadSpec(**self.others)
            except (PlanError, ValidationError) as e:
                raise ValueError(f"others: {e}") from None
        return self

    def digest(self) -> str:
        data = self.model_dump(mode="json")
        if data["profiling"]["last_weight"] is None:  # unset: the hash recipes had before the option
            del data["profiling"]["last_weight"]
        for later in ("sensitivity", "answers"):  # unset: the hash before the option
            if data[later] is None:
                del data[later]
        if "sensitivity" in data and data["sensitivity"]["temper"] == 1.0:  # unset: the hash before the option
            del data["sensitivity"]["temper"]
        vs = (data.get("candidates") or {}).get("vertical_slash")
        if vs is not None and vs["spread_q"] == 0:  # unset: the hash before the option
            del vs["spread_q"]
        text = json.dumps(data, sort_keys=True)
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def available() -> List[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def recipe_path(name_or_path: Union[str, Path]) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    shipped = HERE / f"{Path(str(name_or_path)).stem}.yaml"
    if shipped.is_file() and p.suffix in ("", ".yaml", ".yml"):
        return shipped
    raise RecipeError(f"unknown recipe {str(name_or_path)!r}: not a file, and not one of {', '.join(available())}")


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}" if loc else msg)
        raise RecipeError(f"invalid recipe {source}: " + "; ".join(problems)) from None


def load_recipe(recipe: Union[str, Path, dict, Recipe], **overrides) -> Recipe:
    """A validated Recipe from a shipped name, a YAML path, a dict or a Recipe; `overrides`
    (e.g. target_density=0.2) replace top-level fields and are validated too."""
    if isinstance(recipe, Recipe):
        data, source = recipe.model_dump(mode="json"), recipe.name
    elif isinstance(recipe, dict):
        data, source = dict(recipe), "dict"
    else:
        path = recipe_path(recipe)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML ({e})") from None
        source = path.name
    if isinstance(data, dict):
        data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_recipe(data, source)


__all__ = ["Recipe", "RecipeError", "BudgetFamily", "available", "load_recipe", "parse_recipe", "recipe_path"]
