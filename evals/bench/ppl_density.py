"""Perplexity vs realized density: dense against uniform sparse plans on one text.

    python evals/bench/ppl_density.py --model smollm2-135m \
        --text ../shared/assets/corpora/wikitext-2-raw/wiki.test.raw --tokens 8192 --window 4096 \
        --out evals/bench/results/smollm2_wikitext_ppl.json

Budgets are length rules (fractions of the prompt length); each method runs at a few budgets
around a realized density of 0.3 at 4k tokens, since the realized density of the dynamic methods
depends on the text and is measured, not assumed.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from patchattn import Plan, patch_model, reset_stats, stats, unpatch_model
from patchattn.evals.perplexity import perplexity, read_text
from patchattn.models import load

PLANS_NEAR_0_3 = {
    "streaming_w0.12": ("streaming", {"sink": 4, "window": {"scale": 0.12}}),
    "streaming_w0.16": ("streaming", {"sink": 4, "window": {"scale": 0.16}}),
    "streaming_w0.20": ("streaming", {"sink": 4, "window": {"scale": 0.2}}),
    "vertical_slash_v0.1_s0.1_w64": ("vertical_slash", {"vertical": {"scale": 0.1}, "slash": {"scale": 0.1}, "window": 64}),
    "vertical_slash_v0.15_s0.15_w64": ("vertical_slash", {"vertical": {"scale": 0.15}, "slash": {"scale": 0.15}, "window": 64}),
    "vertical_slash_v0.08_s0.08_w256": ("vertical_slash", {"vertical": {"scale": 0.08}, "slash": {"scale": 0.08}, "window": 256}),
    "block_topk_k0.125": ("block_topk", {"block_size": 64, "top_k": {"scale": 0.125, "min": 1}}),
    "block_topk_k0.16": ("block_topk", {"block_size": 64, "top_k": {"scale": 0.16, "min": 1}}),
    "block_topk_k0.2": ("block_topk", {"block_size": 64, "top_k": {"scale": 0.2, "min": 1}}),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", help="text file (default: Python's pydoc topics)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--plans", help="JSON file {name: {method, params}} (default: built-in plans near density 0.3)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", help="write results JSON here")
    args = parser.parse_args(argv)

    plans = {k: {"method": m, "params": p} for k, (m, p) in PLANS_NEAR_0_3.items()}
    if args.plans:
        plans = json.loads(open(args.plans).read())
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load(args.model, dtype=getattr(torch, args.dtype), device=device)
    text = read_text(args.text)
    rows = [{"plan": "dense", "method": "dense", "density": 1.0, **perplexity(model, tokenizer, text, args.tokens, args.window)}]
    for name, spec in plans.items():
        patch_model(model, Plan.uniform(model, spec["method"], spec["params"]))
        reset_stats(model)
        result = perplexity(model, tokenizer, text, args.tokens, args.window)
        rows.append({"plan": name, "method": spec["method"], "params": spec["params"],
                     "density": stats(model).density, **result})
        unpatch_model(model)
    dense = rows[0]["ppl"]
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} on {args.text or 'pydoc topics'}: {rows[0]['tokens']} tokens, windows of {args.window}, "
          f"{args.dtype} on {where}")
    print("| plan | realized density | perplexity | vs dense | forward s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['plan']} | {r['density']:.4f} | {r['ppl']:.3f} | {100 * (r['ppl'] / dense - 1):+.2f} % | {r['seconds']:.1f} |")
    if args.out:
        meta = {"model": args.model, "text": args.text, "tokens": args.tokens, "window": args.window,
                "torch": torch.__version__, "machine": platform.machine(), "device": where, "dtype": args.dtype,
                "threads": torch.get_num_threads(),
                "date": time.strftime("%Y-%m-%d")}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
