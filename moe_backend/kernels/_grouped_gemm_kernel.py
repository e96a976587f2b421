"""The FP8 grouped GEMM's Triton kernel: the persistent work walk over the contiguous or masked
layout (the walk and unit order: `_grouped_gemm_core`'s docstring); one unit's tile math is
`_grouped_gemm_tile._gemm_tile`. Launched by `_grouped_gemm_core.launch`."""

from __future__ import annotations

import triton
import triton.language as tl

from moe_backend.kernels._dependent_launch import wait_for_producer
from moe_backend.kernels._group_quant_core import partial_count
from moe_backend.kernels._grouped_gemm_tile import _gemm_tile


@triton.jit
def _contiguous_unit(
    a_ptr,
    a_rows_ptr,
    a_scale_ptr,
    b_ptr,
    b_scale_ptr,
    c_ptr,
    expert_ids_ptr,
    a_desc,
    b_desc,
    u,
    k_splits,
    act_count,
    act_slab,
    m_tiles,
    num_n_tiles,
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
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
    """Contiguous layout, unit u of m_tiles x num_n_tiles (x k_splits: the K slices of one tile are
    consecutive units). Grouped ordering: GROUP_M m-tiles sweep the n-tiles together (A and B reuse
    in L2). A tile of padding only (ids -1) stores nothing."""
    k_split = u % k_splits
    u = u // k_splits
    in_group = GROUP_M * num_n_tiles
    first_m = (u // in_group) * GROUP_M
    group_rows = tl.minimum(m_tiles - first_m, GROUP_M)
    pid_m = first_m + (u % in_group) % group_rows
    pid_n = (u % in_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(expert_ids_ptr + offs_m, mask=offs_m < M, other=-1)
    expert = tl.max(ids, axis=0)
    if expert >= 0:
        _gemm_tile(
            a_ptr,
            a_rows_ptr,
            a_scale_ptr,
            b_ptr,
            b_scale_ptr,
            c_ptr + k_split.to(tl.int64) * M * N,
            a_desc,
            b_desc,
            expert,
            offs_m,
            ids == expert,
            pid_m * BLOCK_M,
            pid_n,
            k_split,
            k_splits,
            act_count,
            act_slab,
            M,
            N,
            K,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            SWAP_AB,
            K_UNROLL,
            N_LOOP,
            FULL_KB,
            USE_TMA,
            GATHER_A,
            SPLIT_K,
            SILU_A,
            A_SPLITS,
            UE8M0,
        )


@triton.jit
def _masked_tile(
    a_ptr,
    a_scale_ptr,
    b_ptr,
    b_scale_ptr,
    c_ptr,
    a_desc,
    b_desc,
    expert,
    pid_m,
    pid_n,
    valid_m,
    M,
    N,
    K,
    TILE_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    K_UNROLL: tl.constexpr,
    N_LOOP: tl.constexpr,
    FULL_KB: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Masked layout: the first TILE_M (<= BLOCK_M) rows of expert `expert`'s m-tile `pid_m`
    (BLOCK_M rows apart) times its n-tile `pid_n`; rows at or past `valid_m` are not stored."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, TILE_M)
    # First row of the tile in A viewed as [E * max_m, K] (the TMA path's coordinate).
    tile_row0 = expert * M + pid_m * BLOCK_M
    base = expert.to(tl.int64) * M
    _gemm_tile(
        a_ptr + base * K,
        a_ptr,  # a_rows_ptr: unused (no gather)
        a_scale_ptr + base * (K // BLOCK_K),
        b_ptr,
        b_scale_ptr,
        c_ptr + base * N,
        a_desc,
        b_desc,
        expert,
        offs_m,
        offs_m < valid_m,
        tile_row0,
        pid_n,
        0,
        1,
        0,
        0,
        M,
        N,
        K,
        TILE_M,
        BLOCK_N,
        BLOCK_K,
        SWAP_AB,
        K_UNROLL,
        N_LOOP,
        FULL_KB,
        USE_TMA,
        False,
        1,
        False,
        0,
        False,
    )


# The walk evens out its last round (`_walk`) for units of at least this many K blocks, where the
# resident grid would take at most this many rounds and leave fewer programs than this to the last.
BALANCED_WALK_MIN_K_BLOCKS = tl.constexpr(8)
BALANCED_WALK_MAX_ROUNDS = tl.constexpr(3)
BALANCED_WALK_MAX_TAIL = tl.constexpr(64)


@triton.jit
def _walk(units, pid, num_programs, unit_k_blocks):
    """(end, stride) of program `pid`'s persistent walk over `units` units (read on the device):
    u = pid, pid + stride, ... below end; programs at or past the stride idle.

    The stride is the grid, unless it would leave a few long units to a last round that is a
    large part of the walk (fewer than BALANCED_WALK_MAX_TAIL programs, units of at least
    BALANCED_WALK_MIN_K_BLOCKS K blocks, at most BALANCED_WALK_MAX_ROUNDS rounds): each of those
    streams its weight tile alone at one SM's latency-bound rate, well below the memory
    bandwidth, while the rest of the GPU idles. Then the stride is the fewest programs that take
    no more units each than the grid would, so every share ends together. Elsewhere a balanced
    walk, with fewer programs and fewer loads in flight in every round, is slower: where the last
    round has more programs (together they stream near the bandwidth), where it is one of many
    rounds, and where units are short (GEMM2 at TP8, K = 256)."""
    rounds = tl.maximum(tl.cdiv(units, num_programs), 1)
    last_round = units - (rounds - 1) * num_programs
    balanced = (
        (unit_k_blocks >= BALANCED_WALK_MIN_K_BLOCKS)
        & (rounds <= BALANCED_WALK_MAX_ROUNDS)
        & (last_round < BALANCED_WALK_MAX_TAIL)
    )
    stride = tl.where(balanced, tl.maximum(tl.cdiv(units, rounds), 1), num_programs)
    return tl.where(pid < stride, units, 0), stride


# Row counts stay runtime values (one compiled kernel per config serves every batch size).
@triton.jit(do_not_specialize=["M", "num_m_tiles", "num_n_tiles", "num_experts", "split_min_units", "act_slab"])
def _fp8_grouped_gemm_kernel(
    a_ptr,  # fp8 [M, K] (contiguous) | [E, max_m, K] (masked); GATHER_A: [T, K]
    a_rows_ptr,  # int64 [M]: the row of A each layout row reads, -1 = padding (GATHER_A only)
    a_scale_ptr,  # f32 [M, K/128] | [E, max_m, K/128]; GATHER_A: [T, K/128]
    b_ptr,  # fp8 [E, N, K]
    b_scale_ptr,  # f32 [E, ceil(N/128), K/128]
    c_ptr,  # bf16 [M, N] | [E, max_m, N]; SPLIT_K > 1: f32 [SPLIT_K, M, N] partial sums
    expert_ids_ptr,  # int32 [M] (contiguous only)
    masked_m_ptr,  # int32 [E] (masked only)
    num_rows_ptr,  # int32 [1]: rows of the contiguous layout in use (ROW_BOUND only)
    splits_ptr,  # int32 [1] (SPLIT_K > 1): the K slices this launch cut, written for the consumer
    act_count_ptr,  # int32 [1] (SILU_A with A_SPLITS > 0): the partial-sum slabs of h in use
    a_desc,  # TMA descriptor over A as [rows, K], box [BLOCK_M, 128] (USE_TMA only, else None)
    b_desc,  # TMA descriptor over B as [E * N, K], box [BLOCK_N, 128] (USE_TMA only, else None)
    M,  # rows of one expert's A (masked: max_m) or of all of A (contiguous)
    N,
    K,
    num_m_tiles,  # contiguous: m-tiles of A (masked: unused)
    num_n_tiles,  # n-units per expert (n-tiles / N_LOOP)
    num_experts,
    split_min_units,  # SPLIT_K > 1 with ROW_BOUND: K slices double while units x slices < this
    act_slab,  # SILU_A with A_SPLITS > 0: elements between two partial-sum slabs of h
    MASKED: tl.constexpr,
    ROW_BOUND: tl.constexpr,  # contiguous: walk only the tiles below *num_rows_ptr
    E_PAD: tl.constexpr,  # masked: a power of two >= num_experts (the prefix-sum vector's length)
    NARROW_M: tl.constexpr,  # masked: m-tiles with at most this many rows run this wide (0: BLOCK_M always)
    WIDE_KEY: tl.constexpr,  # masked: units x E_PAD may pass 2^31 (int64 search keys; else int32, half the shuffles)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr,  # C^T = B A^T: N fills the MMA's M slot when rows are few
    K_UNROLL: tl.constexpr,  # 128-wide K blocks per K-loop iteration (1, 2 or 4)
    N_LOOP: tl.constexpr,  # n-tiles per program, looped (short-K mode; 1 = one tile, K loop)
    FULL_KB: tl.constexpr,  # K / 128 when N_LOOP > 1 (1 or 2)
    USE_TMA: tl.constexpr,  # A and B tiles through TMA (Hopper): async bulk copies, no address math
    GATHER_A: tl.constexpr,  # contiguous: A's rows read through a_rows_ptr (the permute folded in)
    SPLIT_K: tl.constexpr,  # contiguous: K cut into up to SPLIT_K slices, each its own unit (few-row decode)
    SILU_A: tl.constexpr,  # contiguous: A computed from GEMM1's output h (SiLU*up, quant), not loaded
    A_SPLITS: tl.constexpr,  # SILU_A: h as that many f32 partial-sum slabs (0: h bf16)
    UE8M0: tl.constexpr,  # SILU_A: power-of-two activation scales
    PDL: tl.constexpr,  # launched as a dependent of the kernel before it (`_dependent_launch`)
):
    wait_for_producer(PDL)
    pid = tl.program_id(0)
    act_count = 0
    if SILU_A and A_SPLITS > 0:
        act_count = partial_count(act_count_ptr, A_SPLITS)
    num_programs = tl.num_programs(0)
    if MASKED:
        experts = tl.arange(0, E_PAD)
        valid = tl.load(masked_m_ptr + experts, mask=experts < num_experts, other=0)
        # Counts outside [0, max_m] would address other experts' rows: clamped (no sync to check).
        valid = tl.minimum(tl.maximum(valid, 0), M)
        unit_end = tl.cumsum(tl.cdiv(valid, BLOCK_M) * num_n_tiles, 0)  # inclusive prefix ends
        total = tl.max(unit_end, 0)
        # Key: prefix end * E_PAD + index + 1. Ends never decrease with the index, so the largest
        # key at or below u names the last expert ending at or before u; the next one owns u.
        # (The index + 1 < E_PAD: an expert ending at or before a unit u < total is not the last.)
        if WIDE_KEY:
            key = unit_end.to(tl.int64) * E_PAD + experts + 1
        else:
            key = unit_end * E_PAD + experts + 1
        end, stride = _walk(total, pid, num_programs, K // BLOCK_K)
        for u in range(pid, end, stride):
            found = tl.max(tl.where(unit_end <= u, key, 0), 0)
            expert = (found % E_PAD).to(tl.int32)
            local = u - (found // E_PAD).to(tl.int32)
            valid_m = tl.minimum(tl.maximum(tl.load(masked_m_ptr + expert), 0), M)
            expert_m_tiles = tl.cdiv(valid_m, BLOCK_M)
            # n-tile-major, m-tile-minor: a weight tile's m-tiles run side by side (L2 reuse).
            pid_n = local // expert_m_tiles
            pid_m = local % expert_m_tiles
            if NARROW_M > 0:
                # An m-tile holding at most NARROW_M rows (every tile at the mean rows, a hot
                # expert's last) runs NARROW_M wide; the others cover BLOCK_M rows per pass over
                # the weight tile. (A static branch: Triton compiles both sides of a runtime `if`.)
                if valid_m - pid_m * BLOCK_M <= NARROW_M:
                    _masked_tile(
                        a_ptr,
                        a_scale_ptr,
                        b_ptr,
                        b_scale_ptr,
                        c_ptr,
                        a_desc,
                        b_desc,
                        expert,
                        pid_m,
                        pid_n,
                        valid_m,
                        M,
                        N,
                        K,
                        NARROW_M,
                        BLOCK_M,
                        BLOCK_N,
                        BLOCK_K,
                        SWAP_AB,
                        K_UNROLL,
                        N_LOOP,
                        FULL_KB,
                        USE_TMA,
                    )
                else:
                    _masked_tile(
                        a_ptr,
                        a_scale_ptr,
                        b_ptr,
                        b_scale_ptr,
                        c_ptr,
                        a_desc,
                        b_desc,
                        expert,
                        pid_m,
                        pid_n,
                        valid_m,
                        M,
                        N,
                        K,
                        BLOCK_M,
                        BLOCK_M,
                        BLOCK_N,
                        BLOCK_K,
                        SWAP_AB,
                        K_UNROLL,
                        N_LOOP,
                        FULL_KB,
                        USE_TMA,
                    )
            else:
                _masked_tile(
                    a_ptr,
                    a_scale_ptr,
                    b_ptr,
                    b_scale_ptr,
                    c_ptr,
                    a_desc,
                    b_desc,
                    expert,
                    pid_m,
                    pid_n,
                    valid_m,
                    M,
                    N,
                    K,
                    BLOCK_M,
                    BLOCK_M,
                    BLOCK_N,
                    BLOCK_K,
                    SWAP_AB,
                    K_UNROLL,
                    N_LOOP,
                    FULL_KB,
                    USE_TMA,
                )
    elif ROW_BOUND:
        used_m_tiles = tl.cdiv(tl.minimum(tl.maximum(tl.load(num_rows_ptr), 0), M), BLOCK_M)
        tiles = used_m_tiles * num_n_tiles
        # The slices follow the tiles that hold rows (read on the device): the fewest powers of two,
        # up to SPLIT_K, that give at least split_min_units units (<= 0: SPLIT_K).
        k_splits = tiles * 0 + 1
        if SPLIT_K > 1:
            for _ in tl.static_range(3):  # SPLIT_K <= 8
                short = (tiles * k_splits < split_min_units) | (split_min_units <= 0)
                k_splits = tl.where(short & (k_splits < SPLIT_K), k_splits * 2, k_splits)
            if pid == 0:
                tl.store(splits_ptr, k_splits)
        end, stride = _walk(tiles * k_splits, pid, num_programs, K // BLOCK_K // k_splits)
        for u in range(pid, end, stride):
            _contiguous_unit(
                a_ptr,
                a_rows_ptr,
                a_scale_ptr,
                b_ptr,
                b_scale_ptr,
                c_ptr,
                expert_ids_ptr,
                a_desc,
                b_desc,
                u,
                k_splits,
                act_count,
                act_slab,
                used_m_tiles,
                num_n_tiles,
                M,
                N,
                K,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                GROUP_M,
                SWAP_AB,
                K_UNROLL,
                N_LOOP,
                FULL_KB,
                USE_TMA,
                GATHER_A,
                SPLIT_K,
                SILU_A,
                A_SPLITS,
                UE8M0,
            )
    else:
        # One program per tile and K slice (the grid covers every one): no loop.
        if SPLIT_K > 1:
            if pid == 0:
                tl.store(splits_ptr, SPLIT_K)
        _contiguous_unit(
            a_ptr,
            a_rows_ptr,
            a_scale_ptr,
            b_ptr,
            b_scale_ptr,
            c_ptr,
            expert_ids_ptr,
            a_desc,
            b_desc,
            pid,
            SPLIT_K,
            act_count,
            act_slab,
            num_m_tiles,
            num_n_tiles,
            M,
            N,
            K,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            GROUP_M,
            SWAP_AB,
            K_UNROLL,
            N_LOOP,
            FULL_KB,
            USE_TMA,
            GATHER_A,
            SPLIT_K,
            SILU_A,
            A_SPLITS,
            UE8M0,
        )
