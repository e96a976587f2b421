"""DeepSeek-V3's `noaux_tc` router: sigmoid scores, a correction bias that steers *selection only*,
group-limited top-k, normalized weights times `routed_scaling_factor`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_backend._checks import check_tensor
from moe_backend.config import MoEConfig

__all__ = ["noaux_tc_route"]

_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def noaux_tc_route(
    hidden: torch.Tensor, gate_weight: torch.Tensor, correction_bias: torch.Tensor, config: MoEConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden `[T, H]`, gate_weight `[E, H]`, correction_bias `[E]` ->
    (topk_weights f32 `[T, k]`, topk_ids int32 `[T, k]`, global expert ids).

    Scores are computed in fp32 (the logits decide which experts run; bf16 would flip near-ties).
    """
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config: expected a MoEConfig, got {type(config).__name__}")
    # Shape, dtype and device only: no host sync on the decode path.
    check_tensor("hidden", hidden, dtypes=_FLOATS, ndim=2)
    check_tensor(
        "gate_weight",
        gate_weight,
        dtypes=_FLOATS,
        shape=(config.n_routed_experts, hidden.shape[1]),
        device=hidden.device,
    )
    check_tensor(
        "correction_bias", correction_bias, dtypes=_FLOATS, shape=(config.n_routed_experts,), device=hidden.device
    )
    num_tokens = hidden.shape[0]
    num_experts, n_group = config.n_routed_experts, config.n_group
    scores = torch.sigmoid(F.linear(hidden.float(), gate_weight.float()))  # [T, E]
    choice = scores + correction_bias.float()
    # A group's strength is the sum of its two best biased scores.
    # The group width is spelled out: `view(..., -1)` cannot infer it for an empty batch.
    group_scores = (
        choice.view(num_tokens, n_group, num_experts // n_group).topk(2, dim=-1).values.sum(-1)
    )  # [T, n_group]
    kept_groups = group_scores.topk(config.topk_group, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
    expert_mask = group_mask.repeat_interleave(num_experts // n_group, dim=1)
    # -inf, not 0: experts of dropped groups must never be picked, even when biased scores are < 0.
    topk_ids = (
        choice.masked_fill(~expert_mask, float("-inf")).topk(config.num_experts_per_tok, dim=-1, sorted=False).indices
    )
    topk_weights = scores.gather(1, topk_ids)
    if config.norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    topk_weights = topk_weights * config.routed_scaling_factor
    return topk_weights, topk_ids.to(torch.int32)
