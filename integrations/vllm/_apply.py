"""The math behind the vLLM experts classes, free of vLLM: what `apply` runs in each activation
format, on vLLM's tensors. Kept apart so that the GPU tests can run it (CUDA-graph capture
included) on a machine without vLLM.
"""

from __future__ import annotations

import torch

from moe_backend import experts as moe_experts
from moe_backend.ab import shadow as ab_shadow
from moe_backend.dispatch import Policy

__all__ = ["apply_standard", "apply_batched", "capturing"]


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def apply_standard(output: torch.Tensor, x_fp8: torch.Tensor, x_scale: torch.Tensor,
                   w13_fp8: torch.Tensor, w13_scale_inv: torch.Tensor, w2_fp8: torch.Tensor,
                   w2_scale_inv: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   expert_map: torch.Tensor | None, weights_on_input: bool,
                   policy: Policy) -> None:
    """Standard format. x_fp8 `[M, H]` with x_scale f32 `[M, H/128]`; topk_weights / topk_ids
    (global ids) `[M, k]`; expert_map `[E_global]` global -> local (-1 elsewhere) or None.
    Writes the weighted sum over this rank's experts into output bf16 `[M, H]`."""
    local_ids = topk_ids
    if expert_map is not None:
        # -1 (another rank's expert, or an id vLLM already dropped) contributes nothing.
        mapped = expert_map.index_select(0, topk_ids.reshape(-1).clamp_min(0).long())
        local_ids = torch.where(topk_ids >= 0, mapped.view_as(topk_ids), -1)
    weights = topk_weights.float()
    if weights_on_input:
        # vLLM's prepare step already scaled the input by the (top-1) weight.
        weights = torch.ones_like(weights)
    # Under CUDA-graph capture (vLLM's decode batches) the policy must pick a shape-static
    # kernel; otherwise it decides the phase from the token count.
    phase = "decode" if capturing() else None
    y = moe_experts.routed_experts(x_fp8, w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, weights,
                                   local_ids, x_scale=x_scale.contiguous(), policy=policy,
                                   phase=phase)
    ab_shadow.observe_routed(y, x_fp8, (w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv), weights, local_ids, x_scale=x_scale, phase=phase)
    output.copy_(y)


def apply_batched(output: torch.Tensor, x_fp8: torch.Tensor, x_scale: torch.Tensor,
                  w13_fp8: torch.Tensor, w13_scale_inv: torch.Tensor, w2_fp8: torch.Tensor,
                  w2_scale_inv: torch.Tensor, expert_num_tokens: torch.Tensor,
                  workspace: torch.Tensor, expected_m: int | None = None) -> None:
    """Batched (masked) format. x_fp8 `[E, T, H]` with x_scale f32 `[E, T, H/128]`;
    expert_num_tokens int32 on the device, at least E entries (the first E are this rank's);
    workspace: at least E*T*2I bf16 elements for GEMM1's output. Writes the unweighted rows
    output bf16 `[E, T, H]`, rows m < expert_num_tokens[e] only. No host sync, sizes from shapes;
    expected_m (typical rows per expert, a host int) only steers the kernels' tile choice."""
    # DeepEP LL sizes the counts by local experts, vLLM's naive batched prepare by global
    # experts (local ones first): a view of the first E either way.
    masked_m = expert_num_tokens[:x_fp8.shape[0]]
    moe_experts.masked_experts(x_fp8, x_scale.contiguous(), w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv,
                               masked_m, out=output, workspace=workspace, impl="best",
                               expected_m=expected_m)
    ab_shadow.observe_masked(output, x_fp8, x_scale, (w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv), masked_m, expected_m=expected_m)
