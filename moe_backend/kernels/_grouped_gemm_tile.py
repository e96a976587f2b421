"""One work unit of the FP8 grouped GEMM (`_grouped_gemm_core`): the fp32 product of a BLOCK_M-row
tile of A and one expert's weight tile, each 128-wide K block scaled in before it is added
(numerics: docs/design.md), rounded to bf16 and stored; or, split over K (SPLIT_K > 1), one K
slice's fp32 partial sum, stored unrounded for the consumer to add. Called by `_grouped_gemm_kernel`."""

from __future__ import annotations

import triton
import triton.language as tl

from moe_backend.kernels._group_quant_core import quantize_groups, silu_mul_of
from moe_backend.kernels._numerics import round_to_bf16_grid


@triton.jit
def _scaled_product(a, b, a_s, b_s, SWAP_AB: tl.constexpr, SCALAR_BS: tl.constexpr, ROW_TILES: tl.constexpr):
    """One 128-wide K block's fp32 partial product times a_scale[m, kb] * b_scale[n // 128, kb].
    Pointer loads shape the tiles for the dot: a [BM, BK] and b [BK, BN], or b [BN, BK] and
    a [BK, BM] with SWAP_AB. TMA tiles arrive as stored (ROW_TILES): a [BM, BK], b [BN, BK]."""
    # One return at the end: Triton 3.6 also compiles the statements after a constexpr-if return.
    if SWAP_AB:
        if ROW_TILES:
            d = tl.dot(b, tl.trans(a))
        else:
            d = tl.dot(b, a)
        if SCALAR_BS:
            p = d * (a_s[None, :] * b_s)
        else:
            p = d * a_s[None, :] * b_s[:, None]
    else:
        if ROW_TILES:
            d = tl.dot(a, tl.trans(b))
        else:
            d = tl.dot(a, b)
        if SCALAR_BS:
            p = d * (a_s[:, None] * b_s)
        else:
            p = d * a_s[:, None] * b_s[None, :]
    return p


@triton.jit
def _silu_quant_a(
    h_ptr, rows, row_ok, kb, K, act_count, act_slab, BLOCK_K: tl.constexpr, A_SPLITS: tl.constexpr, UE8M0: tl.constexpr
):
    """GEMM2's A block kb ([BLOCK_M, BLOCK_K] e4m3 and its f32 scales [BLOCK_M]) computed from
    GEMM1's output h `[M, 2K]` (or its `act_count` partial-sum slabs, `act_slab` elements apart):
    SiLU(gate) * up, then the per-128 quant, exactly as `silu_mul_quant` computes and stores them.
    Rows not in `row_ok` read zeros (their results are never stored)."""
    offs = rows[:, None] * (2 * K) + kb * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    act = silu_mul_of(h_ptr, offs, K, act_slab, act_count, row_ok[:, None], A_SPLITS)
    q, scale = quantize_groups(act, UE8M0)
    return q.to(tl.float8e4nv), scale


@triton.jit
def _gemm_tile(
    a_ptr,
    a_rows_ptr,
    a_scale_ptr,
    b_ptr,
    b_scale_ptr,
    c_ptr,
    a_desc,
    b_desc,
    expert,
    offs_m,
    row_ok,
    tile_row0,
    pid_n,
    k_split,
    k_splits,
    act_count,
    act_slab,
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    K_UNROLL: tl.constexpr,
    N_LOOP: tl.constexpr,
    FULL_KB: tl.constexpr,
    USE_TMA: tl.constexpr,
    GATHER_A: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SILU_A: tl.constexpr,
    A_SPLITS: tl.constexpr,
    UE8M0: tl.constexpr,
):
    """One work unit: rows `offs_m` (BLOCK_M of them, `row_ok` marks the ones stored) of the
    pointers' layout times expert `expert`'s n-tile `pid_n` (N_LOOP > 1: n-tiles
    pid_n * N_LOOP ... + N_LOOP - 1). GATHER_A: row m's operand is A's row `a_rows_ptr[m]`
    (the token it copies; -1, padding, reads row 0 and is never stored), not row m.
    SPLIT_K > 1 (N_LOOP == 1 only): K cut into `k_splits` (<= SPLIT_K) slices, this unit's is
    K blocks [k_split * K/128/k_splits, ...), and the fp32 partial sum is stored unrounded (c_ptr
    points at that slice's [M, N] slab).
    SILU_A (pointer loads only): A is computed, not loaded: `a_ptr` holds GEMM1's output h
    `[M, 2K]` bf16, or A_SPLITS f32 partial-sum slabs of it (`act_count` in use, `act_slab`
    elements apart), and each K block of A is SiLU(gate) * up quantized to e4m3 here
    (`_silu_quant_a`), so the SiLU*up quant kernel and its FP8 round trip drop out; a_scale_ptr
    is unused."""
    num_kb = K // BLOCK_K
    kb_begin = k_split * (num_kb // k_splits)
    kb_end = kb_begin + num_kb // k_splits
    expert64 = expert.to(tl.int64)
    # Rows past the valid ones are clamped, not masked: row m of C depends on row m of A alone,
    # so whatever they hold never reaches a stored row, and unmasked loads vectorize fully.
    offs_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    if GATHER_A:
        tl.static_assert(not USE_TMA, "a gathered A is loaded row by row, not through TMA")
        a_rows = tl.maximum(tl.load(a_rows_ptr + offs_m), 0)
    else:
        a_rows = offs_m
    tl.static_assert(not (SILU_A and (USE_TMA or GATHER_A)), "a computed A is neither TMA-loaded nor gathered")
    offs_k = tl.arange(0, BLOCK_K)
    b_ptr += expert64 * N * K
    b_scale_ptr += expert64 * tl.cdiv(N, 128) * num_kb
    as_ptrs = a_scale_ptr + a_rows * num_kb
    if N_LOOP == 1:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_nb = tl.where(n_ok, offs_n, N - 1).to(tl.int64)
        if BLOCK_N <= 128:
            # One weight-scale row for the whole tile (128 % BLOCK_N == 0: powers of two).
            bs_ptrs = b_scale_ptr + ((pid_n * BLOCK_N) // 128) * num_kb
        else:
            bs_ptrs = b_scale_ptr + (offs_nb // 128) * num_kb
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_TMA:
            # Rows past the tile's valid ones (next expert's, or zero-filled past the end) and
            # columns past N only reach rows/columns that are never stored.
            b_row0 = expert * N + pid_n * BLOCK_N
            for kb in range(kb_begin, kb_end, K_UNROLL):
                for u in tl.static_range(K_UNROLL):
                    k0 = (kb + u) * BLOCK_K
                    acc += _scaled_product(
                        a_desc.load([tile_row0, k0]),
                        b_desc.load([b_row0, k0]),
                        tl.load(as_ptrs + kb + u),
                        tl.load(bs_ptrs + kb + u),
                        SWAP_AB,
                        BLOCK_N <= 128,
                        True,
                    )
        else:
            if SWAP_AB:
                a_ptrs = a_ptr + a_rows[None, :] * K + offs_k[:, None]  # [BK, BM]
                b_ptrs = b_ptr + offs_nb[:, None] * K + offs_k[None, :]  # [BN, BK]
            else:
                a_ptrs = a_ptr + a_rows[:, None] * K + offs_k[None, :]  # [BM, BK]
                b_ptrs = b_ptr + offs_nb[None, :] * K + offs_k[:, None]  # [BK, BN]
            a_ptrs += kb_begin * BLOCK_K
            b_ptrs += kb_begin * BLOCK_K
            for kb in range(kb_begin, kb_end, K_UNROLL):
                # K_UNROLL blocks' products are issued before any is scaled in: that many MMA
                # groups in flight per wait instead of one (num_kb % K_UNROLL == 0, checked by the
                # launcher).
                for u in tl.static_range(K_UNROLL):
                    if SILU_A:
                        a_blk, a_s = _silu_quant_a(
                            a_ptr, a_rows, row_ok, kb + u, K, act_count, act_slab, BLOCK_K, A_SPLITS, UE8M0
                        )
                        if SWAP_AB:
                            a_blk = tl.trans(a_blk)
                    else:
                        a_blk = tl.load(a_ptrs + u * BLOCK_K)
                        a_s = tl.load(as_ptrs + kb + u)
                    acc += _scaled_product(
                        a_blk,
                        tl.load(b_ptrs + u * BLOCK_K),
                        a_s,
                        tl.load(bs_ptrs + kb + u),
                        SWAP_AB,
                        BLOCK_N <= 128,
                        False,
                    )
                a_ptrs += BLOCK_K * K_UNROLL
                b_ptrs += BLOCK_K * K_UNROLL
        if SPLIT_K > 1:
            out = acc  # a partial sum: rounded once, after the consumer adds the slices
        else:
            out = round_to_bf16_grid(acc).to(c_ptr.dtype.element_ty)
        if SWAP_AB:
            c_ptrs = c_ptr + offs_m[None, :] * N + offs_n[:, None]
            tl.store(c_ptrs, out, mask=n_ok[:, None] & row_ok[None, :])
        else:
            c_ptrs = c_ptr + offs_m[:, None] * N + offs_n[None, :]
            tl.store(c_ptrs, out, mask=row_ok[:, None] & n_ok[None, :])
    else:
        # Short K (FULL_KB = K/128 <= 2, e.g. TP8's w2 with K = 256): a K loop of one or two steps
        # leaves the pipeliner nothing to overlap, so the A tile is loaded once and the loop runs
        # over N_LOOP n-tiles instead: the next weight tiles stream in while this one is
        # multiplied and stored.
        tl.static_assert(SPLIT_K == 1, "a short K is not split")
        if SILU_A:
            a0, as0 = _silu_quant_a(a_ptr, a_rows, row_ok, 0, K, act_count, act_slab, BLOCK_K, A_SPLITS, UE8M0)
            if FULL_KB == 2:
                a1, as1 = _silu_quant_a(a_ptr, a_rows, row_ok, 1, K, act_count, act_slab, BLOCK_K, A_SPLITS, UE8M0)
        else:
            a_ptrs = a_ptr + a_rows[:, None] * K + offs_k[None, :]  # [BM, BK]
            a0 = tl.load(a_ptrs)
            as0 = tl.load(as_ptrs)
            if FULL_KB == 2:
                a1 = tl.load(a_ptrs + BLOCK_K)
                as1 = tl.load(as_ptrs + 1)
        for j in range(0, N_LOOP):
            offs_n = (pid_n * N_LOOP + j) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            offs_nb = tl.where(n_ok, offs_n, N - 1).to(tl.int64)
            b_ptrs = b_ptr + offs_nb[None, :] * K + offs_k[:, None]  # [BK, BN]
            bs_ptrs = b_scale_ptr + (offs_nb // 128) * num_kb
            acc = tl.dot(a0, tl.load(b_ptrs)) * as0[:, None] * tl.load(bs_ptrs)[None, :]
            if FULL_KB == 2:
                acc += tl.dot(a1, tl.load(b_ptrs + BLOCK_K)) * as1[:, None] * tl.load(bs_ptrs + 1)[None, :]
            out = round_to_bf16_grid(acc).to(c_ptr.dtype.element_ty)
            c_ptrs = c_ptr + offs_m[:, None] * N + offs_n[None, :]
            tl.store(c_ptrs, out, mask=row_ok[:, None] & n_ok[None, :])
