"""The FP8 grouped GEMM kernel shared by both layouts (contiguous and masked).

One Triton kernel, two row->expert maps (a constexpr switch), so the two public ops cannot drift:
- contiguous: A `[M, K]`, tile rows map to one expert through `expert_ids` (segments are padded
  to `CONTIGUOUS_ALIGNMENT`, a multiple of BLOCK_M, so a tile never straddles two experts);
- masked: A `[E, max_m, K]`, expert e owns its first `masked_m[e]` rows.

Work walk (why a persistent grid): a tile-per-program grid must be sized from shapes alone (no
host sync, CUDA-graph capture), i.e. from `max_m`, so under a masked layout sized for the worst
case (max_m 1024, 256 experts) it launches hundreds of thousands of programs that find no rows
and exit: the cost followed max_m, not the rows present. Here the grid is a fixed number of
programs (the SM count times the programs one SM holds for this config, from the compiled
kernel's registers and shared memory; fewer when the layout's bound has fewer work units), and
each program walks work units u = pid, pid + P, pid + 2P, ... below the number of units that
hold rows. Masked: every program loads `masked_m` (one [E] vector, no host round trip) and takes
an inclusive prefix sum of the per-expert unit counts cdiv(masked_m[e], BLOCK_M) * n_tiles in
registers; unit u belongs to the first expert whose prefix end exceeds u, found by one max-
reduction over the E prefix ends (ends and expert indices packed in one integer key, as both
grow with the index; int32 unless the layout's unit count needs int64). Doing it in every program
costs one 1-4 KB L2 read and a scan of a few hundred elements; a separate prefix-sum kernel would
add a launch and a dependency to every call.
Contiguous: units are the layout's m-tiles x n-tiles (GROUP_M ordering); when the caller gives
the device-side row count in use (`num_rows`), the walk stops there, so the tail of a layout
sized for the worst case costs nothing; without it (prefill) the grid is one program per tile,
no loop: the hardware's block scheduler balances the large tiles.

Unit order (masked): an expert's units are n-tile-major, m-tile-minor. The m-tiles of one n-tile
are consecutive units, i.e. run at the same time on neighbouring programs, so a hot expert's
weight tile comes from HBM once and its other m-tiles read it from L2; at few rows per expert
(one m-tile) consecutive units are consecutive n-tiles, spread over all SMs: the weights stream
at full bandwidth (decode). Tile sizes stay those picked from `expected_m` (one compiled kernel
per call; BLOCK_M is compile-time in Triton, so a tile per expert would mean a kernel per tile
size): a hot expert is then covered by more m-tiles of the same weight tile, read from L2, not
re-streamed per tile.

Numerics (docs/design.md): fp32 accumulation, and each 128-wide K block's partial product is
multiplied by `a_scale[m, kb] * b_scale[n // 128, kb]` before it is added (the per-128-K scale
promotion), so BLOCK_K is fixed at the scale group, 128.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from moe_backend.constants import QUANT_BLOCK
from moe_backend.kernels._launch_utils import interpreting
from moe_backend.kernels._numerics import round_to_bf16_grid

SCALE_GROUP = QUANT_BLOCK  # one A scale per token and one B scale per block, per 128-wide K step


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
def _gemm_tile(
    a_ptr,
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
):
    """One work unit: rows `offs_m` (BLOCK_M of them, `row_ok` marks the ones stored) of the
    pointers' layout times expert `expert`'s n-tile `pid_n` (N_LOOP > 1: n-tiles
    pid_n * N_LOOP ... + N_LOOP - 1)."""
    num_kb = K // BLOCK_K
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
                    acc += _scaled_product(
                        tl.load(a_ptrs + u * BLOCK_K),
                        tl.load(b_ptrs + u * BLOCK_K),
                        tl.load(as_ptrs + kb + u),
                        tl.load(bs_ptrs + kb + u),
                        SWAP_AB,
                        BLOCK_N <= 128,
                        False,
                    )
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


@triton.jit
def _contiguous_unit(
    a_ptr,
    a_scale_ptr,
    b_ptr,
    b_scale_ptr,
    c_ptr,
    expert_ids_ptr,
    a_desc,
    b_desc,
    u,
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
):
    """Contiguous layout, unit u of m_tiles x num_n_tiles. Grouped ordering: GROUP_M m-tiles sweep
    the n-tiles together (A and B reuse in L2). A tile of padding only (ids -1) stores nothing."""
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
            a_scale_ptr,
            b_ptr,
            b_scale_ptr,
            c_ptr,
            a_desc,
            b_desc,
            expert,
            offs_m,
            ids == expert,
            pid_m * BLOCK_M,
            pid_n,
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
        )


# Row counts stay runtime values (one compiled kernel per config serves every batch size).
@triton.jit(do_not_specialize=["M", "num_m_tiles", "num_n_tiles", "num_experts"])
def _fp8_grouped_gemm_kernel(
    a_ptr,  # fp8 [M, K] (contiguous) | [E, max_m, K] (masked)
    a_scale_ptr,  # f32 [M, K/128] | [E, max_m, K/128]
    b_ptr,  # fp8 [E, N, K]
    b_scale_ptr,  # f32 [E, ceil(N/128), K/128]
    c_ptr,  # bf16 [M, N] | [E, max_m, N]
    expert_ids_ptr,  # int32 [M] (contiguous only)
    masked_m_ptr,  # int32 [E] (masked only)
    num_rows_ptr,  # int32 [1]: rows of the contiguous layout in use (ROW_BOUND only)
    a_desc,  # TMA descriptor over A as [rows, K], box [BLOCK_M, 128] (USE_TMA only, else None)
    b_desc,  # TMA descriptor over B as [E * N, K], box [BLOCK_N, 128] (USE_TMA only, else None)
    M,  # rows of one expert's A (masked: max_m) or of all of A (contiguous)
    N,
    K,
    num_m_tiles,  # contiguous: m-tiles of A (masked: unused)
    num_n_tiles,  # n-units per expert (n-tiles / N_LOOP)
    num_experts,
    MASKED: tl.constexpr,
    ROW_BOUND: tl.constexpr,  # contiguous: walk only the tiles below *num_rows_ptr
    E_PAD: tl.constexpr,  # masked: a power of two >= num_experts (the prefix-sum vector's length)
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
):
    pid = tl.program_id(0)
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
        for u in range(pid, total, num_programs):
            found = tl.max(tl.where(unit_end <= u, key, 0), 0)
            expert = (found % E_PAD).to(tl.int32)
            local = u - (found // E_PAD).to(tl.int32)
            valid_m = tl.minimum(tl.maximum(tl.load(masked_m_ptr + expert), 0), M)
            expert_m_tiles = tl.cdiv(valid_m, BLOCK_M)
            # n-tile-major, m-tile-minor: a weight tile's m-tiles run side by side (L2 reuse).
            pid_n = local // expert_m_tiles
            pid_m = local % expert_m_tiles
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            # First row of the tile in A viewed as [E * max_m, K] (the TMA path's coordinate).
            tile_row0 = expert * M + pid_m * BLOCK_M
            base = expert.to(tl.int64) * M
            _gemm_tile(
                a_ptr + base * K,
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
            )
    elif ROW_BOUND:
        used_m_tiles = tl.cdiv(tl.minimum(tl.maximum(tl.load(num_rows_ptr), 0), M), BLOCK_M)
        for u in range(pid, used_m_tiles * num_n_tiles, num_programs):
            _contiguous_unit(
                a_ptr,
                a_scale_ptr,
                b_ptr,
                b_scale_ptr,
                c_ptr,
                expert_ids_ptr,
                a_desc,
                b_desc,
                u,
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
            )
    else:
        # One program per tile (the grid covers every tile): no loop.
        _contiguous_unit(
            a_ptr,
            a_scale_ptr,
            b_ptr,
            b_scale_ptr,
            c_ptr,
            expert_ids_ptr,
            a_desc,
            b_desc,
            pid,
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
        )


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
    return (
        TensorDescriptor.from_tensor(a_fp8.view(-1, k), [block_m, SCALE_GROUP]),
        TensorDescriptor.from_tensor(b_fp8.view(-1, k), [block_n, SCALE_GROUP]),
    )


# Interpreter runs (CPU tests) have no SMs: a few programs, so that each walks several units.
_INTERPRETER_PROGRAMS = 3


@lru_cache(maxsize=None)
def _sm_limits(device_index: int) -> tuple:
    """(SMs, registers per SM, shared-memory bytes per SM, threads per SM) of a CUDA device."""
    p = torch.cuda.get_device_properties(device_index)
    return (
        p.multi_processor_count,
        getattr(p, "regs_per_multiprocessor", 65536),
        getattr(p, "shared_memory_per_multiprocessor", 228 * 1024),
        getattr(p, "max_threads_per_multi_processor", 2048),
    )


_resident: dict = {}


def resident_programs(compiled, num_warps: int, device_index: int) -> int:
    """Programs the whole GPU holds at once for a compiled kernel: SMs x per-SM occupancy, limited
    by registers (allocated per warp in units of 256), shared memory (1 KB reserved per block)
    and threads (the same bound the CUDA occupancy calculator applies)."""
    sms, regs, smem, threads = _sm_limits(device_index)
    compiled._init_handles()
    regs_per_warp = -(-max(compiled.n_regs, 1) * 32 // 256) * 256
    by_regs = regs // (regs_per_warp * num_warps)
    by_smem = smem // (compiled.metadata.shared + 1024) if compiled.metadata.shared else 32
    by_threads = threads // (32 * num_warps)
    return sms * max(1, min(by_regs, by_smem, by_threads, 32))


def launch(
    a_fp8,
    a_scale,
    b_fp8,
    b_scale,
    out,
    expert_ids,
    masked_m,
    *,
    masked: bool,
    rows: int,
    num_experts: int,
    cfg: dict,
    num_rows=None,
) -> None:
    """Launches the kernel with a validated config (`_gemm_config.check_config`). Options that do
    not apply to this K (K_UNROLL not dividing K/128, N_LOOP with K > 256) or device (TMA where
    the tensors do not allow it) fall back safely. `num_rows` (contiguous only): int32 [1] on the
    device, the rows of A in use; the walk stops there."""
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
    # The most units the layout can hold (its shapes' bound): no more programs than that.
    bound = (num_experts if masked else 1) * num_m_tiles * num_n_tiles
    if bound == 0:
        return
    index = masked_m if masked else expert_ids  # the unused pointer arguments get the used one
    row_bound = num_rows is not None and not masked
    args = (
        a_fp8,
        a_scale,
        b_fp8,
        b_scale,
        out,
        index,
        index,
        num_rows if row_bound else index,
        a_desc,
        b_desc,
        rows,
        n,
        k,
        num_m_tiles,
        num_n_tiles,
        num_experts,
    )
    # The expert count only shapes the masked walk (one compiled contiguous kernel for every E).
    e_pad = max(16, triton.next_power_of_2(num_experts)) if masked else 16
    meta = dict(
        MASKED=masked,
        ROW_BOUND=row_bound,
        E_PAD=e_pad,
        WIDE_KEY=masked and (bound + 1) * e_pad >= 2**31,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=SCALE_GROUP,
        GROUP_M=cfg.get("GROUP_M", 1),
        SWAP_AB=swap,
        K_UNROLL=unroll,
        N_LOOP=n_loop,
        FULL_KB=num_kb if n_loop > 1 else 1,
        USE_TMA=descs is not None,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    programs = cfg.get("PROGRAMS", 0)
    if not (masked or row_bound):
        programs = bound  # contiguous without a row count: one program per tile (prefill), no walk
    elif programs <= 0 and interpreting():
        programs = _INTERPRETER_PROGRAMS
    elif programs <= 0:
        dev = a_fp8.device.index if a_fp8.device.index is not None else torch.cuda.current_device()
        # Occupancy depends on the compiled kernel only (its constexprs and specialization).
        key = (
            dev,
            tuple(sorted(meta.items())),
            n % 16 == 0,
            k % 16 == 0,
            tuple(t.data_ptr() % 16 == 0 for t in (a_fp8, a_scale, b_fp8, b_scale, out)),
        )
        if key not in _resident:
            compiled = _fp8_grouped_gemm_kernel.warmup(*args, grid=(1,), **meta)
            _resident[key] = resident_programs(compiled, cfg["num_warps"], dev)
        programs = _resident[key]
    _fp8_grouped_gemm_kernel[(min(programs, bound),)](*args, **meta)
