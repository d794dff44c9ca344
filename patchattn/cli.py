"""Command line: ``patchattn inspect | demo | calibrate | eval | lm-eval | bench``."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import List, Optional


# ------------------------------------------------------------------------------ inspect
def plan_summary(plan, length: int) -> str:
    """Methods per layer x head, budgets, and expected density at `length` tokens."""
    from .heatmap import density_grid

    info = plan.model
    lines = [
        f"plan {plan.schema_} for {info.architecture} ({info.model_type}, fingerprint {info.fingerprint})",
        f"  {info.num_layers} layers x {info.num_q_heads} q heads ({info.num_kv_heads} kv heads), head_dim {info.head_dim}",
        f"  dense_below={plan.defaults.dense_below}  decode={plan.defaults.decode.method}",
    ]
    if plan.calibration:
        lines.append("  calibration: " + ", ".join(f"{k}={v}" for k, v in sorted(plan.calibration.items())
                                                   if not isinstance(v, (dict, list))))
    initials = {}
    counts: Counter = Counter()
    densities = [d for row in density_grid(plan, length) for d in row]
    grid = []
    for layer in range(info.num_layers):
        row = []
        for h in range(info.num_q_heads):
            spec = plan.head_spec(layer, h)
            initials.setdefault(spec.method, spec.method[0].upper())
            row.append(initials[spec.method])
            counts[spec.method] += 1
        dense_layer = length < plan.defaults.dense_below
        grid.append(f"  layer {layer:3d} | {' '.join(row)} | {_layer_params(plan.layers[layer])}"
                    + ("  (dense: prompt < dense_below)" if dense_layer else ""))
    known = [d for d in densities if d == d]
    legend = ", ".join(f"{v}={k} ({counts[k]} heads)" for k, v in initials.items())
    lines.append(f"  methods: {legend}")
    lines.extend(grid)
    if length < plan.defaults.dense_below:
        lines.append(f"expected density at {length} tokens: 1.0 (runs dense: shorter than dense_below)")
    elif known:
        note = "" if len(known) == len(densities) else f" ({len(densities) - len(known)} heads data-dependent, excluded)"
        lines.append(f"expected density at {length} tokens: {sum(known) / len(known):.4f}{note}")
    return "\n".join(lines)


def _layer_params(layer) -> str:
    text = f"{layer.method} {json.dumps(layer.params, sort_keys=True)}"
    extra = []
    if layer.kv_heads:
        extra.append(f"{len(layer.kv_heads)} kv-head overrides")
    if layer.q_heads:
        extra.append(f"{len(layer.q_heads)} q-head overrides")
    if layer.reuse_from is not None:
        extra.append(f"reuses layer {layer.reuse_from}")
    return text + (f" [{'; '.join(extra)}]" if extra else "")


def cmd_inspect(args) -> int:
    from .plan import Plan

    plan = Plan.load(args.plan)
    print(plan_summary(plan, args.length))
    if args.png:
        from .heatmap import plan_heatmap

        plan_heatmap(plan, args.png, length=args.length)
        print(f"wrote {args.png}")
    return 0


# ------------------------------------------------------------------------------ demo
DEMO_PLANS = {
    "streaming": {"sink": 4, "window": {"scale": 0.25, "power": 1.0, "min": 64}},
    "vertical_slash": {"vertical": {"scale": 0.1}, "slash": {"scale": 0.1}, "last_q": 64, "sink": 4, "window": 64},
    "block_topk": {"block_size": 64, "top_k": {"scale": 0.3, "min": 1}},
}


def _demo_plans(args, model) -> List[tuple]:
    """(row name, Plan) for the demo: the hand-written uniform plans of --methods, then the plan files
    of --plan ("shipped": the calibrated plan that ships for the --model alias, if any)."""
    from . import Plan
    from .models import shipped_plan

    plans = [(m, Plan.uniform(model, m, DEMO_PLANS[m])) for m in args.methods.split(",") if m]
    for item in (x for x in args.plan.split(",") if x):
        if item == "shipped":
            path = shipped_plan(args.model)
            if path is None:
                print(f"no calibrated plan ships for {args.model!r}: the demo shows the hand-written plans only")
                continue
            name, plan = f"calibrated ({path.name})", Plan.load(path)
        else:
            name, plan = Path(item).name, Plan.load(item)
        plan.check_model(model)
        plans.append((name, plan))
    return plans


def cmd_demo(args) -> int:
    """Dense vs hand-written sparse plans and a calibrated one: perplexity and realized density on one text."""
    import torch

    from . import patch_model, reset_stats, stats, unpatch_model
    from .evals.perplexity import perplexity, read_text
    from .models import load

    unknown = [m for m in args.methods.split(",") if m and m not in DEMO_PLANS]
    if unknown:
        print(f"patchattn demo: unknown method(s) {', '.join(unknown)}; choose from {', '.join(DEMO_PLANS)}",
              file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer = load(args.model)
    plans = _demo_plans(args, model)  # plan files are checked against the model before any forward
    text = read_text(args.text)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"plan": "dense", **perplexity(model, tokenizer, text, args.tokens, args.window), "density": 1.0}]
    print(f"dense: ppl {rows[0]['ppl']:.3f} ({rows[0]['tokens']} tokens, {rows[0]['seconds']:.1f}s)", flush=True)
    for name, plan in plans:
        if name in DEMO_PLANS:
            plan.save(out_dir / f"{name}.plan.json")
        patch_model(model, plan)
        reset_stats(model)
        result = perplexity(model, tokenizer, text, args.tokens, args.window)
        rows.append({"plan": name, **result, "density": stats(model).density})
        unpatch_model(model)
        print(f"{name}: ppl {result['ppl']:.3f}, realized density {rows[-1]['density']:.4f}", flush=True)
    base = rows[0]["ppl"]
    print(f"\n| plan | perplexity | delta vs dense | realized density | forward s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['plan']} | {r['ppl']:.3f} | {100 * (r['ppl'] / base - 1):+.2f} % | {r['density']:.4f} | {r['seconds']:.1f} |")
    (out_dir / "demo.json").write_text(json.dumps({"model": args.model, "text": args.text or "pydoc topics",
                                                   "tokens": args.tokens, "window": args.window, "rows": rows}, indent=2))
    print(f"\nplans and demo.json written to {out_dir}")
    return 0


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="summarise a plan: methods per layer x head, budgets, expected density")
    p.add_argument("plan")
    p.add_argument("--length", type=int, default=8192, help="prompt length for the expected density")
    p.add_argument("--png", help="write a layers x heads heatmap (needs matplotlib)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="perplexity and realized density, dense vs hand-written and calibrated plans")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", help="text file (default: Python's bundled pydoc topics)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--methods", default="streaming,vertical_slash,block_topk",
                   help="hand-written uniform plans to run (comma list; empty for none)")
    p.add_argument("--plan", default="shipped",
                   help="plan files to run too (comma list); 'shipped' is the calibrated plan that ships for "
                        "the --model alias; empty for none")
    p.add_argument("--out", default="out/demo")
    p.set_defaults(func=cmd_demo)
    for name, helptext in [("calibrate", "calibrate a per-head plan from sample prompts (see --help)"),
                           ("eval", "dense vs patched on synthetic long-context tasks (see --help)"),
                           ("lm-eval", "lm-eval's CLI with the patchattn model and local tasks registered"),
                           ("lm-eval-tasks", "write the local lm-eval task files for a tokenizer"),
                           ("bench", "run a benchmark script from evals/bench")]:
        sub.add_parser(name, help=helptext, add_help=False)
    return parser


def _bench_main(argv: List[str]) -> int:
    """``patchattn bench NAME [args]`` runs ``evals/bench/NAME.py`` with the remaining args."""
    import importlib
    import pkgutil

    from .evals import bench

    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__))
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        print("usage: patchattn bench {%s} [ARGS]" % ",".join(names), file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"patchattn bench: unknown benchmark {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return importlib.import_module(f"{bench.__name__}.{argv[0]}").main(argv[1:]) or 0


# Subcommands with their own argument parsers: the rest of argv goes to them untouched.
PASS_THROUGH = {
    "calibrate": ("patchattn.calibration", "calibrate_main"),
    "eval": ("patchattn.evals.runner", "eval_main"),
    "lm-eval": ("patchattn.lm_eval_model", "lm_eval_main"),
    "lm-eval-tasks": ("patchattn.evals.lm_eval_tasks", "write_tasks_main"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench_main(argv[1:])
    if argv and argv[0] in PASS_THROUGH:
        import importlib

        module, func = PASS_THROUGH[argv[0]]
        return getattr(importlib.import_module(module), func)(argv[1:]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    from .plan import PlanError

    try:
        return args.func(args) or 0
    except (PlanError, FileNotFoundError) as e:
        print(f"patchattn {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
