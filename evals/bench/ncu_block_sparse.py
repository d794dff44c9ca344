"""Hardware-counter profile of the block-sparse kernel (run under Nsight Compute on a GPU).

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats --section SchedulerStats \\
        --section MemoryWorkloadAnalysis --log-file ncu.txt \\
        python3 -m patchattn.evals.bench.ncu_block_sparse --cases 32k:diagonal,32k:0.05,128k:0.1,32k:sdpa

Each case builds the inputs and lists of kernel_variants (Llama-3-8B attention shapes, bf16,
blocks of 128), runs the default block-sparse kernel three times outside the profile (compile,
warm caches), then once between cudaProfilerStart / Stop, so ncu reports exactly one launch per
case, in the order given. Case `N:diagonal` lists only each query block's diagonal block (the
per-program fixed cost with one masked tile), `N:DENSITY` random lists, `N:sdpa` dense SDPA for
comparison. The script also prints which kernel each case dispatched to.
"""

from __future__ import annotations

import argparse

import torch

from patchattn.evals.bench.kernel_variants import structure_lists
from patchattn.evals.bench.prefill import D, parse_lengths, random_block_lists, random_inputs, sdpa
from patchattn.kernels import triton_attention as ta

BLOCK = 128


def case_runner(n: int, kind: str):
    """(run, kernel name, pairs or None) for case N:kind (see the module docstring): run() makes one
    launch on inputs and lists built here."""
    q, k, v = random_inputs(n)
    if kind == "sdpa":
        return (lambda: sdpa(q, k, v)), "sdpa", None  # noqa: E731
    if kind == "diagonal":  # the first lists of kernel_variants' fixed-cost table
        _, index, count, pairs = next(structure_lists(n, [], BLOCK, q.shape[1]))
    else:
        density = float(kind)
        index, count, pairs = random_block_lists(n, density, seed=int(density * 1000), block=BLOCK)
    run = lambda: ta.block_sparse_attention(q, k, v, index, count, scale=D ** -0.5,  # noqa: E731
                                            block_m=BLOCK, block_n=BLOCK)
    return run, ta.block_sparse_kernel(q, BLOCK, BLOCK), pairs


def profile_case(n: int, kind: str) -> str:
    run, name, _ = case_runner(n, kind)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    run()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    del run
    torch.cuda.empty_cache()
    return name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="32k:diagonal,32k:0.05,128k:0.1,32k:sdpa",
                   help="comma list of N:diagonal, N:DENSITY or N:sdpa")
    args = p.parse_args(argv)
    for case in args.cases.split(","):
        length, _, kind = case.partition(":")
        (n,) = parse_lengths(length)
        print(f"case {case}: {profile_case(n, kind)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
