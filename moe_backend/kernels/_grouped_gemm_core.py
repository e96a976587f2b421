"""The FP8 grouped GEMM kernel shared by both layouts (contiguous and masked).

One Triton kernel, two row->expert maps (a constexpr switch), so the two public ops cannot drift:
- contiguous: A `[M, K]`, tile rows map to one expert through `expert_ids` (segments are padded
  to `CONTIGUOUS_ALIGNMENT`, a multiple of BLOCK_M, so a tile never straddles two experts);
- masked: A `[E, max_m, K]`, program ids enumerate (expert, n-tile, m-tile); m-tiles at or past
  `masked_m[e]` return at once (grid from shapes only: no host sync, CUDA-graph capturable).

Numerics (docs/design.md): fp32 accumulation, and each 128-wide K block's partial product is
multiplied by `a_scale[m, kb] * b_scale[n // 128, kb]` before it is added (the per-128-K scale
promotion), so BLOCK_K is fixed at the scale group, 128.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_backend.kernels._numerics import round_to_bf16_grid

SCALE_GROUP = 128


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


# Row counts stay runtime values (one compiled kernel per config serves every batch size).
@triton.jit(do_not_specialize=["M", "num_m_tiles", "num_n_tiles"])
def _fp8_grouped_gemm_kernel(
    a_ptr,  # fp8 [M, K] (contiguous) | [E, max_m, K] (masked)
    a_scale_ptr,  # f32 [M, K/128] | [E, max_m, K/128]
    b_ptr,  # fp8 [E, N, K]
    b_scale_ptr,  # f32 [E, ceil(N/128), K/128]
    c_ptr,  # bf16 [M, N] | [E, max_m, N]
    expert_ids_ptr,  # int32 [M] (contiguous only)
    masked_m_ptr,  # int32 [E] (masked only)
    a_desc,  # TMA descriptor over A as [rows, K], box [BLOCK_M, 128] (USE_TMA only, else None)
    b_desc,  # TMA descriptor over B as [E * N, K], box [BLOCK_N, 128] (USE_TMA only, else None)
    M,  # rows of one expert's A (masked: max_m) or of all of A (contiguous)
    N,
    K,
    num_m_tiles,
    num_n_tiles,
    MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr,  # C^T = B A^T: N fills the MMA's M slot when rows are few
    K_UNROLL: tl.constexpr,  # 128-wide K blocks per K-loop iteration (1, 2 or 4)
    N_LOOP: tl.constexpr,  # n-tiles per program, looped (short-K mode; 1 = one tile, K loop)
    FULL_KB: tl.constexpr,  # K / 128 when N_LOOP > 1 (1 or 2)
    USE_TMA: tl.constexpr,  # A and B tiles through TMA (Hopper): async bulk copies, no address math
):
    pid = tl.program_id(0)
    num_kb = K // BLOCK_K
    rows = tl.arange(0, BLOCK_M)
    if MASKED:
        # m-tiles of one (expert, n-tile) are neighbours: they share the B tile through L2.
        tiles_per_expert = num_m_tiles * num_n_tiles
        expert = pid // tiles_per_expert
        rem = pid % tiles_per_expert
        pid_n = rem // num_m_tiles
        pid_m = rem % num_m_tiles
        valid_m = tl.load(masked_m_ptr + expert)
        if pid_m * BLOCK_M >= valid_m:
            return
        offs_m = pid_m * BLOCK_M + rows
        row_ok = offs_m < valid_m
        # First row of the tile in A viewed as [E * max_m, K] (the TMA path's coordinate).
        tile_row0 = expert * M + pid_m * BLOCK_M
        expert64 = expert.to(tl.int64)
        a_ptr += expert64 * M * K
        a_scale_ptr += expert64 * M * num_kb
        c_ptr += expert64 * M * N
    else:
        # Grouped ordering: GROUP_M m-tiles sweep the n-tiles together (A and B reuse in L2).
        in_group = GROUP_M * num_n_tiles
        first_m = (pid // in_group) * GROUP_M
        group_rows = tl.minimum(num_m_tiles - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_rows
        pid_n = (pid % in_group) // group_rows
        offs_m = pid_m * BLOCK_M + rows
        ids = tl.load(expert_ids_ptr + offs_m, mask=offs_m < M, other=-1)
        expert = tl.max(ids, axis=0)
        if expert < 0:
            return  # a tile of padding only
        row_ok = ids == expert
        tile_row0 = pid_m * BLOCK_M
        expert64 = expert.to(tl.int64)
    # Rows past the valid ones are clamped, not masked: row m of C depends on row m of A alone,
    # so whatever they hold never reaches a stored row, and unmasked loads vectorize fully.
    offs_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    b_ptr += expert64 * N * K
    b_scale_ptr += expert64 * tl.cdiv(N, 128) * num_kb
    as_ptrs = a_scale_ptr + offs_m * num_kb
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
            for kb in range(0, num_kb, K_UNROLL):
                for u in tl.static_range(K_UNROLL):
                    k0 = (kb + u) * BLOCK_K
                    acc += _scaled_product(a_desc.load([tile_row0, k0]), b_desc.load([b_row0, k0]),
                                           tl.load(as_ptrs + kb + u), tl.load(bs_ptrs + kb + u),
                                           SWAP_AB, BLOCK_N <= 128, True)
        else:
            if SWAP_AB:
                a_ptrs = a_ptr + offs_m[None, :] * K + offs_k[:, None]  # [BK, BM]
                b_ptrs = b_ptr + offs_nb[:, None] * K + offs_k[None, :]  # [BN, BK]
            else:
                a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]  # [BM, BK]
                b_ptrs = b_ptr + offs_nb[None, :] * K + offs_k[:, None]  # [BK, BN]
            for kb in range(0, num_kb, K_UNROLL):
                # K_UNROLL blocks' products are issued before any is scaled in: that many MMA
                # groups in flight per wait instead of one (num_kb % K_UNROLL == 0, checked by the
                # launcher).
                for u in tl.static_range(K_UNROLL):
                    acc += _scaled_product(tl.load(a_ptrs + u * BLOCK_K), tl.load(b_ptrs + u * BLOCK_K),
                                           tl.load(as_ptrs + kb + u), tl.load(bs_ptrs + kb + u),
                                           SWAP_AB, BLOCK_N <= 128, False)
                a_ptrs += BLOCK_K * K_UNROLL
                b_ptrs += BLOCK_K * K_UNROLL
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
        a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]  # [BM, BK]
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


def _tma_descriptors(a_fp8, b_fp8, block_m: int, block_n: int):
    """Host-side TMA descriptors over A as `[rows, K]` and B as `[E * N, K]` (one box = one tile's
    128-wide K block), or None where TMA cannot serve (no Hopper, base not 16-byte aligned)."""
    if a_fp8.data_ptr() % 16 or b_fp8.data_ptr() % 16:
        return None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # Triton before 3.4
        return None
    k = a_fp8.shape[-1]
    return (TensorDescriptor.from_tensor(a_fp8.view(-1, k), [block_m, SCALE_GROUP]),
            TensorDescriptor.from_tensor(b_fp8.view(-1, k), [block_n, SCALE_GROUP]))


def launch(a_fp8, a_scale, b_fp8, b_scale, out, expert_ids, masked_m, *, masked: bool, rows: int,
           num_experts: int, cfg: dict) -> None:
    """Launches the kernel with a validated config (`_gemm_config.check_config`). Options that do
    not apply to this K (K_UNROLL not dividing K/128, N_LOOP with K > 256) or device (TMA where
    the tensors do not allow it) fall back safely."""
    n, k = b_fp8.shape[1], b_fp8.shape[2]
    num_kb = k // SCALE_GROUP
    unroll = cfg.get("K_UNROLL", 1)
    while num_kb % unroll:
        unroll //= 2
    n_loop = cfg.get("N_LOOP", 1)
    swap = bool(cfg.get("SWAP_AB", False))
    if num_kb > 2 or swap:
        n_loop = 1
    descs = None
    if cfg.get("TMA", False) and n_loop == 1:
        descs = _tma_descriptors(a_fp8, b_fp8, cfg["BLOCK_M"], cfg["BLOCK_N"])
    a_desc, b_desc = descs or (None, None)
    num_m_tiles = triton.cdiv(rows, cfg["BLOCK_M"])
    num_n_tiles = triton.cdiv(triton.cdiv(n, cfg["BLOCK_N"]), n_loop)
    grid_m = num_experts * num_m_tiles if masked else num_m_tiles
    grid = (grid_m * num_n_tiles,)
    if grid[0] == 0:
        return
    index = masked_m if masked else expert_ids  # the unused pointer argument gets the used one
    _fp8_grouped_gemm_kernel[grid](
        a_fp8, a_scale, b_fp8, b_scale, out, index, index, a_desc, b_desc,
        rows, n, k, num_m_tiles, num_n_tiles,
        MASKED=masked, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=SCALE_GROUP,
        GROUP_M=cfg.get("GROUP_M", 1), SWAP_AB=swap, K_UNROLL=unroll, N_LOOP=n_loop,
        FULL_KB=num_kb if n_loop > 1 else 1, USE_TMA=descs is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
