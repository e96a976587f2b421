"""The math behind the vLLM experts classes, free of vLLM: what `apply` runs in each activation
format, on vLLM's tensors. Kept apart so that the GPU tests can run it (CUDA-graph capture
included) on a machine without vLLM.
"""

from __future__ import annotations

import torch

from moe_backend import experts as moe_experts
from moe_backend._checks import check_bool, check_int, check_tensor
from moe_backend.ab import shadow_hooks
from moe_backend.dispatch import Policy
from moe_backend.quant import FP8_DTYPE

__all__ = ["apply_standard", "apply_batched", "capturing"]


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def apply_standard(
    output: torch.Tensor,
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w13_fp8: torch.Tensor,
    w13_scale_inv: torch.Tensor,
    w2_fp8: torch.Tensor,
    w2_scale_inv: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None,
    weights_on_input: bool,
    policy: Policy,
    num_global_experts: int | None = None,
) -> None:
    """Standard format. x_fp8 `[M, H]` with x_scale f32 `[M, H/128]` (or bf16 tokens and
    x_scale None: quantized here, as the reference does); topk_weights / topk_ids
    (global ids) `[M, k]`; expert_map `[E_global]` global -> local (-1 elsewhere) or None.
    Writes the weighted sum over this rank's experts into output bf16 `[M, H]`; the policy's
    plan for this batch runs it (no host sync: CUDA-graph capturable)."""
    # The engine boundary: metadata checks only (no host sync), so a wrong tensor from the engine
    # is named here instead of failing inside a kernel.
    if x_scale is None:  # unquantized tokens (CPU: experts.expects_unquantized_inputs)
        check_tensor("hidden_states", x_fp8, dtypes=(torch.bfloat16, torch.float16, torch.float32), ndim=2)
    else:
        check_tensor("hidden_states", x_fp8, dtypes=(FP8_DTYPE,), ndim=2)
        check_tensor("a1q_scale", x_scale, dtypes=(torch.float32,), device=x_fp8.device)
    check_tensor("output", output, dtypes=(torch.bfloat16,), shape=tuple(x_fp8.shape), device=x_fp8.device)
    check_tensor("topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), ndim=2, device=x_fp8.device)
    check_tensor("topk_weights", topk_weights, shape=tuple(topk_ids.shape), device=x_fp8.device)
    if expert_map is not None:
        check_tensor("expert_map", expert_map, dtypes=(torch.int32, torch.int64), ndim=1, device=x_fp8.device)
    check_bool("apply_router_weight_on_input", weights_on_input)
    if not isinstance(policy, Policy):
        raise TypeError(f"policy: expected a moe_backend Policy, got {type(policy).__name__}")
    local_ids = topk_ids
    if expert_map is not None:
        # -1 (another rank's expert, or an id vLLM already dropped) contributes nothing.
        mapped = expert_map.index_select(0, topk_ids.reshape(-1).clamp_min(0).long())
        local_ids = torch.where(topk_ids >= 0, mapped.view_as(topk_ids), -1)
    weights = topk_weights.float()
    if weights_on_input:
        # vLLM's prepare step already scaled the input by the (top-1) weight.
        weights = torch.ones_like(weights)
    # vLLM captures decode batches in CUDA graphs; otherwise the policy decides the phase from
    # the token count.
    phase = "decode" if capturing() else None
    y = moe_experts.routed_experts(
        x_fp8,
        w13_fp8,
        w13_scale_inv,
        w2_fp8,
        w2_scale_inv,
        weights,
        local_ids,
        x_scale=None if x_scale is None else x_scale.contiguous(),
        policy=policy,
        phase=phase,
        num_global_experts=num_global_experts,
        out=output,
    )
    shadow_hooks.observe_routed(
        y,
        x_fp8,
        (w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv),
        weights,
        local_ids,
        x_scale=x_scale,
        phase=phase,
        num_global_experts=num_global_experts,
    )


def apply_batched(
    output: torch.Tensor,
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w13_fp8: torch.Tensor,
    w13_scale_inv: torch.Tensor,
    w2_fp8: torch.Tensor,
    w2_scale_inv: torch.Tensor,
    expert_num_tokens: torch.Tensor,
    workspace: torch.Tensor,
    expected_m: int | None = None,
    policy: Policy | None = None,
) -> None:
    """Batched (masked) format. x_fp8 `[E, T, H]` with x_scale f32 `[E, T, H/128]`;
    expert_num_tokens int32 on the device, at least E entries (the first E are this rank's);
    workspace: at least E*T*2I bf16 elements for GEMM1's output. Writes the unweighted rows
    output bf16 `[E, T, H]`, rows m < expert_num_tokens[e] only. No host sync, sizes from shapes;
    expected_m (typical rows per expert, a host int) only steers the kernels' tile choice; the
    policy's `masked_kernel` serves it."""
    check_tensor("hidden_states", x_fp8, dtypes=(FP8_DTYPE,), ndim=3)
    check_tensor("a1q_scale", x_scale, dtypes=(torch.float32,), ndim=3, device=x_fp8.device)
    check_tensor("output", output, dtypes=(torch.bfloat16,), shape=tuple(x_fp8.shape), device=x_fp8.device)
    check_tensor("expert_num_tokens", expert_num_tokens, dtypes=(torch.int32, torch.int64), ndim=1, device=x_fp8.device)
    if expert_num_tokens.shape[0] < x_fp8.shape[0]:
        raise ValueError(
            f"expert_num_tokens: expected >= {x_fp8.shape[0]} entries (one per local "
            f"expert), got {expert_num_tokens.shape[0]}"
        )
    check_tensor("workspace13", workspace, dtypes=(torch.bfloat16,), device=x_fp8.device)
    check_int("expected_m", expected_m, minimum=1, optional=True)
    # DeepEP LL sizes the counts by local experts, vLLM's naive batched prepare by global
    # experts (local ones first): a view of the first E either way.
    masked_m = expert_num_tokens[: x_fp8.shape[0]]
    moe_experts.masked_experts(
        x_fp8,
        x_scale.contiguous(),
        w13_fp8,
        w13_scale_inv,
        w2_fp8,
        w2_scale_inv,
        masked_m,
        out=output,
        workspace=workspace,
        policy=policy,
        expected_m=expected_m,
    )
    shadow_hooks.observe_masked(
        output, x_fp8, x_scale, (w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv), masked_m, expected_m=expected_m
    )
