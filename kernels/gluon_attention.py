"""Hopper (sm_90) block-sparse prefill kernel written in Gluon (Triton's explicit-layout dialect).

Why a second kernel: the Triton kernel (`triton_attention`) spends its whole 24-28 % excess over
SDPA in the softmax, which its compiled schedule runs in series with the matrix products
(evals/bench/results/h200/README.md). Gluon exposes the asynchronous warpgroup MMA, so this
kernel issues tile t+1's q.K^T before tile t's softmax and waits for it only after the softmax
and tile t's P.V are issued (FlashAttention-3's intra-warpgroup overlap):

    start of tile t:  all warps in step; TMA: K(t+2) into K stage t % 2, V(t+1) into V stage (t+1) % 3
                      issue S(t+1) = q.K(t+1)^T
                      softmax of S(t) -> P(t)                (runs under S(t+1))
                      acc *= alpha; issue acc += P(t).V(t)
                      wait S(t+1), then P.V(t)

P.V(t) is waited before the loop's back-edge: carrying it in flight into the next tile makes
ptxas serialize every wgmma (warning C7514: the carried accumulator's registers are read inside
the product's pipeline stage), checked by compiling for sm_90 (`ttgir_probe --gluon`).

Same contract as `triton_attention.block_sparse_attention` for the cases `sm90_usable` accepts
(bf16/fp16, head_dim 64 or 128, list blocks of 64 or 128, no softcap, no sliding window);
GQA, batch > 1, left padding (kv_start) and q_offset are handled. Other cases stay on the
Triton kernel. On by default on sm_90; `PATCHATTN_GLUON=0` (module flag
`triton_attention.GLUON`) keeps the Triton kernel.
"""

from __future__ import annotations

import torch

try:  # Gluon's Hopper API as used here: run on the GPU with triton 3.6, compiled with 3.6 and 3.9
    import triton

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 6):
        raise ImportError(f"triton {triton.__version__} < 3.6")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
except ImportError:  # pragma: no cover - older triton: the Triton kernel is the only path
    gluon = None

LOG2E = 1.4426950408889634

if gluon is not None:
    # The TMA load builtin was renamed (triton 3.6: async_copy_global_to_shared; later: async_load).
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # later: gl.barrier

    @gluon.jit
    def _issue_tile(desc, smem, bar, row, pred):
        """TMA copy of BLOCK_N rows starting at `row` into `smem`, completing `bar` (skipped when
        not `pred`)."""
        mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
        _tma_load(desc, [row, 0], bar, smem, pred=pred)

    @gluon.jit
    def _softmax_step(s, m_i, l_i, qk_scale, pos, cols, kv_start, n_k, masked):
        """One tile's online-softmax update: s raw scores [BM, BN] (masked=True: apply the
        causal / left-padding / key-range mask), qk_scale = scale * log2(e). Returns
        (p fp32, alpha, m_new, l_new)."""
        if masked:
            ok = (cols[None, :] <= pos[:, None]) & (cols[None, :] >= kv_start) & (cols[None, :] < n_k)
            s = gl.where(ok, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit
    def _softmax_and_pv(s, m_i, l_i, acc, kb, t, v_smem, v_bar, qk_scale, pos, offs_n, first_pos, kv_start, n_k,
                        BLOCK_N: gl.constexpr, p_layout: gl.constexpr, row_o: gl.constexpr):
        """Tile t (key block kb): softmax of its scores s (masked only where the tile crosses the
        diagonal, n_k or kv_start), acc rescaled, then P.V issued asynchronously on V stage t % 3.
        Returns (the in-flight P.V, m, l)."""
        n0 = kb * BLOCK_N
        masked = (n0 + BLOCK_N - 1 > first_pos) | (n0 + BLOCK_N > n_k) | (n0 < kv_start)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, pos, n0 + offs_n, kv_start, n_k, masked)
        p_op = gl.convert_layout(p.to(v_smem.dtype), p_layout)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        mbarrier.wait(v_bar.index(t % 3), (t // 3) & 1)
        return warpgroup_mma(p_op, v_smem.index(t % 3), acc, is_async=True), m_i, l_i

    @gluon.jit
    def _block_sparse_fwd_sm90(
        Q, K, V, Out, Lse, BlockIdx, BlockCnt, KvStart,
        si_b, si_h, si_q, sc_b, sc_h,
        n_q, n_k, n_heads, group, idx_group, q_offset, qk_scale,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, num_warps: gl.constexpr,
    ):
        """One program: BLOCK_M query rows of one (batch, head) against its list's key blocks.
        Q / K / V / Out are contiguous [B, H, N, D]; programs are kv-head-major (as the Triton
        kernel's default order: the resident wave shares one kv head's K/V in L2)."""
        dtype: gl.constexpr = Q.dtype.element_ty
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
        kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)

        # Program -> (batch, q head, kv head, query block): kv-head-major, longest blocks first.
        n_kv = n_heads // group
        n_qb = gl.num_programs(1)
        lin = gl.program_id(1) * gl.num_programs(0) + gl.program_id(0)
        qb = n_qb - 1 - (lin // group) % n_qb
        bk = lin // group // n_qb
        b = bk // n_kv
        kvh = bk % n_kv
        h = kvh * group + lin % group
        n_b = gl.num_programs(0) // n_heads

        q_desc = tma.make_tensor_descriptor(Q, [n_b * n_heads * n_q, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_M, HEAD_DIM],
                                            q_sl)
        k_desc = tma.make_tensor_descriptor(K, [n_b * n_kv * n_k, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_N, HEAD_DIM],
                                            kv_sl)
        v_desc = tma.make_tensor_descriptor(V, [n_b * n_kv * n_k, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_N, HEAD_DIM],
                                            kv_sl)
        q_row = (b * n_heads + h) * n_q + qb * BLOCK_M
        kv_row = (b * n_kv + kvh) * n_k

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_sl)
        k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], kv_sl)
        v_smem = gl.allocate_shared_memory(dtype, [3, BLOCK_N, HEAD_DIM], kv_sl)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(2):
            mbarrier.init(k_bar.index(i), count=1)
        for i in gl.static_range(3):
            mbarrier.init(v_bar.index(i), count=1)

        idx_h = h // idx_group  # block lists may be per kv head (shared by the group)
        idx_base = BlockIdx + b.to(gl.int64) * si_b + idx_h.to(gl.int64) * si_h + qb.to(gl.int64) * si_q
        count = gl.load(BlockCnt + b * sc_b + idx_h * sc_h + qb)
        kv_start = gl.load(KvStart + b)
        first_pos = qb * BLOCK_M + q_offset

        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        _tma_load(q_desc, [q_row, 0], q_bar, q_smem)
        kb0 = gl.load(idx_base, mask=count > 0, other=0)
        kb1 = gl.load(idx_base + 1, mask=count > 1, other=0)
        _issue_tile(k_desc, k_smem.index(0), k_bar.index(0), kv_row + kb0 * BLOCK_N, count > 0)
        _issue_tile(k_desc, k_smem.index(1), k_bar.index(1), kv_row + kb1 * BLOCK_N, count > 1)
        _issue_tile(v_desc, v_smem.index(0), v_bar.index(0), kv_row + kb0 * BLOCK_N, count > 0)

        offs_m = qb * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_s)
        pos = offs_m + q_offset
        offs_n = gl.arange(0, BLOCK_N, layout=col_s)
        m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, layout=row_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

        # Scores of tile 0 (an empty list computes them from unfilled memory and never uses them).
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_bar.index(0), 0, pred=count > 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        kb = kb0
        kb_next = kb1

        # Tiles 0 .. count-2 always have a next tile; the last one is peeled off below (an async
        # product's result is a token, not a tensor, so it cannot be issued in only one branch).
        for t in range(0, count - 1):
            # Every warp has finished tile t-1: S(t) (read K stage t % 2) and P.V(t-2) (read V
            # stage (t+1) % 3) are done in all of them, so those stages can be refilled.
            _cta_barrier()
            kb_far = gl.load(idx_base + t + 2, mask=t + 2 < count, other=0)
            _issue_tile(k_desc, k_smem.index(t % 2), k_bar.index(t % 2), kv_row + kb_far * BLOCK_N, t + 2 < count)
            _issue_tile(v_desc, v_smem.index((t + 1) % 3), v_bar.index((t + 1) % 3), kv_row + kb_next * BLOCK_N,
                        True)
            mbarrier.wait(k_bar.index((t + 1) % 2), ((t + 1) // 2) & 1)
            s_next = warpgroup_mma(q_smem, k_smem.index((t + 1) % 2).permute((1, 0)), zero_s, use_acc=False,
                                   is_async=True)
            pv, m_i, l_i = _softmax_and_pv(s, m_i, l_i, acc, kb, t, v_smem, v_bar, qk_scale, pos, offs_n, first_pos,
                                           kv_start, n_k, BLOCK_N, p_layout, row_o)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_next, ))  # S(t+1), issued first
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(pv, ))
            kb = kb_next
            kb_next = kb_far
        if count > 0:  # the last tile
            pv, m_i, l_i = _softmax_and_pv(s, m_i, l_i, acc, kb, count - 1, v_smem, v_bar, qk_scale, pos, offs_n,
                                           first_pos, kv_start, n_k, BLOCK_N, p_layout, row_o)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(pv, ))

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(2):
            mbarrier.invalidate(k_bar.index(i))
        for i in gl.static_range(3):
            mbarrier.invalidate(v_bar.index(i))

        # Normalise and store; rows without a kept key get out = 0, lse = -inf.
        l_o = gl.convert_layout(l_i, row_o)
        m_o = gl.convert_layout(m_i, row_o)
        has = l_o > 0.0
        out = acc / gl.where(has, l_o, 1.0)[:, None]
        rows = qb * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_o)
        dims = gl.arange(0, HEAD_DIM, layout=col_o)
        row_ok = rows < n_q
        base = (b * n_heads + h).to(gl.int64) * n_q
        gl.store(Out + (base + rows[:, None]) * HEAD_DIM + dims[None, :], out.to(dtype), mask=row_ok[:, None])
        lse = gl.where(has, (m_o + gl.log2(gl.where(has, l_o, 1.0))) * 0.6931471805599453, float("-inf"))  # ln 2
        gl.store(Lse + base + rows, lse, mask=row_ok)


def sm90_usable(q: torch.Tensor, block_m: int, block_n: int, softcap, sliding_window) -> bool:
    """Whether `block_sparse_attention_sm90` takes these inputs (else use the Triton kernel)."""
    return (gluon is not None and q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0)
            and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] in (64, 128)
            and block_m in (64, 128) and block_n in (64, 128) and not softcap and sliding_window is None)


def block_sparse_attention_sm90(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor, block_count: torch.Tensor,
    kv_start: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *, scale: float, q_offset: int, block_m: int,
    block_n: int,
) -> None:
    """Fill `out` [B, Hq, N, D] and `lse` [B, Hq, N] (fp32). Callers check `sm90_usable`;
    triton_attention.block_sparse_attention validates the lists and passes int32 lists and
    kv_start. The TMA descriptors are 2-D views of contiguous [B, H, N, D] tensors: others are
    copied first (and the result copied into a non-contiguous `out`)."""
    from .triton_attention import _ensure_tma_allocator  # device-side descriptors need global scratch

    bsz, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    result = out if out.is_contiguous() else torch.empty_like(q)
    hb = block_index.shape[1]
    _ensure_tma_allocator()
    grid = (bsz * hq, -(-n_q // block_m))
    _block_sparse_fwd_sm90[grid](
        q, k, v, result, lse, block_index, block_count, kv_start,
        *block_index.stride()[:3], *block_count.stride()[:2],
        n_q, n_k, hq, hq // hkv, hq // hb, q_offset, scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_m == 128 else 4,
    )
    if result is not out:
        out.copy_(result)
