"""``patchattn eval``: synthetic long-context accuracy and prefill time, dense vs patched.

    patchattn eval --model smollm2-135m --plan plan.json --tasks passkey,niah_single \\
        --lengths 2048,4096,8192 --samples 20 --out results/

The model is loaded once; every task x length gets the same seeded samples in both modes
(dense, then patched with ``patch_model`` and restored with ``unpatch_model``). Decoding is
greedy through the KV cache, so the timed prompt forward is exactly the prefill the plan makes
sparse. Writes ``results.json`` (summary + per-sample completions), ``results.md`` and
``accuracy.png`` into ``--out``.

From Python, on a model already loaded::

    samples = build_samples(tokenizer, ["passkey"], [1024], n=4)
    result = evaluate(model, tokenizer, samples, plan)
    print(markdown_table(result))
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import platform
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from . import synthetic

log = logging.getLogger(__name__)

__all__ = ["eval_main", "run_eval", "evaluate", "build_samples", "markdown_table", "write_results",
           "greedy_generate", "resolve_batch_size", "EvalError"]

Job = Tuple[str, int]  # (task, length)
Samples = Dict[Job, List[synthetic.Sample]]

# Prompt tokens per batch when --batch-size is auto on CUDA: 8 prompts of 8k, 16 of 4k. Dense
# prefill goes through SDPA and the torch reference chunks its queries by batch x heads x keys,
# so memory stays bounded; the KV cache of a 135M-8B model at 64k tokens fits an 80 GB card.
TOKENS_PER_BATCH = 65536


class EvalError(ValueError):
    """The requested evaluation cannot run as asked (bad task, length, device, dtype)."""


# ---------------------------------------------------------------------------------- generation
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eos_ids(model, tokenizer) -> set:
    ids = {tokenizer.eos_token_id}
    cfg = getattr(model, "generation_config", None)
    extra = getattr(cfg, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return {i for i in ids if i is not None}


def _cache_arg(model) -> str:
    # transformers >= 5.2x renamed `past_key_values` to `cache` (old name warns); support both.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def _stopped(tokenizer, tokens: List[int], stop: Sequence[str]) -> bool:
    text = tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
    return any(s and s in text for s in stop)


def left_padded(tokenizer, prompts: Sequence[str], device) -> Tuple[torch.Tensor, dict]:
    """(input_ids, extra forward kwargs) for a batch of prompts, left-padded so that every
    row's next token sits at the right edge. Batch 1 has no padding: no mask is passed, so the
    model (and a sparse patch) sees plain causal attention."""
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if len(prompts) == 1:
        return ids, {}
    return ids, {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


@torch.inference_mode()
def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                    stop: Sequence[str] = (), prefill_repeats: int = 1) -> Tuple[List[str], float]:
    """Greedy completions of `prompts` (one batch) and the seconds the prompt forward took
    (the fastest of `prefill_repeats` identical forwards)."""
    device = model.device
    ids, extra = left_padded(tokenizer, prompts, device)
    prefill_s, out = float("inf"), None
    for _ in range(max(1, prefill_repeats)):
        out = None  # free the previous repeat's KV cache before the next forward
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **extra)
        _sync(device)
        prefill_s = min(prefill_s, time.perf_counter() - start)

    eos, cache_arg = _eos_ids(model, tokenizer), _cache_arg(model)
    new: List[List[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        for row, tok in enumerate(nxt.tolist()):
            if not done[row]:
                done[row] = tok in eos
                if not done[row]:
                    new[row].append(tok)
                    done[row] = _stopped(tokenizer, new[row], stop)
        if all(done) or step == max_new_tokens - 1:
            break
        if "attention_mask" in extra:
            mask = extra["attention_mask"]
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=-1)
            extra.update(attention_mask=mask, position_ids=extra["position_ids"][:, -1:] + 1)
        extra[cache_arg] = _cache_of(out)
        out = model(input_ids=nxt[:, None], use_cache=True, **extra)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in new]
    return [synthetic.truncate_at_stop(t, stop) for t in texts], prefill_s


# ---------------------------------------------------------------------------------- samples
def build_samples(tokenizer, tasks: Sequence[str], lengths: Sequence[int], n: int, seed: int = 0,
                  haystack=None) -> Samples:
    """{(task, length): n samples}, generated for `tokenizer` (same arguments -> same samples)."""
    unknown = [t for t in tasks if t not in synthetic.TASKS]
    if unknown:
        raise EvalError(f"unknown task(s) {unknown}; choose from {', '.join(synthetic.TASKS)}")
    return {(task, length): synthetic.generate_samples(task, tokenizer, length, n, seed=seed, haystack=haystack)
            for task in tasks for length in lengths}


def context_length(config) -> Optional[int]:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(cfg, "max_position_embeddings", None)


def check_lengths(config, lengths: Sequence[int]) -> None:
    """Refuse prompt lengths the model was not built for (RoPE models would run, but the
    accuracy numbers would measure extrapolation, not the plan)."""
    bad = [n for n in lengths if n <= 0]
    if bad:
        raise EvalError(f"lengths must be positive, got {bad}")
    limit = context_length(config)
    too_long = [n for n in lengths if limit and n > limit]
    if too_long:
        raise EvalError(f"lengths {too_long} exceed the model's context of {limit} tokens "
                        f"(max_position_embeddings); use lengths <= {limit}")


def resolve_batch_size(batch_size: Union[int, str], device: torch.device, length: int, n: int) -> int:
    """Prompts per prefill. `auto`: 1 on CPU (compute-bound, so batching only adds padding
    work, and batch 1 keeps numerics unpadded), TOKENS_PER_BATCH // length on CUDA."""
    if batch_size != "auto":
        return max(1, int(batch_size))
    if torch.device(device).type != "cuda":
        return 1
    return max(1, min(n, TOKENS_PER_BATCH // max(1, length)))


# ---------------------------------------------------------------------------------- one mode
def _run_job(model, tokenizer, samples: List[synthetic.Sample], batch_size: int,
             max_new_tokens: Optional[int], prefill_repeats: int, bar) -> List[dict]:
    rows = []
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        budget = max_new_tokens or batch[0].max_new_tokens
        texts, prefill_s = greedy_generate(model, tokenizer, [s.prompt for s in batch], budget, batch[0].stop,
                                           prefill_repeats=prefill_repeats)
        for s, text in zip(batch, texts):
            # Batched prompts share one timed forward: report the per-prompt share.
            rows.append({"completion": text, "score": synthetic.score(s.task, s, text),
                         "prefill_s": prefill_s / len(batch)})
        bar.update(len(batch))
    return rows


def _warmup(model, tokenizer, samples: Samples, batch_size, progress: bool) -> None:
    """Untimed prefills that absorb one-time costs (allocator growth, cuBLAS/Triton kernel
    selection and compilation). On CUDA those are per shape, so every length gets one at its
    batch size; on CPU one short forward is enough."""
    device = model.device
    if device.type == "cuda":
        firsts = {}
        for (task, length), job in samples.items():
            firsts.setdefault(length, job)
    else:
        shortest = min(samples, key=lambda job: job[1])
        firsts = {shortest[1]: samples[shortest]}
    for length, job in tqdm(sorted(firsts.items()), desc="warm-up", unit="length", disable=not progress,
                            leave=False):
        n = resolve_batch_size(batch_size, device, length, len(job)) if device.type == "cuda" else 1
        greedy_generate(model, tokenizer, [s.prompt for s in job[:n]], 1)


def _run_mode(model, tokenizer, samples: Samples, mode: str, batch_size, max_new_tokens, warmup: bool,
              prefill_repeats: int, telemetry: bool, progress: bool) -> Dict[Job, dict]:
    import patchattn

    if warmup:
        _warmup(model, tokenizer, samples, batch_size, progress)
    results = {}
    total = sum(len(v) for v in samples.values())
    with tqdm(total=total, desc=mode, unit="sample", disable=not progress) as bar:
        for job, job_samples in samples.items():
            bar.set_postfix_str(f"{job[0]} @ {job[1]}")
            bs = resolve_batch_size(batch_size, model.device, job[1], len(job_samples))
            if telemetry:
                patchattn.reset_stats(model)
            rows = _run_job(model, tokenizer, job_samples, bs, max_new_tokens, prefill_repeats, bar)
            entry = {"rows": rows, "batch_size": bs, "density": None, "sparse_calls": None, "fallbacks": None}
            if telemetry:
                st = patchattn.stats(model)
                entry.update(density=st.density, sparse_calls=st.sparse_calls, fallbacks=dict(st.fallbacks))
            results[job] = entry
    return results


def evaluate(model, tokenizer, samples: Samples, plan=None, *, batch_size: Union[int, str] = "auto",
             max_new_tokens: Optional[int] = None, warmup: bool = True, progress: bool = True,
             prefill_repeats: Optional[int] = None, checkpoint: Optional[Callable[[dict], None]] = None) -> dict:
    """Dense (and, with `plan`, patched) accuracy and prefill time on the same `samples`.

    Returns {"results": one row per task x length, "samples": per-sample completions}.
    `checkpoint(result)` is called with the dense-only result before the patched pass, so a
    crash in a long patched run keeps the baseline. `prefill_repeats` (default 2 on CUDA, 1 on
    CPU) times each batch's prefill that many times and keeps the fastest: on a GPU a 2k-token
    prefill of a small model takes milliseconds, so one-off costs of a new padded shape would
    otherwise dominate a cell measured by one batch; on CPU a repeat costs seconds and
    shapes need no compilation.
    """
    import patchattn

    if prefill_repeats is None:
        prefill_repeats = 2 if model.device.type == "cuda" else 1
    if plan is not None:
        plan.check_model(model)  # fail before the dense pass, not after it
    dense = _run_mode(model, tokenizer, samples, "dense", batch_size, max_new_tokens, warmup, prefill_repeats,
                      telemetry=False, progress=progress)
    patched = None
    if plan is not None:
        if checkpoint is not None:
            checkpoint(_summarize(samples, dense, None))
        patchattn.patch_model(model, plan)
        try:
            patched = _run_mode(model, tokenizer, samples, "patched", batch_size, max_new_tokens, warmup,
                                prefill_repeats, telemetry=True, progress=progress)
        finally:
            patchattn.unpatch_model(model)
    return _summarize(samples, dense, patched)


# ---------------------------------------------------------------------------------- summary
def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _summarize(samples: Samples, dense, patched) -> dict:
    summary, per_sample = [], []
    for job, job_samples in samples.items():
        d_rows = dense[job]["rows"]
        p_job = patched[job] if patched else None
        p_rows = p_job["rows"] if p_job else [None] * len(d_rows)
        d_acc = _mean(r["score"] for r in d_rows)
        p_acc = _mean(r["score"] for r in p_rows if r) if p_job else None
        d_time = _mean(r["prefill_s"] for r in d_rows)
        p_time = _mean(r["prefill_s"] for r in p_rows if r) if p_job else None
        summary.append({
            "task": job[0], "length": job[1], "n": len(job_samples),
            "prompt_tokens": _mean(s.n_tokens for s in job_samples),
            "dense": d_acc, "patched": p_acc, "delta": None if p_acc is None else p_acc - d_acc,
            "density": p_job["density"] if p_job else None,
            # Share of patched prefill layer-calls that ran dense because the prompt was below the
            # plan's dense_below or the GPU backend's break-even length; `density` covers only the rest.
            "dense_fallback_share": _fallback_share(p_job) if p_job else None,
            "sparse_calls": p_job["sparse_calls"] if p_job else None,
            "fallbacks": p_job["fallbacks"] if p_job else None,
            "prefill_s_dense": d_time, "prefill_s_patched": p_time,
            "speedup": d_time / p_time if d_time and p_time else None,
            "batch_size": dense[job]["batch_size"],
        })
        for s, d, p in zip(job_samples, d_rows, p_rows):
            per_sample.append({
                "task": s.task, "length": s.length, "index": s.index, "depth": s.depth,
                "n_tokens": s.n_tokens, "answers": list(s.answers),
                "dense": d, "patched": p,
            })
    return {"results": summary, "samples": per_sample}


def _fallback_share(job: dict) -> Optional[float]:
    short = (job["fallbacks"] or {}).get("short_prompt", 0)
    total = short + (job["sparse_calls"] or 0)
    return short / total if total else None


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _density_cell(r: dict) -> str:
    share = r.get("dense_fallback_share")
    if not share:
        return _fmt(r["density"], ".3f")
    if r["density"] is None:
        return "1 (all dense_below)"
    return f"{r['density']:.3f} ({100 * share:.0f}% dense_below)"


def markdown_table(result: dict) -> str:
    """Task x length table: accuracy dense / patched / delta, realized density, prefill time."""
    lines = [
        "| task | length | tokens | dense | patched | Δ | density | prefill s dense | prefill s patched | speedup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['task']} | {r['length']} | {_fmt(r['prompt_tokens'], '.0f')} | {_fmt(r['dense'], '.3f')} | "
            f"{_fmt(r['patched'], '.3f')} | {_fmt(r['delta'], '+.3f')} | {_density_cell(r)} | "
            f"{_fmt(r['prefill_s_dense'], '.3f')} | {_fmt(r['prefill_s_patched'], '.3f')} | "
            f"{_fmt(r['speedup'], '.2f')}{'' if r['speedup'] is None else 'x'} |"
        )
    return "\n".join(lines) + "\n"


def _markdown(meta: dict, result: dict) -> str:
    head = [
        f"# patchattn eval: {meta['model']}",
        "",
        f"plan: `{meta['plan'] or 'none (dense only)'}` · samples per cell: {meta['samples']} · "
        f"seed: {meta['seed']} · device: {meta['device']} ({meta.get('device_name', '')}) · "
        f"dtype: {meta['dtype']} · batch size: {meta['batch_size']}",
        "",
        "Accuracy is RULER string match (fraction of gold answers in the greedy completion). "
        "Density is the realized fraction of causal query-key pairs the patched prefill computed "
        "(telemetry). \"dense_below\": prefills shorter than the plan's dense_below or the GPU "
        "backend's break-even length ran dense (set PATCHATTN_DENSE_BELOW=0 to apply the plan at "
        "every length). Prefill seconds are per prompt (a batched forward's time split evenly).",
        "",
    ]
    return "\n".join(head) + markdown_table(result)


def _plot(path: Path, meta: dict, summary: List[dict]) -> bool:
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: skipping %s (pip install 'patchattn[plot]')", path.name)
        return False
    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(11, 4.5))
    tasks = list(dict.fromkeys(r["task"] for r in summary))
    lengths = sorted({r["length"] for r in summary})
    for i, task in enumerate(tasks):
        rows = sorted((r for r in summary if r["task"] == task), key=lambda r: r["length"])
        xs, color = [r["length"] for r in rows], f"C{i % 10}"
        ax.plot(xs, [r["dense"] for r in rows], "o-", color=color, label=f"{task} dense")
        if meta["plan"]:
            ax.plot(xs, [r["patched"] for r in rows], "x--", color=color, label=f"{task} patched")
    # Prefill time depends on length, not on the task: average over tasks per length.
    for key, style, label in (("prefill_s_dense", "o-", "dense"), ("prefill_s_patched", "x--", "patched")):
        ys = [_mean(r[key] for r in summary if r["length"] == n) for n in lengths]
        if any(y is not None for y in ys):
            ax_t.plot(lengths, ys, style, color="k" if label == "dense" else "C3", label=label)
    for a in (ax, ax_t):
        if len(lengths) > 1:
            a.set_xscale("log", base=2)
        a.set_xticks(lengths, [str(n) for n in lengths])
        a.set_xlabel("prompt length (tokens)")
        a.grid(alpha=0.3)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{Path(meta['model']).name}: dense (solid) vs patched (dashed)", fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="best")
    ax_t.set_ylabel("prefill seconds per prompt")
    ax_t.set_title(f"prefill time ({meta['device']}, {meta['dtype']})", fontsize=10)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(out: Union[str, Path], meta: dict, result: dict, plot: bool = True) -> dict:
    """Write results.json, results.md and (with `plot`) accuracy.png into `out`; return the JSON."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    full = {"meta": meta, **result}
    (out / "results.json").write_text(json.dumps(full, indent=2) + "\n")
    (out / "results.md").write_text(_markdown(meta, result))
    if plot:
        _plot(out / "accuracy.png", meta, result["results"])
    return full


# ---------------------------------------------------------------------------------- driver
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device_dtype(device: Optional[str], dtype: str) -> Tuple[str, torch.dtype]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: this torch build sees no CUDA device "
                        f"(torch {torch.__version__}, cuda {torch.version.cuda})")
    if dtype == "auto":
        return device, torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise EvalError(f"--dtype {dtype!r}: choose from auto, {', '.join(DTYPES)}")
    return device, DTYPES[dtype]


def _model_config(spec: str):
    """The model's config without its weights, to check lengths before a long load; None if
    it cannot be read separately (the full load then reports the problem)."""
    from transformers import AutoConfig

    from patchattn import models

    try:
        source, gguf = models.resolve(spec)
        return AutoConfig.from_pretrained(source, **({"gguf_file": gguf} if gguf else {}))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure is re-raised by models.load
        log.debug("config of %s not readable on its own: %s", spec, e)
        return None


def _meta(args, device: str, dtype: torch.dtype) -> dict:
    import transformers

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    return {"model": args.model, "plan": args.plan, "tasks": args.tasks, "lengths": args.lengths,
            "samples": args.samples, "seed": args.seed, "haystack": args.haystack,
            "device": device, "device_name": name, "dtype": str(dtype).removeprefix("torch."),
            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads()}


def _setup(args):
    """Everything that can fail on bad input, before any timed work: (model, tok, plan, samples)."""
    import patchattn
    from patchattn import models

    if args.samples < 1:
        raise EvalError(f"--samples must be >= 1, got {args.samples}")
    if not args.tasks or not args.lengths:
        raise EvalError("--tasks and --lengths must each name at least one entry")
    device, dtype = _device_dtype(args.device, args.dtype)
    plan = patchattn.Plan.load(args.plan) if args.plan else None
    config = _model_config(args.model)
    if config is not None:
        check_lengths(config, args.lengths)
    model, tokenizer = models.load(args.model, dtype=dtype, device=device)
    check_lengths(model.config, args.lengths)
    if plan is not None:
        plan.check_model(model)
    samples = build_samples(tokenizer, args.tasks, args.lengths, args.samples, seed=args.seed,
                            haystack=args.haystack)
    return model, tokenizer, plan, samples, device, dtype


def _execute(args, model, tokenizer, plan, samples, device, dtype) -> dict:
    meta = _meta(args, device, dtype)
    result = evaluate(model, tokenizer, samples, plan, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, warmup=args.warmup,
                      prefill_repeats=args.prefill_repeats,
                      checkpoint=lambda partial: write_results(args.out, meta, partial, plot=False))
    return write_results(args.out, meta, result)


def run_eval(args: argparse.Namespace) -> dict:
    """Run the evaluation described by parsed `eval` arguments; write and return the results."""
    return _execute(args, *_setup(args))


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return parse


def _task_list(text: str) -> List[str]:
    if text.strip() == "all":
        return list(synthetic.TASKS)
    tasks = _csv(str)(text)
    unknown = [t for t in tasks if t not in synthetic.TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown}; choose from {', '.join(synthetic.TASKS)}")
    return tasks


def _batch_size(text: str) -> Union[int, str]:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer or 'auto'")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="patchattn eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="folder, hub id, .gguf path, or alias (smollm2-135m)")
    p.add_argument("--plan", default=None, help="plan JSON; without it only the dense baseline runs")
    p.add_argument("--tasks", type=_task_list, default=list(synthetic.DEFAULT_TASKS),
                   help=f"comma list (or 'all') from: {', '.join(synthetic.TASKS)}")
    p.add_argument("--lengths", type=_csv(int), default=[2048, 4096, 8192], help="prompt lengths in tokens")
    p.add_argument("--samples", type=int, default=20, help="samples per task and length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", default=None, help=".txt file or folder of .txt (default: filler)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation budget (default: per task, 12-96 tokens)")
    p.add_argument("--batch-size", type=_batch_size, default="auto",
                   help=f"prompts per prefill; auto: 1 on CPU, {TOKENS_PER_BATCH} tokens' worth on CUDA")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--prefill-repeats", type=int, default=None,
                   help="time each prefill this many times, keep the fastest (default: 2 on cuda, 1 on cpu)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the untimed warm-up prefills before each mode")
    return p


def eval_main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``patchattn eval``; prints the markdown table, returns an exit code."""
    import sys

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        model, tokenizer, plan, samples, device, dtype = _setup(args)
    except (ValueError, FileNotFoundError) as e:  # EvalError, PlanError, unsizable prompts, paths
        print(f"patchattn eval: error: {e}", file=sys.stderr)
        return 2
    full = _execute(args, model, tokenizer, plan, samples, device, dtype)
    print(_markdown(full["meta"], full))
    print(f"wrote {args.out}/results.json, results.md, accuracy.png")
    return 0
