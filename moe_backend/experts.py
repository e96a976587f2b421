"""The routed experts: layout -> quant+permute -> GEMM1 -> SiLU*up+quant -> GEMM2 -> combine.

The public functions check their arguments once, take the batch's `Plan`
(`moe_backend.dispatch.plan`, cached per shape) and execute it; nothing here chooses a kernel.
Execution is sync-free with shapes from the plan alone, so a whole call (decode or prefill)
can be captured in a CUDA graph and replayed with new routing. Padding rows of a layout are
never zero-filled, gathered, quantized or combined: the layout marks them on the device and
every kernel skips them. On CPU the same pipeline runs on the reference GEMMs.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from moe_backend import ops
from moe_backend._checks import (
    check_activations,
    check_bool,
    check_expert_weights,
    check_finite_rows,
    check_int,
    check_same_device,
    check_tensor,
    check_token_activations,
    check_topk,
    finite_checks_enabled,
)
from moe_backend.constants import QUANT_BLOCK as GROUP
from moe_backend.dispatch.plan import GemmPlan, Plan, make_masked_plan, make_plan
from moe_backend.dispatch.policy import KERNELS, PHASES, KernelChoice, Policy
from moe_backend.env import ENV

__all__ = ["routed_experts", "masked_experts", "run_plan", "run_masked_plan", "recorded_plans"]

_plan_records: list[list[Plan]] = []  # open `recorded_plans` blocks
# MOE_BACKEND_PLAN_LOG=PATH: one line per executed plan appended to PATH, from every process
# (tests/e2e count the plans an engine's server ran while answering a request).
_PLAN_LOG = ENV.plan_log


@contextlib.contextmanager
def recorded_plans() -> Iterator[list[Plan]]:
    """Collects every plan executed inside the block (tests assert which plan an engine path ran)."""
    plans: list[Plan] = []
    _plan_records.append(plans)
    try:
        yield plans
    finally:
        _plan_records.remove(plans)


def _record(plan: Plan) -> None:
    for plans in _plan_records:
        plans.append(plan)
    if _PLAN_LOG is not None:
        # One short write in append mode: lines from several processes do not interleave.
        with open(_PLAN_LOG, "a") as f:
            f.write(f"{os.getpid()} {plan.phase} T={plan.num_tokens} {plan.kernel}\n")


# ---------------------------------------------------------------- execution (no checks, no choices)
def _gemm_contiguous(
    g: GemmPlan,
    a_fp8,
    a_scale,
    b_fp8,
    b_scale,
    expert_ids,
    out,
    num_experts: int,
    rows_in_use: torch.Tensor | None = None,
):
    """rows_in_use: int32 `[1]` on the device, the layout's padded total; the rows past it (the
    static bound's tail) are padding the kernels do not walk."""
    if g.provider == "triton":
        from moe_backend.kernels import _grouped_gemm_core

        _grouped_gemm_core.launch(
            a_fp8,
            a_scale,
            b_fp8,
            b_scale,
            out,
            expert_ids,
            None,
            masked=False,
            rows=a_fp8.shape[0],
            num_experts=num_experts,
            cfg=g.triton_config,
            num_rows=rows_in_use,
        )
    elif g.provider == "cuda":
        from moe_backend.cuda.grouped_gemm_contiguous import launch

        launch(a_fp8, a_scale, b_fp8, b_scale, expert_ids, out, config=g.config, rows_in_use=rows_in_use)
    else:
        ops.grouped_gemm_contiguous(a_fp8, a_scale, b_fp8, b_scale, expert_ids, out, impl=g.provider)
    return out


def _gemm_masked(g: GemmPlan, a_fp8, a_scale, b_fp8, b_scale, masked_m, out, expected_m: int):
    num_experts, max_m, k = a_fp8.shape
    if g.provider == "triton":
        from moe_backend.kernels import _grouped_gemm_core

        _grouped_gemm_core.launch(
            a_fp8,
            a_scale,
            b_fp8,
            b_scale,
            out,
            None,
            masked_m,
            masked=True,
            rows=max_m,
            num_experts=num_experts,
            cfg=g.triton_config,
        )
    elif g.provider == "cuda":
        from moe_backend.cuda.grouped_gemm_contiguous import launch

        rows = num_experts * max_m
        launch(
            a_fp8.view(rows, k),
            a_scale.view(rows, -1),
            b_fp8,
            b_scale,
            masked_m,
            out.view(rows, -1),
            config=g.config,
            masked_max_m=max_m,
        )
    else:
        ops.grouped_gemm_masked(a_fp8, a_scale, b_fp8, b_scale, masked_m, out, impl=g.provider, expected_m=expected_m)
    return out


def run_masked_plan(
    plan: Plan,
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    w13_fp8: torch.Tensor,
    w13_scale_inv: torch.Tensor,
    w2_fp8: torch.Tensor,
    w2_scale_inv: torch.Tensor,
    masked_m: torch.Tensor,
    out: torch.Tensor,
    workspace: torch.Tensor | None,
    ue8m0: bool,
) -> torch.Tensor:
    """Executes a masked-layout plan on checked operands (see `masked_experts`)."""
    if _plan_records or _PLAN_LOG is not None:
        _record(plan)
    return _execute_masked(
        plan, a_fp8, a_scale, w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, masked_m, out, workspace, ue8m0
    )


def _execute_masked(
    plan: Plan, a_fp8, a_scale, w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, masked_m, out, workspace, ue8m0: bool
) -> torch.Tensor:
    num_experts, max_m, _ = a_fp8.shape
    two_i = w13_fp8.shape[1]
    if workspace is not None:
        h = workspace.reshape(-1)[: num_experts * max_m * two_i].view(num_experts, max_m, two_i)
    else:
        h = torch.empty(num_experts, max_m, two_i, dtype=torch.bfloat16, device=a_fp8.device)
    _gemm_masked(plan.gemm1, a_fp8, a_scale, w13_fp8, w13_scale_inv, masked_m, h, plan.expected_m)
    act_fp8, act_scale = ops.silu_mul_quant(h, GROUP, ue8m0, masked_m=masked_m)
    return _gemm_masked(plan.gemm2, act_fp8, act_scale, w2_fp8, w2_scale_inv, masked_m, out, plan.expected_m)


def _layout_activations(
    plan: Plan,
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    src_token: torch.Tensor,
    ue8m0: bool,
    rows_in_use: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GEMM1's operand in the layout's rows (padding rows are not written)."""
    if x_scale is None:
        if plan.fused_permute_quant:
            return ops.permute_quant(x, src_token, GROUP, ue8m0, used_rows=rows_in_use)
        x, x_scale = ops.per_token_group_quant(x, GROUP, ue8m0)
    return ops.permute_rows(x, x_scale, src_token)


def run_plan(
    plan: Plan,
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    w13_fp8: torch.Tensor,
    w13_scale_inv: torch.Tensor,
    w2_fp8: torch.Tensor,
    w2_scale_inv: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_start: int,
    ue8m0: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Executes a standard-format plan on checked operands (see `routed_experts`)."""
    if _plan_records or _PLAN_LOG is not None:
        _record(plan)
    return _execute_plan(
        plan, x, x_scale, w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, topk_weights, topk_ids, expert_start, ue8m0, out
    )


def _execute_plan(
    plan: Plan,
    x,
    x_scale,
    w13_fp8,
    w13_scale_inv,
    w2_fp8,
    w2_scale_inv,
    topk_weights,
    topk_ids,
    expert_start: int,
    ue8m0: bool,
    out: torch.Tensor | None,
) -> torch.Tensor:
    num_experts, two_i, _ = w13_fp8.shape
    hidden = w2_fp8.shape[1]
    dev = x.device
    if plan.layout == "masked":
        layout = ops.build_masked_layout(topk_ids, num_experts, expert_start=expert_start, max_m=plan.num_rows)
        a_fp8, a_scale = _layout_activations(plan, x, x_scale, layout.src_token, ue8m0)
        y = torch.empty(num_experts, plan.num_rows, hidden, dtype=torch.bfloat16, device=dev)
        _execute_masked(
            plan, a_fp8, a_scale, w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, layout.masked_m, y, None, ue8m0
        )
    else:
        layout = ops.build_contiguous_layout(topk_ids, num_experts, expert_start=expert_start, alignment=plan.alignment)
        rows_in_use = layout.expert_offsets[num_experts:]  # int32 [1] on the device
        a_fp8, a_scale = _layout_activations(plan, x, x_scale, layout.src_token, ue8m0, rows_in_use)
        ids = layout.expert_ids
        h = torch.empty(plan.num_rows, two_i, dtype=torch.bfloat16, device=dev)
        _gemm_contiguous(plan.gemm1, a_fp8, a_scale, w13_fp8, w13_scale_inv, ids, h, num_experts, rows_in_use)
        act_fp8, act_scale = ops.silu_mul_quant(h, GROUP, ue8m0, expert_ids=ids, used_rows=rows_in_use)
        y = torch.empty(plan.num_rows, hidden, dtype=torch.bfloat16, device=dev)
        _gemm_contiguous(plan.gemm2, act_fp8, act_scale, w2_fp8, w2_scale_inv, ids, y, num_experts, rows_in_use)
    return ops.unpermute_combine(y, layout.row_of_slot, topk_weights, out)


# ---------------------------------------------------------------- public entry points (checked)
def masked_experts(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    w13_fp8: torch.Tensor,
    w13_scale_inv: torch.Tensor,
    w2_fp8: torch.Tensor,
    w2_scale_inv: torch.Tensor,
    masked_m: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    policy: Policy | None = None,
    plan: Plan | None = None,
    ue8m0: bool = False,
    expected_m: int | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """The expert MLP on the masked layout (DeepEP low-latency / vLLM batched format).

    a_fp8 `[E, max_m, H]` + a_scale `[E, max_m, H/128]`, masked_m int32 `[E]` on the device.
    Writes the unweighted rows `out[e, m]` for m < masked_m[e] (bf16 `[E, max_m, H]`); other rows
    are untouched. workspace: optional bf16 buffer of >= E*max_m*2I elements for GEMM1's output.
    The policy's `masked_kernel` serves it, or `plan`, or `impl` (a provider: best, triton, cuda,
    deepgemm, reference; or a masked KERNELS name).
    Shape-static and sync-free: CUDA-graph capturable.
    """
    check_tensor("a_fp8", a_fp8, ndim=3)
    check_activations(a_fp8, a_scale, ndim=3)
    num_experts, max_m, hidden = a_fp8.shape
    e13, two_i = check_expert_weights(w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, hidden)
    if e13 != num_experts:
        raise ValueError(f"w13_fp8 / w2_fp8: expected {num_experts} experts (dim 0 of a_fp8), got {e13}")
    check_tensor("masked_m", masked_m, dtypes=(torch.int32,), shape=(num_experts,), device=a_fp8.device)
    check_bool("ue8m0", ue8m0)
    check_int("expected_m", expected_m, minimum=1, optional=True)
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"policy: expected a Policy or None, got {type(policy).__name__}")
    check_same_device(a_fp8=a_fp8, w13_fp8=w13_fp8, w2_fp8=w2_fp8, masked_m=masked_m)
    if out is None:
        out = torch.zeros(num_experts, max_m, hidden, dtype=torch.bfloat16, device=a_fp8.device)
    else:
        check_tensor(
            "out",
            out,
            dtypes=(torch.bfloat16,),
            shape=(num_experts, max_m, hidden),
            device=a_fp8.device,
            contiguous=True,
        )
    if workspace is not None:
        check_tensor("workspace", workspace, dtypes=(torch.bfloat16,), device=a_fp8.device)
        if workspace.numel() < num_experts * max_m * two_i:
            raise ValueError(
                f"workspace: expected >= {num_experts * max_m * two_i} elements (E * max_m * 2I), "
                f"got {workspace.numel()}"
            )
    if num_experts == 0 or max_m == 0:
        return out
    if plan is None:
        policy = policy or Policy.from_env()
        if impl is not None:
            policy = _with_kernel(policy, masked_kernel=_MASKED_BY_IMPL.get(impl, impl))
        plan = make_masked_plan(
            policy,
            num_experts=num_experts,
            max_m=max_m,
            hidden=hidden,
            intermediate=two_i // 2,
            device=a_fp8.device,
            expected_m=expected_m,
        )
    return run_masked_plan(
        plan, a_fp8, a_scale, w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, masked_m, out, workspace, ue8m0
    )


# `impl` as the ops name providers, for callers of masked_experts that pick a provider.
_MASKED_BY_IMPL = {
    "auto": "masked",
    "best": "masked",
    "triton": "triton_masked",
    "cuda": "cuda_masked",
    "deepgemm": "deepgemm_masked",
    "reference": "reference_masked",
}


def _with_kernel(policy: Policy, **keys: str) -> Policy:
    from dataclasses import replace

    return replace(policy, **keys)


def routed_experts(
    x: torch.Tensor,
    w13_fp8: torch.Tensor,
    w13_scale_inv: torch.Tensor,
    w2_fp8: torch.Tensor,
    w2_scale_inv: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    x_scale: torch.Tensor | None = None,
    expert_start: int = 0,
    ue8m0: bool = False,
    policy: Policy | None = None,
    phase: str | None = None,
    kernel: KernelChoice | str | None = None,
    expected_m: int | None = None,
    num_global_experts: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x bf16 `[T, H]` (or fp8 with `x_scale` `[T, H/128]`); w13 fp8 `[E, 2I, H]`, w2 fp8 `[E, H, I]`
    with block scales; topk_weights f32 / topk_ids `[T, k]` where experts
    `[expert_start, expert_start + E)` are local and other ids (-1, other ranks) contribute nothing.
    Returns bf16 `[T, H]` (into `out` when given), the weighted sum over local experts (fp32 sum).

    The plan comes from `policy` (default: `MOE_BACKEND_POLICY`) for this phase, or from `kernel`
    (a KERNELS name or choice) when given. `expected_m`: typical rows per local expert, a
    tile-choice hint; default T*k / num_global_experts, the experts of the whole model (callers
    holding an expert-parallel slice pass it; it defaults to E, the local count, which is right
    when every expert is local)."""
    check_int("expert_start", expert_start, minimum=0)
    check_bool("ue8m0", ue8m0)
    check_int("expected_m", expected_m, minimum=1, optional=True)
    check_int("num_global_experts", num_global_experts, minimum=1, optional=True)
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"policy: expected a Policy or None, got {type(policy).__name__}")
    if kernel is not None and not isinstance(kernel, (KernelChoice, str)):
        raise TypeError(f"kernel: expected a KernelChoice, a KERNELS name or None, got {type(kernel).__name__}")
    if phase is not None and phase not in PHASES:
        raise ValueError(f"phase: expected one of {PHASES} or None, got {phase!r}")
    hidden = check_token_activations(x, x_scale)
    num_tokens = x.shape[0]
    num_experts, two_i = check_expert_weights(w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, hidden)
    check_topk(topk_ids, topk_weights, num_tokens)
    check_same_device(x=x, w13_fp8=w13_fp8, w2_fp8=w2_fp8, topk_ids=topk_ids, topk_weights=topk_weights)
    if out is not None:
        check_tensor("out", out, dtypes=(torch.bfloat16,), shape=(num_tokens, hidden), device=x.device)
    if x_scale is None and finite_checks_enabled(x):  # CPU, or MOE_BACKEND_CHECK_FINITE=1 (a host sync)
        check_finite_rows("x", x)
    if num_tokens == 0:
        return out if out is not None else torch.zeros(0, hidden, dtype=torch.bfloat16, device=x.device)
    if isinstance(kernel, KernelChoice):
        kernel = kernel.name
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {sorted(KERNELS)}, got {kernel!r}")

    policy = policy or Policy.from_env()
    plan = make_plan(
        policy,
        num_tokens=num_tokens,
        topk=topk_ids.shape[1],
        num_experts=num_experts,
        num_global_experts=num_global_experts or num_experts,
        hidden=hidden,
        intermediate=two_i // 2,
        device=x.device,
        phase=phase,
        quantized_input=x_scale is not None,
        expected_m=expected_m,
        kernel=kernel,
    )
    if plan.graph_plan is not None and not torch.cuda.is_current_stream_capturing():
        from moe_backend.eager_graphs import run_graphed

        y = run_graphed(
            plan,
            _execute_plan,
            policy.graph_max_tokens,
            x,
            x_scale,
            w13_fp8,
            w13_scale_inv,
            w2_fp8,
            w2_scale_inv,
            topk_weights,
            topk_ids,
            expert_start,
            ue8m0,
            out,
        )
        if y is not None:
            if _plan_records or _PLAN_LOG is not None:
                _record(plan.graph_plan)
            return y
    return run_plan(
        plan, x, x_scale, w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, topk_weights, topk_ids, expert_start, ue8m0, out
    )
