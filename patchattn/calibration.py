"""Calibrate a per-head sparse-attention plan from sample prompts.

    from patchattn import calibrate
    plan = calibrate(model, tokenizer, prompts, recipe="budget", target_density=0.2)
    plan.save("smollm2.plan.json")

    patchattn calibrate --model smollm2-135m --recipe budget --prompts DIR_OR_JSONL \\
        --lengths 4096,8192 --out plan.json

Pipeline: prompts are tokenized and cut to the longest length; one dense forward per prompt
(the first L positions of a causal forward are the L-token forward, so shorter lengths are
prefixes of it) feeds `profiling.layer_option_stats`, which scores every candidate option of
the recipe per (layer, head) at each calibration length and at a held-out check length. The
recipe then picks one option per head (see `recipes/__init__.py`), the plan is built with
per-kv-head / per-q-head overrides, and the chosen methods are re-run for real on a dense
forward at the check length to measure recall and output fidelity (`verify_plan`).

Reproducibility vs. timing: the plan (including `calibration`) is a pure function of the
inputs (model weights, tokenizer, prompts, recipe, lengths, seed), rounded so that the same
inputs give a byte-identical file. Wall-clock time is therefore *not* stored by default: it is
printed, and the CLI writes it to ``OUT.timing.json`` next to the plan. Pass
``record_timing=True`` (CLI ``--record-timing``) to also store it under
``calibration.timing`` -- the only field that then varies between identical runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from .plan import Plan, model_info, text_config
from .profiling import OptionSpace, profile_prompt, retrieval_scores, sample_rows, verify_plan

try:  # the recipes folder ships as the package `patchattn.recipes`
    from .recipes import Recipe, RecipeError, load_recipe
except ImportError:  # pragma: no cover - running from a checkout without the package mapping
    from recipes import Recipe, RecipeError, load_recipe  # type: ignore

PromptSource = Union[None, str, Path, Sequence[str]]
SYNTHETIC = "synthetic"  # prompt source name: generated needle prompts (load_prompts)
PROFILE_VERSION = 3  # bump when profile contents change (invalidates caches); 3: kl_last


# ----------------------------------------------------------------------------- prompts
def _read_texts(source: Path) -> List[Tuple[str, str]]:
    """(name, text) pairs from a directory (recursive *.txt / *.md), a .jsonl or a text file."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix in (".txt", ".md") and p.is_file()
                       and "license" not in p.name.lower())
        return [(str(p.relative_to(source)), p.read_text(encoding="utf-8", errors="replace")) for p in files]
    if source.suffix == ".jsonl":
        out = []
        for i, line in enumerate(source.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            item = json.loads(line)
            if isinstance(item, dict):
                text = next((item[k] for k in ("text", "prompt", "context", "input") if k in item), None)
                if text is None:
                    raise ValueError(f"{source}:{i + 1}: no 'text'/'prompt'/'context'/'input' field")
            else:
                text = str(item)
            out.append((f"line{i + 1}", text))
        return out
    if source.is_file():
        return [(source.name, source.read_text(encoding="utf-8", errors="replace"))]
    raise FileNotFoundError(f"prompts: {source} is not a directory, .jsonl or text file")


def _encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text).input_ids)


def load_prompts(tokenizer, source: PromptSource, length: int, n: int, seed: int) -> Tuple[List[List[int]], str]:
    """Token id lists of exactly `length` tokens and a description of where they came from.

    Texts shorter than `length` are joined with the next ones (blank line between); a single
    long text file is cut into consecutive pieces. Which `n` prompts are used is a seeded
    shuffle of the texts. With no source (or the source name ``synthetic``), synthetic needle
    prompts are generated (passkey / niah_single / niah_multikey alternately, evals/synthetic.py,
    built-in filler).

    A mix of sources is a string of comma-separated sources, e.g. ``"corpus_dir,synthetic"``: the
    `n` prompts are split evenly between them (the first sources take the remainder) and
    interleaved (A, B, A, B, ...), so the first prompts (check and verify prompts) come from every
    source. A directory literally named ``synthetic`` is given as ``./synthetic``."""
    if isinstance(source, str) and "," in source and not Path(source).exists():
        return _mixed_prompts(tokenizer, [s.strip() for s in source.split(",")], length, n, seed)
    if source is None or (isinstance(source, str) and source == SYNTHETIC):
        desc = f"synthetic(passkey,niah_single,niah_multikey;seed={seed})"
        return _synthetic_prompts(tokenizer, length, n, seed), desc
    if isinstance(source, (list, tuple)):
        texts = [(f"item{i}", t) for i, t in enumerate(source)]
        desc = f"list[{len(texts)}]"
    else:
        path = Path(source)
        texts = _read_texts(path)
        desc = path.name or str(path)
    if not texts:
        raise ValueError(f"prompts: no texts found in {source}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    prompts: List[List[int]] = []
    pending: List[int] = []
    for i in order:
        ids = _encode(tokenizer, texts[i][1]) if not pending else _encode(tokenizer, "\n\n" + texts[i][1])
        if not pending:
            pending = ids
        else:
            pending = pending + [t for t in ids if t != tokenizer.bos_token_id]
        while len(pending) >= length and len(prompts) < n:
            prompts.append(pending[:length])
            # The rest of a long single text still makes prompts; it restarts with BOS.
            rest = pending[length:]
            starts_with_bos = tokenizer.bos_token_id is not None and pending[:1] == [tokenizer.bos_token_id]
            bos = [tokenizer.bos_token_id] if starts_with_bos else []
            pending = bos + rest if len(texts) == 1 and rest else []
        if len(prompts) >= n:
            break
    if not prompts:
        raise ValueError(f"prompts: {source} holds fewer than {length} tokens in all")
    return prompts, desc


def _mixed_prompts(tokenizer, sources: List[str], length: int, n: int, seed: int) -> Tuple[List[List[int]], str]:
    """load_prompts over several sources: n split evenly, results interleaved (see load_prompts)."""
    if any(not s for s in sources):
        raise ValueError(f"prompts: empty source in the list {','.join(sources)!r}")
    if len(set(sources)) != len(sources):
        raise ValueError(f"prompts: a source is listed twice in {','.join(sources)!r}")
    if n < len(sources):
        raise ValueError(f"prompts: {n} samples cannot be split between {len(sources)} sources (give --samples >= "
                         f"{len(sources)})")
    parts, descs = [], []
    for j, src in enumerate(sources):
        share = n // len(sources) + (j < n % len(sources))
        ids, desc = load_prompts(tokenizer, src, length, share, seed)
        parts.append(ids)
        descs.append(f"{desc}[{len(ids)}]")
    mixed = [part[i] for i in range(max(len(p) for p in parts)) for part in parts if i < len(part)]
    return mixed, "+".join(descs)


def _synthetic_prompts(tokenizer, length: int, n: int, seed: int) -> List[List[int]]:
    """`n` needle prompts of exactly `length` tokens, passkey / niah_single / niah_multikey in turn.

    Each task's needle depths spread over the whole haystack (0..1, evals/synthetic.py
    `depths_for` over that task's share of the n prompts), and every prompt ends with its question,
    whose rows are the ones that retrieve the needle. A sample is generated a few tokens longer
    than `length` and cut at its start, inside the fixed instructions (before any needle), keeping
    BOS; a sample that lands short is generated again with more slack."""
    from .evals import synthetic

    tasks = ["passkey", "niah_single", "niah_multikey"]
    bos = tokenizer.bos_token_id
    tol = max(2, length // 400) + 2  # evals/synthetic._fit lands at most ~target // 400 under target

    def sized(task: str, count: int) -> List[List[int]]:
        todo: List[Optional[List[int]]] = [None] * count
        for extra in (tol, 4 * tol, 16 * tol):
            if all(x is not None for x in todo):
                break
            for i, s in enumerate(synthetic.generate_samples(task, tokenizer, length + extra, count, seed=seed)):
                ids = _encode(tokenizer, s.prompt)
                if todo[i] is None and len(ids) >= length:
                    head = ids[:1] if bos is not None and ids[:1] == [bos] else []
                    todo[i] = head + ids[len(ids) - (length - len(head)):]
        if any(x is None for x in todo):
            raise ValueError(f"prompts: synthetic {task} prompts land short of {length} tokens")
        return todo  # type: ignore[return-value]

    def fits(task: str) -> bool:  # its fixed instructions fit a prompt of `length` tokens
        try:
            synthetic.generate_samples(task, tokenizer, length, 1, seed=seed)
            return True
        except ValueError:
            return False

    tasks = [t for t in tasks if fits(t)]  # the tasks that fit share the n prompts
    if not tasks:
        raise ValueError(f"prompts: no synthetic task fits {length} tokens")
    share = [n // len(tasks) + (j < n % len(tasks)) for j in range(len(tasks))]
    queues = [sized(t, k) for t, k in zip(tasks, share)]
    out: List[List[int]] = []
    for i in range(max(share)):  # round-robin over the tasks
        out += [q[i] for q in queues if i < len(q)]
    return out


# ----------------------------------------------------------------------------- fingerprints
def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def weights_fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes() if p.numel() else b"")
    return "sha256:" + h.hexdigest()[:16]


def head_output_scale(model) -> torch.Tensor:
    """[layers, Hq] Frobenius norm of each head's slice of the output projection: a value error
    of a head reaches the residual stream through it (1 where the layout is not o_proj)."""
    from .patching import attention_modules

    cfg = text_config(model.config)
    out = torch.ones(cfg.num_hidden_layers, cfg.num_attention_heads, dtype=torch.float64)
    for layer, module in attention_modules(model).items():
        w = getattr(getattr(module, "o_proj", None), "weight", None)
        if w is not None and w.shape[1] % cfg.num_attention_heads == 0:
            per_head = w.detach().float().reshape(w.shape[0], cfg.num_attention_heads, -1)
            out[layer] = per_head.norm(dim=(0, 2)).double().cpu()
    return out


# ----------------------------------------------------------------------------- allocation
def allocate_budget(loss: torch.Tensor, cost: torch.Tensor, allowed: torch.Tensor, target: float) -> torch.Tensor:
    """Choose one option per head minimising total loss s.t. mean cost <= target.

    loss, cost [M, O] (M heads, O options), allowed [M, O]. Lagrangian relaxation (bisection on
    the price of density) gives the lower convex hull solution; the remaining slack is then
    spent greedily on the upgrades with the best loss reduction per unit of density."""
    m = loss.shape[0]
    inf = torch.tensor(float("inf"), dtype=loss.dtype)
    cheapest = torch.where(allowed, cost, inf).min(1).values
    if bool(torch.isinf(cheapest).any()):
        bad = int(torch.isinf(cheapest).nonzero()[0])
        raise RecipeError(f"head #{bad} has no allowed candidate")
    budget = target * m
    if float(cheapest.sum()) > budget + 1e-9:
        raise RecipeError(
            f"cannot reach target_density={target}: the cheapest allowed candidates already give "
            f"{float(cheapest.mean()):.4f} (add sparser candidates or lower min_recall)")
    masked = torch.where(allowed, loss, inf)

    def pick(lam: float) -> torch.Tensor:
        # Ties (equal penalised loss) go to the cheaper option, then the lower index.
        score = masked + lam * cost
        best = score.min(1, keepdim=True).values
        tie = (score <= best + 1e-12) & allowed
        return torch.where(tie, cost, inf).argmin(1)

    def total(choice):
        return float(cost.gather(1, choice[:, None]).sum())

    choice = pick(0.0)
    if total(choice) > budget:
        lo, hi = -9.0, 9.0  # log10 of the price
        while total(pick(10 ** hi)) > budget:
            hi += 3.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if total(pick(10 ** mid)) <= budget:
                hi = mid
            else:
                lo = mid
        choice = pick(10 ** hi)
    rows = torch.arange(m)
    for _ in range(10 * m):
        slack = budget - total(choice)
        cur_loss = masked[rows, choice][:, None]
        cur_cost = cost[rows, choice][:, None]
        gain = cur_loss - masked
        extra = cost - cur_cost
        ok = allowed & (gain > 1e-12) & (extra <= slack + 1e-12)
        if not bool(ok.any()):
            break
        ratio = torch.where(ok, gain / extra.clamp_min(1e-12), torch.tensor(-1.0, dtype=loss.dtype))
        flat = int(ratio.argmax())
        choice[flat // loss.shape[1]] = flat % loss.shape[1]
    return choice


def retrieval_options(recall_min: torch.Tensor, allowed: torch.Tensor, specs: List[dict], rule) -> torch.Tensor:
    """[M, O] options a retrieval head may take: those keeping rule.min_recall (worst over lengths).

    With rule.query_aware only vertical_slash options count, and when none keeps min_recall the
    one with the best recall is taken. Why: the question at a prompt's end attends to what it
    retrieves; columns chosen by the last queries keep exactly that, while dense attention in a
    retrieval head also spreads its mass over the whole haystack (on SmolLM2-135M the dense
    model fails passkey at needle depths >= 0.5 where query-aware plans succeed). Heads with no
    allowed vertical_slash option (sliding-window layers) keep their allowed options."""
    keeps = recall_min >= rule.min_recall
    if not rule.query_aware:
        return keeps
    query_aware = torch.tensor([s["method"] == "vertical_slash" for s in specs]) & allowed
    best = torch.where(query_aware, recall_min, torch.full_like(recall_min, -1.0))
    best = query_aware & (best >= best.max(1, keepdim=True).values)
    options = torch.where((keeps & query_aware).any(1, keepdim=True), keeps & query_aware, best)
    return torch.where(query_aware.any(1, keepdim=True), options, keeps)


def choose_target_recall(recall_min: torch.Tensor, cost: torch.Tensor, loss: torch.Tensor, target: float,
                         specs: List[dict], heads: int) -> torch.Tensor:
    """Cheapest option per head whose recall reaches `target` (recall_min: worst over lengths)."""
    ok = recall_min >= target
    missing = (~ok.any(1)).nonzero().flatten().tolist()
    if missing:
        i = missing[0]
        raise RecipeError(
            f"target_recall={target} not reachable for {len(missing)} heads (first: layer {i // heads} head "
            f"{i % heads}, best candidate recall {float(recall_min[i].max()):.4f}); enable dense or add larger budgets")
    key = torch.where(ok, cost + 1e-9 * loss, torch.tensor(float("inf"), dtype=cost.dtype))
    return key.argmin(1)


# ----------------------------------------------------------------------------- plan
def _spec_key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def build_plan(model, head_specs: List[List[dict]], calibration: dict) -> Plan:
    """A plan with the most common spec per layer as the layer default, kv-head overrides where
    a whole GQA group agrees, and q-head overrides for the rest."""
    info = model_info(model)
    group = info.num_q_heads // info.num_kv_heads
    layers = []
    for specs in head_specs:
        keys = [_spec_key(s) for s in specs]
        default = Counter(keys).most_common(1)[0][0]
        layer = dict(json.loads(default))
        kv_over, q_over = {}, {}
        for kv in range(info.num_kv_heads):
            members = keys[kv * group:(kv + 1) * group]
            shared = members[0] if len(set(members)) == 1 else None
            if shared is not None and shared != default:
                kv_over[kv] = json.loads(shared)
            base = shared if shared is not None else default
            for j, key in enumerate(members):
                if key != base:
                    q_over[kv * group + j] = json.loads(key)
        if kv_over:
            layer["kv_heads"] = kv_over
        if q_over:
            layer["q_heads"] = q_over
        layers.append(layer)
    return Plan.from_dict({"model": info.model_dump(), "calibration": calibration, "layers": layers})


def _r(x: float, nd: int = 4) -> float:
    # Rounded for a stable, readable file; 0.0 instead of -0.0.
    return round(float(x), nd) + 0.0


def _grid(t: torch.Tensor, nd: int = 4) -> List[List[float]]:
    return [[_r(v, nd) for v in row] for row in t.tolist()]


# ----------------------------------------------------------------------------- calibrate
def _cached(path: Optional[Path], compute):
    """compute(), stored at `path` and loaded from there when it exists (no cache: path None)."""
    if path is not None and path.exists():
        return torch.load(path)
    value = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(value, path)
    return value


def _profile_all(model, prompt_ids, lengths, check_length, space, rcp, seed, n_layers, progress):
    """Mean (over prompts) option stats per length: {length: {signal: [layers, H, ...]}}."""
    all_lengths = lengths + [check_length]
    sums: Dict[int, Dict[str, torch.Tensor]] = {}
    bar = tqdm(total=len(prompt_ids) * n_layers, desc="calibrate: profiling layers", disable=not progress)
    for i, ids in enumerate(prompt_ids):
        # The check length is measured on the first `check_prompts` prompts only (it is a check,
        # not an input to the choice), which keeps calibration time down.
        todo = all_lengths if i < rcp.profiling.check_prompts else lengths
        stats = profile_prompt(model, ids, todo, space, rcp.profiling.rows, rcp.profiling.last_rows,
                               seed * 7919 + i, progress=bar, extras_length=lengths[-1])
        for n, st in stats.items():
            acc = sums.setdefault(n, {k: torch.zeros_like(v) for k, v in st.items()})
            for k, v in st.items():
                acc[k] += v
    bar.close()
    counts = {n: len(prompt_ids) for n in lengths}
    counts[check_length] = min(len(prompt_ids), rcp.profiling.check_prompts)
    return {n: {k: v / counts[n] for k, v in st.items()} for n, st in sums.items()}


def decoder_layers(model) -> Optional[List[torch.nn.Module]]:
    """The decoder layers in order: the ModuleList whose i-th entry holds attention module i
    (None when the model has no such list)."""
    from .patching import attention_modules

    attn = attention_modules(model)
    n = len(attn)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            if all(any(sub is attn[i] for sub in module[i].modules()) for i in range(n)):
                return list(module)
    return None


@contextmanager
def _recorded(layers: List[torch.nn.Module], outputs: List):
    """outputs[i] receives layer i's output during the forwards inside (for `_replayed`)."""
    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, out))
             for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def _replayed(layers: List[torch.nn.Module], outputs: List, upto: int):
    """Layers [0, upto) return the outputs recorded from a forward on the same inputs instead of
    computing them again (they are dense in both runs, so the values are the same)."""
    saved = [layer.__dict__.get("forward") for layer in layers[:upto]]
    try:
        for layer, out in zip(layers[:upto], outputs):
            layer.forward = lambda *args, _out=out, **kwargs: _out
        yield
    finally:
        for layer, fwd in zip(layers[:upto], saved):
            if fwd is None:
                del layer.forward
            else:
                layer.forward = fwd


def layer_sensitivity(model, prompt_ids, probe: dict, length: int, rcp, seed: int,
                      progress) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e2e [layers], local_kl [layers, H], local_lost [layers, H]) over
    `rcp.sensitivity.prompts` prompts cut to `length` and their sampled rows (see Sensitivity):
    e2e is the mean next-token KL(dense || layer l's heads all running `probe`, the rest dense);
    local_kl / local_lost are each head's mean -log(kept softmax mass) / lost mass under `probe`
    on the same rows (the per-head losses of the kl / recall objectives, which the weights
    convert).

    The layers before the probed one are dense in both forwards: their outputs are recorded once
    per prompt and replayed, so probing layer l computes only layers l.. (about half the work)."""
    from .patching import patched

    cfg = text_config(model.config)
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    device = next(model.parameters()).device
    dense = {"method": "dense", "params": {}}
    prompts = prompt_ids[:rcp.sensitivity.prompts]
    layers = decoder_layers(model)
    kl = torch.zeros(n_layers, dtype=torch.float64)
    local_kl = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    local_lost = torch.zeros_like(local_kl)
    bar = tqdm(total=len(prompts) * (n_layers + 1), desc="calibrate: layer sensitivity", disable=not progress)

    def log_probs(ids, rows):
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=False, logits_to_keep=rows)
        return torch.log_softmax(out.logits[0].double(), -1)

    everywhere = build_plan(model, [[probe] * n_heads for _ in range(n_layers)], {"tool": "layer sensitivity"})
    for i, full in enumerate(prompts):
        g = torch.Generator().manual_seed(seed * 7919 + i + 0x5E45)
        rows = sample_rows(length, rcp.profiling.rows, rcp.profiling.last_rows, g).to(device)
        ids = torch.tensor([list(full[:length])], device=device)
        # One dense forward gives the probe's local losses (verify_plan), the reference
        # log-probabilities and the layer outputs to replay.
        outputs: List = [None] * n_layers
        with _recorded(layers or [], outputs):
            probed = verify_plan(model, everywhere, full[:length], rows, logits_rows=rows)
        local_kl += probed["kl"] / len(prompts)
        local_lost += (1 - probed["recall"]) / len(prompts)
        ref = probed["log_probs"]
        bar.update(1)
        for layer in range(n_layers):
            specs = [[probe if l == layer else dense] * n_heads for l in range(n_layers)]
            with patched(model, build_plan(model, specs, {"tool": "patchattn.calibrate: layer sensitivity"})), \
                    _replayed(layers or [], outputs, layer if layers else 0):
                lp = log_probs(ids, rows)
            kl[layer] += float((ref.exp() * (ref - lp)).sum(-1).mean()) / len(prompts)
            bar.update(1)
    bar.close()
    return kl, local_kl, local_lost


def sensitivity_weights(e2e_kl: torch.Tensor, local_loss: torch.Tensor, temper: float = 1.0) -> torch.Tensor:
    """[layers] end-to-end damage per unit of summed per-head loss (local_loss [layers]: the
    probe's summed head losses), raised to `temper` and normalised to mean 1; layers the probe
    leaves intact (zero local loss) get the mean."""
    ok = local_loss > 1e-12
    w = torch.where(ok, e2e_kl.clamp_min(0) / local_loss.clamp_min(1e-12), torch.zeros_like(e2e_kl)) ** temper
    mean = w[ok].mean() if bool(ok.any()) else torch.tensor(1.0, dtype=w.dtype)
    w = torch.where(ok, w, mean)
    return w / w.mean().clamp_min(1e-30)


def _probe_option(specs: List[dict], dens_cal: torch.Tensor, lengths: List[int], length: int, target: float,
                  balanced: bool = False) -> int:
    """Index of the vertical_slash candidate whose mean density at the calibration length
    nearest `length` is closest to `target` (what a head "runs sparse" as in the probes).
    balanced: only candidates with equal vertical and slash budgets (the uniform family), where
    the recipe offers any."""
    j = min(range(len(lengths)), key=lambda i: (abs(lengths[i] - length), i))
    vs = [i for i, sp in enumerate(specs) if sp["method"] == "vertical_slash"]
    if balanced:
        vs = [i for i in vs if specs[i]["params"]["vertical"] == specs[i]["params"]["slash"]] or vs
    return min(vs, key=lambda i: (abs(float(dens_cal[j, :, i].mean()) - target), i))


def _mean_nll(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))


def answer_switches(model, tokenizer, choice: torch.Tensor, specs: List[dict], probe: int, may_switch: torch.Tensor,
                    rcp, length: int, text_ids: Sequence[int], seed: int, progress) -> Tuple[torch.Tensor, dict]:
    """(choice with the switched heads on `probe`, record): the recipe's `answers` stage (see
    recipes.Answers). choice [layers * heads] indexes `specs`; the dense heads tried are those
    whose `may_switch` [layers * heads] is set (the recipe allows them the probe option)."""
    from .evals import synthetic
    from .patching import patched
    from .profiling import answer_margins, answer_token

    a = rcp.answers
    cfg = text_config(model.config)
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    device = next(model.parameters()).device
    samples = [s for s in synthetic.generate_samples(a.task, tokenizer, length, 4 * a.prompts, seed=seed + 20_000)
               if s.depth is not None and s.depth >= a.min_depth][:a.prompts]
    if len(samples) < a.prompts:
        raise RecipeError(f"answers: only {len(samples)} of {4 * a.prompts} {a.task} prompts have a needle at "
                          f"depth >= {a.min_depth}; lower answers.min_depth")
    prompts = [(torch.tensor([tokenizer(s.prompt)["input_ids"]], device=device),
                answer_token(tokenizer, s.prompt, s.answers[0])) for s in samples]
    dense = [i for i in range(choice.numel()) if specs[int(choice[i])]["method"] == "dense" and bool(may_switch[i])]
    layers = decoder_layers(model)

    def plan_of(ch):
        table = [[specs[int(ch[l * n_heads + h])] for h in range(n_heads)] for l in range(n_layers)]
        return build_plan(model, table, {"tool": "patchattn.calibrate: answers"})

    # Every prompt's layer outputs under the allocated plan, replayed below a probed head's layer.
    outputs: List[List] = [[None] * n_layers for _ in prompts]

    def margin(ch, upto: int = 0, record: bool = False) -> float:
        total = 0.0
        for (ids, target), out in zip(prompts, outputs):
            with patched(model, plan_of(ch)), _recorded((layers or []) if record else [], out), \
                    _replayed(layers or [], out, upto if layers else 0), torch.inference_mode():
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
            total += float(answer_margins(logits, [target])[0])
        return total / len(prompts)

    bar = tqdm(total=len(dense) + 1, desc="calibrate: answers", disable=not progress)
    base = margin(choice, record=True)
    bar.update(1)
    gains = {}
    for i in dense:
        trial = choice.clone()
        trial[i] = probe
        gains[i] = margin(trial, upto=i // n_heads) - base
        bar.update(1)
    bar.close()
    switched = sorted((i for i in dense if gains[i] > a.min_gain), key=lambda i: (-gains[i], i))
    ids = torch.tensor([list(text_ids[:a.text_tokens])], device=device)
    with patched(model, plan_of(choice)):
        nll_before = _mean_nll(model, ids)
    nll_after, final = nll_before, choice
    while switched:
        final = choice.clone()
        final[switched] = probe
        with patched(model, plan_of(final)):
            nll_after = _mean_nll(model, ids)
        if nll_after - nll_before <= a.max_nll_increase:
            break
        switched.pop()  # undo the smallest gain, try again
        final, nll_after = choice, nll_before
    record = {"task": a.task, "prompts": len(prompts), "length": length,
              "depths": [_r(s.depth) for s in samples], "probe": specs[probe], "base_margin": _r(base),
              "gains": {f"{i // n_heads}.{i % n_heads}": _r(gains[i]) for i in dense},
              "switched": [[i // n_heads, i % n_heads] for i in sorted(switched)],
              "nll": {"allocated": _r(nll_before, 5), "switched": _r(nll_after, 5)}}
    return final, record


def calibrate(model, tokenizer, prompts: PromptSource = None, recipe: Union[str, Path, dict, Recipe] = "budget", *,
              target_density: Optional[float] = None, target_recall: Optional[float] = None,
              lengths: Sequence[int] = (4096, 8192), check_length: Optional[int] = None, samples: int = 8,
              seed: int = 0, record_timing: bool = False, progress: bool = True,
              model_name: Optional[str] = None, timing: Optional[dict] = None,
              cache: Union[None, str, Path] = None) -> Plan:
    """Profile `model` on `prompts` and return a calibrated Plan (see the module docstring).

    prompts: a directory, a .jsonl or text file, a list of strings, None or "synthetic" for
    synthetic needle prompts, or a comma-separated mix of sources ("DIR,synthetic"; the `samples`
    prompts are split evenly between them, see `load_prompts`). lengths: >= 2 calibration
    lengths (budgets are fitted to hold at all of them); check_length: a third length the
    result is checked on (default: midway between the two shortest). `timing`, if a dict,
    receives the phase durations whatever `record_timing` says.
    cache: a folder where profiles (and retrieval scores) are stored and reused, keyed by
    everything they depend on (prompts, weights, candidates, lengths, rows, seed)."""
    t0 = time.perf_counter()
    rcp = load_recipe(recipe, target_density=target_density, target_recall=target_recall)
    lengths = sorted(set(int(n) for n in lengths))
    if len(lengths) < 2:
        raise ValueError("calibrate: give at least two lengths (budgets must generalise across lengths)")
    if check_length is None:
        check_length = (lengths[0] + lengths[1]) // 2
    check_length = int(check_length)
    if check_length in lengths:
        raise ValueError(f"check_length={check_length} must differ from the calibration lengths {lengths}")
    n_max = max(lengths + [check_length])
    cfg = text_config(model.config)
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    info = model_info(model)
    sliding = set(info.sliding_window_layers)

    prompt_ids, prompt_desc = load_prompts(tokenizer, prompts, n_max, samples, seed)
    prompt_hash = _sha(json.dumps(prompt_ids).encode())

    if rcp.kind == "retrieval_heads":
        space = OptionSpace.from_specs([rcp.others], dense=True)
    else:
        space = OptionSpace.from_candidates(rcp.candidates, rcp.reference_length)
    specs = space.specs()
    all_lengths = lengths + [check_length]

    weights = weights_fingerprint(model)
    # Profiles depend on the inputs and the candidate set, not on the target: a cache lets the
    # same profile be re-allocated under other targets / objectives without new forwards.
    profiling_settings = rcp.profiling.model_dump(mode="json", exclude={"verify_prompts", "last_weight"})
    profile_key = _sha(json.dumps({"version": PROFILE_VERSION, "prompts": prompt_hash, "weights": weights,
                                   "specs": specs, "profiling": profiling_settings, "lengths": lengths,
                                   "check": check_length, "seed": seed}, sort_keys=True).encode())
    cache_file = Path(cache) / f"profile-{profile_key[7:]}.pt" if cache else None

    # ---- profile: one forward per prompt
    t_prof = time.perf_counter()
    mean = _cached(cache_file, lambda: _profile_all(model, prompt_ids, lengths, check_length, space, rcp, seed,
                                                     n_layers, progress))
    t_prof = time.perf_counter() - t_prof

    # ---- retrieval scores on synthetic needle prompts (when the recipe uses them)
    t_ret = time.perf_counter()
    retrieval = None
    if rcp.retrieval is not None:
        from .evals import synthetic

        r = rcp.retrieval
        # Needle prompts no longer than the calibration prompts (tiny-context models too).
        ret_key = _sha(json.dumps({"weights": weights, "retrieval": r.model_dump(mode="json"), "n_max": n_max,
                                   "seed": seed}, sort_keys=True).encode())
        ret_file = Path(cache) / f"retrieval-{ret_key[7:]}.pt" if cache else None
        retrieval = _cached(ret_file, lambda: retrieval_scores(model, tokenizer, synthetic.generate_samples(
            r.task, tokenizer, min(r.length, n_max), r.samples, seed=seed + 10_000)))
    t_ret = time.perf_counter() - t_ret

    # ---- choose one option per head
    m, o = n_layers * n_heads, len(specs)
    recall_cal = torch.stack([mean[n]["recall"] for n in lengths]).reshape(len(lengths), m, o)
    kl_cal = torch.stack([mean[n]["kl"] for n in lengths]).reshape(len(lengths), m, o)
    dens_cal = torch.stack([mean[n]["density"] for n in lengths]).reshape(len(lengths), m, o)
    if rcp.objective == "output":
        err_cal = torch.stack([mean[n]["out_err"] for n in lengths]).reshape(len(lengths), m, o)
        loss = (err_cal * head_output_scale(model).reshape(1, m, 1)).mean(0)
    elif rcp.objective == "kl" and rcp.profiling.last_weight is not None:
        # Mean KL over the sampled rows with the last rows' share set to last_weight: the mean
        # over the other rows is recovered from the all-row mean and the last rows' mean.
        prof = rcp.profiling
        n_last = {n: min(prof.last_rows, prof.rows, n) for n in lengths}
        n_all = {n: min(prof.rows, n) for n in lengths}
        last_cal = torch.stack([mean[n]["kl_last"] for n in lengths]).reshape(len(lengths), m, o)
        w = prof.last_weight
        parts = []
        for j, n in enumerate(lengths):
            rest = n_all[n] - n_last[n]
            kl_rest = (kl_cal[j] * n_all[n] - last_cal[j] * n_last[n]) / rest if rest else last_cal[j]
            parts.append(w * last_cal[j] + (1 - w) * kl_rest.clamp_min(0))
        loss = torch.stack(parts).mean(0)
    else:
        loss = (kl_cal if rcp.objective == "kl" else 1 - recall_cal).mean(0)
    cost = dens_cal.max(0).values  # holds the budget at every calibration length
    sensitivity, t_sens = None, None
    if rcp.sensitivity is not None:
        sens_len = rcp.sensitivity.length or lengths[0]
        if sens_len > n_max:
            raise ValueError(f"sensitivity.length={sens_len} is longer than the calibration prompts ({n_max} tokens)")
        probe = _probe_option(specs, dens_cal, lengths, sens_len, rcp.target_density)
        sens_key = _sha(json.dumps({"version": 2, "profile": profile_key, "probe": specs[probe], "length": sens_len,
                                    "prompts": rcp.sensitivity.prompts}, sort_keys=True).encode())
        sens_file = Path(cache) / f"sensitivity-{sens_key[7:]}.pt" if cache else None
        t_sens = time.perf_counter()
        e2e, local_kl, local_lost = _cached(sens_file, lambda: layer_sensitivity(
            model, prompt_ids, specs[probe], sens_len, rcp, seed, progress))
        t_sens = time.perf_counter() - t_sens
        local = (local_kl if rcp.objective == "kl" else local_lost).sum(1)
        weight = sensitivity_weights(e2e, local, rcp.sensitivity.temper)
        loss = loss * weight.repeat_interleave(n_heads)[:, None]
        sensitivity = {"length": sens_len, "prompts": min(rcp.sensitivity.prompts, len(prompt_ids)),
                       "temper": rcp.sensitivity.temper,
                       "probe": specs[probe], "kl": [_r(x, 6) for x in e2e.tolist()],
                       "local_loss": [_r(x, 6) for x in local.tolist()],
                       "weight": [_r(x) for x in weight.tolist()]}
    recall_min = recall_cal.min(0).values
    allowed = torch.ones(m, o, dtype=torch.bool)
    dense_index = 0 if space.dense else None
    if sliding:
        # Sliding-window layers are already local: keep them dense (their base mask applies).
        for layer in sliding:
            allowed[layer * n_heads:(layer + 1) * n_heads] = False
            if dense_index is not None:
                allowed[layer * n_heads:(layer + 1) * n_heads, dense_index] = True
    retrieval_heads = []
    if rcp.kind == "budget":
        if retrieval is not None:
            protected = retrieval.flatten() >= rcp.retrieval.threshold
            retrieval_heads = protected.nonzero().flatten().tolist()
            allowed &= ~protected[:, None] | retrieval_options(recall_min, allowed, specs, rcp.retrieval)
        choice = allocate_budget(loss, cost, allowed, rcp.target_density)
    elif rcp.kind == "target_recall":
        choice = choose_target_recall(torch.where(allowed, recall_min, torch.zeros_like(recall_min)), cost, loss,
                                      rcp.target_recall, specs, n_heads)
    else:
        protected = retrieval.flatten() >= rcp.retrieval.threshold
        retrieval_heads = protected.nonzero().flatten().tolist()
        choice = torch.where(protected, 0, 1)
    answers, t_ans = None, None
    if rcp.answers is not None:
        ans_len = rcp.answers.length or lengths[0]
        t_ans = time.perf_counter()
        # Balanced budgets: on SmolLM2-135M a layer-0 head that gains as uniform vertical_slash
        # (0.13 N columns and diagonals) loses with 0.04 N columns and 0.16 N diagonals.
        probe = _probe_option(specs, dens_cal, lengths, ans_len, rcp.target_density, balanced=True)
        choice, answers = answer_switches(model, tokenizer, choice, specs, probe, allowed[:, probe], rcp, ans_len,
                                          prompt_ids[0], seed, progress)
        t_ans = time.perf_counter() - t_ans
    rows_m = torch.arange(m)
    expected = {n: float(mean[n]["density"].reshape(m, o)[rows_m, choice].mean()) for n in all_lengths}
    if rcp.max_density is not None and max(expected[n] for n in lengths) > rcp.max_density:
        raise RecipeError(f"recipe {rcp.name!r}: resulting density {max(expected[n] for n in lengths):.4f} exceeds "
                          f"max_density={rcp.max_density}")

    head_specs = [[specs[int(choice[l * n_heads + h])] for h in range(n_heads)] for l in range(n_layers)]

    def chosen(n, key):
        return mean[n][key].reshape(m, o)[rows_m, choice].reshape(n_layers, n_heads)

    heads = {
        "recall": _grid(torch.stack([chosen(n, "recall") for n in lengths]).mean(0)),
        "kl": _grid(torch.stack([chosen(n, "kl") for n in lengths]).mean(0)),
        "density": _grid(torch.stack([chosen(n, "density") for n in lengths]).mean(0)),
        "check_recall": _grid(chosen(check_length, "recall")),
        "check_density": _grid(chosen(check_length, "density")),
        "entropy": _grid(mean[lengths[-1]]["entropy"]),
        "local_mass": _grid(mean[lengths[-1]]["local_mass"]),
    }
    if retrieval is not None:
        heads["retrieval"] = _grid(retrieval)

    calibration = {
        "tool": "patchattn.calibrate",
        "recipe": {"name": rcp.name, "kind": rcp.kind, "hash": rcp.digest(), "objective": rcp.objective,
                   "target_density": rcp.target_density, "target_recall": rcp.target_recall,
                   "candidates": len(specs)},
        "prompts": {"source": prompt_desc, "hash": prompt_hash, "count": len(prompt_ids), "tokens": n_max,
                    "rows_per_length": rcp.profiling.rows,
                    "check_prompts": min(len(prompt_ids), rcp.profiling.check_prompts)},
        "lengths": lengths,
        "check_length": check_length,
        "seed": seed,
        "model": {"name": model_name or Path(str(getattr(model.config, "_name_or_path", "") or "")).name,
                  "fingerprint": info.fingerprint, "weights": weights},
        "expected_density": {str(n): _r(expected[n]) for n in all_lengths},
        "mean_recall": {str(n): _r(chosen(n, "recall").mean()) for n in all_lengths},
        "mean_kl": {str(n): _r(chosen(n, "kl").mean()) for n in all_lengths},
        "methods": dict(sorted(Counter(s["method"] for row in head_specs for s in row).items())),
        "retrieval_heads": [[i // n_heads, i % n_heads] for i in retrieval_heads],
        "heads": heads,
    }
    if sensitivity is not None:
        calibration["layer_sensitivity"] = sensitivity
    if answers is not None:
        calibration["answers"] = answers
    plan = build_plan(model, head_specs, calibration)

    # ---- verify: the real methods on a dense forward at the check length
    t_ver = time.perf_counter()
    n_verify = min(rcp.profiling.verify_prompts, len(prompt_ids))
    if n_verify:
        rec_v = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        err_v = torch.zeros_like(rec_v)
        for i in range(n_verify):
            g = torch.Generator().manual_seed(seed * 7919 + i + 0x5EED)
            rows = sample_rows(check_length, rcp.profiling.rows, rcp.profiling.last_rows, g)
            res = verify_plan(model, plan, prompt_ids[i][:check_length], rows)
            rec_v += res["recall"] / n_verify
            err_v += res["fidelity_error"] / n_verify
        calibration["verify"] = {"length": check_length, "prompts": n_verify, "mean_recall": _r(rec_v.mean()),
                                 "mean_fidelity_error": _r(err_v.mean())}
        heads["verify_recall"] = _grid(rec_v)
        heads["fidelity_error"] = _grid(err_v)
    t_ver = time.perf_counter() - t_ver

    phases = {"profile_s": round(t_prof, 3), "retrieval_s": round(t_ret, 3), "verify_s": round(t_ver, 3),
              **({"sensitivity_s": round(t_sens, 3)} if t_sens is not None else {}),
              **({"answers_s": round(t_ans, 3)} if t_ans is not None else {}),
              "total_s": round(time.perf_counter() - t0, 3)}
    if timing is not None:
        timing.update(phases)
    if record_timing:
        calibration["timing"] = phases
    return build_plan(model, head_specs, calibration)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="patchattn calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="alias, folder, hub id or .gguf (patchattn.models.load)")
    p.add_argument("--recipe", default="budget",
                   help="shipped recipe name (budget, vertical-slash, retrieval-heads) or YAML path")
    p.add_argument("--prompts", help="directory of text files, .jsonl or text file, 'synthetic' (generated needle "
                        "prompts, the default), or a comma-separated mix such as DIR,synthetic (--samples "
                        "split evenly)")
    p.add_argument("--lengths", default="4096,8192", help="comma-separated calibration lengths (>= 2)")
    p.add_argument("--check-length", type=int, help="held-out length the plan is checked on (default: midway)")
    p.add_argument("--samples", type=int, default=8, help="number of prompts (in all, for a mix of sources)")
    p.add_argument("--target-density", type=float, help="override the recipe's target_density")
    p.add_argument("--target-recall", type=float, help="override the recipe's target_recall")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--record-timing", action="store_true",
                   help="store phase durations in plan.calibration.timing (the plan is then not byte-reproducible)")
    p.add_argument("--png", help="also write a layers x heads heatmap")
    p.add_argument("--cache", help="folder to store/reuse profiles (re-allocate under new targets without forwards)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _unwritable(path: Path) -> Optional[str]:
    """Why a file cannot be written at `path` (None when it can; missing folders are created)."""
    if path.is_dir():
        return "is a folder, expected a file path"
    folder = next((p for p in path.parents if p.exists()), Path("."))
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {folder} is not writable"
    return None


def calibrate_main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .models import load

    # Calibration takes minutes: find an unusable output path before it, not after.
    for flag, target in (("--out", args.out), ("--png", args.png)):
        problem = target and _unwritable(Path(target))
        if problem:
            print(f"patchattn calibrate: {flag} {target}: {problem}", file=sys.stderr)
            return 2

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    start = time.perf_counter()
    try:
        model, tokenizer = load(args.model, dtype=getattr(torch, args.dtype), device=device)
    except FileNotFoundError as e:
        print(f"patchattn calibrate: --model: {e}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - start
    timing: dict = {}
    try:
        plan = calibrate(model, tokenizer, args.prompts, args.recipe, target_density=args.target_density,
                         target_recall=args.target_recall, lengths=lengths, check_length=args.check_length,
                         samples=args.samples, seed=args.seed, record_timing=args.record_timing,
                         progress=not args.no_progress, model_name=args.model, timing=timing,
                         cache=args.cache)
    except (RecipeError, ValueError, FileNotFoundError) as e:
        print(f"patchattn calibrate: {e}", file=sys.stderr)
        return 2
    out = plan.save(args.out)
    timing.update(load_model_s=round(load_s, 1), device=str(device), threads=torch.get_num_threads())
    Path(str(out) + ".timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    cal = plan.calibration
    print(f"wrote {out}: recipe {cal['recipe']['name']}, {cal['prompts']['count']} prompts, lengths {cal['lengths']} "
          f"(check {cal['check_length']})")
    print("  expected density: " + ", ".join(f"{k}: {v}" for k, v in cal["expected_density"].items()))
    print("  mean recall:      " + ", ".join(f"{k}: {v}" for k, v in cal["mean_recall"].items()))
    if "verify" in cal:
        print(f"  verified at {cal['verify']['length']}: recall {cal['verify']['mean_recall']}, "
              f"output error {cal['verify']['mean_fidelity_error']}")
    print(f"  methods: {cal['methods']}")
    if "answers" in cal:
        switched = ", ".join(f"{l}.{h}" for l, h in cal["answers"]["switched"]) or "none"
        print(f"  answers: dense heads switched to vertical_slash: {switched}")
    phases = ", ".join(f"{k[:-2]} {v} s" for k, v in timing.items()
                       if k.endswith("_s") and k not in ("total_s", "load_model_s"))
    print(f"  time: {timing['total_s']} s calibrate + {timing['load_model_s']} s model load ({phases})")
    if args.png:
        from .heatmap import plan_heatmap

        plan_heatmap(plan, args.png, length=max(lengths))
        print(f"  wrote {args.png}")
    return 0


__all__ = ["allocate_budget", "build_plan", "calibrate", "calibrate_main", "load_prompts", "weights_fingerprint"]
