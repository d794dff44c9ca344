"""``patchattn eval``: synthetic long-context accuracy and prefill time, dense vs patched.

    patchattn eval --model smollm2-135m --plan plan.json --tasks passkey,niah_single \\
        --lengths 2048,4096,8192 --samples 20 --out results/

The model is loaded once; every task x length gets the same seeded samples in both modes
(dense, then patched with ``patch_model`` and restored with ``unpatch_model``). Decoding is
greedy through the KV cache, so the timed prompt forward is exactly the prefill the plan makes
sparse. Writes ``results.json`` (summary + per-sample completions), ``results.md`` and
``accuracy.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from . import synthetic

log = logging.getLogger(__name__)

__all__ = ["eval_main", "run_eval", "greedy_generate"]

Job = Tuple[str, int]  # (task, length)


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


@torch.inference_mode()
def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                    stop: Sequence[str] = ()) -> Tuple[List[str], float]:
    """Greedy completions of `prompts` (one batch) and the seconds the prompt forward took."""
    device = model.device
    # Left padding: every row's next token then sits at the right edge.
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    # Batch 1 has no padding: pass no mask, so the model (and a sparse patch) sees plain causal.
    extra = {}
    if len(prompts) > 1:
        extra = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **extra)
    _sync(device)
    prefill_s = time.perf_counter() - start

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
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=-1)
            extra.update(attention_mask=mask, position_ids=extra["position_ids"][:, -1:] + 1)
        extra[cache_arg] = _cache_of(out)
        out = model(input_ids=nxt[:, None], use_cache=True, **extra)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in new]
    return [synthetic.truncate_at_stop(t, stop) for t in texts], prefill_s


# ---------------------------------------------------------------------------------- one mode
def _run_job(model, tokenizer, samples: List[synthetic.Sample], batch_size: int,
             max_new_tokens: Optional[int], bar) -> List[dict]:
    rows = []
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        budget = max_new_tokens or batch[0].max_new_tokens
        texts, prefill_s = greedy_generate(model, tokenizer, [s.prompt for s in batch], budget, batch[0].stop)
        for s, text in zip(batch, texts):
            rows.append({"completion": text, "score": synthetic.score(s.task, s, text),
                         "prefill_s": prefill_s / len(batch)})
        bar.update(len(batch))
    return rows


def _warmup(model, tokenizer, sample: synthetic.Sample) -> None:
    # The first forward pays one-time costs (allocator growth, kernel compilation); keep them
    # out of the first timed prefill.
    greedy_generate(model, tokenizer, [sample.prompt], 1)


def _run_mode(model, tokenizer, samples: Dict[Job, List[synthetic.Sample]], mode: str, args,
              telemetry: bool) -> Dict[Job, dict]:
    import patchattn

    if args.warmup:
        shortest = min(samples, key=lambda job: job[1])
        _warmup(model, tokenizer, samples[shortest][0])
    results = {}
    total = sum(len(v) for v in samples.values())
    with tqdm(total=total, desc=mode, unit="sample") as bar:
        for job, job_samples in samples.items():
            bar.set_postfix_str(f"{job[0]} @ {job[1]}")
            if telemetry:
                patchattn.reset_stats(model)
            rows = _run_job(model, tokenizer, job_samples, args.batch_size, args.max_new_tokens, bar)
            density = patchattn.stats(model).density if telemetry else None
            results[job] = {"rows": rows, "density": density}
    return results


# ---------------------------------------------------------------------------------- summary
def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _summarize(samples, dense, patched) -> Tuple[List[dict], List[dict]]:
    summary, per_sample = [], []
    for job, job_samples in samples.items():
        d_rows = dense[job]["rows"]
        p_rows = patched[job]["rows"] if patched else [None] * len(d_rows)
        d_acc = _mean(r["score"] for r in d_rows)
        p_acc = _mean(r["score"] for r in p_rows if r) if patched else None
        summary.append({
            "task": job[0], "length": job[1], "n": len(job_samples),
            "prompt_tokens": _mean(s.n_tokens for s in job_samples),
            "dense": d_acc, "patched": p_acc, "delta": None if p_acc is None else p_acc - d_acc,
            "density": patched[job]["density"] if patched else None,
            "prefill_s_dense": _mean(r["prefill_s"] for r in d_rows),
            "prefill_s_patched": _mean(r["prefill_s"] for r in p_rows if r) if patched else None,
        })
        for s, d, p in zip(job_samples, d_rows, p_rows):
            per_sample.append({
                "task": s.task, "length": s.length, "index": s.index, "depth": s.depth,
                "n_tokens": s.n_tokens, "answers": list(s.answers),
                "dense": d, "patched": p,
            })
    return summary, per_sample


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _markdown(meta: dict, summary: List[dict]) -> str:
    lines = [
        f"# patchattn eval: {meta['model']}",
        "",
        f"plan: `{meta['plan'] or 'none (dense only)'}` · samples per cell: {meta['samples']} · "
        f"seed: {meta['seed']} · device: {meta['device']} · dtype: {meta['dtype']}",
        "",
        "| task | length | tokens | dense | patched | Δ | density | prefill s dense / patched |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        lines.append(
            f"| {r['task']} | {r['length']} | {_fmt(r['prompt_tokens'], '.0f')} | {_fmt(r['dense'], '.3f')} | "
            f"{_fmt(r['patched'], '.3f')} | {_fmt(r['delta'], '+.3f')} | {_fmt(r['density'], '.3f')} | "
            f"{_fmt(r['prefill_s_dense'], '.3f')} / {_fmt(r['prefill_s_patched'], '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def _plot(path: Path, meta: dict, summary: List[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    tasks = list(dict.fromkeys(r["task"] for r in summary))
    for i, task in enumerate(tasks):
        rows = sorted((r for r in summary if r["task"] == task), key=lambda r: r["length"])
        xs, color = [r["length"] for r in rows], f"C{i % 10}"
        ax.plot(xs, [r["dense"] for r in rows], "o-", color=color, label=f"{task} dense")
        if meta["plan"]:
            ax.plot(xs, [r["patched"] for r in rows], "x--", color=color, label=f"{task} patched")
    lengths = sorted({r["length"] for r in summary})
    if len(lengths) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{Path(meta['model']).name}: dense (solid) vs patched (dashed)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------- driver
def _device_dtype(device: Optional[str], dtype: str) -> Tuple[str, torch.dtype]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return device, torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, getattr(torch, dtype)


def _warn_context(model, lengths: Sequence[int]) -> None:
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    too_long = [n for n in lengths if limit and n > limit]
    if too_long:
        log.warning("lengths %s exceed the model's context of %s tokens", too_long, limit)


def run_eval(args: argparse.Namespace) -> dict:
    """Run the evaluation described by parsed `eval` arguments; write and return the results."""
    import patchattn
    from patchattn import models

    device, dtype = _device_dtype(args.device, args.dtype)
    model, tokenizer = models.load(args.model, dtype=dtype, device=device)
    plan = patchattn.Plan.load(args.plan) if args.plan else None
    _warn_context(model, args.lengths)
    samples = {
        (task, n): synthetic.generate_samples(task, tokenizer, n, args.samples, seed=args.seed,
                                              haystack=args.haystack)
        for task in args.tasks for n in args.lengths
    }
    dense = _run_mode(model, tokenizer, samples, "dense", args, telemetry=False)
    patched = None
    if plan is not None:
        patchattn.patch_model(model, plan)
        try:
            patched = _run_mode(model, tokenizer, samples, "patched", args, telemetry=True)
        finally:
            patchattn.unpatch_model(model)
    meta = {"model": args.model, "plan": args.plan, "tasks": args.tasks, "lengths": args.lengths,
            "samples": args.samples, "seed": args.seed, "haystack": args.haystack,
            "device": device, "dtype": str(dtype).removeprefix("torch."),
            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    summary, per_sample = _summarize(samples, dense, patched)
    return _write(Path(args.out), meta, summary, per_sample)


def _write(out: Path, meta: dict, summary: List[dict], per_sample: List[dict]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "results": summary, "samples": per_sample}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(_markdown(meta, summary))
    _plot(out / "accuracy.png", meta, summary)
    return result


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def _task_list(text: str) -> List[str]:
    tasks = _csv(str)(text)
    unknown = [t for t in tasks if t not in synthetic.TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown}; choose from {', '.join(synthetic.TASKS)}")
    return tasks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="patchattn eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="folder, hub id, .gguf path, or alias (smollm2-135m)")
    p.add_argument("--plan", default=None, help="plan JSON; without it only the dense baseline runs")
    p.add_argument("--tasks", type=_task_list, default=list(synthetic.DEFAULT_TASKS),
                   help=f"comma list from: {', '.join(synthetic.TASKS)}")
    p.add_argument("--lengths", type=_csv(int), default=[2048, 4096, 8192], help="prompt lengths in tokens")
    p.add_argument("--samples", type=int, default=20, help="samples per task and length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", default=None, help=".txt file or folder of .txt (default: filler)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation budget (default: per task, 12-96 tokens)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the untimed warm-up forward before each mode")
    return p


def eval_main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``patchattn eval``; prints the markdown table, returns an exit code."""
    args = build_parser().parse_args(argv)
    result = run_eval(args)
    print(_markdown(result["meta"], result["results"]))
    print(f"wrote {args.out}/results.json, results.md, accuracy.png")
    return 0
