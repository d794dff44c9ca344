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

import functools
import os

import torch

try:  # Gluon's Hopper API as used here: run on the GPU with triton 3.6, compiled with 3.6 and 3.9
    import triton

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 6):
        raise ImportError(f"triton {triton.__version__} < 3.6")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
except ImportError:  # pragma: no cover - older triton: the Triton kernel is the only path
    gluon = None

LOG2E = 1.4426950408889634
# Warp-specialised variant (`_block_sparse_fwd_sm90_ws`), on by default for 128-row blocks
# (PATCHATTN_GLUON_WS=0 keeps the per-item Gluon kernel): on the H200 it runs 1.14-1.31x faster
# than the per-item kernel over two runs (evals/bench/results/h200/kernel_variants_gluon_ws_fixed_h200.json,
# kernel_variants_gluon_wsp_h200.json).
# Its partitions: 4 + 4 compute warps at 240 registers, 1 loader warp at 24; the kernel's register
# ceiling spreads that over its 12 warps.
WARP_SPECIALIZED = os.environ.get("PATCHATTN_GLUON_WS", "1") == "1"
WS_MAXNREG = 168
# Persistent form of the warp-specialised variant (`_block_sparse_fwd_sm90_wsp`), the default for
# 128-row blocks (PATCHATTN_GLUON_PERSISTENT=0 keeps one program per item): one program per SM,
# each claiming the next free work item from an atomic counter, so that an item's q and first
# tiles load under the previous item's last tiles while the items in flight stay consecutive.
# On the H200 it ran 0.93-1.02x the time of the per-item form in the same run (faster in 7 of 9
# rows; evals/bench/results/h200/kernel_variants_gluon_tmastore_h200.json). Its static-stride form
# (commit 786f9fc) was slower per pair (L2 locality); chaining items in the compute partitions
# (commit c80f524) gained nothing.
PERSISTENT = os.environ.get("PATCHATTN_GLUON_PERSISTENT", "1") == "1"
# K stages of the persistent form's ring (V keeps 2): a third K stage gives the loader 2.5 tiles of
# lead on K instead of 1.5, for sparse lists whose scattered tiles miss L2. 3 is used where it fits
# the 227 KB of shared memory (head_dim 128 with 128-key tiles: 229,892 B); PATCHATTN_GLUON_K_STAGES=2
# keeps two. On the H200 (three runs, kernel_variants_gluon_{kvlag,smemslots,tmastore}_h200.json)
# three stages took 0.87-0.92x the time of two at 64k and density 0.05, 0.92-0.99x at 32k, and
# 1.02-1.07x at 64k and 1.01-1.03x at 32k at density 0.1; 0.99-1.01x at 128k.
WSP_K_STAGES = int(os.environ.get("PATCHATTN_GLUON_K_STAGES", "3"))
# q buffers of the persistent form (PATCHATTN_GLUON_Q_BUFFERS=3 for three): with two, an item's q
# load starts only when the item two before it is done, one item of lead; three give two, and
# take the shared memory of the third K stage. Timed on the H200 (kernel_variants_fixed_q{2,3}_h200.json,
# 2026-12-03): no gain at density 0.05 (32k 1.22 / 1.22, 64k 1.25 / 1.21 of density x SDPA), so two.
WSP_Q_BUFFERS = int(os.environ.get("PATCHATTN_GLUON_Q_BUFFERS", "2"))
# Compute-partition ping-pong (`_take_turn`; PATCHATTN_GLUON_PINGPONG=0: the two halves issue
# their products whenever ready, in FlashAttention-3's order either way).
PINGPONG = os.environ.get("PATCHATTN_GLUON_PINGPONG", "1") == "1"
SM90_SHARED_BYTES = 232448  # the opt-in shared memory limit of one block on sm_90

if gluon is not None:
    # The TMA builtins were renamed (triton 3.6: async_copy_global_to_shared / async_copy_shared_to_global;
    # later: async_load / async_store, the old names removed by 3.9).
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global  # same rename
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # later: gl.barrier

    @gluon.jit
    def _issue_tile(desc, smem, bar, row, pred):
        """TMA copy of BLOCK_N rows starting at `row` into `smem`, completing `bar` (skipped when
        not `pred`)."""
        mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
        _tma_load(desc, [row, 0], bar, smem, pred=pred)

    @gluon.jit
    def _put_scalar(slot, value, NUM_WARPS: gl.constexpr):
        """Write an int32 into a one-element shared-memory slot (every lane writes the same value).
        A partition hands it to another by arriving on an mbarrier after the write: the waiter
        then reads it (`_get_scalar`)."""
        slot.store(gl.full([1], value, gl.int32, layout=gl.BlockedLayout([1], [32], [NUM_WARPS], [0])))

    @gluon.jit
    def _get_scalar(slot, NUM_WARPS: gl.constexpr):
        return gl.max(slot.load(gl.BlockedLayout([1], [32], [NUM_WARPS], [0])), 0)

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
    def _tile_probs(s, m_i, l_i, kb, qk_scale, pos, offs_n, first_pos, kv_start, n_k, dtype: gl.constexpr,
                    BLOCK_N: gl.constexpr, p_layout: gl.constexpr, row_o: gl.constexpr):
        """Softmax of key block kb's scores s (masked only where the tile crosses the diagonal, n_k
        or kv_start). Returns (P as the P.V product's operand, alpha in the accumulator's row
        layout, m, l)."""
        n0 = kb * BLOCK_N
        masked = (n0 + BLOCK_N - 1 > first_pos) | (n0 + BLOCK_N > n_k) | (n0 < kv_start)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, pos, n0 + offs_n, kv_start, n_k, masked)
        return gl.convert_layout(p.to(dtype), p_layout), gl.convert_layout(alpha, row_o), m_i, l_i

    @gluon.jit
    def _softmax_and_pv(s, m_i, l_i, acc, kb, t, v_smem, v_bar, qk_scale, pos, offs_n, first_pos, kv_start, n_k,
                        BLOCK_N: gl.constexpr, p_layout: gl.constexpr, row_o: gl.constexpr,
                        V_STAGES: gl.constexpr = 3):
        """Tile t (key block kb): `_tile_probs`, acc rescaled, then P.V issued asynchronously on V
        stage t % V_STAGES. Returns (the in-flight P.V, m, l)."""
        p_op, alpha, m_i, l_i = _tile_probs(s, m_i, l_i, kb, qk_scale, pos, offs_n, first_pos, kv_start, n_k,
                                            v_smem.dtype, BLOCK_N, p_layout, row_o)
        acc = acc * alpha[:, None]
        mbarrier.wait(v_bar.index(t % V_STAGES), (t // V_STAGES) & 1)
        return warpgroup_mma(p_op, v_smem.index(t % V_STAGES), acc, is_async=True), m_i, l_i

    @gluon.jit
    def _item_coords(lin, n_heads, group, n_qb):
        """Work item `lin` -> (batch, q head, kv head, query block): kv-head-major, longest
        blocks first, the group's q heads side by side (they share each K/V tile in L2)."""
        n_kv = n_heads // group
        bk = lin // group // n_qb
        kvh = bk % n_kv
        return bk // n_kv, kvh * group + lin % group, kvh, n_qb - 1 - (lin // group) % n_qb

    @gluon.jit
    def _program_coords(n_heads, group):
        """This program's item (grid: (batch x q heads, query blocks)), see `_item_coords`."""
        return _item_coords(gl.program_id(1) * gl.num_programs(0) + gl.program_id(0), n_heads, group,
                            gl.num_programs(1))

    @gluon.jit
    def _block_list(b, h, qb, BlockIdx, BlockCnt, si_b, si_h, si_q, sc_b, sc_h, idx_group):
        """(first entry, length) of the key-block list of (batch b, q head h, query block qb);
        lists may be per kv head (shared by the group: idx_group q heads per list)."""
        idx_h = h // idx_group
        idx_base = BlockIdx + b.to(gl.int64) * si_b + idx_h.to(gl.int64) * si_h + qb.to(gl.int64) * si_q
        return idx_base, gl.load(BlockCnt + b * sc_b + idx_h * sc_h + qb)

    @gluon.jit
    def _online_state(ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, row_layout: gl.constexpr,
                      o_layout: gl.constexpr):
        """Empty online-softmax state: (running max, running sum, output accumulator)."""
        return (gl.full([ROWS], -1.0e30, gl.float32, layout=row_layout),
                gl.zeros([ROWS], gl.float32, layout=row_layout),
                gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout))

    @gluon.jit
    def _first_scores(q_tile, q_bar, k_tile, k_bar, count, zero_s):
        """S(0) = q.K(0)^T once q and K(0) have landed (an empty list computes it from unfilled
        memory and never uses it)."""
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_bar, 0, pred=count > 0)
        s = warpgroup_mma(q_tile, k_tile.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        return warpgroup_mma_wait(num_outstanding=0, deps=(s, ))

    @gluon.jit
    def _finished_rows(acc, m_i, l_i, row_o: gl.constexpr):
        """(output, natural-log lse) of rows whose online softmax is done; rows without a kept
        key get out = 0, lse = -inf."""
        l_o = gl.convert_layout(l_i, row_o)
        has = l_o > 0.0
        l_safe = gl.where(has, l_o, 1.0)
        lse = gl.where(has, (gl.convert_layout(m_i, row_o) + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        return acc / l_safe[:, None], lse

    @gluon.jit
    def _store_rows(acc, m_i, l_i, Out, Lse, base, row0, n_q, HEAD_DIM: gl.constexpr, ROWS: gl.constexpr,
                    o_layout: gl.constexpr, row_o: gl.constexpr):
        """Normalise and store query rows [row0, row0 + ROWS) of one (batch, head) whose output
        rows start at `base` (`_finished_rows`)."""
        out, lse = _finished_rows(acc, m_i, l_i, row_o)
        rows = row0 + gl.arange(0, ROWS, layout=row_o)
        dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        row_ok = rows < n_q
        gl.store(Out + (base + rows[:, None]) * HEAD_DIM + dims[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None])
        gl.store(Lse + base + rows, lse, mask=row_ok)

    @gluon.jit
    def _store_half(acc, m_i, l_i, staging, o_desc, Out, Lse, out_base, row0, n_q, HEAD_DIM: gl.constexpr,
                    ROWS: gl.constexpr, o_layout: gl.constexpr, row_o: gl.constexpr):
        """`_store_rows` for a warp-specialised compute partition: a block of ROWS rows that lies
        inside n_q goes through `staging` (this item's q half-tile, free once its last q.K^T is
        done) and one TMA store, instead of 32 scattered 4-byte stores per thread from the MMA
        layout; the TMA has read `staging` when this returns. A ragged last block (the 2-D
        descriptor would run into the next head's rows) and the lse take `_store_rows`' stores."""
        if row0 + ROWS <= n_q:
            out, lse = _finished_rows(acc, m_i, l_i, row_o)
            staging.store(out.to(staging.dtype))
            fence_async_shared()
            _tma_store(o_desc, [(out_base + row0).to(gl.int32), 0], staging)
            gl.store(Lse + out_base + row0 + gl.arange(0, ROWS, layout=row_o), lse)
            tma.store_wait(0)
        else:
            _store_rows(acc, m_i, l_i, Out, Lse, out_base, row0, n_q, HEAD_DIM, ROWS, o_layout, row_o)

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
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
        kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)

        b, h, kvh, qb = _program_coords(n_heads, group)
        n_kv = n_heads // group
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

        idx_base, count = _block_list(b, h, qb, BlockIdx, BlockCnt, si_b, si_h, si_q, sc_b, sc_h, idx_group)
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
        m_i, l_i, acc = _online_state(BLOCK_M, HEAD_DIM, row_s, o_layout)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        s = _first_scores(q_smem, q_bar, k_smem.index(0), k_bar.index(0), count, zero_s)
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

        _store_rows(acc, m_i, l_i, Out, Lse, (b * n_heads + h).to(gl.int64) * n_q, qb * BLOCK_M, n_q, HEAD_DIM,
                    BLOCK_M, o_layout, row_o)

    # ------------------------------------------------------------------ warp-specialised variant
    @gluon.jit
    def _ws_loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, kb_smem, q_bar, k_ready, k_empty, v_ready,
                   v_empty, idx_base, count, q_row, kv_row, BLOCK_N: gl.constexpr, HALF_M: gl.constexpr):
        """1-warp load partition: the two 64-row halves of the q tile, then each listed K / V tile
        into its ring stage once both compute partitions have released the stage, the tile's list
        entry into the stage's slot of `kb_smem` (published by the K tile's mbarrier)."""
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
        _tma_load(q_desc, [q_row, 0], q_bar, q_smem.index(0))
        _tma_load(q_desc, [q_row + HALF_M, 0], q_bar, q_smem.index(1))
        for t in range(count):
            stage = t % 2
            free = ((t // 2) & 1) ^ 1  # a fresh barrier counts as released once (phase 1 complete)
            kb = gl.load(idx_base + t)
            row = kv_row + kb * BLOCK_N
            mbarrier.wait(k_empty.index(stage), free)
            _put_scalar(kb_smem.index(stage), kb, 1)
            _issue_tile(k_desc, k_smem.index(stage), k_ready.index(stage), row, True)
            mbarrier.wait(v_empty.index(stage), free)
            _issue_tile(v_desc, v_smem.index(stage), v_ready.index(stage), row, True)

    @gluon.jit
    def _take_turn(turn, g, HALF: gl.constexpr, PINGPONG: gl.constexpr):
        """Wait for this compute partition's g-th turn at the tensor cores: half 0's turn g follows
        half 1's turn g - 1 (its first is free: a fresh barrier's parity-1 wait returns), half 1's
        turn g follows half 0's turn g."""
        if PINGPONG:
            mbarrier.wait(turn.index(HALF), (g & 1) ^ (1 - HALF))

    @gluon.jit
    def _pass_turn(turn, HALF: gl.constexpr, PINGPONG: gl.constexpr):
        """Hand the tensor cores to the other compute partition (its products queue behind ours)."""
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - HALF), count=1)

    @gluon.jit
    def _ws_half(q_tile, q_bar, q_phase, k_smem, v_smem, kb_smem, k_ready, k_empty, v_ready, v_empty, turn, g, o_desc,
                 Out, Lse, count, c0, first_row, kv_start, n_q, n_k, q_offset, qk_scale, out_base, HALF: gl.constexpr,
                 HEAD_DIM: gl.constexpr, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, K_STAGES: gl.constexpr = 2,
                 PINGPONG: gl.constexpr = True):
        """One compute partition's work on one item: query rows [first_row + HALF * HALF_M,
        + HALF_M) against the item's list, releasing each K / V ring stage to the loader once its
        product is done, then the store. c0: the ring position of the list's first tile (the tiles
        of earlier items in a persistent program); q_phase: the phase of q_bar that holds this
        item's q. K tile c sits in stage c % K_STAGES, V tile c in stage c % 2; the tile's list
        entry (for the mask test) in the K stage's slot of kb_smem, read before the stage is released.

        FlashAttention-3's order: per tile, S(t+1) = q.K(t+1)^T and acc += P(t).V(t) are issued
        together, then softmax(t+1) runs under P(t).V(t). With PINGPONG the two partitions take
        turns to issue (`turn`, g: this partition's turns so far, returned updated: count + 1 per
        non-empty list), so one partition's softmax and store run under the other's products
        instead of both softmaxes leaving the tensor cores idle at once."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        rows0 = first_row + HALF * HALF_M
        pos = rows0 + gl.arange(0, HALF_M, layout=row_s) + q_offset
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        first_pos = first_row + q_offset  # the tile's first row decides which tiles need the mask
        zero_s = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout=s_layout)
        m_i, l_i, acc = _online_state(HALF_M, HEAD_DIM, row_s, o_layout)
        mbarrier.wait(q_bar, q_phase)
        if count > 0:
            stage = c0 % K_STAGES
            mbarrier.wait(k_ready.index(stage), (c0 // K_STAGES) & 1)
            kb = _get_scalar(kb_smem.index(stage), 4)
            _take_turn(turn, g, HALF, PINGPONG)
            s = warpgroup_mma(q_tile, k_smem.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            _pass_turn(turn, HALF, PINGPONG)
            g += 1
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            mbarrier.arrive(k_empty.index(stage), count=1)
            # acc is still zero: the first alpha needs no rescale
            p_op, alpha, m_i, l_i = _tile_probs(s, m_i, l_i, kb, qk_scale, pos, offs_n, first_pos, kv_start, n_k,
                                                v_smem.dtype, BLOCK_N, p_layout, row_o)
            for t in range(0, count - 1):
                c = c0 + t
                nxt = (c + 1) % K_STAGES
                mbarrier.wait(k_ready.index(nxt), ((c + 1) // K_STAGES) & 1)
                kb = _get_scalar(kb_smem.index(nxt), 4)
                mbarrier.wait(v_ready.index(c % 2), (c // 2) & 1)
                _take_turn(turn, g, HALF, PINGPONG)
                s_next = warpgroup_mma(q_tile, k_smem.index(nxt).permute((1, 0)), zero_s, use_acc=False,
                                       is_async=True)
                pv = warpgroup_mma(p_op, v_smem.index(c % 2), acc, is_async=True)
                _pass_turn(turn, HALF, PINGPONG)
                g += 1
                s = warpgroup_mma_wait(num_outstanding=1, deps=(s_next, ))
                mbarrier.arrive(k_empty.index(nxt), count=1)
                p_op, alpha, m_i, l_i = _tile_probs(s, m_i, l_i, kb, qk_scale, pos, offs_n, first_pos, kv_start,
                                                    n_k, v_smem.dtype, BLOCK_N, p_layout, row_o)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(pv, ))
                mbarrier.arrive(v_empty.index(c % 2), count=1)
                acc = acc * alpha[:, None]
            c = c0 + count - 1  # the last tile's P.V
            mbarrier.wait(v_ready.index(c % 2), (c // 2) & 1)
            _take_turn(turn, g, HALF, PINGPONG)
            pv = warpgroup_mma(p_op, v_smem.index(c % 2), acc, is_async=True)
            _pass_turn(turn, HALF, PINGPONG)
            g += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(pv, ))
            mbarrier.arrive(v_empty.index(c % 2), count=1)
        _store_half(acc, m_i, l_i, q_tile, o_desc, Out, Lse, out_base, rows0, n_q, HEAD_DIM, HALF_M, o_layout, row_o)
        return g

    @gluon.jit
    def _ws_compute(q_smem, k_smem, v_smem, kb_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn, o_desc, Out, Lse,
                    count, first_row, kv_start, n_q, n_k, q_offset, qk_scale, out_base, HALF: gl.constexpr,
                    HEAD_DIM: gl.constexpr, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, PINGPONG: gl.constexpr):
        """4-warp compute partition for one 64-row half of the item (`_ws_half`). The two halves
        share the K/V tiles but not a CTA barrier, so one half's softmax can run under the
        other's wgmma."""
        _ws_half(q_smem.index(HALF), q_bar, 0, k_smem, v_smem, kb_smem, k_ready, k_empty, v_ready, v_empty, turn,
                 gl.to_tensor(0), o_desc, Out, Lse, count, 0, first_row, kv_start, n_q, n_k, q_offset, qk_scale,
                 out_base, HALF, HEAD_DIM, HALF_M, BLOCK_N, 2, PINGPONG)

    @gluon.jit
    def _block_sparse_fwd_sm90_ws(
        q_desc, k_desc, v_desc, o_desc, Out, Lse, BlockIdx, BlockCnt, KvStart,
        si_b, si_h, si_q, sc_b, sc_h,
        n_q, n_k, n_heads, group, idx_group, q_offset, qk_scale,
        HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, PINGPONG: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Warp-specialised variant (BLOCK_M = 128 as two 64-row halves): a 1-warp TMA loader and
        two 4-warp compute partitions synchronised only through per-stage ready / released
        mbarriers (released = both halves done with the stage). Host-side descriptors, q in
        64-row blocks. Same program order and contract as `_block_sparse_fwd_sm90`."""
        HALF_M: gl.constexpr = 64
        dtype: gl.constexpr = q_desc.dtype
        b, h, kvh, qb = _program_coords(n_heads, group)
        n_kv = n_heads // group
        idx_base, count = _block_list(b, h, qb, BlockIdx, BlockCnt, si_b, si_h, si_q, sc_b, sc_h, idx_group)
        kv_start = gl.load(KvStart + b)
        q_row = (b * n_heads + h) * n_q + qb * (2 * HALF_M)
        kv_row = (b * n_kv + kvh) * n_k
        out_base = (b * n_heads + h).to(gl.int64) * n_q

        q_smem = gl.allocate_shared_memory(dtype, [2, HALF_M, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], v_desc.layout)
        kb_smem = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # `_take_turn`
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # one arrival per compute partition
            mbarrier.init(v_empty.index(i), count=2)

        first_row = qb * (2 * HALF_M)
        gl.warp_specialize([
            (_ws_compute, (q_smem, k_smem, v_smem, kb_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn, o_desc,
                           Out, Lse, count, first_row, kv_start, n_q, n_k, q_offset, qk_scale, out_base, 0, HEAD_DIM,
                           HALF_M, BLOCK_N, PINGPONG)),
            (_ws_compute, (q_smem, k_smem, v_smem, kb_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn, o_desc,
                           Out, Lse, count, first_row, kv_start, n_q, n_k, q_offset, qk_scale, out_base, 1, HEAD_DIM,
                           HALF_M, BLOCK_N, PINGPONG)),
            (_ws_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, kb_smem, q_bar, k_ready, k_empty, v_ready,
                          v_empty, idx_base, count, q_row, kv_row, BLOCK_N, HALF_M)),
        ], [4, 1], [240, 24])

    # ------------------------------------------------- persistent warp-specialised variant
    @gluon.jit
    def _item_list(item, BlockIdx, BlockCnt, si_b, si_h, si_q, sc_b, sc_h, n_heads, group, idx_group, n_qb):
        """Work item -> (batch, q head, kv head, query block, its list's first entry, its length)."""
        b, h, kvh, qb = _item_coords(item, n_heads, group, n_qb)
        idx_base, count = _block_list(b, h, qb, BlockIdx, BlockCnt, si_b, si_h, si_q, sc_b, sc_h, idx_group)
        return b, h, kvh, qb, idx_base, count

    @gluon.jit
    def _issue_pending_v(v_desc, v_smem, v_ready, v_empty, c, v_row, pred):
        """V(c - 1) into ring stage (c - 1) % 2 once both compute partitions released it (when
        `pred`; ring position c - 1 is then >= 0, so (c + 1) % 2 is its stage)."""
        mbarrier.wait(v_empty.index((c + 1) % 2), (((c - 1) // 2) & 1) ^ 1, pred=pred)
        _issue_tile(v_desc, v_smem.index((c + 1) % 2), v_ready.index((c + 1) % 2), v_row, pred)

    @gluon.jit
    def _wsp_loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, kb_smem, item_smem, q_ready, q_empty, k_ready,
                    k_empty, v_ready, v_empty, Counter, BlockIdx, BlockCnt, KvStart, si_b, si_h, si_q, sc_b, sc_h, n_q,
                    n_k, n_heads, group, idx_group, n_qb, n_items, BLOCK_N: gl.constexpr, HALF_M: gl.constexpr,
                    K_STAGES: gl.constexpr, Q_BUFS: gl.constexpr):
        """1-warp load partition: claims items (its program id first, then the next free one from
        `Counter`, so the items in flight stay consecutive, as the per-item grid's are) and
        hands each to the compute partitions through its q buffer's slots (batch x heads + head,
        list length, kv_start, query block: 4 slots of `item_smem` per q buffer), so that they make
        no global loads or divisions. Per item: the q tile into the q buffer (of Q_BUFS) that the
        compute partitions released, then its K / V tiles through the ring, whose position `c` runs
        on across items. The next item's q and first tiles are therefore in flight while the
        compute partitions finish an item. After the last item: slot value -1.

        V runs one tile behind K (K(c) is issued before V(c-1), as FlashAttention-3's producer
        does): the compute partitions release K(c)'s stage half a tile before V(c)'s, so a
        loader that issued V(c) before K(c+1) would hold K(c+1) back until V(c)'s stage is free
        and leave K about one tile of lead; this order gives K and V about 1.5 tiles each. An
        item's last V is issued at the item's end. The list entry for the next tile is loaded
        before the waits, out of the issue chain, and goes to the compute partitions in the K
        stage's slot of `kb_smem`."""
        n_kv = n_heads // group
        c = 0  # ring position of the next K tile
        v_done = 0  # V tiles issued: V(c - 1) is pending (its row in v_row) while v_done < c
        v_row = 0
        local = 0
        item = gl.program_id(0)
        while item < n_items:
            # The next item is claimed now and used after this item's loads are issued, so the
            # atomic's round trip runs under them instead of between two items.
            claimed = gl.atomic_add(Counter, 1)
            b, h, kvh, qb, idx_base, count = _item_list(item, BlockIdx, BlockCnt, si_b, si_h, si_q, sc_b, sc_h,
                                                        n_heads, group, idx_group, n_qb)
            q_row = (b * n_heads + h) * n_q + qb * (2 * HALF_M)
            kv_row = (b * n_kv + kvh) * n_k
            # The list's last entry goes first: in an ascending causal list it is the diagonal
            # block, whose masked softmax then runs under the next tile's q.K^T instead of at the
            # item's end, where nothing overlaps it (the compute side takes any order). On the H200
            # this timed 0.99-1.01x of the diagonal-last order (kernel_variants_listorder_h200.json).
            next_kb = gl.load(idx_base + count - 1, mask=count > 0, other=0)
            kv_start = gl.load(KvStart + b)
            qbuf = local % Q_BUFS
            mbarrier.wait(q_empty.index(qbuf), ((local // Q_BUFS) & 1) ^ 1)  # fresh: counts as released
            _put_scalar(item_smem.index(4 * qbuf), b * n_heads + h, 1)
            _put_scalar(item_smem.index(4 * qbuf + 1), count, 1)
            _put_scalar(item_smem.index(4 * qbuf + 2), kv_start, 1)
            _put_scalar(item_smem.index(4 * qbuf + 3), qb, 1)
            # expect() arrives on q_ready after the slot stores: the compute side reads them after the wait
            mbarrier.expect(q_ready.index(qbuf), 2 * q_desc.block_type.nbytes)
            _tma_load(q_desc, [q_row, 0], q_ready.index(qbuf), q_smem.index(2 * qbuf))
            _tma_load(q_desc, [q_row + HALF_M, 0], q_ready.index(qbuf), q_smem.index(2 * qbuf + 1))
            for t in range(count):
                kb = next_kb
                next_kb = gl.load(idx_base + t, mask=t + 1 < count, other=0)  # entry t runs (t + 1)-th
                row = kv_row + kb * BLOCK_N
                mbarrier.wait(k_empty.index(c % K_STAGES), ((c // K_STAGES) & 1) ^ 1)
                _put_scalar(kb_smem.index(c % K_STAGES), kb, 1)
                _issue_tile(k_desc, k_smem.index(c % K_STAGES), k_ready.index(c % K_STAGES), row, True)
                _issue_pending_v(v_desc, v_smem, v_ready, v_empty, c, v_row, v_done < c)
                v_done = c
                v_row = row
                c += 1
            # The item's last V goes now, not after the next item's q_empty wait: that wait ends
            # only when the item before this one is done, so a V held back to it would reach
            # the compute partitions one load latency after they start this item's last tile,
            # on every item (and after an empty list the pending V is an earlier item's).
            _issue_pending_v(v_desc, v_smem, v_ready, v_empty, c, v_row, v_done < c)
            v_done = c
            local += 1
            item = gl.num_programs(0) + claimed
        qbuf = local % Q_BUFS
        mbarrier.wait(q_empty.index(qbuf), ((local // Q_BUFS) & 1) ^ 1)
        _put_scalar(item_smem.index(4 * qbuf), -1, 1)
        mbarrier.arrive(q_ready.index(qbuf), count=1)

    @gluon.jit
    def _wsp_item(item_smem, q_ready, local, Q_BUFS: gl.constexpr):
        """The (batch x heads + head) of the item in q buffer local % Q_BUFS's slot, once the buffer's
        q has landed (-1: none left)."""
        mbarrier.wait(q_ready.index(local % Q_BUFS), (local // Q_BUFS) & 1)
        return _get_scalar(item_smem.index(4 * (local % Q_BUFS)), 4)

    @gluon.jit
    def _wsp_compute(q_smem, k_smem, v_smem, kb_smem, item_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                     turn, o_desc, Out, Lse, n_q, n_k, q_offset, qk_scale, HALF: gl.constexpr,
                     HEAD_DIM: gl.constexpr, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, K_STAGES: gl.constexpr,
                     Q_BUFS: gl.constexpr, PINGPONG: gl.constexpr):
        """4-warp compute partition for one 64-row half of each item the loader hands over
        (`_ws_half`), with the ring position and the q buffer carried across items; the item's
        (batch x heads + head), list length, kv_start and query block come from the q buffer's
        slots once its q has landed (-1: none left)."""
        c0 = 0
        g = gl.to_tensor(0)  # turns taken (`_ws_half`)
        local = 0
        bh = _wsp_item(item_smem, q_ready, local, Q_BUFS)
        while bh >= 0:
            qbuf = local % Q_BUFS
            count = _get_scalar(item_smem.index(4 * qbuf + 1), 4)
            kv_start = _get_scalar(item_smem.index(4 * qbuf + 2), 4)
            qb = _get_scalar(item_smem.index(4 * qbuf + 3), 4)
            g = _ws_half(q_smem.index(2 * qbuf + HALF), q_ready.index(qbuf), (local // Q_BUFS) & 1, k_smem, v_smem,
                         kb_smem, k_ready, k_empty, v_ready, v_empty, turn, g, o_desc, Out, Lse, count, c0,
                         qb * (2 * HALF_M), kv_start, n_q, n_k, q_offset, qk_scale,
                         bh.to(gl.int64) * n_q, HALF, HEAD_DIM, HALF_M, BLOCK_N, K_STAGES, PINGPONG)
            mbarrier.arrive(q_empty.index(qbuf), count=1)  # every product reading this q is done
            c0 += count
            local += 1
            bh = _wsp_item(item_smem, q_ready, local, Q_BUFS)

    @gluon.jit
    def _block_sparse_fwd_sm90_wsp(
        q_desc, k_desc, v_desc, o_desc, Out, Lse, BlockIdx, BlockCnt, KvStart,
        si_b, si_h, si_q, sc_b, sc_h,
        n_q, n_k, n_heads, group, idx_group, q_offset, qk_scale, n_qb, n_items, Counter,
        HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, K_STAGES: gl.constexpr, Q_BUFS: gl.constexpr,
        PINGPONG: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Persistent warp-specialised variant: one program per SM; each takes its program id's
        item, then claims the next free one (`_item_coords` order) from `Counter` (zeroed by the
        host, counts claims after the first grid), so an item's q load and first K / V tiles
        overlap the previous item's last tiles and store (the fixed cost per item that the
        per-item kernels pay in series). Q_BUFS q buffers (2 or 3), each with its item's slots; a
        ring of K_STAGES K tiles (each with a list-entry slot) and 2 V tiles."""
        HALF_M: gl.constexpr = 64
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2 * Q_BUFS, HALF_M, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [Q_BUFS, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [Q_BUFS, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # `_take_turn`
        slot: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        # per q buffer: b * H + h, list length, kv_start, query block
        item_smem = gl.allocate_shared_memory(gl.int32, [4 * Q_BUFS, 1], slot)
        kb_smem = gl.allocate_shared_memory(gl.int32, [K_STAGES, 1], slot)
        for i in gl.static_range(Q_BUFS):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)  # one arrival per compute partition
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_empty.index(i), count=2)
        for i in gl.static_range(K_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)
        gl.warp_specialize([
            (_wsp_compute, (q_smem, k_smem, v_smem, kb_smem, item_smem, q_ready, q_empty, k_ready, k_empty, v_ready,
                            v_empty, turn, o_desc, Out, Lse, n_q, n_k, q_offset, qk_scale, 0,
                            HEAD_DIM, HALF_M, BLOCK_N, K_STAGES, Q_BUFS, PINGPONG)),
            (_wsp_compute, (q_smem, k_smem, v_smem, kb_smem, item_smem, q_ready, q_empty, k_ready, k_empty, v_ready,
                            v_empty, turn, o_desc, Out, Lse, n_q, n_k, q_offset, qk_scale, 1,
                            HEAD_DIM, HALF_M, BLOCK_N, K_STAGES, Q_BUFS, PINGPONG)),
            (_wsp_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, kb_smem, item_smem, q_ready, q_empty,
                           k_ready, k_empty, v_ready, v_empty, Counter, BlockIdx, BlockCnt, KvStart, si_b, si_h, si_q,
                           sc_b, sc_h, n_q, n_k, n_heads, group, idx_group, n_qb, n_items, BLOCK_N, HALF_M, K_STAGES,
                           Q_BUFS)),
        ], [4, 1], [240, 24])


def wsp_buffers(head_dim: int, block_n: int, itemsize: int = 2) -> tuple:
    """(q buffers, K stages) of the persistent form: WSP_Q_BUFFERS and WSP_K_STAGES where the
    buffers (2 q half-tiles per q buffer, the K stages, 2 V stages) and 1 KB of barriers / scratch
    fit one block's shared memory, else 2 of each that does not fit (q buffers first)."""
    half, tile = 64 * head_dim * itemsize, block_n * head_dim * itemsize

    def fits(q_bufs, k_stages):
        return 2 * q_bufs * half + k_stages * tile + 2 * tile + 1024 <= SM90_SHARED_BYTES

    q_bufs = WSP_Q_BUFFERS if fits(WSP_Q_BUFFERS, 2) else 2
    return q_bufs, WSP_K_STAGES if fits(q_bufs, WSP_K_STAGES) else 2


def wsp_k_stages(head_dim: int, block_n: int, itemsize: int = 2) -> int:
    """K stages of the persistent form (see `wsp_buffers`)."""
    return wsp_buffers(head_dim, block_n, itemsize)[1]


def ws_usable(block_m: int) -> bool:
    """Whether the warp-specialised variant runs (on unless PATCHATTN_GLUON_WS=0; two 64-row halves)."""
    return WARP_SPECIALIZED and block_m == 128


def wsp_usable(block_m: int) -> bool:
    """Whether its persistent form runs (on unless PATCHATTN_GLUON_PERSISTENT=0)."""
    return PERSISTENT and ws_usable(block_m)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _tile_layout(rows: int, head_dim: int, dtype: torch.dtype):
    """The shared-memory layout of a [rows, head_dim] TMA tile. Cached: building it takes about 18 us
    of host time, and each call makes four descriptors."""
    gl_dtype = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return gl.NVMMASharedLayout.get_default_for([rows, head_dim], gl_dtype)


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
    if ws_usable(block_m):
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        def desc(t: torch.Tensor, rows: int):  # a 2-D [B * H * N, D] view
            layout = _tile_layout(rows, d, t.dtype)
            return TensorDescriptor(t, [t.shape[0] * t.shape[1] * t.shape[2], d], [d, 1], [rows, d], layout)

        args = (desc(q, 64), desc(k, block_n), desc(v, block_n), desc(result, 64), result, lse, block_index,
                block_count, kv_start,
                *block_index.stride()[:3], *block_count.stride()[:2],
                n_q, n_k, hq, hq // hkv, hq // hb, q_offset, scale * LOG2E)
        n_qb = -(-n_q // block_m)
        if wsp_usable(block_m):
            n_items = bsz * hq * n_qb
            grid = min(n_items, _sm_count(q.device.index or 0))
            counter = torch.zeros(1, dtype=torch.int32, device=q.device)  # items claimed after the first `grid`
            q_bufs, k_stages = wsp_buffers(d, block_n, q.element_size())
            _block_sparse_fwd_sm90_wsp[(grid,)](
                *args, n_qb, n_items, counter, HEAD_DIM=d, BLOCK_N=block_n, K_STAGES=k_stages,
                Q_BUFS=q_bufs, PINGPONG=PINGPONG, num_warps=4, maxnreg=WS_MAXNREG)
        else:
            _block_sparse_fwd_sm90_ws[(bsz * hq, n_qb)](
                *args, HEAD_DIM=d, BLOCK_N=block_n, PINGPONG=PINGPONG, num_warps=4, maxnreg=WS_MAXNREG)
        if result is not out:
            out.copy_(result)
        return
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
