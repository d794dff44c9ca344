"""Triton kernels against a brute-force dense masked softmax (fp64 on CPU, fp32 on GPU).

CPU: the checks run in one worker subprocess under TRITON_INTERPRET=1 (the interpreter has to be
chosen before triton is first imported, which another test module may already have done here),
on small fp32/fp16 shapes; the interpreter's bf16 dot is wrong, so bf16 is left to the GPU tests.
GPU (`-m gpu`): bf16 at realistic shapes, relative error <= 1e-2 against fp32.
"""

import os
import sys

if __name__ == "__main__":  # interpreter worker: must be set before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import contextlib
import json
import subprocess
import traceback

import pytest
import torch

# ----------------------------------------------------------------------------- oracle


def base_keep(bsz, n_q, n_k, q_offset, kv_start, window, device="cpu"):
    """bool [B, 1, N, Nk]: causal, left padding and sliding window."""
    i = torch.arange(n_q, device=device)[:, None] + q_offset
    j = torch.arange(n_k, device=device)[None, :]
    keep = (j <= i)[None] & (j[None] >= kv_start.to(device)[:, None, None])
    if window is not None:
        keep = keep & ((i - j) < window)[None]
    return keep[:, None]


def dense_oracle(q, k, v, keep, scale, softcap=None, dtype=torch.float64):
    """Masked softmax over exactly the kept pairs; empty rows give out 0 and lse -inf."""
    g = q.shape[1] // k.shape[1]
    k = k.to(dtype).repeat_interleave(g, 1)
    v = v.to(dtype).repeat_interleave(g, 1)
    s = q.to(dtype) @ k.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    out = torch.where(l > 0, (p @ v) / l.clamp_min(1e-30), torch.zeros_like(l))
    lse = torch.where(l[..., 0] > 0, (m + torch.log(l.clamp_min(1e-30)))[..., 0], float("-inf"))
    return out, lse


def random_block_lists(bsz, heads, n_q, n_k, bm, bn, q_offset, density, device="cpu"):
    """Ascending random key-block lists (diagonal block and block 0 always in), plus the token mask."""
    nqb, nkb = -(-n_q // bm), -(-n_k // bn)
    last_row = (torch.arange(nqb) * bm + bm).clamp(max=n_q) - 1 + q_offset
    last = last_row.div(bn, rounding_mode="floor").clamp(max=nkb - 1)
    kb = torch.arange(nkb)
    pick = (torch.rand(bsz, heads, nqb, nkb) < density) | (kb == 0) | (kb == last[:, None])
    pick &= kb <= last[:, None]
    count = pick.sum(-1).int()
    index = torch.where(pick, kb, nkb).sort(-1).values.int()  # unused tail holds nkb
    tokens = pick.repeat_interleave(bm, 2)[:, :, :n_q].repeat_interleave(bn, 3)[..., :n_k]
    return index.to(device), count.to(device), tokens.to(device)


def random_vs_masks(bsz, heads, n_q, n_k, q_offset, p_col, p_diag, device="cpu", diag_group=1, sink=True):
    col = torch.rand(bsz, heads, n_k) < p_col
    diag = torch.rand(bsz, heads, n_k) < p_diag
    if diag_group > 1:  # whole aligned groups of diagonals, as vertical_slash's slash_group selects them
        from patchattn.methods.vertical_slash import top_group_mask

        diag = top_group_mask(torch.rand(bsz, heads, n_k), max(1, int(p_diag * n_k)), diag_group)
    diag[..., :3] = True  # local band
    col[..., 0] = sink  # attention sink
    d = (torch.arange(n_q)[:, None] + q_offset - torch.arange(n_k)[None]).clamp(0, n_k - 1)
    tokens = col[:, :, None, :] | diag[:, :, d]
    return col.to(device), diag.to(device), tokens.to(device)


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _lse_err(lse, ref_lse):
    same_inf = torch.equal(torch.isinf(lse).cpu(), torch.isinf(ref_lse).cpu())
    fin = torch.isfinite(ref_lse)
    err = (lse.double()[fin] - ref_lse.double()[fin]).abs().max().item() if fin.any() else 0.0
    return err if same_inf else float("inf")


def _qkv(bsz, hq, hkv, n_q, n_k, d, dtype, device="cpu"):
    mk = lambda h, n: torch.randn(bsz, h, n, d, dtype=torch.float32, device=device).to(dtype)  # noqa: E731
    return mk(hq, n_q), mk(hkv, n_k), mk(hkv, n_k)


# ----------------------------------------------------------------------------- checks (shared by CPU and GPU)


class _module_flag:
    """Set a module attribute for the duration of a check (kernel variants chosen by a flag)."""

    def __init__(self, module, name, value):
        self.module, self.name, self.value = module, name, value

    def __enter__(self):
        self.saved = getattr(self.module, self.name)
        if self.value is not None:
            setattr(self.module, self.name, self.value)

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.saved)


def _program_order(kv_major):
    from patchattn.kernels import triton_attention

    return _module_flag(triton_attention, "KV_MAJOR", kv_major)


def _tma_loads(tma):
    from patchattn.kernels import triton_attention

    return _module_flag(triton_attention, "TMA", tma)


@contextlib.contextmanager
def _persistent_buffers(gluon_attention, form):
    """The persistent form's buffers for a test form: persistent_k2 two K stages, persistent_q3
    three q buffers, else the defaults (2 q buffers, 3 K stages)."""
    with _module_flag(gluon_attention, "WSP_K_STAGES", 2 if form == "persistent_k2" else 3), \
            _module_flag(gluon_attention, "WSP_Q_BUFFERS", 3 if form == "persistent_q3" else 2):
        yield


def _gluon_kernel(gluon):
    from patchattn.kernels import triton_attention

    return _module_flag(triton_attention, "GLUON", gluon)


def check_block_sparse(bsz, hq, hkv, n_q, n_k, d, bm, bn, q_offset, kv_start, window, softcap, dtype,
                       density=0.4, device="cpu", shared_lists=False, kv_major=None, tile=None, tma=None,
                       gluon=False, empty_share=0.0):
    """empty_share: the fraction of query blocks given an empty list (the first always is).
    tile: the kernel's (rows, keys) per step, a fraction of the lists' (bm, bn) blocks.
    tma=True: tiles loaded by tensor descriptor where the layout allows (`tma_used`), also
    compared with the pointer loads on the same inputs. gluon=True: the Gluon sm_90 kernel where
    `sm90_usable` takes the inputs (`gluon_used`); the default tests the Triton kernel on every GPU."""
    with _program_order(kv_major), _tma_loads(tma), _gluon_kernel(gluon):
        return _check_block_sparse(bsz, hq, hkv, n_q, n_k, d, bm, bn, q_offset, kv_start, window, softcap, dtype,
                                   density, device, shared_lists, tile, bool(tma), empty_share)


def _check_block_sparse(bsz, hq, hkv, n_q, n_k, d, bm, bn, q_offset, kv_start, window, softcap, dtype,
                        density, device, shared_lists, tile, tma, empty_share):
    from patchattn.kernels import triton_attention
    from patchattn.kernels.triton_attention import block_sparse_attention

    q, k, v = _qkv(bsz, hq, hkv, n_q, n_k, d, dtype, device)
    kvs = torch.tensor(kv_start, dtype=torch.int32)
    hb = hkv if shared_lists else hq
    index, count, tokens = random_block_lists(bsz, hb, n_q, n_k, bm, bn, q_offset, density, device)
    empty = torch.rand(count.shape, device=count.device) < empty_share
    empty[0, 0, 0] = True  # empty query blocks: zeros and -inf
    count[empty] = 0
    tokens[empty.repeat_interleave(bm, 2)[:, :, :n_q]] = False
    tokens = tokens.repeat_interleave(hq // hb, 1)
    keep = base_keep(bsz, n_q, n_k, q_offset, kvs, window, device) & tokens
    out = torch.full_like(q, float("nan"))
    run = lambda out: block_sparse_attention(  # noqa: E731
        q, k, v, index, count, scale=d ** -0.5, q_offset=q_offset, kv_start=kvs.to(device), sliding_window=window,
        softcap=softcap, block_m=bm, block_n=bn, out=out, tile=tile)
    o, lse = run(out)
    extra = {}
    if triton_attention.GLUON:
        from patchattn.kernels.gluon_attention import sm90_usable

        extra["gluon_used"] = sm90_usable(q, bm, bn, softcap, window) and tile is None
    if tma:
        extra["tma_used"] = triton_attention._tma_usable(q, k, v)
        with _tma_loads(False):
            ptr, ptr_lse = run(torch.full_like(q, float("nan")))
        extra.update(tma_vs_pointer=rel_err(o, ptr), tma_vs_pointer_lse=_lse_err(lse, ptr_lse))
    ref, ref_lse = dense_oracle(q, k, v, keep, d ** -0.5, softcap, torch.float64 if device == "cpu" else torch.float32)
    return dict(out=rel_err(o, ref), lse=_lse_err(lse, ref_lse), nan=bool(o.isnan().any()), same=o is out, **extra)


def check_vertical_slash(bsz, hq, hkv, n_q, n_k, d, bm, bn, q_offset, kv_start, window, softcap, dtype,
                         p_col=0.08, p_diag=0.08, device="cpu", diag_group=1, flat=False, kv_major=None,
                         no_sink=False):
    with _program_order(kv_major):
        return _check_vertical_slash(bsz, hq, hkv, n_q, n_k, d, bm, bn, q_offset, kv_start, window, softcap, dtype,
                                     p_col, p_diag, device, diag_group, flat, not no_sink)


def _check_vertical_slash(bsz, hq, hkv, n_q, n_k, d, bm, bn, q_offset, kv_start, window, softcap, dtype,
                          p_col, p_diag, device, diag_group, flat, sink):
    from patchattn.kernels.triton_attention import (
        vertical_slash_attention, vertical_slash_index, vertical_slash_pair_counts)

    q, k, v = _qkv(bsz, hq, hkv, n_q, n_k, d, dtype, device)
    kvs = torch.tensor(kv_start, dtype=torch.int32)
    col, diag, tokens = random_vs_masks(bsz, hq, n_q, n_k, q_offset, p_col, p_diag, device, diag_group, sink)
    base = base_keep(bsz, n_q, n_k, q_offset, kvs, window, device)
    keep = base & tokens
    opts = dict(q_offset=q_offset, kv_start=kvs.to(device), sliding_window=window)
    index = vertical_slash_index(col, diag, n_q=n_q, block_m=bm, flat_slash_block_n=bn if flat else None, **opts)
    out = torch.full_like(q, float("nan"))
    o, lse = vertical_slash_attention(q, k, v, col, diag, scale=d ** -0.5, softcap=softcap, index=index, block_m=bm,
                                      block_n=bn, out=out, **opts)
    extra = {}
    if flat:  # the flat tile list walks the per-segment loop's tiles in the same order
        nested, _ = vertical_slash_attention(q, k, v, col, diag, scale=d ** -0.5, softcap=softcap, block_m=bm,
                                             block_n=bn, **opts)
        extra["flat_equals_nested"] = rel_err(o, nested)
    # Lists cut at the most columns / diagonals a row keeps (what a method's budgets bound): the
    # same entries, so the same tiles in the same order.
    bounded = vertical_slash_index(col, diag, n_q=n_q, block_m=bm, flat_slash_block_n=bn if flat else None,
                                   max_columns=int(col.sum(-1).max()), max_diagonals=int(diag.sum(-1).max()),
                                   **opts)
    o_bounded, _ = vertical_slash_attention(q, k, v, col, diag, scale=d ** -0.5, softcap=softcap, index=bounded,
                                            block_m=bm, block_n=bn, **opts)
    # Query blocks whose mask-free loop runs (whole column tiles before the block's first row).
    extra["open_tiles"] = int(((index.v_mid - index.v_lo) >= (bn or 64)).sum()) if index.v_mid is not None else 0
    extra["bounded_lists_shorter"] = bounded.v_idx.shape[-1] < n_k and bounded.seg_lo.shape[-1] < n_k
    extra["bounded_equals_full"] = rel_err(o_bounded, o)
    ref, ref_lse = dense_oracle(q, k, v, keep, d ** -0.5, softcap, torch.float64 if device == "cpu" else torch.float32)
    counts = vertical_slash_pair_counts(col, diag, n_q=n_q, index=index, block_n=bn or 64, **opts)
    kept = keep.sum((-1, -2)).cpu()
    extra["kept_ok_bounded"] = torch.equal(
        vertical_slash_pair_counts(col, diag, n_q=n_q, index=bounded, computed=False, **opts)["kept"].cpu(), kept)
    extra["kept_ok_masks"] = torch.equal(vertical_slash_pair_counts(col, diag, n_q=n_q, **opts)["kept"].cpu(), kept)
    if not flat:  # the one-launch index (what patched layers use) against the torch one, field by field
        extra["fused_index_equal"], extra["fused_kept_ok"] = _fused_index_agrees(
            index, col, diag, kept, n_q=n_q, block_m=bm, **opts)
        bounds = dict(max_columns=int(col.sum(-1).max()), max_diagonals=int(diag.sum(-1).max()))
        extra["fused_bounded_equal"], _ = _fused_index_agrees(bounded, col, diag, kept, n_q=n_q, block_m=bm, **opts,
                                                              **bounds)
    return dict(out=rel_err(o, ref), lse=_lse_err(lse, ref_lse), nan=bool(o.isnan().any()),
                kept_ok=torch.equal(counts["kept"].cpu(), kept),
                base_ok=torch.equal(counts["base"].cpu(), base.sum((-1, -2)).expand(bsz, hq).cpu()),
                computed_ge_kept=bool((counts["computed"] >= counts["kept"]).all()), **extra)


def _fused_index_agrees(index, col, diag, kept, **kwargs):
    """(every field of the one-launch index equals `index`'s, its kept-pair count equals `kept`)."""
    from patchattn.kernels.triton_index import vertical_slash_index_and_kept

    fused, fused_kept = vertical_slash_index_and_kept(col, diag, **kwargs)
    fields = ("v_idx", "v_lo", "v_mid", "v_hi", "seg_lo", "seg_hi", "seg_cnt", "seg_full", "d_idx")
    same = all(torch.equal(getattr(fused, f).cpu(), getattr(index, f).cpu()) for f in fields)
    return same and fused.block_m == index.block_m, torch.equal(fused_kept.cpu(), kept)


def _brute_last_q(q, k, scale, pos, kvs, softcap):
    """Loop-level definition of the vertical / slash scores (fp64)."""
    bsz, h, n_last, _ = q.shape
    n_k = k.shape[2]
    s = q.double() @ k.double().repeat_interleave(h // k.shape[1], 1).transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    vert = torch.zeros(bsz, h, n_k, dtype=torch.float64)
    slash = torch.zeros_like(vert)
    j = torch.arange(n_k)
    for b in range(bsz):
        for row in range(n_last):
            ok = (j <= pos[row]) & (j >= kvs[b])
            if ok.any():
                p = torch.softmax(s[b, :, row].masked_fill(~ok, float("-inf")), -1)
                vert[b] += p
                slash[b].index_add_(1, (pos[row] - j[ok]), p[:, ok])
    return vert, slash


def check_last_q(bsz, hq, hkv, n_last, n_k, d, kv_start, softcap, dtype, device="cpu"):
    from patchattn.kernels.triton_estimators import last_q_scores

    q, k, _ = _qkv(bsz, hq, hkv, n_last, n_k, d, dtype, device)
    pos = torch.arange(n_k - n_last, n_k)
    kvs = torch.tensor(kv_start)
    res = {}
    if device == "cpu":
        rv, rs = _brute_last_q(q, k, d ** -0.5, pos, kvs, softcap)
    else:
        rv, rs = last_q_scores(q, k, scale=d ** -0.5, q_positions=pos, kv_start=kvs, softcap=softcap, impl="torch")
    for impl in ("torch", "triton"):
        v, s = last_q_scores(q, k, scale=d ** -0.5, q_positions=pos.to(device), kv_start=kvs.to(device),
                             softcap=softcap, impl=impl)
        res[impl] = max(rel_err(v.cpu(), rv.cpu()), rel_err(s.cpu(), rs.cpu()))
    return res


def _brute_antidiagonal(q, k, bs, stride, scale, kvs, q_offset):
    bsz, h, n_q, _ = q.shape
    n_k = k.shape[2]
    kk = k.double().repeat_interleave(h // k.shape[1], 1)
    nrq, nrk = -(-n_q // stride), -(-n_k // stride)
    red = torch.zeros(bsz, h, nrq, nrk, dtype=torch.float64)
    ok = torch.zeros(bsz, nrq, nrk, dtype=torch.bool)
    for b in range(bsz):
        for a in range(nrq):
            q_last = min(a * stride + stride, n_q) - 1 + q_offset
            for c in range(nrk):
                ok[b, a, c] = c * stride <= q_last and c * stride + stride - 1 >= kvs[b] and q_last >= kvs[b]
                for r in range(stride):
                    i, j = a * stride + stride - 1 - r, c * stride + r
                    if i < n_q and j < n_k and i + q_offset >= kvs[b] and j >= kvs[b]:
                        red[b, :, a, c] += (q[b, :, i].double() * kk[b, :, j]).sum(-1)
    p = torch.softmax((red * scale).masked_fill(~ok[:, None], float("-inf")), -1).nan_to_num(0.0)
    per = bs // stride
    out = torch.zeros(bsz, h, -(-n_q // bs), -(-n_k // bs), dtype=torch.float64)
    for a in range(nrq):
        for c in range(nrk):
            out[:, :, a // per, c // per] += p[:, :, a, c]
    return out / out.sum(-1, keepdim=True).clamp_min(1e-30)


def check_antidiagonal(bsz, hq, hkv, n_q, n_k, d, bs, stride, kv_start, dtype, device="cpu", scratch_heads=None):
    """scratch_heads: the Triton path's scratch budget in heads' worth of scores (0: pass 2
    recomputes them; 1.5: one head per launch)."""
    from patchattn.kernels import triton_estimators

    per_head = bsz * -(-n_q // stride) * -(-n_k // stride) * 4
    budget = None if scratch_heads is None else int(scratch_heads * per_head)
    with _module_flag(triton_estimators, "ANTIDIAG_SCRATCH_BYTES", budget):
        return _check_antidiagonal(bsz, hq, hkv, n_q, n_k, d, bs, stride, kv_start, dtype, device)


def _check_antidiagonal(bsz, hq, hkv, n_q, n_k, d, bs, stride, kv_start, dtype, device):
    from patchattn.kernels.triton_estimators import antidiagonal_block_scores

    q, k, _ = _qkv(bsz, hq, hkv, n_q, n_k, d, dtype, device)
    kvs = torch.tensor(kv_start)
    scale = d ** -0.5 / stride
    if device == "cpu":
        ref = _brute_antidiagonal(q, k, bs, stride, scale, kvs, n_k - n_q)
    else:
        ref = antidiagonal_block_scores(q, k, block_size=bs, stride=stride, scale=scale, kv_start=kvs, impl="torch")
    return {impl: rel_err(antidiagonal_block_scores(q, k, block_size=bs, stride=stride, scale=scale,
                                                    kv_start=kvs.to(device), impl=impl).cpu(), ref.cpu())
            for impl in ("torch", "triton")}


def check_pooled(bsz, hq, hkv, n_q, n_k, d, bs, kv_start):
    from patchattn.kernels.triton_estimators import pooled_block_scores

    q, k, _ = _qkv(bsz, hq, hkv, n_q, n_k, d, torch.float32)
    q_offset, g = n_k - n_q, hq // hkv
    nqb, nkb = -(-n_q // bs), -(-n_k // bs)
    ref = torch.zeros(bsz, hq, nqb, nkb, dtype=torch.float64)
    for b in range(bsz):
        keys = [[j for j in range(kb * bs, min(n_k, kb * bs + bs)) if j >= kv_start[b]] for kb in range(nkb)]
        for qb in range(nqb):
            rows = [i for i in range(qb * bs, min(n_q, qb * bs + bs)) if i + q_offset >= kv_start[b]]
            if not rows:
                continue
            last = min(n_q, qb * bs + bs) - 1 + q_offset
            for h in range(hq):
                pq = q[b, h, rows].double().mean(0)
                s = torch.full((nkb,), float("-inf"), dtype=torch.float64)
                for kb, ks in enumerate(keys):
                    if ks and kb * bs <= last:
                        s[kb] = (pq * k[b, h // g, ks].double().mean(0)).sum() * 0.3
                ref[b, h, qb] = torch.softmax(s, -1)
    out = pooled_block_scores(q, k, block_size=bs, scale=0.3, kv_start=torch.tensor(kv_start))
    return dict(err=rel_err(out, ref))


class _HostReads:
    """Records, inside one function, the operators that read a tensor's value back to the host
    (on CUDA each one waits for the GPU: `.item()`, `int(t)`, `bool(t)`, `torch.equal`, `nonzero`)
    and how many torch operators do work (on CUDA about one launch and its host cost each), as
    `evals/bench/host_ops.py` counts them. The kernel path of vertical_slash / block_topk /
    streaming / xattention reads nothing back (the GPU test `test_kernel_prefill_never_syncs_gpu`
    checks host-to-device copies too); flexprefill reads two flags (`_assert_result`)."""

    def __init__(self):
        self.ops = []
        self.work = 0

    @contextlib.contextmanager
    def around(self, module, name):
        """Record the operators issued inside module.name (the function swapped for a recording one)."""
        from patchattn.evals.bench.host_ops import OpCounter

        original = getattr(module, name)

        def recorded(*args, **kwargs):
            with OpCounter() as counter:
                out = original(*args, **kwargs)
            self.ops += counter.reads
            self.work += counter.work
            return out

        setattr(module, name, recorded)
        try:
            yield self
        finally:
            setattr(module, name, original)


def check_patching_kernel_path(method, params, bsz, hq, hkv, n_q, n_k, d, pad, softcap, dtype, device="cpu"):
    """patchattn's own execution with PATCHATTN_BACKEND=triton: the selection a method makes is
    run by the kernels (backends.run_group) and must equal a masked softmax over that selection,
    with telemetry counting exactly the kept pairs; the reference backend must agree."""
    from patchattn import backends, patching
    from patchattn.methods import get_method
    from patchattn.patching import causal_lazy_mask, run_method

    q, k, v = _qkv(bsz, hq, hkv, n_q, n_k, d, dtype, device)
    padding = torch.ones(bsz, n_k, dtype=torch.long, device=device)
    padding[-1, :pad] = 0
    mask = causal_lazy_mask(bsz, n_q, n_k, padding if pad else None, device=torch.device(device))
    cls = get_method(method)
    m = cls(cls.validate_params(params))
    old = os.environ.get(backends.BACKEND_ENV)
    try:
        os.environ[backends.BACKEND_ENV] = "triton"
        layout_ok = backends.kernel_layout(mask, q, k, None) is not None  # (padding: read once per mask)
        launches = sum(backends.kernel_calls.values())
        reads = _HostReads()
        with reads.around(patching, "sparse_attention"):
            out, kept, keep = run_method(m, q, k, v, mask, scale=d ** -0.5, softcap=softcap, return_mask=True)
        layout_ok = layout_ok and sum(backends.kernel_calls.values()) > launches  # the kernels really ran
        os.environ[backends.BACKEND_ENV] = "reference"
        ref_path, ref_kept, ref_keep = run_method(m, q, k, v, mask, scale=d ** -0.5, softcap=softcap,
                                                  return_mask=True)
    finally:
        os.environ.pop(backends.BACKEND_ENV) if old is None else os.environ.__setitem__(backends.BACKEND_ENV, old)
    ref, _ = dense_oracle(q, k, v, keep, d ** -0.5, softcap, torch.float64 if device == "cpu" else torch.float32)
    base = mask.rows(0, n_q).expand_as(keep)
    same_sel = torch.equal(keep, ref_keep)
    return dict(out=rel_err(out, ref), nan=bool(out.isnan().any()), layout_ok=layout_ok,
                kept_ok=torch.equal(kept.cpu(), keep.sum((-1, -2)).sum(0).cpu()), host_reads=reads.ops,
                torch_ops=reads.work,
                skips=bool((base & ~keep).any()),
                ref_agrees=(rel_err(ref_path, out) <= 1e-4 and torch.equal(ref_kept, kept)) if same_sel else True)


def check_patched_llama(dtype=torch.float32):
    """A patched tiny Llama (GQA, batch 2, left padding; vertical_slash and xattention layers):
    the kernel backend gives the reference backend's logits and telemetry."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from patchattn import Plan, backends, patch_model, stats
    from patchattn.telemetry import reset_stats

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    plan = Plan.uniform(model, "vertical_slash", {"vertical": 16, "slash": 16, "last_q": 16}).to_dict()
    plan["layers"][1] = {"method": "xattention", "params": {"block_size": 32, "stride": 8, "threshold": 0.9}}
    patch_model(model, Plan.from_dict(plan))
    ids = torch.randint(0, 256, (2, 300))
    am = torch.ones_like(ids)
    am[1, :23] = 0
    res = {}
    old = os.environ.get(backends.BACKEND_ENV)
    try:
        for choice in ("triton", "reference"):
            os.environ[backends.BACKEND_ENV] = choice
            reset_stats(model)
            calls = sum(backends.kernel_calls.values())
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=am).logits
            res[choice] = (logits, stats(model).density, sum(backends.kernel_calls.values()) - calls,
                           dict(stats(model).kernels))
    finally:
        os.environ.pop(backends.BACKEND_ENV) if old is None else os.environ.__setitem__(backends.BACKEND_ENV, old)
    (lk, dk, ck, kk), (lr, dr, cr, kr) = res["triton"], res["reference"]
    valid = am.bool()
    return dict(err=rel_err(lk[valid], lr[valid]), density_equal=dk == dr, sparse=dk < 0.95, kernel_calls=ck,
                reference_calls=cr, telemetry_kernels=kk, telemetry_reference=kr)


# Small CPU cases: (check, kwargs). Shapes cover GQA, batch > 1, ragged tails, left padding,
# q_offset (prefill after cache), sliding window, softcap, unequal block_m / block_n.
F32, F16 = torch.float32, torch.float16
CPU_CASES = {
    "bs_gqa_pad": (check_block_sparse, dict(bsz=2, hq=4, hkv=2, n_q=160, n_k=160, d=32, bm=32, bn=32, q_offset=0,
                                            kv_start=[0, 37], window=None, softcap=None, dtype=F32)),
    "bs_offset_window_cap": (check_block_sparse, dict(bsz=1, hq=2, hkv=1, n_q=70, n_k=150, d=16, bm=16, bn=32,
                                                      q_offset=80, kv_start=[5], window=50, softcap=20.0, dtype=F16)),
    "bs_small_blocks_pad_window": (check_block_sparse, dict(bsz=2, hq=4, hkv=2, n_q=150, n_k=150, d=32, bm=16,
                                                            bn=16, q_offset=0, kv_start=[0, 21], window=70,
                                                            softcap=None, dtype=F32)),
    "bs_unequal_blocks_d64": (check_block_sparse, dict(bsz=2, hq=2, hkv=2, n_q=100, n_k=100, d=64, bm=32, bn=16,
                                                       q_offset=0, kv_start=[0, 99], window=None, softcap=None,
                                                       dtype=F32)),
    "bs_subtiles_offset_window": (check_block_sparse, dict(bsz=2, hq=4, hkv=2, n_q=90, n_k=150, d=16, bm=32, bn=32,
                                                           q_offset=60, kv_start=[0, 41], window=45, softcap=None,
                                                           dtype=F32, tile=(16, 8))),
    "bs_subtiles_pad_cap": (check_block_sparse, dict(bsz=2, hq=2, hkv=1, n_q=100, n_k=100, d=32, bm=32, bn=32,
                                                     q_offset=0, kv_start=[0, 37], window=None, softcap=15.0,
                                                     dtype=F16, tile=(8, 16))),
    "bs_gqa_pad_heads_fastest": (check_block_sparse, dict(bsz=2, hq=4, hkv=2, n_q=100, n_k=100, d=32, bm=32,
                                                          bn=32, q_offset=0, kv_start=[0, 37], window=None,
                                                          softcap=None, dtype=F32, kv_major=False)),
    "bs_shared_group_lists_d48": (check_block_sparse, dict(bsz=1, hq=4, hkv=2, n_q=96, n_k=96, d=48, bm=16, bn=16,
                                                           q_offset=0, kv_start=[0], window=None, softcap=None,
                                                           dtype=F32, shared_lists=True)),
    # TMA (tensor-descriptor) loads: rows past n_k and head_dim padding come back as zeros from
    # the descriptor instead of masked loads.
    "bs_tma_gqa_pad": (check_block_sparse, dict(bsz=2, hq=4, hkv=2, n_q=150, n_k=150, d=32, bm=32, bn=32,
                                                q_offset=0, kv_start=[0, 37], window=None, softcap=None, dtype=F32,
                                                tma=True)),
    "bs_tma_offset_window_cap_f16": (check_block_sparse, dict(bsz=2, hq=4, hkv=1, n_q=70, n_k=150, d=16, bm=16,
                                                              bn=32, q_offset=80, kv_start=[5, 30], window=50,
                                                              softcap=20.0, dtype=F16, tma=True)),
    "bs_tma_subtiles_offset_window": (check_block_sparse, dict(bsz=2, hq=4, hkv=2, n_q=90, n_k=150, d=16, bm=32,
                                                               bn=32, q_offset=60, kv_start=[0, 41], window=45,
                                                               softcap=None, dtype=F32, tile=(16, 8), tma=True)),
    "bs_tma_subtiles_pad_f16": (check_block_sparse, dict(bsz=2, hq=2, hkv=1, n_q=100, n_k=100, d=32, bm=32, bn=32,
                                                         q_offset=0, kv_start=[0, 37], window=None, softcap=None,
                                                         dtype=F16, tile=(8, 16), tma=True)),
    "bs_tma_d48_shared_lists_heads_fastest": (check_block_sparse, dict(
        bsz=2, hq=4, hkv=2, n_q=96, n_k=110, d=48, bm=16, bn=16, q_offset=0, kv_start=[0, 13], window=None,
        softcap=None, dtype=F32, shared_lists=True, kv_major=False, tma=True)),
    # head_dim 12 in fp16: 24-byte rows, which TMA cannot address; the pointer loads run instead.
    "bs_tma_unaligned_rows_f16": (check_block_sparse, dict(bsz=2, hq=2, hkv=1, n_q=70, n_k=70, d=12, bm=16, bn=16,
                                                           q_offset=0, kv_start=[0, 9], window=None, softcap=None,
                                                           dtype=F16, tma=True)),
    "vs_gqa_pad": (check_vertical_slash, dict(bsz=2, hq=4, hkv=1, n_q=150, n_k=150, d=32, bm=32, bn=32, q_offset=0,
                                              kv_start=[0, 37], window=None, softcap=None, dtype=F32)),
    "vs_offset_window_cap": (check_vertical_slash, dict(bsz=1, hq=2, hkv=2, n_q=70, n_k=150, d=16, bm=16, bn=32,
                                                        q_offset=80, kv_start=[5], window=50, softcap=20.0, dtype=F16,
                                                        p_col=0.2, p_diag=0.3)),
    "vs_gqa_pad_heads_fastest": (check_vertical_slash, dict(bsz=2, hq=4, hkv=2, n_q=150, n_k=150, d=32, bm=32, bn=32,
                                                            q_offset=0, kv_start=[0, 37], window=None, softcap=None,
                                                            dtype=F32, kv_major=False)),
    # Many columns: query blocks with whole column tiles before their first row (the mask-free loop).
    "vs_dense_columns_offset_pad": (check_vertical_slash, dict(bsz=2, hq=4, hkv=2, n_q=120, n_k=160, d=32, bm=32,
                                                               bn=16, q_offset=40, kv_start=[0, 23], window=None,
                                                               softcap=None, dtype=F32, p_col=0.4, p_diag=0.05)),
    # Streaming with sink 0: no column at all (the column list keeps one padding slot).
    "vs_no_columns": (check_vertical_slash, dict(bsz=2, hq=2, hkv=1, n_q=100, n_k=100, d=16, bm=16, bn=16, q_offset=0,
                                                 kv_start=[0, 11], window=None, softcap=None, dtype=F32, p_col=0.0,
                                                 p_diag=0.05, no_sink=True)),
    "vs_band_only": (check_vertical_slash, dict(bsz=2, hq=2, hkv=1, n_q=120, n_k=120, d=16, bm=16, bn=16, q_offset=0,
                                                kv_start=[0, 9], window=None, softcap=None, dtype=F32, p_col=0.05,
                                                p_diag=0.0)),
    "vs_sparse_diagonals": (check_vertical_slash, dict(bsz=1, hq=2, hkv=1, n_q=200, n_k=200, d=32, bm=16, bn=16,
                                                       q_offset=0, kv_start=[3], window=None, softcap=None, dtype=F32,
                                                       p_col=0.03, p_diag=0.02)),
    "vs_grouped_diagonals": (check_vertical_slash, dict(bsz=2, hq=2, hkv=1, n_q=200, n_k=200, d=32, bm=16, bn=16,
                                                        q_offset=0, kv_start=[0, 21], window=None, softcap=None,
                                                        dtype=F32, p_col=0.03, p_diag=0.1, diag_group=8)),
    "vs_flat_gqa_pad": (check_vertical_slash, dict(bsz=2, hq=4, hkv=1, n_q=150, n_k=150, d=32, bm=32, bn=32,
                                                   q_offset=0, kv_start=[0, 37], window=None, softcap=None,
                                                   dtype=F32, flat=True)),
    "vs_flat_offset_window_cap": (check_vertical_slash, dict(bsz=1, hq=2, hkv=2, n_q=70, n_k=150, d=16, bm=16,
                                                             bn=32, q_offset=80, kv_start=[5], window=50,
                                                             softcap=20.0, dtype=F16, p_col=0.2, p_diag=0.3,
                                                             flat=True)),
    "vs_flat_grouped_diagonals": (check_vertical_slash, dict(bsz=2, hq=2, hkv=1, n_q=200, n_k=200, d=32, bm=16,
                                                             bn=16, q_offset=0, kv_start=[0, 21], window=None,
                                                             softcap=None, dtype=F32, p_col=0.03, p_diag=0.1,
                                                             diag_group=8, flat=True)),
    "lastq_gqa_pad": (check_last_q, dict(bsz=2, hq=4, hkv=2, n_last=20, n_k=150, d=32, kv_start=[0, 140],
                                         softcap=None, dtype=F32)),
    "lastq_cap_f16": (check_last_q, dict(bsz=1, hq=2, hkv=1, n_last=16, n_k=100, d=16, kv_start=[3], softcap=10.0,
                                         dtype=F16)),
    "antidiag_pad": (check_antidiagonal, dict(bsz=2, hq=4, hkv=2, n_q=200, n_k=200, d=16, bs=32, stride=4,
                                              kv_start=[0, 45], dtype=F32)),
    "antidiag_recompute": (check_antidiagonal, dict(bsz=2, hq=4, hkv=2, n_q=200, n_k=200, d=16, bs=32, stride=4,
                                                    kv_start=[0, 45], dtype=F32, scratch_heads=0)),
    "antidiag_head_chunks": (check_antidiagonal, dict(bsz=2, hq=4, hkv=2, n_q=200, n_k=200, d=16, bs=32, stride=4,
                                                      kv_start=[0, 45], dtype=F32, scratch_heads=2.5)),
    "antidiag_offset_f16": (check_antidiagonal, dict(bsz=1, hq=2, hkv=1, n_q=90, n_k=130, d=32, bs=64, stride=8,
                                                     kv_start=[7], dtype=F16)),
    "pooled": (check_pooled, dict(bsz=2, hq=4, hkv=2, n_q=200, n_k=200, d=16, bs=32, kv_start=[0, 45])),
    "pooled_offset": (check_pooled, dict(bsz=1, hq=2, hkv=1, n_q=90, n_k=130, d=32, bs=64, kv_start=[70])),
    # patchattn's kernel backend end to end (GQA, left padding, batch 2, prefill after a cache).
    "path_vertical_slash": (check_patching_kernel_path, dict(
        method="vertical_slash", params={"vertical": 6, "slash": 4, "last_q": 16, "sink": 2, "window": 8},
        bsz=2, hq=4, hkv=2, n_q=130, n_k=130, d=32, pad=21, softcap=None, dtype=F32)),
    "path_block_topk_offset": (check_patching_kernel_path, dict(
        method="block_topk", params={"block_size": 32, "top_k": 2}, bsz=2, hq=4, hkv=1, n_q=70, n_k=134, d=16,
        pad=40, softcap=20.0, dtype=F32)),
    "path_streaming_odd_offset": (check_patching_kernel_path, dict(
        method="streaming", params={"sink": 3, "window": 9}, bsz=1, hq=2, hkv=1, n_q=50, n_k=77, d=16, pad=0,
        softcap=None, dtype=F32)),
    "path_flexprefill": (check_patching_kernel_path, dict(
        method="flexprefill", params={"block_size": 16, "gamma": 0.3, "tau": 0.3, "last_q": 16},
        bsz=2, hq=4, hkv=2, n_q=128, n_k=128, d=32, pad=19, softcap=None, dtype=F32)),
    "patched_llama": (check_patched_llama, {}),
    "path_xattention": (check_patching_kernel_path, dict(
        method="xattention", params={"block_size": 32, "stride": 4, "threshold": 0.5},
        bsz=2, hq=4, hkv=2, n_q=150, n_k=150, d=32, pad=37, softcap=None, dtype=F32)),
}


def _assert_result(name, res):
    check = CPU_CASES[name][0] if name in CPU_CASES else None
    assert "error" not in res, res.get("error")
    tol = 5e-3 if CPU_CASES.get(name, (None, {}))[1].get("dtype") is F16 else 1e-5
    if check is check_patched_llama:
        assert res["err"] <= 1e-5 and res["density_equal"] and res["sparse"], res
        assert res["kernel_calls"] == 2 and res["reference_calls"] == 0, res
        # telemetry names what ran: layer 0 vertical_slash, layer 1 xattention's block lists (head_dim
        # 32: never the Gluon kernel)
        assert res["telemetry_kernels"] == {"triton_vertical_slash": 1, "triton_block_sparse": 1}, res
        assert res["telemetry_reference"] == {"reference": 2}, res
    elif check is check_patching_kernel_path:
        assert res["layout_ok"] and not res["nan"] and res["out"] <= tol, res
        assert res["kept_ok"] and res["skips"] and res["ref_agrees"], res
        # Reads back per call: none where budgets bound the lists (vertical_slash, block_topk,
        # streaming) and none for the mass-based block selections' lists, which take the full
        # width below backends.FULL_WIDTH_LIST_BYTES (every case here); flexprefill reads which
        # branches (query-aware blocks / vertical-slash) any head took, to skip the other. Building
        # both instead cost more host time than the two syncs (evals/bench/results/h200/flex_sync_1207/).
        reads = {"flexprefill": 2}.get(CPU_CASES[name][1]["method"], 0)
        assert len(res["host_reads"]) == reads, res["host_reads"]
        # Host work of one patched call, in torch operators (each a launch on CUDA). Column /
        # diagonal selections get their kernel index in one Triton launch (kernels/triton_index.py):
        # 72 / 52 operators here, 206 / 186 with the torch index, whose host time bound patched
        # vertical_slash layers below ~32k.
        bound = {"vertical_slash": 90, "streaming": 70}.get(CPU_CASES[name][1]["method"])
        if bound is not None:
            assert res["torch_ops"] <= bound, res["torch_ops"]
    elif check in (check_block_sparse, check_vertical_slash):
        assert not res["nan"] and res["out"] <= tol and res["lse"] <= 1e-3, res
        kw = CPU_CASES[name][1]
        if kw.get("tma"):  # descriptors wherever TMA can address the rows
            assert res["tma_used"] == (kw["d"] * kw["dtype"].itemsize % 16 == 0), res
            # The same values reach the same math: bit-equal to the pointer loads.
            assert res["tma_vs_pointer"] == 0.0 and res["tma_vs_pointer_lse"] == 0.0, res
        if check is check_vertical_slash:
            assert res["kept_ok"] and res["base_ok"] and res["computed_ge_kept"], res
            assert res["kept_ok_bounded"] and res["kept_ok_masks"], res
            if not kw.get("flat"):
                assert res["fused_index_equal"] and res["fused_kept_ok"] and res["fused_bounded_equal"], res
            assert res.get("flat_equals_nested", 0.0) == 0.0, res  # same tiles, same order: bit-equal
            assert res["bounded_lists_shorter"] and res["bounded_equals_full"] == 0.0, res
            if "dense_columns" in name:
                assert res["open_tiles"] > 0, res
    elif check is check_pooled:
        assert res["err"] <= 1e-5, res
    else:
        assert all(err <= tol for err in res.values()), res


def test_block_sparse_tuning_tiles_divide_the_list_blocks():
    """Every config the block-sparse autotuner may run divides the lists' blocks, also for lists
    of smaller blocks than any searched tile (block_topk with block_size 32 on a long prompt)."""
    pytest.importorskip("triton")
    from patchattn.kernels import triton_attention as ta

    q = torch.empty(1, dtype=torch.bfloat16)
    for lm, ln in ((128, 128), (128, 64), (64, 64), (32, 32), (256, 128)):
        meta = dict(LIST_M=lm, LIST_N=ln, BLOCK_D=128)
        kept = ta._prune_configs(ta._BLOCK_TILE_CONFIGS, {"Q": q}, **meta)
        assert kept, (lm, ln)
        for c in kept:
            assert lm % c.kwargs["BLOCK_M"] == 0 and ln % c.kwargs["BLOCK_N"] == 0, (lm, ln, c)
    kept = ta._prune_configs(ta._BLOCK_TILE_CONFIGS, {"Q": q}, LIST_M=32, LIST_N=32, BLOCK_D=128)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept} == {(32, 32)}


def test_block_lists_with_a_host_bound_match_the_mask(monkeypatch):
    """lists_from_blocks with a bound (block_topk's top_k + 2, no device sync) gives the lists
    read from the mask, padded to the bound; a broken bound cuts rows, never overruns them.
    Without a bound, small lists take the full row width (no sync) and large ones the longest
    row's, read back."""
    from patchattn import backends
    from patchattn.backends import lists_from_blocks

    g = torch.Generator().manual_seed(7)
    keep = torch.rand(2, 3, 7, 11, generator=g) < 0.35
    full, full_count = lists_from_blocks(keep)
    assert full.shape[-1] == 11
    monkeypatch.setattr(backends, "FULL_WIDTH_LIST_BYTES", keep.numel() * 4 - 1)
    index, count = lists_from_blocks(keep)
    width = int(keep.sum(-1).max())
    assert index.shape[-1] == width and torch.equal(full_count, count)
    assert torch.equal(full[..., :width], index)  # the same lists, the full width padded past them
    bounded, bcount = lists_from_blocks(keep, max_count=width + 3)
    assert bounded.shape[-1] == width + 3 and torch.equal(bcount, count)
    for b, h, r in zip(*[t.flatten() for t in torch.meshgrid(*map(torch.arange, keep.shape[:3]), indexing="ij")]):
        want = keep[b, h, r].nonzero().flatten().to(torch.int32)
        assert torch.equal(bounded[b, h, r, :count[b, h, r]], want)
        assert torch.equal(index[b, h, r, :count[b, h, r]], want)
    cut, ccount = lists_from_blocks(keep, max_count=2)  # rows keep up to `width` > 2 blocks
    assert width > 2 and cut.shape[-1] == 2 and torch.equal(ccount, count.clamp(max=2))
    listed = torch.arange(2) < ccount[..., None]
    assert torch.equal(cut[listed], index[..., :2][listed])  # each row's lowest kept blocks


def test_kernel_break_even_scales_with_attention_width(monkeypatch):
    """The kernel backend's dense_below is the measured Llama-3-8B threshold, moved to longer
    prompts for narrower layers (less attention work per token pair to win back the fixed
    per-layer costs) and kept for wider ones; the environment override wins."""
    from types import SimpleNamespace

    from patchattn import backends

    monkeypatch.setattr(backends, "kernels_enabled", lambda device: True)
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    monkeypatch.delenv("PATCHATTN_DENSE_BELOW", raising=False)

    def state(*methods):
        return SimpleNamespace(groups=[SimpleNamespace(method=SimpleNamespace(name=m), is_dense=m == "dense")
                                       for m in methods])

    def below(st, heads, dim):
        return backends.kernel_dense_below(st, torch.empty(1, heads, 1, dim, device="meta"))

    measured = backends.KERNEL_BREAK_EVEN["vertical_slash"]
    assert below(state("vertical_slash", "dense"), 32, 128) == measured  # Llama-3-8B: as measured
    assert below(state("vertical_slash"), 64, 128) == measured  # wider: not below the measurement
    smol = below(state("vertical_slash"), 9, 64)  # SmolLM2-135M: 576 wide, sqrt(4096 / 576) = 2.67x
    assert smol == backends.width_scaled_break_even(measured, 576) and 2.6 * measured < smol <= 2.7 * measured
    assert below(state("streaming", "vertical_slash"), 9, 64) > smol  # the group with the higher threshold
    assert below(state("dense"), 9, 64) == 0
    monkeypatch.setenv("PATCHATTN_DENSE_BELOW", "4096")
    assert below(state("vertical_slash"), 9, 64) == 4096


def test_tma_only_where_descriptors_can_address_the_tensors(monkeypatch):
    """The block-sparse kernel takes the descriptor path only on layouts TMA accepts (and, off
    CUDA, only under the interpreter); anything else runs the pointer loads."""
    pytest.importorskip("triton")
    from patchattn.kernels import triton_attention as ta

    x = torch.randn(2, 4, 64, 32, dtype=torch.float16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not ta._tma_usable(x, x, x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ta._tma_usable(x, x, x)
    assert ta._tma_usable(x.transpose(1, 2).contiguous().transpose(1, 2))  # HF's [B, N, H, D] transposes
    flat = torch.randn(x.numel() + 1, dtype=torch.float16)
    assert not ta._tma_usable(flat[1:].view(x.shape))  # base 2 bytes off 16-byte alignment
    assert not ta._tma_usable(torch.randn(2, 4, 64, 12, dtype=torch.float16))  # 24-byte rows
    assert ta._tma_usable(torch.randn(2, 4, 64, 12, dtype=torch.float32))  # 48-byte rows
    assert not ta._tma_usable(x[:, :1].expand(x.shape))  # broadcast heads (stride 0)
    assert not ta._tma_usable(x[..., ::2])
    assert not ta._tma_usable(x, x[..., ::2], x)


@pytest.mark.parametrize("form", ["per_item", "warp_specialized", "persistent", "persistent_k2", "persistent_q3"])
def test_gluon_kernel_compiles_for_hopper(form):
    """The Gluon sm_90 kernel compiles on a CPU machine, with the overlap intact: the next tile's
    q.K^T is waited with one product still outstanding (pendings = 1), and ptxas keeps the wgmma
    pipeline (no "wgmma.mma_async instructions are serialized" note) without spills. The
    warp-specialised variant and its persistent form (3 K stages, 2, and 3 q buffers with 2 K
    stages) have these products once per compute partition, and the persistent form's buffers fit
    one block's shared memory. Spills: none with triton 3.6, the GPU machine's (where the kernel
    is timed and tested); other versions' ptxas input may spill a few scalars (triton 3.9: 20
    bytes in the persistent form, kernel parameters stored at a partition's start and reloaded
    later), so up to 32 bytes pass there."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    from patchattn.evals.bench.ttgir_probe import compile_gluon_block_sparse, ptxas_report, sass_report
    from patchattn.kernels import gluon_attention

    persistent = form.startswith("persistent")
    with _persistent_buffers(gluon_attention, form):
        kernel = compile_gluon_block_sparse(128, 128, 128, form == "warp_specialized", persistent)
        expected = {"persistent_k2": (2, 2), "persistent_q3": (3, 2)}.get(form, (2, 3))
        assert gluon_attention.wsp_buffers(128, 128) == expected
    assert kernel.metadata.shared <= gluon_attention.SM90_SHARED_BYTES
    ir = kernel.asm["ttgir"]
    # S(0), S(t+1), P.V(t), last tile's P.V (per compute partition)
    assert ir.count("ttng.warp_group_dot ") == (4 if form == "per_item" else 8)
    assert "pendings = 1" in ir
    report = ptxas_report(kernel)
    import triton

    spill_limit = 0 if triton.__version__.startswith("3.6.") else 32
    assert report["ok"] and not report["wgmma_serialized"] and report["spill_bytes"] <= spill_limit, report
    sass = sass_report(kernel)  # a serialised pipeline fences every HGMMA (88 of 88 in one such patch)
    assert sass["hgmma"] > 0 and 4 * sass["wgmma_fences"] <= sass["hgmma"], sass


def test_gluon_persistent_k_stages_fit_shared_memory():
    """Three K stages (or q buffers) only where the persistent form's buffers fit 227 KB, else two."""
    pytest.importorskip("triton")
    from patchattn.kernels import gluon_attention as ga

    with _module_flag(ga, "WSP_K_STAGES", 3):
        assert ga.wsp_k_stages(128, 128) == 3 and ga.wsp_k_stages(64, 128) == 3
        assert ga.wsp_k_stages(128, 128, itemsize=4) == 2  # 448 KB of fp32 buffers
        assert ga.wsp_k_stages(256, 128) == 2
    with _module_flag(ga, "WSP_K_STAGES", 2):
        assert ga.wsp_k_stages(64, 64) == 2
    with _module_flag(ga, "WSP_Q_BUFFERS", 3), _module_flag(ga, "WSP_K_STAGES", 3):
        assert ga.wsp_buffers(128, 128) == (3, 2)  # 3 q buffers and 3 K stages: 256 KB
        assert ga.wsp_buffers(64, 128) == (3, 3)
        assert ga.wsp_buffers(256, 128) == (2, 2)  # 3 q buffers: 448 KB


def test_gluon_kernel_takes_only_what_it_supports():
    pytest.importorskip("triton")
    from patchattn.kernels.gluon_attention import sm90_usable

    cpu = torch.zeros(1, 1, 8, 128, dtype=torch.bfloat16)
    assert not sm90_usable(cpu, 128, 128, None, None)  # not CUDA
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        gpu = cpu.cuda()
        assert sm90_usable(gpu, 128, 128, None, None)
        assert not sm90_usable(gpu, 128, 128, 30.0, None) and not sm90_usable(gpu, 128, 128, None, 512)
        assert not sm90_usable(gpu.float(), 128, 128, None, None) and not sm90_usable(gpu, 32, 32, None, None)


def test_softmax_mode_is_validated():
    """An unknown softmax mode is refused with the list of modes (the diagnostic ones exist for
    kernel_variants and must be asked for by name)."""
    pytest.importorskip("triton")
    from patchattn.kernels import triton_attention as ta

    q = torch.zeros(1, 1, 4, 16)
    index, count = torch.zeros(1, 1, 1, 1, dtype=torch.int32), torch.ones(1, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="softmax='lazy'.*exact, no_exp, mma_only"):
        ta.block_sparse_attention(q, q, q, index, count, scale=1.0, block_m=4, block_n=4, softmax="lazy")


def test_tma_allocator_is_installed_unless_the_user_set_one():
    triton = pytest.importorskip("triton")
    from triton.runtime import _allocation

    from patchattn.kernels import triton_attention as ta

    saved = ta._current_allocator()
    try:
        triton.set_allocator(_allocation.NullAllocator())
        assert ta._current_allocator() is None
        ta._ensure_tma_allocator()
        assert ta._current_allocator() is ta._tma_scratch
        mine = lambda size, alignment, stream: torch.empty(size, dtype=torch.int8)  # noqa: E731
        triton.set_allocator(mine)
        ta._ensure_tma_allocator()
        assert ta._current_allocator() is mine
    finally:
        triton.set_allocator(saved if saved is not None else _allocation.NullAllocator())


# ----------------------------------------------------------------------------- CPU: interpreter worker


def _worker(names):
    from patchattn.kernels.interpreter_compat import patch_interpreter_for_numpy2

    patch_interpreter_for_numpy2()
    results = {}
    for name in names:
        torch.manual_seed(0)
        fn, kwargs = CPU_CASES[name]
        try:
            results[name] = fn(**kwargs)
        except Exception:  # reported back to the parent test
            results[name] = {"error": traceback.format_exc()}
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, __file__, *CPU_CASES], capture_output=True, text=True, env=env,
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert lines, f"interpreter worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_interpreter(interpreter_results, name):
    _assert_result(name, interpreter_results[name])


# ----------------------------------------------------------------------------- GPU: bf16 on CUDA

BF16 = torch.bfloat16


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("variant", ["plain", "pad_cap", "offset_window", "blocks128", "shared_lists",
                                     "heads_fastest", "subtiles"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_block_sparse_gpu(one_config, d, variant):
    torch.manual_seed(0)
    kw = dict(bsz=2, hq=8, hkv=2, n_q=1536, n_k=1536, d=d, bm=64, bn=64, q_offset=0, kv_start=[0, 300],
              window=None, softcap=None, dtype=BF16, density=0.3, device="cuda")
    if variant == "pad_cap":
        kw.update(n_q=1000, n_k=1000, softcap=30.0, kv_start=[17, 0])
    elif variant == "offset_window":
        kw.update(n_q=700, n_k=2000, q_offset=1300, window=512)
    elif variant == "blocks128":
        kw.update(bm=128, bn=128)
    elif variant == "shared_lists":
        kw.update(shared_lists=True)
    elif variant == "heads_fastest":  # PATCHATTN_KV_MAJOR=0
        kw.update(kv_major=False, kv_start=[0, 77])
    elif variant == "subtiles":  # 128-blocks walked in 64 x 64 tiles (an autotuning choice)
        kw.update(bm=128, bn=128, tile=(64, 64), kv_start=[0, 77])
    res = check_block_sparse(**kw)
    assert not res["nan"] and res["same"] and res["out"] <= 1e-2 and res["lse"] <= 2e-2, res


@pytest.mark.parametrize("form", ["per_item", "warp_specialized", "persistent", "persistent_k2", "persistent_q3"])
@pytest.mark.parametrize("variant", ["plain", "pad_offset", "d64_shared_lists", "blocks64_ragged", "gqa_batch_pad",
                                     "many_programs", "empty_lists"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs a Hopper (sm_90) GPU")
def test_block_sparse_gluon_gpu(one_config, variant, form):
    """The Gluon sm_90 kernel, its warp-specialised variant and that variant's persistent form
    (the default for 128-row blocks; 3 K stages where they fit, 2, and 3 q buffers) against the fp32
    oracle (poisoned output, lse)."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    from patchattn.kernels import gluon_attention

    torch.manual_seed(0)
    kw = dict(bsz=1, hq=8, hkv=2, n_q=4096, n_k=4096, d=128, bm=128, bn=128, q_offset=0, kv_start=[0],
              window=None, softcap=None, dtype=BF16, density=0.3, device="cuda", gluon=True)
    if variant == "pad_offset":  # left padding, a prefill after a cache, n_k not a multiple of the blocks
        kw.update(bsz=2, n_q=1800, n_k=3000, q_offset=1200, kv_start=[0, 333])
    elif variant == "d64_shared_lists":
        kw.update(d=64, shared_lists=True, dtype=torch.float16)
    elif variant == "blocks64_ragged":
        kw.update(bm=64, bn=64, n_q=1000, n_k=1000, kv_start=[17])
    elif variant == "gqa_batch_pad":
        kw.update(bsz=2, hq=8, hkv=1, n_q=2500, n_k=2500, kv_start=[0, 700])
    elif variant == "many_programs":  # the benchmark's head counts, ~16 programs per SM
        kw.update(hq=32, hkv=8, n_q=8192, n_k=8192, density=0.1)
    elif variant == "empty_lists":  # many empty and short lists (programs that end at once)
        kw.update(hq=32, hkv=8, n_q=8192, n_k=8192, density=0.01, bsz=2, kv_start=[0, 1000], empty_share=0.3)
    if form != "per_item" and kw["bm"] != 128:
        pytest.skip("the warp-specialised variant takes 128-row blocks")
    with _module_flag(gluon_attention, "WARP_SPECIALIZED", form != "per_item"), \
            _module_flag(gluon_attention, "PERSISTENT", form.startswith("persistent")), \
            _persistent_buffers(gluon_attention, form):
        res = check_block_sparse(**kw)
    assert res["gluon_used"], res
    assert not res["nan"] and res["same"] and res["out"] <= 1e-2 and res["lse"] <= 2e-2, res


@pytest.mark.parametrize("variant", ["plain", "pad_offset_window", "subtiles_cap", "d64_heads_fastest"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a Hopper (sm_90+) GPU")
def test_block_sparse_tma_gpu(one_config, variant):
    """PATCHATTN_TMA=1: descriptor loads against the oracle and against the pointer loads."""
    torch.manual_seed(0)
    kw = dict(bsz=1, hq=8, hkv=2, n_q=4096, n_k=4096, d=128, bm=128, bn=128, q_offset=0, kv_start=[0],
              window=None, softcap=None, dtype=BF16, density=0.3, device="cuda", tma=True)
    if variant == "pad_offset_window":  # n_k not a multiple of the blocks, left padding, prefill after a cache
        kw.update(bsz=2, n_q=1800, n_k=3000, q_offset=1200, kv_start=[0, 333], window=1024)
    elif variant == "subtiles_cap":
        kw.update(n_q=3000, n_k=3000, tile=(64, 64), softcap=30.0)
    elif variant == "d64_heads_fastest":
        kw.update(d=64, bm=64, bn=64, kv_major=False, shared_lists=True)
    res = check_block_sparse(**kw)
    assert res["tma_used"], res
    assert not res["nan"] and res["same"] and res["out"] <= 1e-2 and res["lse"] <= 2e-2, res
    # Same values into the same math; the compiled loops may still schedule (contract) the
    # softmax differently, so allow a few bf16 roundings.
    assert res["tma_vs_pointer"] <= 1e-4 and res["tma_vs_pointer_lse"] <= 1e-4, res


@pytest.mark.parametrize("variant", ["plain", "pad_cap_d64", "offset_window_d256", "tall_m128", "flat_slash",
                                     "many_columns", "no_columns"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vertical_slash_gpu(one_config, variant):
    torch.manual_seed(0)
    kw = dict(bsz=2, hq=8, hkv=2, n_q=2048, n_k=2048, d=128, bm=64, bn=64, q_offset=0, kv_start=[0, 300],
              window=None, softcap=None, dtype=BF16, p_col=0.02, p_diag=0.01, device="cuda")
    if variant == "pad_cap_d64":
        kw.update(d=64, n_q=1000, n_k=1000, softcap=30.0, kv_start=[17, 0])
    elif variant == "offset_window_d256":
        kw.update(d=256, n_q=700, n_k=2000, q_offset=1300, window=512, p_diag=0.05)
    elif variant == "tall_m128":  # PATCHATTN_VS_BLOCK_M=128
        kw.update(bm=128, diag_group=64, p_diag=0.05)
    elif variant == "flat_slash":  # PATCHATTN_VS_FLAT_SLASH=1
        kw.update(diag_group=64, p_diag=0.05, kv_start=[0, 77], flat=True)
    elif variant == "many_columns":  # whole column tiles before a block's first row: the mask-free loop
        kw.update(p_col=0.2, diag_group=64, p_diag=0.03, kv_start=[0, 129])
    elif variant == "no_columns":  # streaming with sink 0: a one-slot padding column list reaches Triton
        kw.update(p_col=0.0, no_sink=True, diag_group=64, p_diag=0.05)
    res = check_vertical_slash(**kw)
    if variant == "many_columns":
        assert res["open_tiles"] > 0, res
    assert not res["nan"] and res["out"] <= 1e-2 and res["lse"] <= 2e-2, res
    assert res["kept_ok"] and res["base_ok"] and res["computed_ge_kept"], res
    assert res["kept_ok_bounded"] and res["kept_ok_masks"] and res["bounded_lists_shorter"], res
    # The same tiles in the same order; compiled apart (the list lengths are specialised
    # arguments), so allow what differently contracted FMAs could give.
    assert res["bounded_equals_full"] <= 1e-5, res
    # Same tiles in the same order; the two loop forms may still contract FMAs differently when
    # compiled (seen: 5.3e-6, a few bf16 roundings), unlike under the interpreter (bit-equal).
    assert res.get("flat_equals_nested", 0.0) <= 1e-4, res
    if variant != "flat_slash":  # the one-launch index of patched layers, compiled: field by field
        assert res["fused_index_equal"] and res["fused_kept_ok"] and res["fused_bounded_equal"], res


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autotuned_configs_gpu():
    """The autotuned path (every config is benchmarked, the winner must also be right)."""
    torch.manual_seed(0)
    kw = dict(bsz=1, hq=8, hkv=2, n_q=4096, n_k=4096, d=128, bm=64, bn=64, q_offset=0, kv_start=[0], window=None,
              softcap=None, dtype=BF16, device="cuda")
    res = check_block_sparse(density=0.2, **kw)
    assert not res["nan"] and res["out"] <= 1e-2, res
    kw["bn"] = None  # key tile width tuned as well
    res = check_vertical_slash(p_col=0.01, p_diag=0.005, **kw)
    assert not res["nan"] and res["out"] <= 1e-2 and res["kept_ok"], res


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_estimators_gpu(one_config):
    torch.manual_seed(0)
    r = check_last_q(2, 8, 2, 64, 5000, 128, [0, 333], None, BF16, device="cuda")
    assert r["triton"] <= 1e-3, r
    r = check_last_q(1, 4, 1, 64, 3000, 64, [0], 30.0, BF16, device="cuda")
    assert r["triton"] <= 1e-3, r
    for bs, stride, heads in ((128, 8, None), (128, 16, None), (64, 8, None), (128, 16, 0), (128, 8, 3)):
        r = check_antidiagonal(2, 8, 2, 2000, 2000, 128, bs, stride, [0, 111], BF16, device="cuda",
                               scratch_heads=heads)
        assert r["triton"] <= 1e-3, (bs, stride, heads, r)


if __name__ == "__main__":
    _worker(sys.argv[1:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vertical_slash_fused_index_long_gpu():
    """The one-launch index at a length where every loop of the kernel runs many chunks (40k keys,
    626 query blocks, lists bounded as a method bounds them), with left padding, against torch."""
    torch.manual_seed(0)
    n, bsz, heads = 40_000, 2, 8
    col, diag, _ = random_vs_masks(bsz, heads, 1, n, n - 1, 0.01, 0.02, "cuda", diag_group=64)
    kvs = torch.tensor([0, 1234], dtype=torch.int32, device="cuda")
    from patchattn.kernels.triton_attention import vertical_slash_index, vertical_slash_pair_counts

    bounds = dict(max_columns=int(col.sum(-1).max()), max_diagonals=int(diag.sum(-1).max()))
    index = vertical_slash_index(col, diag, n_q=n, kv_start=kvs, block_m=64, **bounds)
    kept = vertical_slash_pair_counts(col, diag, n_q=n, kv_start=kvs, index=index, computed=False)["kept"]
    same, kept_ok = _fused_index_agrees(index, col, diag, kept.cpu(), n_q=n, kv_start=kvs, block_m=64, **bounds)
    assert same and kept_ok
