"""The routed experts' checked entry points: `routed_experts` and `masked_experts`.

The public functions check their arguments once, take the batch's `Plan`
(`moe_backend.dispatch.plan`, cached per shape) and execute it with `moe_backend.plan_execution`;
nothing here chooses a kernel. Execution is sync-free with shapes from the plan alone, so a whole
call (decode or prefill) can be captured in a CUDA graph and replayed with new routing. On CPU the
same pipeline runs on the reference GEMMs.
"""

from __future__ import annotations

import torch

from moe_backend._checks import (
    check_activations,
    check_bool,
    check_distinct_ids,
    check_expert_weights,
    check_finite_fp8_rows,
    check_finite_rows,
    check_int,
    check_same_device,
    check_tensor,
    check_token_activations,
    check_topk,
    finite_checks_enabled,
)
from moe_backend._device import runs_on_first_tensor_device
from moe_backend.dispatch.plan import Plan, make_masked_plan, make_plan, rows_bucket
from moe_backend.dispatch.policy import KERNELS, PHASES, KernelChoice, Policy
from moe_backend.eager_graphs import run_graphed
from moe_backend.plan_execution import _execute_plan, record_executed, recorded_plans, run_masked_plan, run_plan

__all__ = [
    "routed_experts",
    "masked_experts",
    "routed_plan",
    "layout_rows_in_use",
    "run_plan",
    "run_masked_plan",
    "recorded_plans",
]


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
    if impl is not None and impl not in _MASKED_BY_IMPL and impl not in _MASKED_KERNELS:
        raise ValueError(f"impl: expected one of {sorted(_MASKED_BY_IMPL) + sorted(_MASKED_KERNELS)}, got {impl!r}")
    if finite_checks_enabled(a_fp8):  # CPU, or MOE_BACKEND_CHECK_FINITE=1 (host syncs)
        # The valid rows only: an engine's buffer past masked_m may hold anything.
        valid = torch.arange(max_m, device=a_fp8.device) < masked_m.unsqueeze(1)
        check_finite_fp8_rows("a_fp8", a_fp8[valid])
        check_finite_rows("a_scale", a_scale[valid])
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


_MASKED_KERNELS = frozenset(name for name, choice in KERNELS.items() if choice.layout == "masked")
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


@runs_on_first_tensor_device
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
    used_rows: int | None = None,
) -> torch.Tensor:
    """x bf16 `[T, H]` (or fp8 with `x_scale` `[T, H/128]`); w13 fp8 `[E, 2I, H]`, w2 fp8 `[E, H, I]`
    with block scales; topk_weights f32 / topk_ids `[T, k]` where experts
    `[expert_start, expert_start + E)` are local and other ids (-1, other ranks) contribute nothing.
    Returns bf16 `[T, H]` (into `out` when given), the weighted sum over local experts (fp32 sum).

    The plan comes from `policy` (default: `MOE_BACKEND_POLICY`) for this phase, or from `kernel`
    (a KERNELS name or choice) when given. `expected_m`: typical rows per local expert, a
    tile-choice hint; default T*k / num_global_experts, the experts of the whole model (callers
    holding an expert-parallel slice pass it; it defaults to E, the local count, which is right
    when every expert is local). `used_rows`: only for a plan with `rows_on_host` (a DeepGEMM
    contiguous kernel, which walks every row it is given): the layout's rows in use as
    `layout_rows_in_use` returns them, read earlier on the host; without it that plan reads them
    with one host sync per call. Other plans ignore it."""
    check_int("expert_start", expert_start, minimum=0)
    check_bool("ue8m0", ue8m0)
    check_int("expected_m", expected_m, minimum=1, optional=True)
    check_int("num_global_experts", num_global_experts, minimum=1, optional=True)
    check_int("used_rows", used_rows, minimum=0, optional=True)
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
    if isinstance(kernel, KernelChoice):
        kernel = kernel.name
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {sorted(KERNELS)}, got {kernel!r}")
    if finite_checks_enabled(x):  # CPU, or MOE_BACKEND_CHECK_FINITE=1 (host syncs)
        if x_scale is None:
            check_finite_rows("x", x)
        else:
            check_finite_fp8_rows("x", x)
            check_finite_rows("x_scale", x_scale)
        # Only the local slots' weights enter the sum (absent slots' weights are never read).
        local = (topk_ids >= expert_start) & (topk_ids < expert_start + num_experts)
        check_finite_rows("topk_weights", torch.where(local, topk_weights, 0.0))
        check_distinct_ids("topk_ids", torch.where(local, topk_ids, -1))
    if num_tokens == 0:
        return out if out is not None else torch.zeros(0, hidden, dtype=torch.bfloat16, device=x.device)

    policy = policy or Policy.from_env()
    plan = routed_plan(
        x, w13_fp8, topk_ids, policy=policy, phase=phase, kernel=kernel, expected_m=expected_m,
        num_global_experts=num_global_experts, quantized_input=x_scale is not None,
    )  # fmt: skip
    graphed = plan.graph_plan is not None and not torch.cuda.is_current_stream_capturing()
    if graphed and plan.rows_on_host and used_rows is None:
        used_rows = int(layout_rows_in_use(plan, topk_ids, expert_start).item())  # a host sync
    if graphed:
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
            used_rows=rows_bucket(used_rows, plan.graph_plan) if plan.rows_on_host else None,
        )
        if y is not None:
            record_executed(plan.graph_plan)
            return y
    return run_plan(
        plan, x, x_scale, w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, topk_weights, topk_ids, expert_start, ue8m0,
        out, used_rows=used_rows,
    )  # fmt: skip


def routed_plan(
    x: torch.Tensor,
    w13_fp8: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    policy: Policy,
    phase: str | None = None,
    kernel: str | None = None,
    expected_m: int | None = None,
    num_global_experts: int | None = None,
    quantized_input: bool = False,
) -> Plan:
    """The plan `routed_experts` runs for these (checked) operands: cached per shape."""
    num_experts, two_i, hidden = w13_fp8.shape
    return make_plan(
        policy,
        num_tokens=x.shape[0],
        topk=topk_ids.shape[1],
        num_experts=num_experts,
        num_global_experts=num_global_experts or num_experts,
        hidden=hidden,
        intermediate=two_i // 2,
        device=x.device,
        phase=phase,
        quantized_input=quantized_input,
        expected_m=expected_m,
        kernel=kernel,
    )


def layout_rows_in_use(plan: Plan, topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
    """int32 `[1]` on the device: the rows in use of `plan`'s contiguous layout for this routing
    (its segments padded to `plan.alignment`), queued on the current stream without a host sync;
    read on the host, it is the `used_rows` of a plan with `rows_on_host`."""
    from moe_backend import ops

    layout = ops.build_contiguous_layout(
        topk_ids, plan.num_experts, expert_start=expert_start, alignment=plan.alignment
    )
    return layout.expert_offsets[plan.num_experts :]
