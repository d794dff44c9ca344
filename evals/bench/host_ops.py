"""Host work of one patched attention call per method: the torch operators it issues (on CUDA
each one is a kernel launch with its own host cost, a few to tens of microseconds) and the values
it reads back to the host (on CUDA each one waits for the GPU).

    python -m patchattn.evals.bench.host_ops [--n 1024] [--out FILE]

Below ~32k tokens a patched layer can be bound by this host work rather than by the GPU
(evals/bench/results/h100/fused_index_1207/), so these counts say where fusing pays. Runs on any
machine: without CUDA the Triton kernels run under the interpreter, whose argument copies are
not counted (a CUDA launch of a Triton kernel issues no torch operator either). The counts do not
depend on the prompt length; each is the second call on the same inputs (the first one fills
per-layer caches: head ids on the device, tile pair counts).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__" and not os.path.exists("/dev/nvidiactl") and os.environ.get("TRITON_INTERPRET") != "1":
    # No GPU: the Triton kernels run under the interpreter, which must be chosen before triton is
    # first imported, and `python -m` has imported the patchattn package (and triton) already.
    os.environ["TRITON_INTERPRET"] = "1"
    os.execv(sys.executable, [sys.executable, "-m", "patchattn.evals.bench.host_ops", *sys.argv[1:]])

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators that do no work: views and metadata, and the copies the Triton interpreter makes of
# kernel arguments.
NOT_WORK = frozenset({
    "view", "expand", "unsqueeze", "squeeze", "slice", "select", "transpose", "permute", "alias", "detach",
    "split_with_sizes", "split", "unbind", "as_strided", "set_", "empty", "new_empty", "copy_", "lift_fresh",
})
# Operators that read a tensor's value back to the host (`.item()`, `int(t)`, `bool(t)`, ...).
READS = frozenset({"aten._local_scalar_dense", "aten.equal", "aten.nonzero", "aten.is_nonzero"})


class OpCounter(TorchDispatchMode):
    """Counts, while active, the torch operators that do work (`work`, by name in `by_op`) and
    the reads back to the host (`reads`, their overloads)."""

    def __init__(self):
        super().__init__()
        self.work = 0
        self.by_op = collections.Counter()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in READS:
            self.reads.append(str(func))
        short = name.split(".")[-1]
        if short not in NOT_WORK:
            self.work += 1
            self.by_op[short] += 1
        return func(*args, **(kwargs or {}))


def count_methods(names, n: int, heads: int = 4, kv_heads: int = 1, head_dim: int = 16, device: str = "cpu"):
    """Per method of `prefill.METHODS`: torch operators and host reads of one patched call."""
    from patchattn import backends
    from patchattn.evals.bench import prefill
    from patchattn.patching import causal_lazy_mask, sparse_attention

    prefill.HQ, prefill.HKV, prefill.D = heads, kv_heads, head_dim  # _layer_state's head group
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, head_dim, generator=gen).to(device) for h in (heads, kv_heads, kv_heads))
    mask = causal_lazy_mask(1, n, n, device=torch.device(device))
    rows = {}
    for name in names:
        state, _ = prefill._layer_state(name, prefill.METHODS[name])

        def call():
            return sparse_attention(state, q, k, v, mask, scale=head_dim ** -0.5, softcap=None, sliding_window=None)

        launches = sum(backends.kernel_calls.values())
        call()
        with OpCounter() as counter:
            call()
        rows[name] = {"torch_ops": counter.work, "host_reads": len(counter.reads),
                      "kernel_path": sum(backends.kernel_calls.values()) > launches,
                      "top_ops": dict(counter.by_op.most_common(8))}
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024, help="prompt length (the counts do not depend on it)")
    parser.add_argument("--methods", default="vertical_slash_g64,streaming,block_topk,xattention,flexprefill")
    parser.add_argument("--out", default=None, help="JSON file for the table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        from patchattn.kernels.interpreter_compat import patch_interpreter_for_numpy2

        patch_interpreter_for_numpy2()
    names = [m for m in args.methods.split(",") if m]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from patchattn import backends

    rows = {}
    for fused in (False, True):  # ends on the default (the one-launch index)
        backends.VS_FUSED_INDEX = fused
        for name, row in count_methods(names, args.n, device=device).items():
            rows.setdefault(name, {})["fused_index" if fused else "torch_index"] = row
    print("| method | torch operators per call | (torch index) | reads back | kernel path |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        f, t = r["fused_index"], r["torch_index"]
        print(f"| {name} | {f['torch_ops']} | {t['torch_ops']} | {f['host_reads']} | {f['kernel_path']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"n": args.n, "device": device, "torch": torch.__version__,
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PATCHATTN_BACKEND", "triton")
    os.environ.setdefault("PATCHATTN_DENSE_BELOW", "0")
    sys.exit(main())
