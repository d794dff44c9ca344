"""Which heads of a plan decide a task? Evaluate edited variants of a plan side by side.

    python -m patchattn.evals.bench.plan_ablation --plan patchattn/plans/smollm2-135m.budget.json \\
        --variants "dense;plan;vs@0.13;plan|method:streaming->vs@0.13;dense|layers:0-10->vs@0.13" \\
        --lengths 4096,8192 --samples 20 --seed 77 --out ablation.json

A variant is a base plan followed by edits, `BASE|SELECTOR->REPLACEMENT|...`:

* BASE: `dense`, `plan` (the --plan file), `plan=PATH` (another plan file for the same model),
  `vs@S` (uniform vertical_slash, vertical = slash = S*N), `vsr@S` (as vs@S, its columns and
  diagonals chosen from the last 64 rows plus 64 rows spread over the prompt: spread_q=64) or
  `stream@S` (uniform streaming, window S*N);
* SELECTOR: `all`, `method:NAME` (heads the current variant runs with NAME), `layers:A-B`
  (layers A..B-1), `retrieval` (the plan's calibration.retrieval_heads), `heads:L.H,L.H`;
* REPLACEMENT: `dense`, `vs@S`, `vsr@S`, `stream@S`, `plan` (the --plan file's spec for that head) or
  `plan=PATH`.

Per variant: realized density, passkey accuracy per length (greedy, batched) and per quarter
of needle depth, and wikitext perplexity when --tokens > 0. `--first-token` scores passkey from
one prefill per prompt instead of decoding: right where the answer's first token has the largest
logit, plus the mean margin of that logit over the best other token (a graded signal: which way,
and how far, an edit moves the number-or-words choice); `--min-depth 0.5` keeps the prompts whose
needle sits in the second half, where plans differ. `--rescore FILE...` re-scores the
completions saved in earlier result files per depth quarter (no model forward; the samples are
rebuilt from each file's seed, lengths, sample count and haystack). Use a passkey --seed other
than the one reported in calibration_quality.py, so that exploring variants does not tune on
the held-out samples.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Callable, List

import torch

from patchattn import Plan
from patchattn.calibration import build_plan
from patchattn.evals import synthetic
from patchattn.evals.perplexity import read_text
from patchattn.models import load, load_tokenizer

from .calibration_quality import (DEFAULT_PLAN, DEFAULT_TEXT, DEPTH_QUARTERS, UNIFORM, accuracy_by_depth, answer_split,
                                  comparison_lines, evaluate, passkey_comparisons, saved_passkey_scores)

HeadTable = List[List[dict]]  # [layer][q_head] -> {"method", "params"}


# vsr@S: vs@S whose estimator also scores SPREAD_Q rows spread over the prompt (vertical_slash's
# spread_q), not only the last 64.
SPREAD_Q = 64


def _uniform_spec(token: str) -> dict:
    families = {"vs": "uniform_vertical_slash", "vsr": "uniform_vertical_slash", "stream": "uniform_streaming"}
    name, _, scale = token.partition("@")
    if name not in families or not scale:
        raise ValueError(f"unknown plan token {token!r}: expected dense, plan, vs@SCALE, vsr@SCALE or stream@SCALE")
    method, params = UNIFORM[families[name]]
    params = params(float(scale))
    if name == "vsr":
        params = {**params, "spread_q": SPREAD_Q}
    return {"method": method, "params": params}


def _table(plan: Plan) -> HeadTable:
    return [[{"method": s.method, "params": dict(s.params)} for s in (plan.head_spec(l, h) for h in range(plan.model.num_q_heads))]
            for l in range(plan.model.num_layers)]


def _selector(text: str, plan: Plan) -> Callable[[int, int, dict], bool]:
    kind, _, arg = text.partition(":")
    if kind == "all":
        return lambda l, h, spec: True
    if kind == "method":
        return lambda l, h, spec: spec["method"] == arg
    if kind == "layers":
        a, _, b = arg.partition("-")
        return lambda l, h, spec: int(a) <= l < int(b)
    if kind == "retrieval":
        heads = {tuple(x) for x in (plan.calibration or {}).get("retrieval_heads", [])}
        if not heads:
            raise ValueError("selector 'retrieval': the plan records no calibration.retrieval_heads")
        return lambda l, h, spec: (l, h) in heads
    if kind == "heads":
        heads = {tuple(int(x) for x in item.split(".")) for item in arg.split(",")}
        return lambda l, h, spec: (l, h) in heads
    raise ValueError(f"unknown selector {text!r}: expected all, method:NAME, layers:A-B, retrieval or heads:L.H,...")


def _spec_source(token: str, planned: HeadTable, model) -> Callable[[int, int], dict]:
    """(layer, q_head) -> spec for a BASE / REPLACEMENT token: plan, plan=PATH, dense, vs@S,
    vsr@S or stream@S."""
    if token == "plan":
        return lambda l, h: planned[l][h]
    if token.startswith("plan="):
        other = Plan.load(token[len("plan="):])
        other.check_model(model)  # a plan for another model is refused, naming the mismatch
        table = _table(other)
        return lambda l, h: table[l][h]
    spec = {"method": "dense", "params": {}} if token == "dense" else _uniform_spec(token)
    return lambda l, h: spec


def build_variant(model, plan: Plan, text: str) -> Plan:
    """The plan a variant string describes (see the module docstring)."""
    base, *edits = text.split("|")
    planned = _table(plan)
    n_layers, n_heads = len(planned), len(planned[0])
    source = _spec_source(base, planned, model)
    table = [[source(l, h) for h in range(n_heads)] for l in range(n_layers)]
    for edit in edits:
        sel_text, arrow, repl = edit.partition("->")
        if not arrow:
            raise ValueError(f"edit {edit!r}: expected SELECTOR->REPLACEMENT")
        selected, source = _selector(sel_text, plan), _spec_source(repl, planned, model)
        for l in range(n_layers):
            for h in range(n_heads):
                if selected(l, h, table[l][h]):
                    table[l][h] = source(l, h)
    return build_plan(model, table, {"variant": text})


def _quarters(values) -> str:
    return " / ".join("–" if v is None else f"{v:.2f}" for v in values)


def rescore(files: List[str], tokenizer) -> str:
    """Markdown table: per saved variant and length, accuracy per needle-depth quarter and the
    share of answers that are numbers (with their accuracy), from the completions in `files`
    (plan_ablation or calibration_quality JSON). tokenizer: the one the runs used, or a model
    spec to load it from."""
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    header = " / ".join(f"{lo:.2f}-{hi:.2f}" for lo, hi in DEPTH_QUARTERS)
    lines = [f"| file | variant | length | passkey | by needle depth ({header}) | numeric answers | "
             "accuracy of numeric answers |", "|---|---|---|---|---|---|---|"]
    paired = []
    for f in files:
        data = json.loads(Path(f).read_text())
        if data.get("first_token") or data.get("min_depth"):
            raise ValueError(f"{f}: a --first-token / --min-depth run saves no completions of the full sample set; "
                             "its per-prompt scores and margins are in the file itself")
        for length, (samples, by_row) in saved_passkey_scores(data, tokenizer).items():
            for name, scores in by_row.items():
                outs = data["rows"][name]["completions"][str(length)]
                numeric, numeric_acc = answer_split(scores, outs)
                lines.append(f"| {Path(f).name} | `{name}` | {length} | {sum(scores) / len(scores):.2f} | "
                             f"{_quarters(accuracy_by_depth(samples, scores))} | {numeric:.2f} | "
                             f"{_quarters([numeric_acc])} |")
                data["rows"][name].setdefault("passkey_scores", {})[str(length)] = scores
        if "calibrated" in data["rows"]:  # a calibration_quality result: the paired comparison too
            paired += [f"{Path(f).name}: {line}" for line in
                       comparison_lines(passkey_comparisons(data["rows"], [int(n) for n in data["lengths"]]))]
    if paired:
        lines += ["", "Paired on the same prompts (95 % Wilson intervals):", *paired]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--plan", default=str(DEFAULT_PLAN))
    p.add_argument("--variants", help="';'-separated variant strings")
    p.add_argument("--rescore", nargs="+", metavar="JSON", help="re-score saved completions per depth quarter, exit")
    p.add_argument("--lengths", default="4096,8192")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--seed", type=int, default=77, help="passkey seed (keep it apart from the reported eval seed)")
    p.add_argument("--haystack", help="passkey haystack .txt file or folder (default: the built-in filler sentences)")
    p.add_argument("--text", default=str(DEFAULT_TEXT))
    p.add_argument("--tokens", type=int, default=0, help="perplexity on the first N tokens of --text (0: skip)")
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--first-token", action="store_true",
                   help="score passkey from one prefill per prompt: right where the answer's first token has the "
                        "largest logit, with the mean logit margin (faster, and graded; no completions are saved)")
    p.add_argument("--min-depth", type=float, default=0.0,
                   help="keep only the passkey prompts whose needle depth is >= this (0.5: the half where plans differ)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.rescore:
        print(rescore(args.rescore, args.model))
        return 0
    if not args.variants:
        p.error("--variants is required (or --rescore FILE...)")

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tokenizer = load(args.model, dtype=getattr(torch, args.dtype), device=device)
    plan = Plan.load(args.plan)
    plan.check_model(model)
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    built = {v: build_variant(model, plan, v) for v in variants}  # parse everything before the long work
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    passkey = {n: [s for s in synthetic.generate_samples("passkey", tokenizer, n, args.samples, seed=args.seed,
                                                         haystack=args.haystack) if s.depth >= args.min_depth]
               for n in lengths}
    text = read_text(args.text) if args.tokens else ""
    rows = {}
    started = time.perf_counter()

    def table() -> str:
        margin_head = "".join(f" | mean margin@{n}" for n in lengths) if args.first_token else ""
        lines = ["| variant | density | " + " | ".join(f"passkey@{n} (by depth quarter)" for n in lengths)
                 + margin_head + " | ppl |", "|" + "---|" * (3 + len(lengths) * (1 + args.first_token))]
        for v, r in rows.items():
            ppl = f"{r['ppl']:.3f}" if r["ppl"] is not None else "–"
            margins = "".join(f" | {_mean(r['passkey_margins'][str(n)]):+.3f}" for n in lengths) if args.first_token else ""
            lines.append(f"| `{v}` | {r['density']:.4f} | "
                         + " | ".join(f"{r['passkey'][str(n)]:.2f} ({_quarters(r['passkey_by_depth'][str(n)])})"
                                      for n in lengths) + f"{margins} | {ppl} |")
        return "\n".join(lines)

    def save() -> None:  # after every variant, so a time limit keeps the finished rows
        if args.out:
            result = {"model": args.model, "plan": str(args.plan), "device": device, "dtype": args.dtype,
                      "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
                      "torch": torch.__version__, "machine": platform.machine(), "lengths": lengths,
                      "samples": args.samples, "seed": args.seed, "haystack": args.haystack, "tokens": args.tokens,
                      "first_token": args.first_token, "min_depth": args.min_depth,
                      "rows": rows,
                      "table": table(), "seconds": time.perf_counter() - started}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    for v in variants:
        plan_v = None if v == "dense" else built[v]
        rows[v] = evaluate(model, tokenizer, plan_v, text, args.tokens, args.window, passkey, args.batch_size, False,
                           first_token=args.first_token)
        rows[v]["methods"] = dict(sorted(_count_methods(built[v]).items()))
        print(f"{v}: density {rows[v]['density']:.4f}, passkey {rows[v]['passkey']}, ppl {rows[v]['ppl']} "
              f"({rows[v]['seconds']:.0f} s)", flush=True)
        save()
    print(f"\n{args.model} on {device} ({args.dtype}); passkey {args.samples} samples, seed {args.seed}\n\n{table()}")
    return 0


def _mean(xs: List[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _count_methods(plan: Plan) -> Counter:
    return Counter(spec["method"] for row in _table(plan) for spec in row)


if __name__ == "__main__":
    raise SystemExit(main())
