"""Time one prefill forward off CUDA (the torch path patched layers take there): dense vs plans.

    python -m patchattn.evals.bench.cpu_forward --model smollm2-135m --tokens 2048 --reps 3 \\
        --out evals/bench/results/cpu_forward_smollm2.json

Rows: dense (the model's own SDPA), the calibrated plan that ships for the model (or --plan FILE),
and a uniform vertical_slash plan (--vs-scale). Each row is the median of --reps forwards after
one warm-up, on random token ids; the realized density of the last forward is reported too.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from patchattn import Plan, patch_model, reset_stats, stats, unpatch_model
from patchattn.models import load, shipped_plan


def _median_seconds(forward, reps: int) -> float:
    forward()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--plan", default="shipped", help="plan file, or 'shipped' (the model alias's calibrated plan)")
    p.add_argument("--vs-scale", type=float, default=0.13, help="uniform vertical_slash budget scale (0: no row)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load(args.model)
    ids = torch.randint(100, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    plans = []
    path = shipped_plan(args.model) if args.plan == "shipped" else Path(args.plan)
    if path is not None:
        plans.append((f"plan {path.name}", Plan.load(path)))
    if args.vs_scale > 0:
        plans.append((f"uniform vertical_slash {args.vs_scale:g}",
                      Plan.uniform(model, "vertical_slash", {"vertical": {"scale": args.vs_scale},
                                                             "slash": {"scale": args.vs_scale}})))
    rows = [{"name": "dense", "seconds": _median_seconds(forward, args.reps), "density": 1.0}]
    for name, plan in plans:
        patch_model(model, plan)
        try:
            seconds = _median_seconds(forward, args.reps)
            reset_stats(model)
            forward()
            rows.append({"name": name, "seconds": seconds, "density": stats(model).density})
        finally:
            unpatch_model(model)
    print(f"{args.model}, {args.tokens} tokens, {torch.get_num_threads()} threads, median of {args.reps}\n")
    print("| row | forward s | vs dense | realized density |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['seconds']:.2f} | {r['seconds'] / rows[0]['seconds']:.2f}x | {r['density']:.4f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "model": args.model, "tokens": args.tokens, "reps": args.reps, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
            "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
