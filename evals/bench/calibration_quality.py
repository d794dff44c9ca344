"""Calibrated plan vs uniform plans at matched realized density, on held-out prompts.

    python evals/bench/calibration_quality.py --model smollm2-135m \\
        --plan patchattn/plans/smollm2-135m.budget.json \\
        --text ../shared/assets/corpora/wikitext-2-raw/wiki.test.raw \\
        --lengths 4096,8192 --samples 20 --out evals/bench/results/calibration_quality.json
    # tiny CPU smoke run:
    python evals/bench/calibration_quality.py --lengths 1024 --samples 2 --tokens 2048 --window 1024

Rows: dense, the calibrated plan, and uniform `vertical_slash` and `streaming` plans whose
BudgetRule scale is searched (bisection in log-scale) so that their realized density on the
eval prompts matches the calibrated plan's. Per plan: realized density over every patched
prefill of the run, passkey accuracy per length (synthetic prompts, seed distinct from
calibration, key at depths spread 0..1, greedy decoding) and wikitext perplexity (first
--tokens tokens, windows of --window) with its delta vs dense. None of these prompts are
calibration prompts (the shipped plan was calibrated on LongBench-v2 documents).
Runs on CUDA when available (--device auto), on CPU otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from patchattn import Plan, patch_model, reset_stats, stats, unpatch_model
from patchattn.evals import synthetic
from patchattn.evals.perplexity import perplexity, read_text, token_windows
from patchattn.evals.runner import greedy_generate, left_padded
from patchattn.models import load
from patchattn.profiling import answer_margins, answer_token

DEFAULT_PLAN = Path(__file__).resolve().parents[2] / "patchattn" / "plans" / "smollm2-135m.budget.json"
DEFAULT_TEXT = Path(__file__).resolve().parents[3] / "shared" / "assets" / "corpora" / "wikitext-2-raw" / "wiki.test.raw"

# The uniform families whose one scale knob is searched to match density.
UNIFORM = {
    "uniform_vertical_slash": ("vertical_slash", lambda s: {"vertical": {"scale": s}, "slash": {"scale": s},
                                                            "last_q": 64, "sink": 4, "window": 64}),
    "uniform_streaming": ("streaming", lambda s: {"sink": 4, "window": {"scale": s, "min": 16}}),
}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def _prefill_density(model, plan: Plan, inputs: List[List[int]]) -> float:
    """Realized density of `plan` over prefills of `inputs` (logits of the last token only)."""
    device = next(model.parameters()).device
    patch_model(model, plan)
    try:
        reset_stats(model)
        for ids in inputs:
            model(input_ids=torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1)
        return float(stats(model).density)
    finally:
        unpatch_model(model)


def match_density(model, family: str, target: float, inputs: List[List[int]], tol: float = 0.01,
                  iters: int = 10, log=print) -> tuple:
    """Bisection on log(scale) of a uniform plan until its realized density is within `tol`
    (relative) of `target`; returns (scale, density, plan)."""
    method, params = UNIFORM[family]
    lo, hi = math.log(1e-4), math.log(1.0)
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        scale = float(f"{math.exp(mid):.5g}")
        plan = Plan.uniform(model, method, params(scale))
        d = _prefill_density(model, plan, inputs)
        log(f"  {family}: scale {scale:.5g} -> density {d:.4f} (target {target:.4f})")
        if best is None or abs(d - target) < abs(best[1] - target):
            best = (scale, d, plan)
        if abs(d - target) <= tol * target:
            break
        if d > target:
            hi = mid
        else:
            lo = mid
    return best


DEPTH_QUARTERS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))


def accuracy_by_depth(samples: list, scores: List[float]) -> List[Optional[float]]:
    """Mean score per quarter of needle depth (DEPTH_QUARTERS; the last quarter includes 1.0;
    None for a quarter without samples): where in the context retrieval fails."""
    out = []
    for lo, hi in DEPTH_QUARTERS:
        picked = [x for s, x in zip(samples, scores) if s.depth is not None and lo <= s.depth < hi + (hi == 1.0)]
        out.append(sum(picked) / len(picked) if picked else None)
    return out


def answer_split(scores: List[float], completions: List[str]) -> Tuple[float, Optional[float]]:
    """(share of completions that open with a number, mean score among those; None without any)
    from each completion's score: whether a miss is a wrong retrieval or an answer in words
    ("a special key that ...")."""
    numeric = [x for x, t in zip(scores, completions) if re.match(r"\s*\d", t)]
    return len(numeric) / len(completions), (sum(numeric) / len(numeric) if numeric else None)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> Tuple[float, float]:
    """95 % Wilson score interval of an accuracy of `correct` / `n` (sane at 0 / n and n / n,
    unlike the normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_exact_test(a: List[float], b: List[float]) -> dict:
    """Exact two-sided McNemar test of two plans scored on the same prompts: only prompts that
    one plan gets right and the other wrong count. Returns the discordant counts and p (1.0
    without any discordant prompt)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores of different lengths: {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b) if x > y)
    only_b = sum(1 for x, y in zip(a, b) if y > x)
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n if n else 1.0
    return {"only_first": only_a, "only_second": only_b, "p": min(1.0, 2 * tail)}


def passkey_comparisons(rows: Dict[str, dict], lengths: List[int], first: str = "calibrated") -> List[dict]:
    """`first`'s passkey answers against every other row's, per length: accuracies with Wilson
    intervals and the paired exact test (is a difference of a few prompts more than chance?)."""
    out = []
    for other in [r for r in rows if r != first]:
        for n in lengths:
            a, b = rows[first]["passkey_scores"][str(n)], rows[other]["passkey_scores"][str(n)]
            test = paired_exact_test(a, b)
            out.append({"first": first, "second": other, "length": n, "samples": len(a),
                        "first_correct": int(sum(a)), "second_correct": int(sum(b)),
                        "first_interval": [_r4(x) for x in wilson_interval(int(sum(a)), len(a))],
                        "second_interval": [_r4(x) for x in wilson_interval(int(sum(b)), len(b))], **test})
    return out


def comparison_lines(comparisons: List[dict]) -> List[str]:
    return [f"{c['first']} vs {c['second']} @{c['length']}: {c['first_correct']}/{c['samples']} "
            f"[{c['first_interval'][0]:.2f}, {c['first_interval'][1]:.2f}] vs {c['second_correct']}/{c['samples']} "
            f"[{c['second_interval'][0]:.2f}, {c['second_interval'][1]:.2f}]; right only in the first / second: "
            f"{c['only_first']} / {c['only_second']}, exact McNemar p = {c['p']:.3g}" for c in comparisons]


def _r4(x: float) -> float:
    return round(x, 4)


@torch.inference_mode()
def first_token_margins(model, tokenizer, samples: list) -> List[float]:
    """Per sample (one batch, left-padded): the logit of its answer's first token minus the
    best other token's logit, at the prompt's last position (one prefill, no decoding).
    Greedy decoding starts the answer exactly where the margin is > 0. On SmolLM2 passkey
    prompts that token is the space before the digits, so the margin measures the choice
    between answering with the number and answering in words, the only way those prompts fail."""
    device = next(model.parameters()).device
    targets = [answer_token(tokenizer, s.prompt, s.answers[0]) for s in samples]
    ids, extra = left_padded(tokenizer, [s.prompt for s in samples], device)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=1, **extra).logits[:, -1]
    return answer_margins(logits, targets).tolist()


@torch.inference_mode()
def evaluate(model, tokenizer, plan: Optional[Plan], text: str, tokens: int, window: int,
             passkey: Dict[int, list], batch_size: int, progress: bool, first_token: bool = False) -> dict:
    """Realized density, perplexity and passkey accuracy of `plan` (None: dense). first_token:
    score passkey from each prompt's next-token margin (first_token_margins) instead of decoding;
    the row then has `passkey_margins` and no completions."""
    device = next(model.parameters()).device
    if plan is not None:
        patch_model(model, plan)
        reset_stats(model)
    try:
        _sync(device)
        start = time.perf_counter()
        ppl = perplexity(model, tokenizer, text, tokens, window, progress=progress) if tokens else {"ppl": None, "tokens": 0}
        acc, completions, by_depth, numeric, per_prompt, margins = {}, {}, {}, {}, {}, {}
        for length, samples in passkey.items():
            scores, outs, length_margins = [], [], []
            for i in range(0, len(samples), batch_size):
                batch = samples[i:i + batch_size]
                if first_token:
                    batch_margins = first_token_margins(model, tokenizer, batch)
                    length_margins += batch_margins
                    scores += [float(m > 0) for m in batch_margins]
                    continue
                texts, _ = greedy_generate(model, tokenizer, [s.prompt for s in batch],
                                           batch[0].max_new_tokens, batch[0].stop)
                scores += [synthetic.score(s.task, s, t) for s, t in zip(batch, texts)]
                outs += texts
            acc[str(length)] = sum(scores) / len(scores)
            per_prompt[str(length)] = scores
            by_depth[str(length)] = accuracy_by_depth(samples, scores)
            if first_token:
                margins[str(length)] = length_margins
            else:
                completions[str(length)] = outs
                share, numeric_acc = answer_split(scores, outs)
                numeric[str(length)] = {"share": share, "accuracy": numeric_acc}
        _sync(device)
        density = float(stats(model).density) if plan is not None else 1.0
        row = {"density": density, "ppl": ppl["ppl"], "ppl_tokens": ppl["tokens"], "passkey": acc,
               "passkey_scores": per_prompt, "passkey_by_depth": by_depth}
        if first_token:
            row["passkey_margins"] = margins
        else:
            row.update(passkey_numeric_answers=numeric, completions=completions)
        return {**row, "seconds": time.perf_counter() - start}
    finally:
        if plan is not None:
            unpatch_model(model)


def saved_passkey_scores(data: dict, tokenizer) -> Dict[int, Tuple[list, Dict[str, List[float]]]]:
    """Per length of a saved result (this script's or plan_ablation's JSON): the passkey samples
    rebuilt from its seed, and each row's per-prompt scores of its stored completions. Where the
    file stores an accuracy, the rebuilt scores must reproduce it (else the prompts differ)."""
    out = {}
    for length in data["lengths"]:
        samples = synthetic.generate_samples("passkey", tokenizer, int(length), data["samples"], seed=data["seed"],
                                             haystack=data.get("haystack"))
        scores = {}
        for name, row in data["rows"].items():
            texts = row["completions"][str(length)]
            scores[name] = [synthetic.score(s.task, s, t) for s, t in zip(samples, texts)]
            stored = row.get("passkey", {}).get(str(length))
            if stored is not None and abs(sum(scores[name]) / len(scores[name]) - stored) > 1e-9:
                raise ValueError(f"row {name!r} at {length}: the rebuilt prompts give accuracy "
                                 f"{sum(scores[name]) / len(scores[name])}, the file says {stored}")
        out[int(length)] = (samples, scores)
    return out


def summarize(rows: Dict[str, dict], lengths: List[int]) -> Tuple[str, dict, List[dict]]:
    """(markdown table, acceptance checks, paired passkey comparisons) of a run's rows. The checks
    need every row and perplexity ({} otherwise); the comparisons need the calibrated row."""
    dense_ppl = rows["dense"]["ppl"] if "dense" in rows else None

    def ppl_cells(r):
        if r["ppl"] is None:
            return "– | –"
        delta = f"{100 * (r['ppl'] / dense_ppl - 1):+.2f} %" if dense_ppl else "–"
        return f"{r['ppl']:.3f} | {delta}"

    header = "| plan | realized density | " + " | ".join(f"passkey@{n}" for n in lengths) + \
             " | wikitext ppl | vs dense |"
    lines = [header, "|" + "---|" * (4 + len(lengths))]
    for name, r in rows.items():
        acc = " | ".join(f"{r['passkey'][str(n)]:.2f}" for n in lengths)
        lines.append(f"| {name} | {r['density']:.4f} | {acc} | {ppl_cells(r)} |")

    checks = {}
    if all(r in rows for r in ("dense", "calibrated", *UNIFORM)) and all(r["ppl"] is not None for r in rows.values()):
        cal = rows["calibrated"]
        checks = {
            "density_le_0.25": cal["density"] <= 0.25,
            "passkey_ge_dense": all(cal["passkey"][str(n)] >= rows["dense"]["passkey"][str(n)] for n in lengths),
            "ppl_within_3pct": cal["ppl"] <= 1.03 * dense_ppl,
            "beats_uniform_ppl": all(cal["ppl"] < rows[f]["ppl"] for f in UNIFORM),
            "beats_uniform_passkey": all(cal["passkey"][str(n)] >= rows[f]["passkey"][str(n)] for f in UNIFORM for n in lengths),
        }
    paired = passkey_comparisons(rows, lengths) if "calibrated" in rows else []
    return "\n".join(lines), checks, paired


def print_summary(table: str, checks: dict, paired: List[dict]) -> None:
    print(table)
    if checks:
        print("\nacceptance: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in checks.items()))
    else:
        print("\nacceptance checks need every row and perplexity: not evaluated in this (partial) run")
    if paired:
        print("\npasskey, paired on the same prompts (95 % Wilson intervals):\n" + "\n".join(comparison_lines(paired)))


# What every part of a split run must agree on before its rows can share one table.
SHARED_SETTINGS = ("model", "plan_calibration", "dtype", "text", "tokens", "window", "lengths", "samples", "seed",
                   "haystack")


def merge_parts(parts: List[dict], names: List[str]) -> dict:
    """One result from the JSON files of a run split by --rows (across calls or machines): the
    settings must agree (the same plan, prompts and text), every row must come from one part, and
    uniform rows must have been matched to the calibrated row's density. Each row keeps the device
    it ran on."""
    first = parts[0]
    for name, part in zip(names[1:], parts[1:]):
        for key in SHARED_SETTINGS:
            if part.get(key) != first.get(key):
                raise ValueError(f"{name}: {key!r} differs from {names[0]}'s ({part.get(key)!r} vs {first.get(key)!r})")
    rows, row_devices, matched = {}, {}, {}
    for name, part in zip(names, parts):
        for row, value in part["rows"].items():
            if row in rows:
                raise ValueError(f"row {row!r} is in both {row_devices[row]['file']} and {name}")
            rows[row] = value
            row_devices[row] = {"file": name, "device": part["device"], "gpu": part.get("gpu"), "torch": part["torch"]}
        matched.update(part.get("matched", {}))
    if "calibrated" in rows:
        density = rows["calibrated"]["density"]
        for name, part in zip(names, parts):
            target = part.get("target_density")
            if part.get("matched") and target is not None and abs(target - density) > 1e-9:
                raise ValueError(f"{name}: its uniform rows were matched to density {target}, "
                                 f"the calibrated row's is {density}")
    order = [r for r in ("dense", "calibrated", *UNIFORM) if r in rows]
    rows = {r: rows[r] for r in order}
    table, checks, paired = summarize(rows, first["lengths"])
    return {**{k: first.get(k) for k in ("model", "plan", *SHARED_SETTINGS)}, "parts": names,
            "row_devices": {r: row_devices[r] for r in order}, "matched": matched, "rows": rows,
            "checks": checks, "passkey_paired": paired, "table": table,
            "seconds": sum(p["seconds"] for p in parts)}


def _write_json(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--plan", default=str(DEFAULT_PLAN), help="calibrated plan JSON")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="perplexity text (wikitext-2 raw test)")
    p.add_argument("--tokens", type=int, default=8192, help="perplexity: first N tokens of --text")
    p.add_argument("--window", type=int, default=4096, help="perplexity window")
    p.add_argument("--lengths", default="4096,8192", help="passkey prompt lengths")
    p.add_argument("--samples", type=int, default=20, help="passkey samples per length")
    p.add_argument("--seed", type=int, default=1234, help="passkey seed (differs from calibration's)")
    p.add_argument("--haystack", help="passkey haystack file/folder (default: built-in filler)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--match-tol", type=float, default=0.01, help="relative density tolerance of the scale search")
    p.add_argument("--out", help="write results JSON here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--rows", default="dense,calibrated," + ",".join(UNIFORM),
                   help="rows to run (a long run can be split across machines/calls)")
    p.add_argument("--scales", default="",
                   help="family=scale,... : use these uniform scales (from an earlier search) instead of searching")
    p.add_argument("--target-density", type=float, default=None,
                   help="density the uniform plans match when the calibrated row is not run")
    p.add_argument("--merge", default="",
                   help="A.json,B.json,... : no run; one table and the acceptance checks from the results of "
                        "a run split by --rows")
    args = p.parse_args(argv)
    if args.merge:
        names = [x for x in args.merge.split(",") if x]
        merged = merge_parts([json.loads(Path(x).read_text()) for x in names], names)
        print(f"\n{merged['model']} ({merged['dtype']}); rows from {', '.join(names)}; devices: "
              + ", ".join(f"{r} {d['gpu'] or d['device']}" for r, d in merged["row_devices"].items()) + "\n")
        print_summary(merged["table"], merged["checks"], merged["passkey_paired"])
        if args.out:
            _write_json(args.out, merged)
        return 0

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tokenizer = load(args.model, dtype=getattr(torch, args.dtype), device=device)
    plan = Plan.load(args.plan)
    plan.check_model(model)
    text = read_text(args.text)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    passkey = {n: synthetic.generate_samples("passkey", tokenizer, n, args.samples, seed=args.seed,
                                             haystack=args.haystack) for n in lengths}
    progress = not args.no_progress

    wanted = [r for r in args.rows.split(",") if r]
    unknown = set(wanted) - {"dense", "calibrated", *UNIFORM}
    if unknown:
        p.error(f"--rows: unknown rows {sorted(unknown)}")
    given_scales = {k: float(v) for k, v in (item.split("=") for item in args.scales.split(",") if item)}
    started = time.perf_counter()
    rows = {}
    if "dense" in wanted:
        rows["dense"] = evaluate(model, tokenizer, None, text, args.tokens, args.window, passkey, args.batch_size, progress)
        print(f"dense: ppl {rows['dense']['ppl']}, passkey {rows['dense']['passkey']}", flush=True)
    target = args.target_density
    if "calibrated" in wanted:
        rows["calibrated"] = evaluate(model, tokenizer, plan, text, args.tokens, args.window, passkey, args.batch_size, progress)
        target = rows["calibrated"]["density"]
        print(f"calibrated: density {target:.4f}, ppl {rows['calibrated']['ppl']}, passkey {rows['calibrated']['passkey']}",
              flush=True)
    if target is None and any(f in wanted and f not in given_scales for f in UNIFORM):
        p.error("uniform rows without the calibrated row need --target-density or --scales")

    # Density probe for the scale search: the eval inputs themselves (ppl windows + one passkey
    # prompt per length), so the uniform plans match the calibrated plan where it was measured.
    probe = token_windows(tokenizer, text, args.tokens, args.window)
    probe += [tokenizer(samples[len(samples) // 2].prompt).input_ids for samples in passkey.values()]
    matched = {}
    for family in [f for f in UNIFORM if f in wanted]:
        if family in given_scales:
            method, params = UNIFORM[family]
            scale, d, uplan = given_scales[family], None, Plan.uniform(model, method, params(given_scales[family]))
        else:
            scale, d, uplan = match_density(model, family, target, probe, tol=args.match_tol)
        matched[family] = {"scale": scale, "probe_density": d, "params": uplan.layers[0].params}
        rows[family] = evaluate(model, tokenizer, uplan, text, args.tokens, args.window, passkey, args.batch_size, progress)
        print(f"{family}: scale {scale}, density {rows[family]['density']:.4f}, ppl {rows[family]['ppl']}, "
              f"passkey {rows[family]['passkey']}", flush=True)

    table, checks, paired = summarize(rows, lengths)
    print(f"\n{args.model} on {device} ({args.dtype}); ppl: {args.tokens} tokens of {Path(args.text).name}, "
          f"windows of {args.window}; passkey: {args.samples} samples per length, seed {args.seed}\n")
    print_summary(table, checks, paired)
    result = {
        "model": args.model, "plan": str(args.plan), "plan_calibration": {k: v for k, v in (plan.calibration or {}).items()
                                                                           if k != "heads"},
        "device": device, "dtype": args.dtype, "torch": torch.__version__, "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "text": str(args.text), "tokens": args.tokens, "window": args.window, "lengths": lengths,
        "samples": args.samples, "seed": args.seed, "haystack": args.haystack, "target_density": target,
        "matched": matched, "rows": rows,
        "checks": checks, "passkey_paired": paired,
        "table": table, "seconds": time.perf_counter() - started,
    }
    if args.out:
        _write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
