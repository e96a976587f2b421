"""Un-permute + top-k weighted combine as a gather: `out[t] = sum_j w[t, j] * y[row_of_slot[t, j]]`.

Deterministic (a fixed j order, no atomics), fp32 sum, one bf16 rounding; rows of -1 (expert not
local) contribute nothing, and their y rows are never read (they may hold NaN). Works for both
layouts: y `[M, N]` (contiguous) or `[E, max_m, N]` (masked, flat row e*max_m + r). y may also be
a K-split GEMM2's fp32 partial sums `[S, M, N]` (the first `num_partials` of them, when the GEMM
chose the count on the device): a row's slabs are added in order and rounded to bf16 (the
unsplit GEMM's output) before it is weighted. With `skip_single` a token with exactly one local
slot is neither read nor written: GEMM2 stored its row into `out` itself (`kernels/direct_rows.py`).
Its torch twin: `moe_backend.reference.unpermute_combine` (after `reference.sum_partials`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_backend.kernels._dependent_launch import launch_options, wait_for_producer
from moe_backend.kernels._group_quant_core import partial_count
from moe_backend.kernels._launch_utils import check_kernel_tensor
from moe_backend.kernels._numerics import round_to_bf16_grid

__all__ = ["unpermute_combine"]

# One token and 1024 columns per program, 2 warps: the fastest cut at EP8 prefill and close to
# the best elsewhere (docs/benchmarks.md, "Un-permute + combine: program cuts").
BLOCK_N = 1024
NUM_WARPS = 2


@triton.jit
def _combine_kernel(
    y_ptr,
    rows_ptr,
    w_ptr,
    out_ptr,
    count_ptr,  # COUNT_ON_DEVICE: int32 [1], the partial-sum slabs to add (<= SPLITS)
    N,
    slab,
    TOPK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    COUNT_ON_DEVICE: tl.constexpr,
    BRANCH: tl.constexpr,
    SKIP_SINGLE: tl.constexpr,
    TOPK_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_producer(PDL)
    if COUNT_ON_DEVICE:
        count = partial_count(count_ptr, SPLITS)
    else:
        count = SPLITS
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    if SKIP_SINGLE:  # a token with one local slot: its row is GEMM2's to store (all loads masked off)
        slots = tl.arange(0, TOPK_PAD)
        local = tl.load(rows_ptr + t * TOPK + slots, mask=slots < TOPK, other=-1) >= 0
        ok = ok & ((offs * 0 + tl.sum(local.to(tl.int32), axis=0)) != 1)  # a vector mask, as below
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        r = tl.load(rows_ptr + t * TOPK + j).to(tl.int64)
        if BRANCH:
            # Most slots not local (EP): a branch skips each absent one outright, where a masked
            # load would still cost its address and predicate work.
            if r >= 0:
                w = tl.load(w_ptr + t * TOPK + j)
                y_offs = r * N + offs  # int64
                v = tl.load(y_ptr + y_offs, mask=ok, other=0.0).to(tl.float32)
                if SPLITS > 0:  # partial sums: the slabs added, then the bf16 the unsplit GEMM stores
                    for _ in range(1, count):
                        y_offs += slab
                        v += tl.load(y_ptr + y_offs, mask=ok, other=0.0)
                    v = round_to_bf16_grid(v)
                acc += w * v
        else:
            # Most slots local (TP): masked loads, free of branches, so every slot's row load is
            # issued before the first sum waits on one. (The two forms are spelled out apart: each
            # compiles to the kernel timed in docs/benchmarks.md.)
            # An absent slot's weight is not read into the sum: 0 * a NaN weight would still be NaN.
            w = tl.where(r >= 0, tl.load(w_ptr + t * TOPK + j), 0.0)
            row_ok = (offs * 0 + r) >= 0  # a vector mask (scalar masks trip the interpreter)
            y_offs = r * N + offs  # int64
            v = tl.load(y_ptr + y_offs, mask=ok & row_ok, other=0.0).to(tl.float32)
            if SPLITS > 0:  # partial sums: the slabs added, then the bf16 the unsplit GEMM stores
                for _ in range(1, count):
                    y_offs += slab
                    v += tl.load(y_ptr + y_offs, mask=ok & row_ok, other=0.0)
                v = round_to_bf16_grid(v)
            acc += w * v
    tl.store(out_ptr + t * N + offs, round_to_bf16_grid(acc).to(out_ptr.dtype.element_ty), mask=ok)


def unpermute_combine(
    y: torch.Tensor,
    row_of_slot: torch.Tensor,
    topk_weights: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    partials: bool = False,
    num_partials: torch.Tensor | None = None,
    branch_on_slots: bool = False,
    skip_single: bool = False,
) -> torch.Tensor:
    """y bf16 `[M, N]` or `[E, max_m, N]`; row_of_slot int32/int64 `[T, k]` (flat row of y holding
    token t's j-th expert, -1 = none); topk_weights f32 `[T, k]`; out bf16 `[T, N]`.
    partials: y is f32 `[S, M, N]`, S partial sums of a GEMM split over K (module docstring), of
    which only the first `num_partials[0]` hold slices when that int32 `[1]` is given.
    branch_on_slots: skip each absent slot (-1) by a branch instead of masking its row load: faster
    where most slots are absent (expert parallel), slower where most are present (the plan's
    `combine_branch`). Same result either way. skip_single: tokens with exactly one local slot keep
    what `out` holds (GEMM2 stored their rows there: `kernels/direct_rows.py`); needs `out`."""
    splits = 0
    if partials:
        check_kernel_tensor("y", y, dtypes=(torch.float32,), ndim=3)
        splits = y.shape[0]
        if splits < 1:
            raise ValueError("y: expected at least one partial-sum slab")
        if num_partials is not None:
            check_kernel_tensor("num_partials", num_partials, y.device, dtypes=(torch.int32,), shape=(1,))
    elif num_partials is not None:
        raise ValueError("num_partials: given without partials=True")
    else:
        check_kernel_tensor("y", y, dtypes=(torch.bfloat16,), min_dim=2)
    dev = y.device
    check_kernel_tensor("row_of_slot", row_of_slot, dev, dtypes=(torch.int32, torch.int64), ndim=2)
    num_tokens, topk = row_of_slot.shape
    check_kernel_tensor("topk_weights", topk_weights, dev, dtypes=(torch.float32,), shape=(num_tokens, topk))
    n = y.shape[-1]
    if skip_single and out is None:
        raise ValueError("out: skip_single leaves single-slot tokens' rows to the caller's output; pass it")
    if out is None:
        out = torch.empty((num_tokens, n), dtype=torch.bfloat16, device=dev)
    else:
        check_kernel_tensor("out", out, dev, dtypes=(torch.bfloat16,), shape=(num_tokens, n))
    if num_tokens == 0 or n == 0:
        return out
    if topk == 0:
        return out.zero_()
    grid = (num_tokens, triton.cdiv(n, BLOCK_N))
    slab = y[0].numel() if partials else 0
    counted = num_partials is not None
    _combine_kernel[grid](
        y,
        row_of_slot,
        topk_weights,
        out,
        num_partials if counted else row_of_slot,
        n,
        slab,
        TOPK=topk,
        BLOCK_N=BLOCK_N,
        SPLITS=splits,
        COUNT_ON_DEVICE=counted,
        BRANCH=branch_on_slots,
        SKIP_SINGLE=skip_single,
        TOPK_PAD=triton.next_power_of_2(topk),
        num_warps=NUM_WARPS,
        **launch_options(),
    )
    return out
