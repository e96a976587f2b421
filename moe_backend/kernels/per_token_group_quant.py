"""Per-token-group FP8 quantization (1x128 groups): the activations' quantizer before GEMM1."""

from __future__ import annotations

import torch

from moe_backend._checks import check_quant_out
from moe_backend.constants import QUANT_BLOCK
from moe_backend.kernels import _group_quant_core
from moe_backend.kernels._launch_utils import check_kernel_tensor
from moe_backend.quant import FP8_DTYPE

__all__ = ["per_token_group_quant"]


def per_token_group_quant(
    x: torch.Tensor,
    group: int = QUANT_BLOCK,
    ue8m0: bool = False,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[..., K]` bf16/fp16/fp32 (K % group == 0) -> (x_fp8 `[..., K]`, x_scale f32 `[..., K/group]`),
    allocated or the pair `out` (e.g. allocated on one stream, written on another).

    Same numerics as `moe_backend.quant.quantize_fp8_per_token_group`.
    """
    check_kernel_tensor("x", x, dtypes=(torch.bfloat16, torch.float16, torch.float32), min_dim=1)
    if group not in (32, 64, 128, 256):
        raise ValueError(f"group: expected one of 32, 64, 128, 256, got {group}")
    k = x.shape[-1]
    if k % group:
        raise ValueError(f"x: last dim ({k}) must be a multiple of the group size {group}")
    s_shape = (*x.shape[:-1], k // group)
    if out is None:
        x_fp8 = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
        x_scale = torch.empty(s_shape, dtype=torch.float32, device=x.device)
    else:
        check_quant_out(out, tuple(x.shape), s_shape, x.device)
        x_fp8, x_scale = out
        check_kernel_tensor("out[0]", x_fp8, x.device)
        check_kernel_tensor("out[1]", x_scale, x.device)
    _group_quant_core.launch(
        x.reshape(-1, k),
        x_fp8.view(-1, k),
        x_scale.view(-1, k // group),
        cols=k,
        silu_mul=False,
        ue8m0=ue8m0,
        group=group,
    )
    return x_fp8, x_scale
