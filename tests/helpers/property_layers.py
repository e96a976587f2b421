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


def layer_reference(layer: DeepseekV3MoE, x: torch.Tensor, activations: tuple | None = None) -> tuple:
    """The torch reference of `layer(x)` on the CPU: (fp32 `[T, H]`, the (token, expert) pairs it
    sums: the local routed slots plus one shared-expert pair per token). Routed on the bf16 x;
    `activations` (x_fp8, x_scale), when given, feed the experts instead of the reference's own
    quantization of x."""
    from moe_backend import reference
    from moe_backend.layers.router import noaux_tc_route

    cpu = {n: b.cpu() for n, b in layer.named_buffers()}
    x = x.cpu()
    tokens = x.shape[0]
    w, ids = noaux_tc_route(x, cpu["gate_weight"], cpu["e_score_correction_bias"], layer.config)
    local = (ids >= layer.expert_start) & (ids < layer.expert_stop)
    x_in, x_scale = (x, None) if activations is None else (t.cpu() for t in activations)
    names = ("w13_fp8", "w13_scale_inv", "w2_fp8", "w2_scale_inv")

    def experts(prefix: str, weights, slots) -> torch.Tensor:
        return reference.routed_experts(
            x_in,
            *(cpu[prefix + n] for n in names),
            weights,
            slots,
            x_scale=x_scale,
            ue8m0=layer.config.ue8m0_scales,
        ).float()

    ref = experts("", w, torch.where(local, ids.long() - layer.expert_start, -1))
    if layer.with_shared_experts:
        ref += experts("shared_", torch.ones(tokens, 1), torch.zeros(tokens, 1, dtype=torch.int64))
    return ref, int(local.sum()) + tokens * layer.with_shared_experts
