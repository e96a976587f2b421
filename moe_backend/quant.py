"""FP8 e4m3 quantization in plain torch: the numerics every kernel must reproduce.

Activations: one fp32 scale per token per 128 columns ("1x128 groups").
Weights: one fp32 scale per 128x128 block (`weight_scale_inv` in DeepSeek-V3 checkpoints).
All scales are multipliers (`x ~= x_fp8 * scale`); UE8M0 scales are powers of two, rounded up so
that `x / scale` never exceeds the fp8 range.
"""

from __future__ import annotations

import torch

from moe_backend._checks import check_bool, check_int, check_tensor
from moe_backend.constants import FP8_DTYPE, FP8_MAX, QUANT_BLOCK, SCALE_CEIL, SCALE_FLOOR

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "SCALE_CEIL",
    "quantize_fp8_per_token_group",
    "dequantize_fp8_per_token_group",
    "quantize_fp8_blockwise",
    "dequantize_fp8_blockwise",
]

_FLOAT_INPUTS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _scale_from_amax(amax: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    # Capping the scale, not pre-scaling the inputs: an out-of-range product saturates either way,
    # and every group below the cap (all ordinary inputs) keeps the exact same scale and values.
    # Divided by a tensor, not a Python number: on CUDA torch turns division by a CPU scalar into a
    # multiply by its reciprocal (an ulp off), and the kernels and the CPU divide exactly (IEEE).
    amax = amax.float().clamp_min(SCALE_FLOOR)
    scale = (amax / torch.full_like(amax, FP8_MAX)).clamp_max(SCALE_CEIL)
    if ue8m0:
        # Round up so the quantized values stay within +-448.
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def _to_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8_per_token_group(
    x: torch.Tensor, group: int = QUANT_BLOCK, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[..., K]` (K a multiple of `group`) -> (x_fp8 `[..., K]`, x_scale fp32 `[..., K/group]`)."""
    check_tensor("x", x, dtypes=_FLOAT_INPUTS, min_dim=1)
    check_int("group", group, minimum=1)
    check_bool("ue8m0", ue8m0)
    k = x.shape[-1]
    if k % group:
        raise ValueError(f"x: last dim ({k}) must be a multiple of the group size {group}")
    grouped = x.float().reshape(*x.shape[:-1], k // group, group)
    scale = _scale_from_amax(grouped.abs().amax(dim=-1), ue8m0)
    x_fp8 = _to_fp8(grouped / scale.unsqueeze(-1)).reshape(x.shape)
    return x_fp8, scale


def dequantize_fp8_per_token_group(
    x_fp8: torch.Tensor, x_scale: torch.Tensor, group: int = QUANT_BLOCK
) -> torch.Tensor:
    """Inverse of `quantize_fp8_per_token_group`, in fp32."""
    check_tensor("x_fp8", x_fp8, dtypes=(FP8_DTYPE,), min_dim=1)
    k = x_fp8.shape[-1]
    expected = (*x_fp8.shape[:-1], -(-k // group))
    if tuple(x_scale.shape) != expected:
        raise ValueError(f"x_scale: expected shape {list(expected)}, got {list(x_scale.shape)}")
    scale = x_scale.float().repeat_interleave(group, dim=-1)[..., :k]
    return x_fp8.float() * scale


def quantize_fp8_blockwise(
    w: torch.Tensor, block: int = QUANT_BLOCK, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """w `[..., N, K]` -> (w_fp8 `[..., N, K]`, w_scale_inv fp32 `[..., ceil(N/block), ceil(K/block)]`).

    N and K need not be multiples of `block`: edge blocks are scaled over the rows/columns they hold.
    """
    check_tensor("w", w, dtypes=_FLOAT_INPUTS, min_dim=2)
    check_int("block", block, minimum=1)
    check_bool("ue8m0", ue8m0)
    n, k = w.shape[-2:]
    nb, kb = -(-n // block), -(-k // block)
    wf = w.float()
    padded = torch.nn.functional.pad(wf, (0, kb * block - k, 0, nb * block - n))
    blocks = padded.reshape(*w.shape[:-2], nb, block, kb, block)
    scale = _scale_from_amax(blocks.abs().amax(dim=(-3, -1)), ue8m0)  # [..., nb, kb]
    w_fp8 = _to_fp8(wf / _expand_block_scale(scale, n, k, block))
    return w_fp8, scale


def dequantize_fp8_blockwise(w_fp8: torch.Tensor, w_scale_inv: torch.Tensor, block: int = QUANT_BLOCK) -> torch.Tensor:
    """Inverse of `quantize_fp8_blockwise`, in fp32."""
    check_tensor("w_fp8", w_fp8, dtypes=(FP8_DTYPE,), min_dim=2)
    n, k = w_fp8.shape[-2:]
    expected = (*w_fp8.shape[:-2], -(-n // block), -(-k // block))
    if tuple(w_scale_inv.shape) != expected:
        raise ValueError(f"w_scale_inv: expected shape {list(expected)}, got {list(w_scale_inv.shape)}")
    return w_fp8.float() * _expand_block_scale(w_scale_inv.float(), n, k, block)


def _expand_block_scale(scale: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    return scale.repeat_interleave(block, dim=-2)[..., :n, :].repeat_interleave(block, dim=-1)[..., :k]
