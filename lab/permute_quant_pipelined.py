"""A candidate for the shipped fused permute + quant (`moe_backend/kernels/permute_quant.py`): the
same row loop and cut (one layout row x 8 groups per step), with padding rows masked rather than
branched over and the loop software-pipelined (`tl.range(num_stages=...)`), so the next rows'
`src_token` and bf16 loads are in flight while this row is quantized. The shipped loop branches on
each row (`if src >= 0`), which keeps a row's chain of dependent loads (src, then x) unpipelined; at
EP8 prefill almost every row below the device-side count holds a token, so masking the few padding
rows costs little. `lab/sweep_permute_quant.py` times it beside the shipped kernel.

Same rounding (`quantize_groups`): every stage count must give the shipped kernel's bytes on the
rows holding a token, and padding rows are neither read nor written (masked).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_backend.kernels._group_quant_core import GROUPS_PER_PROGRAM, quantize_groups
from moe_backend.kernels._launch_utils import persistent_row_programs


@triton.jit(do_not_specialize=["num_rows"])
def _permute_quant_pipelined_kernel(
    x_ptr,  # [T, H] bf16
    src_ptr,  # int64 [R]: the token each layout row copies, -1 = padding
    q_ptr,  # fp8 [R, H]
    s_ptr,  # f32 [R, H / GROUP]
    used_rows_ptr,  # int32 [1]: rows at and past it are padding
    H,
    num_groups,
    num_rows,
    UE8M0: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr,
    STAGES: tl.constexpr,
):
    end = tl.load(used_rows_ptr).to(tl.int64)
    end = tl.where(end < num_rows, end, num_rows)
    g = tl.program_id(1) * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
    g_ok = g < num_groups
    offs = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [GPP, GROUP]
    for row in tl.range(tl.program_id(0).to(tl.int64), end, tl.num_programs(0), num_stages=STAGES):
        src = tl.load(src_ptr + row)
        holds = (g * 0 + src) >= 0  # a vector mask (scalar masks trip the interpreter)
        ok = g_ok & holds
        x = tl.load(x_ptr + src * H + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        q, scale = quantize_groups(x, UE8M0)
        tl.store(q_ptr + row * H + offs, q.to(q_ptr.dtype.element_ty), mask=ok[:, None])
        tl.store(s_ptr + row * num_groups + g, scale, mask=ok)


def permute_quant_pipelined(x, src_token, used_rows, out, stages: int, ue8m0: bool = False):
    """`permute_quant(x, src_token, 128, ue8m0, out=out, used_rows=used_rows)` (operands as checked
    there; src_token one-dimensional) with the row loop pipelined over `stages`."""
    q, s = out
    num_rows, hidden = src_token.numel(), x.shape[1]
    num_groups = hidden // 128
    group_blocks = triton.cdiv(num_groups, GROUPS_PER_PROGRAM)
    programs = persistent_row_programs(x.device, num_rows, group_blocks)
    _permute_quant_pipelined_kernel[(programs, group_blocks)](
        x,
        src_token,
        q,
        s,
        used_rows,
        hidden,
        num_groups,
        num_rows,
        UE8M0=ue8m0,
        GROUP=128,
        GROUPS_PER_PROG=GROUPS_PER_PROGRAM,
        STAGES=stages,
        num_warps=4,
    )
    return q, s
