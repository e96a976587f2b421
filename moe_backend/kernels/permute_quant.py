"""Per-token-group FP8 quantization fused with the permute into a layout's rows.

Unfused, bf16 activations take two passes: quantize `[T, H]` (write fp8 + scales), then gather
the fp8 rows into the layout (read them back, write again). Here each layout row reads its source
token's bf16 row and writes its fp8 row and scales directly: no `[T, H]` intermediate. Rounding is
`_group_quant_core.quantize_groups`, so the result is bit-identical to `per_token_group_quant`
followed by `moe_backend.dispatch.layouts.permute` on every row that copies a token. Padding rows
(src_token -1) are neither read nor written: their program returns at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_backend.kernels._group_quant_core import GROUPS_PER_PROGRAM, quantize_groups
from moe_backend._checks import check_quant_out
from moe_backend.kernels._launch_utils import check_kernel_tensor
from moe_backend.quant import FP8_DTYPE

__all__ = ["permute_quant"]


@triton.jit
def _permute_quant_kernel(
    x_ptr,  # [T, H] bf16/fp16/fp32
    src_ptr,  # int64 [R]: the token each output row copies, -1 = padding (skipped)
    q_ptr,  # fp8 [R, H]
    s_ptr,  # f32 [R, H / GROUP]
    H,
    num_groups,
    UE8M0: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS_PER_PROG: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    src = tl.load(src_ptr + row)
    if src >= 0:
        g = tl.program_id(1) * GROUPS_PER_PROG + tl.arange(0, GROUPS_PER_PROG)
        g_ok = g < num_groups
        offs = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [GPP, GROUP]
        x = tl.load(x_ptr + src * H + offs, mask=g_ok[:, None], other=0.0).to(tl.float32)
        q, scale = quantize_groups(x, UE8M0)
        tl.store(q_ptr + row * H + offs, q.to(q_ptr.dtype.element_ty), mask=g_ok[:, None])
        tl.store(s_ptr + row * num_groups + g, scale, mask=g_ok)


def permute_quant(x: torch.Tensor, src_token: torch.Tensor, group: int = 128, ue8m0: bool = False, *,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[T, H]` bf16/fp16/fp32 (H % group == 0), src_token int64 of any shape S (values in
    `[0, T)` or -1 for padding, not checked: no host sync) -> (a_fp8 `[*S, H]`, a_scale f32
    `[*S, H/group]`), allocated or the pair `out`.

    `a_fp8[i], a_scale[i] = per_token_group_quant(x[src_token[i]])` where src_token[i] >= 0;
    padding rows are not written (their contents are unspecified, `torch.empty`'s or out's).
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
    if num_tokens == 0 or num_rows == 0 or num_groups == 0:  # no tokens: every row is padding
        return a_fp8, a_scale
    grid = (num_rows, triton.cdiv(num_groups, GROUPS_PER_PROGRAM))
    _permute_quant_kernel[grid](
        x, src_token, a_fp8, a_scale, hidden, num_groups,
        UE8M0=ue8m0, GROUP=group, GROUPS_PER_PROG=GROUPS_PER_PROGRAM, num_warps=4,
    )
    return a_fp8, a_scale
