"""First-forward (compile + autotune) cost of a plan on the Triton backend.

    PATCHATTN_BACKEND=triton PATCHATTN_DENSE_BELOW=0 python -m patchattn.evals.bench.warmup \\
        --config CONFIG_DIR --plan patchattn/plans/smollm2-135m.budget.json --lengths 4096,8192

The model is built from its config with random weights (kernel compile and tuning time does not
depend on the weights), so no checkpoint needs staging. Per length: the first patched forward
(Triton compiles a kernel per constexpr signature and, from PATCHATTN_TRITON_AUTOTUNE_MIN_N query
rows on, times every config), the second forward, and a dense forward for scale.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    from patchattn import Plan, patch_model, stats, unpatch_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="folder with the model's config.json")
    p.add_argument("--plan", required=True)
    p.add_argument("--lengths", default="4096,8192")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    config = AutoConfig.from_pretrained(args.config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().eval()
    plan = Plan.load(args.plan)
    rows = []
    with torch.no_grad():
        for n in [int(x) for x in args.lengths.split(",")]:
            ids = torch.randint(0, config.vocab_size, (1, n), device="cuda")
            forward = lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)  # noqa: E731
            forward()  # dense warm-up (cuBLAS / SDPA)
            dense_s = _timed(forward)
            patch_model(model, plan)
            try:
                first_s = _timed(forward)
                second_s = _timed(forward)
                density = stats(model).density
            finally:
                unpatch_model(model)
            rows.append({"n": n, "dense_s": dense_s, "first_patched_s": first_s, "second_patched_s": second_s,
                         "density": density})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| N | dense s | first patched s | second patched s | density |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['dense_s']:.3f} | {r['first_patched_s']:.2f} | {r['second_patched_s']:.3f} | "
              f"{r['density']:.3f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "plan": args.plan,
                                              "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
