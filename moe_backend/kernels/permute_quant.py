"""Per-token-group FP8 quantization fused with the permute into a layout's rows.

Unfused, bf16 activations take two passes: quantize `[T, H]` (write fp8 + scales), then gather
the fp8 rows into the layout (read them back, write again). Here each layout row reads its source
token's bf16 row and writes its fp8 row and scales directly: no `[T, H]` intermediate. Rounding is
`_group_quant_core.quantize_groups`, so the result is bit-identical to `per_token_group_quant`
followed by `moe_backend.reference.permute` on every row that copies a token. Padding rows
(src_token -1) are neither read nor written: their program returns at once. Given `used_rows` (a
device-side count, e.g. a contiguous layout's `expert_offsets[-1:]`: on the static row bound the
rows past it are all padding), a fixed number of programs loop over the rows below it instead, so
the all-padding tail costs nothing, not even a program per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_backend._checks import check_quant_out
from moe_backend.constants import QUANT_BLOCK
from moe_backend.kernels._dependent_launch import launch_options, wait_for_producer
from moe_backend.kernels._group_quant_core import GROUPS_PER_PROGRAM, quantize_groups
from moe_backend.kernels._launch_utils import check_kernel_tensor, check_used_rows, persistent_row_programs
from moe_backend.quant import FP8_DTYPE

__all__ = ["permute_quant"]


@triton.jit
def _permute_quant_row(
    x_ptr,
    src_ptr,
    q_ptr,
    s_ptr,
    row,
    H,
    num_groups,
    UE8M0: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr,
):
    src = tl.load(src_ptr + row)
    if src >= 0:
        g = tl.program_id(1) * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
        g_ok = g < num_groups
        offs = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [GPP, GROUP]
        x = tl.load(x_ptr + src * H + offs, mask=g_ok[:, None], other=0.0).to(tl.float32)
        q, scale = quantize_groups(x, UE8M0)
        tl.store(q_ptr + row * H + offs, q.to(q_ptr.dtype.element_ty), mask=g_ok[:, None])
        tl.store(s_ptr + row * num_groups + g, scale, mask=g_ok)


@triton.jit(do_not_specialize=["num_rows"])
def _permute_quant_kernel(
    x_ptr,  # [T, H] bf16/fp16/fp32
    src_ptr,  # int64 [R]: the token each output row copies, -1 = padding (skipped)
    q_ptr,  # fp8 [R, H]
    s_ptr,  # f32 [R, H / GROUP]
    used_rows_ptr,  # USED_ROWS: int32 [1], rows at and past it are padding
    H,
    num_groups,
    num_rows,
    UE8M0: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr,
    USED_ROWS: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_producer(PDL)
    if USED_ROWS:
        end = tl.load(used_rows_ptr).to(tl.int64)
        end = tl.where(end < num_rows, end, num_rows)
        for row in range(tl.program_id(0).to(tl.int64), end, tl.num_programs(0)):
            _permute_quant_row(x_ptr, src_ptr, q_ptr, s_ptr, row, H, num_groups, UE8M0, GROUP, GROUPS_PER_PROG)
    else:
        _permute_quant_row(
            x_ptr, src_ptr, q_ptr, s_ptr, tl.program_id(0).to(tl.int64), H, num_groups, UE8M0, GROUP, GROUPS_PER_PROG
        )


def permute_quant(
    x: torch.Tensor,
    src_token: torch.Tensor,
    group: int = QUANT_BLOCK,
    ue8m0: bool = False,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    used_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[T, H]` bf16/fp16/fp32 (H % group == 0), src_token int64 of any shape S (values in
    `[0, T)` or -1 for padding, not checked: no host sync) -> (a_fp8 `[*S, H]`, a_scale f32
    `[*S, H/group]`), allocated or the pair `out`.

    `a_fp8[i], a_scale[i] = per_token_group_quant(x[src_token[i]])` where src_token[i] >= 0;
    padding rows are not written (their contents are unspecified, `torch.empty`'s or out's).
    used_rows: optional int32 `[1]` on the device; flat rows at and past `used_rows[0]` must be
    padding and are not even visited (module docstring).
    """
    check_kernel_tensor("x", x, dtypes=(torch.bfloat16, torch.float16, torch.float32), ndim=2)
    check_kernel_tensor("src_token", src_token, x.device, dtypes=(torch.int64,))
    if group not in (32, 64, 128, 256):
        raise ValueError(f"group: expected one of 32, 64, 128, 256, got {group}")
    num_tokens, hidden = x.shape
    if hidden % group:
        raise ValueError(f"x: last dim ({hidden}) must be a multiple of the group size {group}")
    num_rows, num_groups = src_token.numel(), hidden // group
    if out is None:
        a_fp8 = torch.empty((*src_token.shape, hidden), dtype=FP8_DTYPE, device=x.device)
        a_scale = torch.empty((*src_token.shape, num_groups), dtype=torch.float32, device=x.device)
    else:
        check_quant_out(out, (*src_token.shape, hidden), (*src_token.shape, num_groups), x.device)
        a_fp8, a_scale = out
        check_kernel_tensor("out[0]", a_fp8, x.device)
        check_kernel_tensor("out[1]", a_scale, x.device)
    if used_rows is not None:
        check_used_rows(used_rows, x.device)
    if num_tokens == 0 or num_rows == 0 or num_groups == 0:  # no tokens: every row is padding
        return a_fp8, a_scale
    group_blocks = triton.cdiv(num_groups, GROUPS_PER_PROGRAM)
    row_programs = num_rows if used_rows is None else persistent_row_programs(x.device, num_rows, group_blocks)
    _permute_quant_kernel[(row_programs, group_blocks)](
        x,
        src_token,
        a_fp8,
        a_scale,
        used_rows if used_rows is not None else src_token,
        hidden,
        num_groups,
        num_rows,
        UE8M0=ue8m0,
        GROUP=group,
        GROUPS_PER_PROG=GROUPS_PER_PROGRAM,
        USED_ROWS=used_rows is not None,
        num_warps=4,
        **launch_options(),
    )
    return a_fp8, a_scale
