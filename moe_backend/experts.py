"""The routed experts, policy-driven: layout -> quant+permute -> GEMM1 -> SiLU*up+quant -> GEMM2 -> combine.

Same signature and function as `moe_backend.reference.routed_experts`; the policy picks the layout
and the kernel provider per batch (prefill: contiguous; decode: masked or the Triton kernel on a
shape-static contiguous layout). On CPU the same pipeline runs on the reference GEMMs, so the
layout and combine code is exercised by the CPU tests too.
"""

from __future__ import annotations

import torch

from moe_backend import ops
from moe_backend._checks import (check_bool, check_finite_rows, check_int, check_same_device, check_tensor,
                                 finite_checks_enabled)
from moe_backend.dispatch.layouts import (ContiguousLayout, MaskedLayout, build_contiguous_layout,
                                         build_masked_layout, permute)
from moe_backend.dispatch.policy import PHASES, KernelChoice, Policy
from moe_backend.reference import GROUP, check_activations, check_grouped_gemm_weights

__all__ = ["routed_experts", "masked_experts"]


def masked_experts(a_fp8: torch.Tensor, a_scale: torch.Tensor, w13_fp8: torch.Tensor,
                   w13_scale_inv: torch.Tensor, w2_fp8: torch.Tensor, w2_scale_inv: torch.Tensor,
                   masked_m: torch.Tensor, *, out: torch.Tensor | None = None,
                   workspace: torch.Tensor | None = None, impl: str = "auto", ue8m0: bool = False,
                   expected_m: int | None = None) -> torch.Tensor:
    """The expert MLP on the masked layout (DeepEP low-latency / vLLM batched format).

    a_fp8 `[E, max_m, H]` + a_scale `[E, max_m, H/128]`, masked_m int32 `[E]` on the device.
    Writes the unweighted rows `out[e, m]` for m < masked_m[e] (bf16 `[E, max_m, H]`); other rows
    are untouched. workspace: optional bf16 buffer of >= E*max_m*2I elements for GEMM1's output.
    Shape-static and sync-free: CUDA-graph capturable.
    """
    check_tensor("a_fp8", a_fp8, ndim=3)
    check_tensor("masked_m", masked_m, dtypes=(torch.int32, torch.int64), shape=(a_fp8.shape[0],),
                 device=a_fp8.device)
    if workspace is not None:
        check_tensor("workspace", workspace, dtypes=(torch.bfloat16,), device=a_fp8.device)
        if workspace.numel() < a_fp8.shape[0] * a_fp8.shape[1] * w13_fp8.shape[1]:
            raise ValueError(f"workspace: expected >= {a_fp8.shape[0] * a_fp8.shape[1] * w13_fp8.shape[1]} "
                             f"elements (E * max_m * 2I), got {workspace.numel()}")
    check_bool("ue8m0", ue8m0)
    num_experts, max_m, _ = a_fp8.shape
    h = None
    if workspace is not None:
        h = workspace.reshape(-1)[:num_experts * max_m * w13_fp8.shape[1]].view(num_experts, max_m, -1)
    h = ops.grouped_gemm_masked(a_fp8, a_scale, w13_fp8, w13_scale_inv, masked_m, h, impl=impl,
                                expected_m=expected_m)
    # Rows past masked_m[e] hold stale data; they are quantized but never read back.
    act_fp8, act_scale = ops.silu_mul_quant(h, GROUP, ue8m0)
    return ops.grouped_gemm_masked(act_fp8, act_scale, w2_fp8, w2_scale_inv, masked_m, out, impl=impl,
                                   expected_m=expected_m)


def _layout_activations(x: torch.Tensor, x_scale: torch.Tensor | None, layout: ContiguousLayout | MaskedLayout,
                        ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GEMM1's operand in the layout's rows. bf16 x with few layout rows per token is quantized
    straight into them (one pass, no `[T, H]` fp8 intermediate); otherwise x is quantized once and
    its fp8 rows gathered. Pre-quantized x (the layer's, shared with the shared expert) is gathered
    with its scales."""
    if x_scale is None:
        if fused_permute_quant_pays(x.shape[0], layout.src_token.numel()):
            return ops.permute_quant(x, layout.src_token, GROUP, ue8m0)
        x, x_scale = ops.per_token_group_quant(x, GROUP, ue8m0)
    return permute(x, layout), permute(x_scale, layout)


def fused_permute_quant_pays(num_tokens: int, layout_rows: int) -> bool:
    """Bytes per hidden element: fused reads bf16 per layout row and writes fp8 (3R); unfused
    quantizes the tokens (2T read + T write) and gathers fp8 rows (R read + R write): fused moves
    less while R < 3T. Measured on H100 (docs/benchmarks.md): EP8 at 2048-16384 tokens (R <= 2T)
    1.24-1.67x faster fused; TP8 (R ~ 9-250 T: 256 experts, segments padded to 128) and EP8 at
    128 tokens (R = 32T) 0.53-0.88x, so those keep the two passes."""
    return layout_rows < 3 * num_tokens


def routed_experts(x: torch.Tensor, w13_fp8: torch.Tensor, w13_scale_inv: torch.Tensor,
                   w2_fp8: torch.Tensor, w2_scale_inv: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, *, x_scale: torch.Tensor | None = None,
                   expert_start: int = 0, ue8m0: bool = False, policy: Policy | None = None,
                   phase: str | None = None, kernel: KernelChoice | None = None,
                   expected_m: int | None = None) -> torch.Tensor:
    """x bf16 `[T, H]` (or fp8 with `x_scale` `[T, H/128]`); w13 fp8 `[E, 2I, H]`, w2 fp8 `[E, H, I]`
    with block scales; topk_weights f32 / topk_ids `[T, k]` where experts
    `[expert_start, expert_start + E)` are local and other ids (-1, other ranks) contribute nothing.
    Returns bf16 `[T, H]`, the weighted sum over local experts (fp32 accumulation).
    `expected_m`: typical rows per local expert (T*k / global experts), a tile-choice hint only."""
    check_int("expert_start", expert_start, minimum=0)
    check_bool("ue8m0", ue8m0)
    check_int("expected_m", expected_m, minimum=1, optional=True)
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"policy: expected a Policy or None, got {type(policy).__name__}")
    if kernel is not None and not isinstance(kernel, KernelChoice):
        raise TypeError(f"kernel: expected a KernelChoice or None, got {type(kernel).__name__}")
    if phase is not None and phase not in PHASES:
        raise ValueError(f"phase: expected one of {PHASES} or None, got {phase!r}")
    if x_scale is None:
        check_tensor("x", x, dtypes=(torch.bfloat16, torch.float16, torch.float32), ndim=2)
        if x.shape[-1] % GROUP:
            raise ValueError(f"x: hidden size ({x.shape[-1]}) must be a multiple of {GROUP}")
    else:
        check_activations(x, x_scale, ndim=2)
    num_tokens, hidden = x.shape
    num_experts, two_i = check_grouped_gemm_weights(w13_fp8, w13_scale_inv, hidden)
    check_grouped_gemm_weights(w2_fp8, w2_scale_inv, two_i // 2)
    check_tensor("topk_ids", topk_ids, dtypes=(torch.int32, torch.int64), ndim=2)
    if topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids: expected {num_tokens} rows (tokens), got {topk_ids.shape[0]}")
    check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=tuple(topk_ids.shape))
    check_same_device(x=x, w13_fp8=w13_fp8, w2_fp8=w2_fp8, topk_ids=topk_ids, topk_weights=topk_weights)
    if x_scale is None and finite_checks_enabled(x):  # CPU, or MOE_BACKEND_CHECK_FINITE=1 (a host sync)
        check_finite_rows("x", x)
    if num_tokens == 0:
        return torch.zeros(0, hidden, dtype=torch.bfloat16, device=x.device)

    if kernel is None:
        kernel = (policy or Policy.from_env()).choose(num_tokens, phase)
    impl = kernel.impl

    if expected_m is None:
        expected_m = max(1, -(-num_tokens * topk_ids.shape[1] // num_experts))
    if kernel.layout == "masked":
        layout = build_masked_layout(topk_ids, num_experts, expert_start=expert_start)
        a_fp8, a_scale = _layout_activations(x, x_scale, layout, ue8m0)
        y = masked_experts(a_fp8, a_scale, w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, layout.masked_m,
                           impl=impl, ue8m0=ue8m0, expected_m=expected_m)
    else:
        alignment = ops.contiguous_alignment(impl, x.device)
        layout = build_contiguous_layout(topk_ids, num_experts, expert_start=expert_start,
                                         alignment=alignment, exact_size=not kernel.static_shapes)
        a_fp8, a_scale = _layout_activations(x, x_scale, layout, ue8m0)
        ids = layout.expert_ids
        h = ops.grouped_gemm_contiguous(a_fp8, a_scale, w13_fp8, w13_scale_inv, ids, impl=impl,
                                        expected_m=expected_m)
        act_fp8, act_scale = ops.silu_mul_quant(h, GROUP, ue8m0)
        y = ops.grouped_gemm_contiguous(act_fp8, act_scale, w2_fp8, w2_scale_inv, ids, impl=impl,
                                        expected_m=expected_m)
    return ops.unpermute_combine(y, layout.row_of_slot, topk_weights)
