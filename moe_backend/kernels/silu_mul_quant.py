"""SiLU(gate) * up, then per-token-group FP8 quantization: the GEMM1 -> GEMM2 hand-off in one pass."""

from __future__ import annotations

import torch

from moe_backend.kernels import _group_quant_core
from moe_backend.kernels._launch_utils import check_kernel_tensor
from moe_backend.quant import FP8_DTYPE

__all__ = ["silu_mul_quant"]


def silu_mul_quant(h: torch.Tensor, group: int = 128, ue8m0: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """h `[..., 2I]` (gate columns, then up; I % group == 0) -> (a_fp8 `[..., I]`, a_scale f32
    `[..., I/group]`), `a = silu(gate) * up` computed in fp32 (as `moe_backend.reference`)."""
    check_kernel_tensor("h", h, dtypes=(torch.bfloat16, torch.float16, torch.float32), min_dim=1)
    if group not in (32, 64, 128, 256):
        raise ValueError(f"group: expected one of 32, 64, 128, 256, got {group}")
    two_i = h.shape[-1]
    if two_i % (2 * group):
        raise ValueError(f"h: last dim ({two_i}) must be 2*I with I a multiple of {group}")
    i = two_i // 2
    a_fp8 = torch.empty((*h.shape[:-1], i), dtype=FP8_DTYPE, device=h.device)
    a_scale = torch.empty((*h.shape[:-1], i // group), dtype=torch.float32, device=h.device)
    _group_quant_core.launch(h.reshape(-1, two_i), a_fp8.view(-1, i), a_scale.view(-1, i // group),
                             cols=i, silu_mul=True, ue8m0=ue8m0, group=group)
    return a_fp8, a_scale
