"""Compile the block-sparse kernel for Hopper (sm_90) without a GPU and count what its TTGIR uses:
wgmma (warp_group_dot), TMA copies, cp.async copies, shared-to-register loads.

    python -m patchattn.evals.bench.ttgir_probe            # pointer loads and TMA side by side

Why: whether descriptor loads feed wgmma straight from shared memory (no register staging) is a
property of the compiled IR, checkable on a CPU machine before spending GPU time."""

from __future__ import annotations

import argparse
import inspect

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from patchattn.kernels import triton_attention as ta

_POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Lse": "*fp32", "BlockIdx": "*i32",
             "BlockCnt": "*i32", "KvStart": "*i32"}


def compile_block_sparse(use_tma: bool, block: int = 128, head_dim: int = 128, warps: int = 8, stages: int = 2,
                         softmax: str = "exact"):
    params = list(inspect.signature(ta._block_sparse_fwd.fn).parameters)
    const = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=block, BLOCK_N=block, LIST_M=block, LIST_N=block,
                 SOFTCAP=False, HAS_WINDOW=False, EVEN_N=True, MASK_ALL=False, KV_MAJOR=True, USE_TMA=use_tma,
                 SOFTMAX_MODE=ta.SOFTMAX_MODES[softmax])
    sig = {p: "constexpr" if p in const else _POINTERS.get(p, "fp32" if p in ("sm_scale", "softcap") else "i32")
           for p in params}
    src = ASTSource(ta._block_sparse_fwd, sig, constexprs={(params.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def counts(kernel) -> dict:
    ir = kernel.asm["ttgir"]
    return {"wgmma": ir.count("ttng.warp_group_dot "), "tma_copy": ir.count("async_tma_copy"),
            "cp_async": ir.count("async_copy_global_to_local"), "local_load": ir.count("ttg.local_load"),
            "branches": ir.count("scf.if "), "exp2": ir.count("math.exp2 ")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--softmax", default="exact", help=f"comma list of {', '.join(ta.SOFTMAX_MODES)}")
    args = p.parse_args(argv)
    for mode in args.softmax.split(","):
        for use_tma in (False, True):
            print(f"softmax {mode}, {'TMA' if use_tma else 'pointer'} loads:",
                  counts(compile_block_sparse(use_tma, stages=args.stages, softmax=mode)))


if __name__ == "__main__":
    main()
