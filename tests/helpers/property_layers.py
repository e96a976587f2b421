"""The small DeepSeek-V3-shaped layers of the layer property (hidden and intermediate 128, 8 or 16
experts, EP slices), built one way for `tests/test_properties.py` and the GPU history test."""

from __future__ import annotations

import torch

from moe_backend import MoEConfig
from moe_backend.layers import DeepseekV3MoE
from moe_backend.testing import random_moe_weights


def property_layer(num_experts: int, slices: int, rank: int, ue8m0: bool, device: torch.device | str) -> DeepseekV3MoE:
    """Rank `rank` of `slices` EP slices (the shared expert on rank 0), weights seeded by the expert count."""
    config = MoEConfig(
        hidden_size=128,
        moe_intermediate_size=128,
        n_routed_experts=num_experts,
        num_experts_per_tok=min(4, num_experts // 2),
        n_group=num_experts // 4 or 1,
        topk_group=max(1, num_experts // 8),
        ue8m0_scales=ue8m0,
    )
    local = num_experts // slices
    experts = range(rank * local, (rank + 1) * local)
    shared = rank == 0
    layer = DeepseekV3MoE(config, expert_range=(experts.start, experts.stop), with_shared_experts=shared, device=device)
    layer.load_weights(random_moe_weights(config, seed=num_experts, experts=experts, with_shared_experts=shared))
    return layer
