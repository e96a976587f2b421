"""Weights whose 128x128 block scales lie far apart, for the CUDA GEMM's scale-band checks
(tests/cuda): a column promoted with a neighbouring block's scale is then off by 2x or more."""

from __future__ import annotations

import torch


def block_spread_weights(num_experts: int, n: int, k: int) -> torch.Tensor:
    """f32 `[num_experts, n, k]` on the GPU: N(0, 0.05^2) values, each 128-row N block of each
    expert scaled by a power of two from 1/8 to 8 (neighbouring blocks 4x or 32x apart)."""
    block = torch.arange(n, device="cuda") // 128
    spread = 2.0 ** ((block * 5 + torch.arange(num_experts, device="cuda")[:, None]) % 7 - 3)
    return torch.randn(num_experts, n, k, device="cuda") * 0.05 * spread[..., None]
