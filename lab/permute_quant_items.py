"""A candidate for the shipped fused permute + quant (`moe_backend/kernels/permute_quant.py`): the
flat-item cut of `_group_quant_core` (a program quantizes `items` consecutive (layout row, group)
items per block and loops over the blocks below the device-side row count) with each item's x row
read through `src_token`. The shipped kernel takes one layout row and 8 groups per step of its
row loop, so a program has 2 KB in flight per chain of dependent loads (src, then the row); at EP8
prefill it runs at about half the copy bandwidth (docs/benchmarks.md, "Where the prefill layer's
time goes"), where x quant on flat items reaches about 3.2 TB/s. `lab/sweep_permute_quant.py` times
it beside the shipped kernel.

Same rounding (`quantize_groups`), so every cut must give the shipped kernel's bytes on the rows
holding a token; padding rows are neither read nor written.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_backend.kernels._group_quant_core import quantize_groups
from moe_backend.kernels._launch_utils import resident_grid


@triton.jit(do_not_specialize=["num_rows"])
def _permute_quant_items_kernel(
    x_ptr,  # [T, H] bf16/fp16/fp32, rows x_row_stride apart
    src_ptr,  # int64 [R]: the token each layout row copies, -1 = padding
    q_ptr,  # fp8 [R, H]
    s_ptr,  # f32 [R, H / GROUP]
    used_rows_ptr,  # int32 [1]: rows at and past it are padding
    x_row_stride,
    num_rows,
    NUM_GROUPS: tl.constexpr,
    UE8M0: tl.constexpr,
    GROUP: tl.constexpr,
    ITEMS: tl.constexpr,
):
    used = tl.load(used_rows_ptr)
    used = tl.where(used < num_rows, used, num_rows)
    end = tl.maximum(used, 0) * NUM_GROUPS
    cols = tl.arange(0, GROUP)[None, :]
    for block in range(tl.program_id(0), tl.cdiv(end, ITEMS), tl.num_programs(0)):
        f = block * ITEMS + tl.arange(0, ITEMS)
        row = f // NUM_GROUPS
        g = f - row * NUM_GROUPS
        src = tl.load(src_ptr + row, mask=f < end, other=-1)
        ok = (f < end) & (src >= 0)
        x_offs = src[:, None] * x_row_stride + (g * GROUP)[:, None] + cols  # [ITEMS, GROUP], int64
        x = tl.load(x_ptr + x_offs, mask=ok[:, None], other=0.0).to(tl.float32)
        q, scale = quantize_groups(x, UE8M0)
        q_offs = f.to(tl.int64)[:, None] * GROUP + cols
        tl.store(q_ptr + q_offs, q.to(q_ptr.dtype.element_ty), mask=ok[:, None])
        tl.store(s_ptr + f, scale, mask=ok)


def permute_quant_items(x, src_token, used_rows, out, items: int, num_warps: int, ue8m0: bool = False):
    """`permute_quant(x, src_token, 128, ue8m0, out=out, used_rows=used_rows)` (operands as
    checked there; src_token one-dimensional) on flat items, `items` per block."""
    q, s = out
    num_rows, hidden = src_token.numel(), x.shape[1]
    num_groups = hidden // 128
    args = (x, src_token, q, s, used_rows, x.stride(0), num_rows)
    meta = dict(NUM_GROUPS=num_groups, UE8M0=ue8m0, GROUP=128, ITEMS=items, num_warps=num_warps)
    blocks = triton.cdiv(num_rows * num_groups, items)
    programs = resident_grid(_permute_quant_items_kernel, args, meta, blocks, x.device)
    _permute_quant_items_kernel[(programs,)](*args, **meta)
    return q, s
