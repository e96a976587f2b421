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
each program walks work units u = pid, pid + S, pid + 2S, ... below the number of units U that
hold rows; S = P, unless P would leave the last of at most three rounds to a few units of many
K blocks: then S = cdiv(U, cdiv(U, P)), the same rounds, every share equal (`_walk`).
Masked: every program loads `masked_m` (one [E] vector, no host round trip) and takes an
inclusive prefix sum of the per-expert unit counts cdiv(masked_m[e], BLOCK_M) * n_tiles in
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
per call; BLOCK_M is compile-time in Triton): a hot expert is then covered by more m-tiles of the
same weight tile, read from L2, not re-streamed per tile. A config with NARROW_M compiles two tile
heights into the one kernel and picks per unit, on the device: an m-tile holding at most
NARROW_M rows runs NARROW_M wide, the others BLOCK_M wide.

Numerics (docs/design.md): fp32 accumulation, and each 128-wide K block's partial product is
multiplied by `a_scale[m, kb] * b_scale[n // 128, kb]` before it is added (the per-128-K scale
promotion), so BLOCK_K is fixed at the scale group, 128.

Code: the kernel and its walk in `_grouped_gemm_kernel`, one unit's tile in `_grouped_gemm_tile`;
this module holds the host side (launch, TMA descriptors, persistent-grid occupancy).
"""

from __future__ import annotations

import torch
import triton

from moe_backend.constants import QUANT_BLOCK

# The device functions stay importable from here (tests and tools name them by this module).
from moe_backend.kernels._dependent_launch import launch_options
from moe_backend.kernels._grouped_gemm_kernel import _contiguous_unit, _fp8_grouped_gemm_kernel  # noqa: F401
from moe_backend.kernels._grouped_gemm_tile import _gemm_tile, _scaled_product  # noqa: F401
from moe_backend.kernels._launch_utils import interpreting, resident_programs

SCALE_GROUP = QUANT_BLOCK  # one A scale per token and one B scale per block, per 128-wide K step


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


_resident: dict = {}


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
    a_rows=None,
    splits_out=None,
    silu_a: bool = False,
    a_splits: int = 0,
    a_count=None,
    ue8m0: bool = False,
) -> None:
    """Launches the kernel with a validated config (`_gemm_config.check_config`). Options that do
    not apply to this K (K_UNROLL not dividing K/128, N_LOOP with K > 256) or device (TMA where
    the tensors do not allow it) fall back safely. `num_rows` (contiguous only): int32 [1] on the
    device, the rows of A in use; the walk stops there. `a_rows` (contiguous only): int64 `[rows]`,
    the row of `a_fp8` each layout row reads (-1 = padding), so A need not be permuted first; A
    is then loaded row by row (no TMA).

    cfg["SPLIT_K"] > 1 (contiguous only; K/128 divisible by it): K is cut into slices computed
    by separate units, `out` is f32 `[SPLIT_K, rows, N]`, slab s holding slice s's partial sums,
    unrounded; rows not stored are left as they were. With `num_rows` the slices used follow the
    tiles holding rows (read on the device): the fewest powers of two up to SPLIT_K giving at least
    cfg["SPLIT_MIN_UNITS"] units; without it, SPLIT_K. The count is written to `splits_out` (int32
    `[1]` on the device, required): the consumer adds that many slabs in order and rounds to bf16
    (`silu_mul_quant` / `unpermute_combine` with `partials=True, num_partials=splits_out`).

    silu_a (contiguous only): `a_fp8` is GEMM1's output h, bf16 `[rows, 2K]` (a_splits 0) or f32
    `[a_splits, rows, 2K]` partial sums of which `a_count` (int32 `[1]`, required) are in use, and
    the kernel computes A = quant(SiLU(gate) * up) per K block itself (`ue8m0`: power-of-two
    scales), bit-identical to `silu_mul_quant` followed by this GEMM; `a_scale` is unused. Pointer
    loads only (TMA off); each unit recomputes its rows inside its K loop: an option for few rows
    and a short K (the plan's `silu_in_gemm2`)."""
    n, k = b_fp8.shape[1], b_fp8.shape[2]
    num_kb = k // SCALE_GROUP
    split = cfg.get("SPLIT_K", 1)
    if split > 1 and (masked or num_kb % split):
        raise ValueError(f"config: SPLIT_K={split} needs the contiguous layout and K/128 ({num_kb}) divisible by it")
    if split > 1 and splits_out is None:
        raise ValueError("splits_out: a GEMM split over K (SPLIT_K > 1) writes its slice count there; got None")
    unroll = cfg.get("K_UNROLL", 1)
    while (num_kb // split) % unroll:
        unroll //= 2
    if silu_a and (masked or a_rows is not None):
        raise ValueError("silu_a: GEMM2 computes its A from h on the contiguous layout only, not gathered")
    if silu_a and a_splits and a_count is None:
        raise ValueError("a_count: h given as partial sums (a_splits > 0) needs their device-side count")
    narrow = cfg.get("NARROW_M", 0)
    if narrow and not masked:
        raise ValueError(f"config: NARROW_M={narrow} applies to the masked layout only")
    n_loop = cfg.get("N_LOOP", 1)
    swap = bool(cfg.get("SWAP_AB", False))
    if num_kb > 2 or swap or split > 1:
        n_loop = 1
    gather = a_rows is not None and not masked
    descs = None
    if cfg.get("TMA", False) and n_loop == 1 and not gather and not silu_a:
        descs = _tma_descriptors(a_fp8, b_fp8, cfg["BLOCK_M"], cfg["BLOCK_N"])
    a_desc, b_desc = descs or (None, None)
    num_m_tiles = triton.cdiv(rows, cfg["BLOCK_M"])
    num_n_tiles = triton.cdiv(triton.cdiv(n, cfg["BLOCK_N"]), n_loop)
    # The most units the layout can hold (its shapes' bound): no more programs than that.
    bound = (num_experts if masked else 1) * num_m_tiles * num_n_tiles * split
    if bound == 0:
        return
    index = masked_m if masked else expert_ids  # the unused pointer arguments get the used one
    row_bound = num_rows is not None and not masked
    args = (
        a_fp8,
        a_rows if gather else index,
        a_scale,
        b_fp8,
        b_scale,
        out,
        index,
        index,
        num_rows if row_bound else index,
        splits_out if split > 1 else index,
        a_count if silu_a and a_splits else index,
        a_desc,
        b_desc,
        rows,
        n,
        k,
        num_m_tiles,
        num_n_tiles,
        num_experts,
        cfg.get("SPLIT_MIN_UNITS", 0),
        rows * 2 * k if silu_a else 0,
    )
    # The expert count only shapes the masked walk (one compiled contiguous kernel for every E).
    e_pad = max(16, triton.next_power_of_2(num_experts)) if masked else 16
    meta = dict(
        MASKED=masked,
        ROW_BOUND=row_bound,
        E_PAD=e_pad,
        NARROW_M=narrow,
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
        GATHER_A=gather,
        SPLIT_K=split,
        SILU_A=silu_a,
        A_SPLITS=a_splits if silu_a else 0,
        UE8M0=ue8m0 and silu_a,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **launch_options(),
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
