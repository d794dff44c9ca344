"""Where does a patched prefill spend its time? torch.profiler over one Llama-3-8B-shaped forward.

    python -m patchattn.evals.bench.profile_ttft --n 128k --layers 4 --method vertical_slash_g64 \\
        --out ttft_profile.json

The TTFT benchmark in prefill.py measures a patched 4-layer prefill at 128k about 95 ms slower
than its attention-only timings add up to; this profiles one dense and one patched forward
(after warm-up) and prints the CUDA-time totals per operator / kernel, so the difference shows
up by name. Methods and parameters are prefill.py's METHODS.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from .prefill import METHODS, _method_name, cuda_time, llama3_8b_shaped, parse_lengths

VOCAB = 128256


# --sort: the profiler table's column, and the key of the JSON's top operators.
SORTS = {"cuda": ("cuda_time_total", lambda e: e.device_time_total),
         "cpu": ("self_cpu_time_total", lambda e: e.self_cpu_time_total),  # host cost (short prompts)
         "count": ("count", lambda e: e.count)}


def _profile(forward, rows: int, sort: str = "cuda"):
    forward()  # warm-up: compile / autotune outside the profile
    torch.cuda.synchronize()
    # Timed without the profiler: its per-op overhead would inflate the host side, which is
    # what the idle gap below is about.
    wall_ms = cuda_time(forward, min_reps=3, max_reps=3, warmup=0, mode="synced")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    events = prof.key_averages()
    column, key = SORTS[sort]
    table = events.table(sort_by=column, row_limit=rows)
    top = sorted(events, key=key, reverse=True)[:rows]
    # The device-side events (kernels, memcpy, memset) summed are the GPU's busy time (one stream,
    # so they do not overlap); what the forward's wall time has beyond it is the GPU waiting on
    # the host (syncs, launch gaps).
    busy_ms = sum(e.device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e3
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    summary = {"wall_ms": wall_ms, "gpu_busy_ms": busy_ms, "gpu_idle_ms": wall_ms - busy_ms, "launches": launches,
               "ops": [{"name": e.key, "calls": e.count, "cuda_ms": e.device_time_total / 1e3,
                        "cpu_ms": e.cpu_time_total / 1e3, "self_cpu_ms": e.self_cpu_time_total / 1e3}
                       for e in top]}
    table += (f"\nwall {wall_ms:.1f} ms (no profiler), GPU busy {busy_ms:.1f} ms, idle {wall_ms - busy_ms:.1f} ms, "
              f"{launches} kernel launches")
    return table, summary


def main(argv=None) -> int:
    from patchattn import Plan, patch_model, unpatch_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="128k")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--method", default="vertical_slash_g64", choices=sorted(METHODS))
    p.add_argument("--rows", type=int, default=25, help="operators listed per profile")
    p.add_argument("--sort", choices=sorted(SORTS), default="cuda", help="order of the operator table")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    n = parse_lengths(args.n)[0]
    model = llama3_8b_shaped(args.layers)
    ids = torch.randint(0, VOCAB, (1, n), device="cuda")

    def forward():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    report = {"n": n, "layers": args.layers, "method": args.method, "params": METHODS[args.method],
              "gpu": torch.cuda.get_device_name()}
    table, report["dense"] = _profile(forward, args.rows, args.sort)
    print(f"dense, N={n}\n{table}")
    patch_model(model, Plan.uniform(model, _method_name(args.method), METHODS[args.method]))
    try:
        table, report["patched"] = _profile(forward, args.rows, args.sort)
    finally:
        unpatch_model(model)
    print(f"{args.method}, N={n}\n{table}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
