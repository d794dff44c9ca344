"""Per-(layer, head) attention signals from real forward passes, without N x N matrices.

`capture(model, hook)` switches the model to an attention implementation registered here
(``patchattn_profile``) that hands each layer's q/k/v to `hook` and then runs the model's
original attention, so the forward's outputs are untouched; on exit the implementation name
is restored exactly. Nothing in `patching.py` is involved.

For a sampled set of query rows (the last rows plus uniformly random ones) the exact softmax
rows are computed against all keys ([H, R, N], never [H, N, N]). Every candidate head option
(streaming windows, vertical-slash column/diagonal budgets, block top-k counts) is then scored
in one pass per family: each key gets the smallest option index that keeps it ("bucket"), the
probability mass is scatter-added per bucket and a cumulative sum gives the kept mass of every
option at once. The selections are computed with the methods' own estimators
(`estimate_vertical_slash`, `pooled_block_attention`), so what is scored is what will run.
Densities are exact pair counts of the selection at that length, not estimates.

Signals per option: mean recall (kept softmax mass) and mean KL(sparse || dense) = -log(recall)
over rows; per head: entropy and local mass; on needle prompts: retrieval score; and, for a
finished plan, output fidelity (`verify_plan`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

from .kernels.reference import softcapped
from .methods import get_method
from .methods.base import AllPairs, AttnContext, band_pairs, causal_pairs
from .methods.block_topk import pooled_block_attention
from .methods.vertical_slash import estimate_vertical_slash
from .patching import attention_modules, original_attention
from .plan import BudgetRule, Plan, resolve_budget, text_config

IMPLEMENTATION = "patchattn_profile"
_HOOK_ATTR = "_patchattn_profile_hook"
_ORIGINAL_ATTR = "_patchattn_profile_original"

Hook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float, Optional[float]], None]


# ----------------------------------------------------------------------------- capture
def _profile_attention(module, query, key, value, attention_mask, scaling=None, softcap=None,
                       sliding_window=None, **kwargs):
    name = getattr(module.config, _ORIGINAL_ATTR, "sdpa")
    hook = getattr(module, _HOOK_ATTR, None)
    if hook is not None and query.shape[-2] > 1:
        hook(module.layer_idx, query, key, value,
             scaling if scaling is not None else query.shape[-1] ** -0.5, softcap)
    extra = dict(scaling=scaling, **kwargs)
    if sliding_window is not None:
        extra["sliding_window"] = sliding_window
    if softcap is not None:
        extra["softcap"] = softcap
    return original_attention(module, name)(module, query, key, value, attention_mask, **extra)


def _profile_mask(**kwargs):
    # The model builds its masks by implementation name: give it the original one's mask.
    name = getattr(kwargs.get("config"), _ORIGINAL_ATTR, "sdpa")
    fn = ALL_MASK_ATTENTION_FUNCTIONS[name] if name in ALL_MASK_ATTENTION_FUNCTIONS else sdpa_mask
    return fn(**kwargs)


AttentionInterface.register(IMPLEMENTATION, _profile_attention)
AttentionMaskInterface.register(IMPLEMENTATION, _profile_mask)


@contextlib.contextmanager
def capture(model, hook: Hook):
    """Within the block, every prefill attention call of `model` first calls
    ``hook(layer, q [B,Hq,M,D], k [B,Hkv,N,D], v, scale, softcap)``."""

    cfg = text_config(model.config)
    original = cfg._attn_implementation
    if original in ("patchattn", IMPLEMENTATION):
        raise RuntimeError(f"cannot profile a model whose attention is {original!r}: unpatch it first")
    modules = attention_modules(model)
    setattr(cfg, _ORIGINAL_ATTR, original)
    cfg._attn_implementation = IMPLEMENTATION
    for module in modules.values():
        setattr(module, _HOOK_ATTR, hook)
    try:
        yield
    finally:
        for module in modules.values():
            if hasattr(module, _HOOK_ATTR):
                delattr(module, _HOOK_ATTR)
        cfg._attn_implementation = original
        if hasattr(cfg, _ORIGINAL_ATTR):
            delattr(cfg, _ORIGINAL_ATTR)


# ----------------------------------------------------------------------------- options
def _budget_json(b: Union[int, BudgetRule]):
    return b.model_dump(mode="json") if isinstance(b, BudgetRule) else int(b)


def _vs_params(c) -> Dict:
    """vertical_slash's fixed (non-budget) params; spread_q only when set, so that plans
    calibrated without it keep their bytes."""
    params = {"last_q": c.last_q, "sink": c.sink, "window": c.window}
    if c.spread_q:
        params["spread_q"] = c.spread_q
    return params


@dataclass
class OptionSpace:
    """The candidate head configurations, in a fixed order (the option index)."""

    dense: bool = True
    stream_sink: int = 4
    stream_windows: List[Union[int, BudgetRule]] = field(default_factory=list)
    vs_params: Dict = field(default_factory=dict)  # last_q, sink, window (, spread_q)
    vs_pairs: List[Tuple[Union[int, BudgetRule], Union[int, BudgetRule]]] = field(default_factory=list)
    block_size: int = 64
    block_topk: List[Union[int, BudgetRule]] = field(default_factory=list)

    @classmethod
    def from_candidates(cls, cand, reference_length: int) -> "OptionSpace":
        space = cls(dense=cand.dense)
        if cand.streaming is not None:
            space.stream_sink = cand.streaming.sink
            space.stream_windows = [w for w in cand.streaming.window.rules(reference_length) if w != 0]
        if cand.vertical_slash is not None:
            c = cand.vertical_slash
            space.vs_params = _vs_params(c)
            space.vs_pairs = [(v, s) for v in c.vertical.rules(reference_length) for s in c.slash.rules(reference_length)]
        if cand.block_topk is not None:
            space.block_size = cand.block_topk.block_size
            space.block_topk = [k for k in cand.block_topk.top_k.rules(reference_length / cand.block_topk.block_size)
                                if k != 0]
        return space

    @classmethod
    def from_specs(cls, specs: Sequence[dict], dense: bool = True) -> "OptionSpace":
        """Explicit specs (one fixed set of non-budget params per method)."""
        space = cls(dense=dense)
        for spec in specs:
            params = get_method(spec["method"]).Params(**spec["params"])
            if spec["method"] == "streaming":
                space.stream_sink = params.sink
                space.stream_windows.append(params.window)
            elif spec["method"] == "vertical_slash":
                space.vs_params = _vs_params(params)
                space.vs_pairs.append((params.vertical, params.slash))
            elif spec["method"] == "block_topk" and params.top_k is not None:
                space.block_size = params.block_size
                space.block_topk.append(params.top_k)
            elif spec["method"] != "dense":
                raise ValueError(f"cannot profile spec {spec}")
        return space

    def specs(self) -> List[dict]:
        out = [{"method": "dense", "params": {}}] if self.dense else []
        out += [{"method": "streaming", "params": {"sink": self.stream_sink, "window": _budget_json(w)}}
                for w in self.stream_windows]
        out += [{"method": "vertical_slash", "params": {"vertical": _budget_json(v), "slash": _budget_json(s),
                                                        **self.vs_params}} for v, s in self.vs_pairs]
        out += [{"method": "block_topk", "params": {"block_size": self.block_size, "top_k": _budget_json(k)}}
                for k in self.block_topk]
        return out

    def __len__(self) -> int:
        return int(self.dense) + len(self.stream_windows) + len(self.vs_pairs) + len(self.block_topk)


# ----------------------------------------------------------------------------- layer stats
def sample_rows(length: int, rows: int, last_rows: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted distinct query rows: the last `last_rows` plus uniform ones from the rest."""
    rows = min(rows, length)
    last = torch.arange(length - min(last_rows, rows), length)
    pool = length - last.numel()
    extra = rows - last.numel()
    if extra > 0 and pool > 0:
        pick = torch.randperm(pool, generator=generator)[:extra]
        last = torch.cat([pick, last])
    return last.sort().values


def _causal_ctx(length: int, device, scale: float, softcap, layer: int) -> AttnContext:
    pos = torch.arange(length, device=device)

    def base_rows(start, end):
        return (pos[None, :] <= pos[start:end, None])[None, None]

    return AttnContext(q_pos=pos, k_pos=pos, kv_start=torch.zeros(1, dtype=torch.long, device=device),
                       base_rows=base_rows, scale=scale, softcap=softcap, layer=layer)


def dense_rows(q, k, rows, scale, softcap):
    """Exact softmax rows: q [H,L,D], k [H,L,D] (per q head) -> P [H,R,L] float32."""
    length = k.shape[-2]
    scores = softcapped(torch.matmul(q[:, rows].float(), k.float().transpose(-1, -2)) * scale, softcap)
    causal = torch.arange(length, device=q.device)[None, :] <= rows[:, None]
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def _unique_budgets(budgets, n: int, device) -> Tuple[torch.Tensor, List[int]]:
    values = [resolve_budget(b, n) for b in budgets]
    uniq = sorted(set(values))
    return torch.tensor(uniq, device=device), [uniq.index(v) for v in values]


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank (0 = highest) of each entry along the last dim."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ar = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


def row_kl(kept: torch.Tensor) -> torch.Tensor:
    """Per-row KL(sparse || dense) of a mask that keeps softmax mass `kept`: -log(kept), with the
    mass clamped to [1e-6, 1] (the kl objective; profiles and verify_plan both use it)."""
    return -torch.log(kept.clamp(1e-6, 1.0))


def _row_stats(kept: torch.Tensor, spread: Optional[torch.Tensor] = None, last: int = 0):
    """kept [H,R,K] mass per option -> (mean recall, mean KL, mean output error, mean KL of the
    last `last` rows) each [H,K] (the last one zeros when `last` is 0).

    Output error: for a row, o_sparse - o_dense = (1 - R) (o_kept - o_dropped); the gap between
    kept and dropped values is approximated by the row's attention-weighted value spread
    (`spread` [H,R]), so the error estimate is (1 - R) * spread."""
    kept = kept.clamp(0, 1)
    err = ((1 - kept) * spread[..., None]).mean(1) if spread is not None else torch.zeros_like(kept[:, 0])
    kl = row_kl(kept)
    kl_last = kl[:, -last:].mean(1) if last > 0 else torch.zeros_like(kept[:, 0])
    return kept.mean(1), kl.mean(1), err, kl_last


def layer_option_stats(space: OptionSpace, q, k, rows, scale, softcap, layer: int = 0,
                       extras: bool = True, v: Optional[torch.Tensor] = None,
                       last_rows: int = 0) -> Dict[str, torch.Tensor]:
    """Signals of every option for one layer at length L = k.shape[-2].

    q [H,L,D], k and v [H,L,D] (already one key head per query head). Returns recall, kl,
    out_err (zero without v), kl_last (the mean KL of the last `last_rows` of the sorted `rows`
    only, zero when 0), density [H, n_options] and, with `extras`, entropy and local_mass [H]
    (all float64 on CPU)."""
    last_rows = min(int(last_rows), rows.numel())
    h, length, _ = k.shape
    device = q.device
    total_pairs = causal_pairs(length)
    probs = dense_rows(q, k, rows, scale, softcap)  # [H,R,L]
    ar = torch.arange(length, device=device)
    dist = rows[:, None] - ar[None, :]  # [R,L]
    dist_c = dist.clamp(min=0)
    recall, kl, err, density, kl_last = [], [], [], [], []
    spread = None
    if v is not None:
        vf = v.float()
        mean_v = probs @ vf  # [H,R,D]
        second = probs @ (vf * vf).sum(-1, keepdim=True)  # [H,R,1]
        spread = (second[..., 0] - (mean_v * mean_v).sum(-1)).clamp_min(0).sqrt().double()

    if space.dense:
        recall.append(torch.ones(h, 1, dtype=torch.float64, device=device))
        kl.append(torch.zeros(h, 1, dtype=torch.float64, device=device))
        err.append(torch.zeros(h, 1, dtype=torch.float64, device=device))
        kl_last.append(torch.zeros(h, 1, dtype=torch.float64, device=device))
        density.append(torch.ones(h, 1, dtype=torch.float64, device=device))

    if space.stream_windows:
        # Kept mass of window w for row r: keys (r-w, r] from a prefix sum over keys, plus the
        # sink keys the window does not reach.
        w, idx = _unique_budgets(space.stream_windows, length, device)
        prefix = torch.nn.functional.pad(probs.cumsum(-1), (1, 0))  # [H,R,L+1]
        hi = (rows + 1)[None, :, None].expand(h, -1, w.numel())
        lo = (rows[:, None] + 1 - w[None, :]).clamp(min=0)[None].expand(h, -1, -1)
        band = prefix.gather(-1, hi) - prefix.gather(-1, lo)  # [H,R,nW]
        sink = min(space.stream_sink, length)
        if sink:
            outside = dist[None, :, :sink, None] >= w[None, None, None, :]  # [1,R,sink,nW]
            band = band + (probs[:, :, :sink, None] * outside).sum(2)
        r, c, e, cl = _row_stats(band.double(), spread, last_rows)
        dens = torch.tensor([band_pairs(length, space.stream_sink, int(x)) / total_pairs for x in w.tolist()],
                            dtype=torch.float64, device=device)
        recall.append(r[:, idx]), kl.append(c[:, idx]), err.append(e[:, idx]), kl_last.append(cl[:, idx])
        density.append(dens[idx].expand(h, -1))

    if space.vs_pairs:
        p = space.vs_params
        ctx = _causal_ctx(length, device, scale, softcap, layer)
        vscore, sscore = estimate_vertical_slash(q[None], k[None], ctx, p["last_q"], p.get("spread_q", 0))
        vv, vi = _unique_budgets([v for v, _ in space.vs_pairs], length, device)
        ss, si = _unique_budgets([s for _, s in space.vs_pairs], length, device)
        nv, ns = vv.numel() + 1, ss.numel() + 1
        cb = torch.searchsorted(vv, _rank(vscore[0]), right=True)  # [H,L] column bucket
        cb = torch.where(ar[None, :] < p["sink"], torch.zeros_like(cb), cb)
        db = torch.searchsorted(ss, _rank(sscore[0]), right=True)  # [H,L] diagonal bucket
        db = torch.where(ar[None, :] < p["window"], torch.zeros_like(db), db)
        row_db = db.gather(-1, dist_c.reshape(1, -1).expand(h, -1)).view(h, rows.numel(), length)
        index = cb[:, None, :] * ns + row_db
        mass = torch.zeros(h, rows.numel(), nv * ns, device=device)
        mass.scatter_add_(-1, index, probs)
        cum = mass.view(h, -1, nv, ns).double().cumsum(-2).cumsum(-1)
        both = cum[:, :, :-1, :-1]
        union = cum[:, :, :-1, -1:] + cum[:, :, -1:, :-1] - both  # [H,R,nv-1,ns-1]
        pick = torch.tensor(vi, device=device) * (ns - 1) + torch.tensor(si, device=device)
        r, c, e, cl = _row_stats(union.flatten(2)[..., pick], spread, last_rows)
        # Exact pair counts: column j covers rows j..L-1, diagonal d covers rows d..L-1, and
        # column j meets diagonal d inside the causal triangle iff j + d <= L - 1.
        span = (length - ar).expand(h, -1)
        colp = torch.zeros(h, nv, dtype=torch.long, device=device).scatter_add_(-1, cb, span).cumsum(-1)
        diagp = torch.zeros(h, ns, dtype=torch.long, device=device).scatter_add_(-1, db, span).cumsum(-1)
        onehot = torch.nn.functional.one_hot(db, ns).cumsum(1)  # [H,L,ns]: #{d' <= d} per bucket
        reach = onehot[:, length - 1 - ar]  # [H,L(j),ns]: diagonals meeting column j
        overlap = torch.zeros(h, nv, ns, dtype=torch.long, device=device)
        overlap.scatter_add_(1, cb[:, :, None].expand(-1, -1, ns), reach)
        overlap = overlap.cumsum(1).cumsum(2)
        kept_pairs = colp[:, :-1, None] + diagp[:, None, :-1] - overlap[:, :-1, :-1]
        dens = kept_pairs.flatten(1)[:, pick].double() / total_pairs
        recall.append(r), kl.append(c), err.append(e), kl_last.append(cl), density.append(dens)

    if space.block_topk:
        bs = space.block_size
        ctx = _causal_ctx(length, device, scale, softcap, layer)
        pooled, _, _ = pooled_block_attention(q[None], k[None], ctx, bs)
        pooled = pooled[0]  # [H,nb,nb]
        nb = pooled.shape[-1]
        kk, ki = _unique_budgets(space.block_topk, nb, device)
        nk = kk.numel() + 1
        bucket = torch.searchsorted(kk, _rank(pooled), right=True)
        bucket = torch.where(pooled > 0, bucket, torch.full_like(bucket, nk - 1))
        blocks = torch.arange(nb, device=device)
        always = (blocks[:, None] == blocks[None, :]) | (blocks[None, :] == 0)
        bucket = torch.where(always[None], torch.zeros_like(bucket), bucket)
        padded = torch.nn.functional.pad(probs, (0, nb * bs - length))
        block_mass = padded.view(h, rows.numel(), nb, bs).sum(-1)
        row_bucket = bucket[:, rows // bs]  # [H,R,nb]
        mass = torch.zeros(h, rows.numel(), nk, device=device).scatter_add_(-1, row_bucket, block_mass)
        r, c, e, cl = _row_stats(mass.double().cumsum(-1)[..., :-1], spread, last_rows)
        size = torch.clamp(length - blocks * bs, max=bs)  # rows (= keys) per block
        tiles = torch.where(blocks[None, :] < blocks[:, None], size[:, None] * size[None, :],
                            torch.where(blocks[None, :] == blocks[:, None], size * (size + 1) // 2, 0))
        pairs = torch.zeros(h, nk, dtype=torch.long, device=device)
        pairs.scatter_add_(-1, bucket.flatten(1), tiles.flatten().expand(h, -1))
        dens = pairs.cumsum(-1)[:, :-1].double() / total_pairs
        recall.append(r[:, ki]), kl.append(c[:, ki]), err.append(e[:, ki]), kl_last.append(cl[:, ki])
        density.append(dens[:, ki])

    out = {"recall": torch.cat(recall, 1).cpu(), "kl": torch.cat(kl, 1).cpu(), "out_err": torch.cat(err, 1).cpu(),
           "kl_last": torch.cat(kl_last, 1).cpu(), "density": torch.cat(density, 1).cpu()}
    if extras:
        # Entropy normalised by log(#keys) and the mass within 64 tokens: descriptive only.
        plogp = probs * probs.clamp_min(1e-30).log()
        norm = torch.log((rows + 1).double()).clamp_min(1e-9)
        out["entropy"] = (-plogp.sum(-1).double() / norm[None]).mean(-1).cpu()
        prefix = torch.nn.functional.pad(probs.cumsum(-1), (1, 0))
        hi = (rows + 1)[None, :, None].expand(h, -1, 1)
        lo = (rows + 1 - 64).clamp(min=0)[None, :, None].expand(h, -1, 1)
        out["local_mass"] = (prefix.gather(-1, hi) - prefix.gather(-1, lo))[..., 0].double().mean(-1).cpu()
    return out


# ----------------------------------------------------------------------------- prompt profile
def per_q_head(k: torch.Tensor, num_q: int) -> torch.Tensor:
    """[Hkv,L,D] -> [Hq,L,D] (GQA: query head h reads key head h // group)."""
    return k.repeat_interleave(num_q // k.shape[0], dim=0)


@torch.inference_mode()
def profile_prompt(model, ids: Sequence[int], lengths: Sequence[int], space: OptionSpace, rows: int,
                   last_rows: int, seed: int, progress=None, extras_length: Optional[int] = None
                   ) -> Dict[int, Dict[str, torch.Tensor]]:
    """One forward of `ids` (as long as the longest length); stats for each length from its
    prefix (a causal model's first L positions do not see the rest). Returns
    {length: {signal: [layers, H, ...]}}."""
    device = next(model.parameters()).device
    lengths = sorted(set(int(n) for n in lengths))
    n_max = lengths[-1]
    n_extras = extras_length if extras_length is not None else n_max
    if len(ids) < n_max:
        raise ValueError(f"prompt has {len(ids)} tokens; {n_max} needed")
    row_sets = {}
    for n in lengths:
        g = torch.Generator().manual_seed(seed * 1_000_003 + n)
        row_sets[n] = sample_rows(n, rows, last_rows, g).to(device)
    per_layer: Dict[int, Dict[int, dict]] = {n: {} for n in lengths}

    def hook(layer, query, key, value, scale, softcap):
        q, k = query[0], per_q_head(key[0], query.shape[1])
        v = per_q_head(value[0], query.shape[1])
        for n in lengths:
            per_layer[n][layer] = layer_option_stats(space, q[:, :n], k[:, :n], row_sets[n], scale, softcap, layer,
                                                     extras=n == n_extras, v=v[:, :n], last_rows=last_rows)
        if progress is not None:
            progress.update(1)

    input_ids = torch.tensor([list(ids[:n_max])], device=device)
    with capture(model, hook):
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    out = {}
    for n in lengths:
        layers = [per_layer[n][i] for i in sorted(per_layer[n])]
        out[n] = {key: torch.stack([l[key] for l in layers]) for key in layers[0]}
    return out


# ----------------------------------------------------------------------------- answers
def answer_token(tokenizer, prompt: str, answer: str) -> int:
    """The first token of the answer where it follows `prompt` after a space (`prompt` +
    " " + `answer` must tokenize as `prompt`'s tokens followed by the answer's)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    joint = tokenizer(prompt + " " + answer)["input_ids"]
    if joint[:len(prompt_ids)] != prompt_ids or len(joint) == len(prompt_ids):
        raise ValueError("the answer's first token is not separable from the prompt's tokens; "
                         "answer margins need a prompt that ends on a token boundary")
    return joint[len(prompt_ids)]


def answer_margins(logits: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """[B] logit of each row's target token minus the best other token's logit (logits [B, V],
    the next-token logits at the prompt's end). Greedy decoding starts the answer exactly where
    the margin is > 0; its size says how firmly."""
    logits = logits.float()
    target = torch.as_tensor(list(targets), device=logits.device)[:, None]
    return logits.gather(1, target)[:, 0] - logits.scatter(1, target, float("-inf")).amax(-1)


# ----------------------------------------------------------------------------- retrieval
def _needle_token_positions(tokenizer, text: str, needles: Sequence[str], n_tokens: int) -> Optional[set]:
    spans = []
    for needle in needles:
        start = text.find(needle)
        if start >= 0:
            spans.append((start, start + len(needle)))
    if not spans:
        return None
    try:
        offsets = tokenizer(text, return_offsets_mapping=True).offset_mapping
    except (NotImplementedError, TypeError, ValueError, KeyError):
        return None  # slow tokenizers: fall back to the whole prompt
    return {i for i, (a, b) in enumerate(offsets[:n_tokens]) if b > a and any(a < e and b > s for s, e in spans)}


@torch.inference_mode()
def retrieval_scores(model, tokenizer, samples) -> torch.Tensor:
    """[layers, Hq] fraction of answer tokens for which the head's top attention (teacher
    forced, from the row that predicts the token) lands on that same token inside the needle."""
    cfg = text_config(model.config)
    device = next(model.parameters()).device
    hits = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads, dtype=torch.float64)
    total = 0
    for sample in samples:
        prompt_ids = tokenizer(sample.prompt).input_ids
        text = sample.prompt + " " + sample.answers[0]
        ids = tokenizer(text).input_ids
        common = 0
        while common < min(len(ids), len(prompt_ids)) and ids[common] == prompt_ids[common]:
            common += 1
        targets = list(range(max(common, 1), len(ids)))
        if not targets:
            continue
        needle_pos = _needle_token_positions(tokenizer, text, sample.needles, common)
        allowed = torch.zeros(len(ids), dtype=torch.bool)
        if needle_pos:
            allowed[sorted(needle_pos)] = True
        else:
            allowed[:common] = True
        rows = torch.tensor([t - 1 for t in targets], device=device)
        target_ids = torch.tensor([ids[t] for t in targets])
        ids_t = torch.tensor(ids)

        def hook(layer, query, key, value, scale, softcap, rows=rows, target_ids=target_ids,
                 allowed=allowed, ids_t=ids_t):
            q, k = query[0], per_q_head(key[0], query.shape[1])
            top = dense_rows(q, k, rows, scale, softcap).argmax(-1).cpu()  # [H,T]
            ok = allowed[top] & (ids_t[top] == target_ids[None, :])
            hits[layer] += ok.double().sum(-1)

        with capture(model, hook):
            model(input_ids=torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1)
        total += len(targets)
    return hits / max(total, 1)


# ----------------------------------------------------------------------------- verification
@torch.inference_mode()
def verify_plan(model, plan: Plan, ids: Sequence[int], rows: torch.Tensor,
                logits_rows: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Run every head's planned method on a dense forward's q/k/v (the real `select`), and score
    the sampled rows: recall [layers,H], kl (mean -log kept mass, as the profile's) and output
    fidelity = ||o_sparse - o_dense|| / ||o_dense||, each averaged over rows. With `logits_rows`,
    also the dense forward's float64 log-probabilities at those positions ("log_probs" [R, V])."""
    info = plan.model
    device = next(model.parameters()).device
    recall = torch.zeros(info.num_layers, info.num_q_heads, dtype=torch.float64)
    error = torch.zeros_like(recall)
    kl = torch.zeros_like(recall)
    rows = rows.to(device)

    def hook(layer, query, key, value, scale, softcap):
        q = query[0]
        k, v = per_q_head(key[0], q.shape[0]), per_q_head(value[0], q.shape[0])
        n = k.shape[-2]
        ctx = _causal_ctx(n, device, scale, softcap, layer)
        probs = dense_rows(q, k, rows, scale, softcap)  # [H,R,N]
        dense_out = probs @ v.float()
        groups: Dict[str, List[int]] = {}
        for h in range(q.shape[0]):
            groups.setdefault(plan.head_spec(layer, h).key(), []).append(h)
        for heads in groups.values():  # heads sharing a spec run as one group, as when patched
            spec = plan.head_spec(layer, heads[0])
            idx = torch.tensor(heads, device=device)
            sel = get_method(spec.method)(spec.params).select(q[None, idx], k[None, idx], ctx)
            if isinstance(sel, AllPairs):
                keep = torch.ones_like(probs[idx], dtype=torch.bool)
            else:
                keep = sel.rows(rows, ctx.k_pos)[0].expand(len(heads), -1, -1)
            kept = probs[idx] * keep
            mass = kept.sum(-1)  # [h,R]
            out = (kept @ v[idx].float()) / mass.clamp_min(1e-30)[..., None]
            rel = (out - dense_out[idx]).norm(dim=-1) / dense_out[idx].norm(dim=-1).clamp_min(1e-12)
            recall[layer, heads] = mass.double().mean(-1).cpu()
            kl[layer, heads] = row_kl(mass.double()).mean(-1).cpu()
            error[layer, heads] = rel.double().mean(-1).cpu()

    keep = 1 if logits_rows is None else logits_rows.to(device)
    with capture(model, hook):
        out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False, logits_to_keep=keep)
    result = {"recall": recall, "kl": kl, "fidelity_error": error}
    if logits_rows is not None:
        result["log_probs"] = torch.log_softmax(out.logits[0].double(), -1)
    return result


__all__ = ["IMPLEMENTATION", "OptionSpace", "capture", "dense_rows", "layer_option_stats", "profile_prompt",
           "retrieval_scores", "sample_rows", "verify_plan"]
