"""FROZEN copy of the un-permute + combine kernel of moe_backend/kernels/unpermute_combine.py before
it branched on each slot (commit bbf110e): every slot's row is a masked load, also where the slot's
expert is not local. Kept only so lab/sweep_combine.py can time it beside the shipped kernel in the
same run; not imported by the package. bf16 rows only (no K-split partial sums), no PDL.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_backend.kernels._numerics import round_to_bf16_grid

BLOCK_N = 1024
NUM_WARPS = 2


@triton.jit
def _combine_masked_kernel(y_ptr, rows_ptr, w_ptr, out_ptr, N, TOPK: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        r = tl.load(rows_ptr + t * TOPK + j).to(tl.int64)
        w = tl.load(w_ptr + t * TOPK + j)
        row_ok = (offs * 0 + r) >= 0
        v = tl.load(y_ptr + r * N + offs, mask=ok & row_ok, other=0.0).to(tl.float32)
        acc += w * v
    tl.store(out_ptr + t * N + offs, round_to_bf16_grid(acc).to(out_ptr.dtype.element_ty), mask=ok)


def launch(y, row_of_slot, topk_weights, out):
    """out <- the combine of bf16 y `[M, N]` (operands as `unpermute_combine` checks them)."""
    num_tokens, topk = row_of_slot.shape
    n = y.shape[-1]
    grid = (num_tokens, triton.cdiv(n, BLOCK_N))
    _combine_masked_kernel[grid](y, row_of_slot, topk_weights, out, n, TOPK=topk, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    return out
