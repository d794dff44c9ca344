"""Compile the block-sparse kernel for Hopper (sm_90) without a GPU and count what its TTGIR uses:
wgmma (warp_group_dot), TMA copies, cp.async copies, shared-to-register loads.

    python -m patchattn.evals.bench.ttgir_probe            # pointer loads and TMA side by side
    python -m patchattn.evals.bench.ttgir_probe --gluon    # the Gluon sm_90 kernel: IR + ptxas report

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
             "BlockCnt": "*i32", "Counter": "*i32", "KvStart": "*i32"}


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


def compile_gluon_block_sparse(head_dim: int = 128, block_m: int = 128, block_n: int = 128,
                               warp_specialized: bool = False, persistent: bool = False):
    """The Gluon sm_90 kernel (kernels/gluon_attention.py) compiled for Hopper; warp_specialized:
    its warp-specialised variant (host-side TMA descriptors for q / k / v, block_m 128);
    persistent: that variant's persistent form."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from patchattn.kernels import gluon_attention as ga

    warp_specialized = warp_specialized or persistent
    fn = ga._block_sparse_fwd_sm90_ws if warp_specialized else ga._block_sparse_fwd_sm90
    if persistent:
        fn = ga._block_sparse_fwd_sm90_wsp
    params = list(inspect.signature(fn.fn).parameters)
    const = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_m == 128 else 4)
    if warp_specialized:
        const = dict(HEAD_DIM=head_dim, BLOCK_N=block_n, PINGPONG=ga.PINGPONG, num_warps=4)
    if persistent:
        const["Q_BUFS"], const["K_STAGES"] = ga.wsp_buffers(head_dim, block_n)

    def desc(rows: int) -> str:
        layout = gl.NVMMASharedLayout.get_default_for([rows, head_dim], gl.bfloat16)
        return f"tensordesc<bf16[{rows}, {head_dim}],{layout!r}>"

    descs = {"q_desc": desc(64), "k_desc": desc(block_n), "v_desc": desc(block_n), "o_desc": desc(64)}
    sig = {p: "constexpr" if p in const else descs.get(p) or _POINTERS.get(p, "fp32" if p == "qk_scale" else "i32")
           for p in params}
    src = GluonASTSource(fn, sig, constexprs={(params.index(k),): v for k, v in const.items()})
    options = dict(num_warps=const["num_warps"], **({"maxnreg": ga.WS_MAXNREG} if warp_specialized else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def ptxas_report(kernel) -> dict:
    """ptxas -v on the kernel's PTX (triton's own ptxas): registers, spills, and whether it
    serialises the wgmma pipeline (any of its "wgmma.mma_async instructions are serialized" notes)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = f"{tmp}/k.ptx"
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        res = subprocess.run([getattr(ptxas, "path", ptxas), "-v", "--gpu-name", "sm_90a", ptx, "-o", f"{tmp}/k.cubin"],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores", text)
    # ptxas names the reason in the code (C7513: non-wgmma instructions define a wgmma's input
    # registers inside the pipeline stage; C7514 others), so match the message, not one code
    serialized = re.search(r"wgmma\.mma_async instructions are serialized[^\n]*", text)
    return {"ok": res.returncode == 0, "registers": int(regs[-1]) if regs else None,
            "spill_bytes": int(spills[-1]) if spills else None, "wgmma_serialized": bool(serialized),
            **({"wgmma_serialized_why": serialized.group(0)} if serialized else {}),
            **({} if res.returncode == 0 else {"error": text[-300:]})}


def sass_report(kernel) -> dict:
    """HGMMA instructions and the wgmma fences (`WARPGROUP.ARRIVE`) around them in the kernel's SASS
    (nvdisasm of its cubin, triton's own nvdisasm). A kept pipeline fences once per product (8
    HGMMA for a 128-deep one), a serialised one once per HGMMA: a check that does not depend on
    the wording of ptxas's note."""
    import subprocess
    import tempfile

    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([knobs.nvidia.nvdisasm.path, "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    return {"hgmma": sass.count(" HGMMA."), "wgmma_fences": sass.count("WARPGROUP.ARRIVE")}


def counts(kernel) -> dict:
    ir = kernel.asm["ttgir"]
    return {"wgmma": ir.count("ttng.warp_group_dot "), "tma_copy": ir.count("async_tma_copy"),
            "cp_async": ir.count("async_copy_global_to_local"), "local_load": ir.count("ttg.local_load"),
            "branches": ir.count("scf.if "), "exp2": ir.count("math.exp2 ")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--softmax", default="exact", help=f"comma list of {', '.join(ta.SOFTMAX_MODES)}")
    p.add_argument("--gluon", action="store_true", help="the Gluon sm_90 kernel instead (IR counts + ptxas report)")
    args = p.parse_args(argv)
    if args.gluon:
        from patchattn.kernels import gluon_attention as ga

        names = {"": "gluon", "ws": "gluon warp-specialised", "wsp": "gluon persistent warp-specialised"}
        for form, d, bm, bn in (("", 128, 128, 128), ("", 64, 128, 128), ("", 128, 64, 64),
                                ("ws", 128, 128, 128), ("ws", 64, 128, 128), ("ws", 128, 128, 64),
                                ("wsp", 128, 128, 128), ("wsp", 64, 128, 128), ("wsp", 128, 128, 64)):
            kernel = compile_gluon_block_sparse(d, bm, bn, form == "ws", form == "wsp")
            q_bufs, k_stages = ga.wsp_buffers(d, bn)
            stages = f", {q_bufs} q buffers, {k_stages} K stages" if form == "wsp" else ""
            print(f"{names[form]} head_dim {d}, tile {bm}x{bn}{stages}:", counts(kernel), ptxas_report(kernel),
                  sass_report(kernel), f"shared {kernel.metadata.shared} B")
            assert kernel.metadata.shared <= ga.SM90_SHARED_BYTES, "over the shared memory of one sm_90 block"
        return
    for mode in args.softmax.split(","):
        for use_tma in (False, True):
            print(f"softmax {mode}, {'TMA' if use_tma else 'pointer'} loads:",
                  counts(compile_block_sparse(use_tma, stages=args.stages, softmax=mode)))


if __name__ == "__main__":
    main()
