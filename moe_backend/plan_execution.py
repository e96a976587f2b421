"""Plan execution: layout -> quant+permute -> GEMM1 -> SiLU*up+quant -> GEMM2 -> combine.

Runs a `Plan` (`moe_backend.dispatch.plan`) on operands `moe_backend.experts` has already checked;
nothing here checks an argument or chooses a kernel. Execution is sync-free with shapes from the
plan alone, so a whole call (decode or prefill) can be captured in a CUDA graph and replayed with
new routing (except a plan with `rows_on_host`, whose peer GEMM needs the rows in use). Padding
rows of a layout are never zero-filled, gathered, quantized or combined: the layout marks them on
the device and every kernel skips them. On CPU the same pipeline runs on the reference GEMMs.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import torch

from moe_backend import ops
from moe_backend.constants import FP8_DTYPE
from moe_backend.constants import QUANT_BLOCK as GROUP
from moe_backend.dispatch.plan import GemmPlan, Plan
from moe_backend.env import ENV

__all__ = ["run_plan", "run_masked_plan", "recorded_plans", "record_executed"]

_plan_records: list[list[Plan]] = []  # open `recorded_plans` blocks


def _plan_log_path() -> str | None:
    """MOE_BACKEND_PLAN_LOG if it can be appended to; otherwise one warning and no log (a debugging
    aid must never fail a forward)."""
    path = ENV.plan_log
    if path is None:
        return None
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        print(
            f"[moe_backend] MOE_BACKEND_PLAN_LOG: cannot append to {path!r} ({exc}); no plan log is written",
            file=sys.stderr,
            flush=True,
        )
        return None
    return path


# MOE_BACKEND_PLAN_LOG=PATH: one line per executed plan appended to PATH, from every process
# (tests/e2e count the plans an engine's server ran while answering a request).
_PLAN_LOG = _plan_log_path()


@contextlib.contextmanager
def recorded_plans() -> Iterator[list[Plan]]:
    """Collects every plan executed inside the block (tests assert which plan an engine path ran)."""
    plans: list[Plan] = []
    _plan_records.append(plans)
    try:
        yield plans
    finally:
        _plan_records.remove(plans)


def record_executed(plan: Plan) -> None:
    """Records a plan run outside `run_plan` (a graph replay) for `recorded_plans` and the plan log."""
    if _plan_records or _PLAN_LOG is not None:
        _record(plan)


def _record(plan: Plan) -> None:
    for plans in _plan_records:
        plans.append(plan)
    if _PLAN_LOG is not None:
        # One short write in append mode: lines from several processes do not interleave.
        with open(_PLAN_LOG, "a") as f:
            f.write(f"{os.getpid()} {plan.phase} T={plan.num_tokens} {plan.kernel}\n")


def run_contiguous_gemm(
    g: GemmPlan,
    a_fp8,
    a_scale,
    b_fp8,
    b_scale,
    expert_ids,
    out,
    num_experts: int,
    rows_in_use: torch.Tensor | None = None,
    a_rows: torch.Tensor | None = None,
    splits_out: torch.Tensor | None = None,
    silu_a: dict | None = None,
    act_scale: torch.Tensor | None = None,
    ue8m0: bool = False,
    direct: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """rows_in_use: int32 `[1]` on the device, the layout's padded total; the rows past it (the
    static bound's tail) are padding the kernels do not walk. a_rows (Triton and CUDA, `plan.gather_a`):
    the layout's src_token, A being the unpermuted token rows. splits_out (`g.split_k` > 1): int32
    `[1]`, the K slices the kernel cut (`out` then holds f32 partial sums). silu_a (Triton only,
    `plan.silu_in_gemm2`): a_fp8 is GEMM1's output h, from which the kernel computes its A; the
    dict holds `_grouped_gemm_core.launch`'s a_splits, a_count and ue8m0. act_scale (CUDA only,
    `plan.silu_in_gemm1`): fp32 `[rows, I / 128]`; the kernel then stores SiLU*up quantized into
    `out` (fp8 `[rows, I]`) and its scales (UE8M0 with ue8m0) here. direct (CUDA only,
    `plan.direct_rows`): (pairs int32 `[rows, 2]`, the layer's output): rows of single-slot tokens
    go there, weighted (`kernels/direct_rows.py`)."""
    if act_scale is not None and g.provider != "cuda":
        raise ValueError(f"act_scale: only our CUDA GEMM stores SiLU*up quant, the plan's provider is {g.provider}")
    if direct is not None and g.provider != "cuda":
        raise ValueError(f"direct: only our CUDA GEMM stores rows into the output, the plan's provider is {g.provider}")
    if silu_a is not None and g.provider != "triton":
        raise ValueError(f"silu_a: only the Triton GEMM computes its A from h, the plan's provider is {g.provider}")
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
            rows=expert_ids.shape[0],
            num_experts=num_experts,
            cfg=g.triton_config,
            num_rows=rows_in_use,
            a_rows=a_rows,
            splits_out=splits_out,
            silu_a=silu_a is not None,
            **(silu_a or {}),
        )
    elif g.provider == "cuda":
        from moe_backend.cuda.grouped_gemm_contiguous import launch

        launch(
            a_fp8, a_scale, b_fp8, b_scale, expert_ids, out, config=g.config, rows_in_use=rows_in_use, a_rows=a_rows,
            act_scale=act_scale, ue8m0=ue8m0, direct=direct,
        )  # fmt: skip
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
    with _launches(plan):
        return _execute_masked(
            plan, a_fp8, a_scale, w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, masked_m, out, workspace, ue8m0
        )


def _launches(plan: Plan) -> contextlib.AbstractContextManager:
    """The block the plan's kernels launch in: as dependents of each other where the plan says
    (`Plan.dependent_launch`: a CUDA device, so Triton is present)."""
    if not plan.dependent_launch:
        return contextlib.nullcontext()
    from moe_backend.kernels._dependent_launch import dependent_launches

    return dependent_launches(True)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GEMM1's operand (a_fp8, a_scale, a_rows): the token rows and the layout's src_token when
    GEMM1 gathers them itself (`plan.gather_a`), else the rows copied into the layout (padding rows
    not written) and None."""
    if x_scale is None and (plan.gather_a or not plan.fused_permute_quant):
        x, x_scale = ops.per_token_group_quant(x, GROUP, ue8m0)
    if plan.gather_a:
        return x, x_scale, src_token
    if x_scale is None:
        return (*ops.permute_quant(x, src_token, GROUP, ue8m0, used_rows=rows_in_use), None)
    return (*ops.permute_rows(x, x_scale, src_token, used_rows=rows_in_use), None)


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
    used_rows: int | None = None,
) -> torch.Tensor:
    """Executes a standard-format plan on checked operands (see `routed_experts`)."""
    if _plan_records or _PLAN_LOG is not None:
        _record(plan)
    return _execute_plan(
        plan, x, x_scale, w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, topk_weights, topk_ids, expert_start, ue8m0,
        out, used_rows=used_rows,
    )  # fmt: skip


def _execute_plan(plan: Plan, *operands, used_rows: int | None = None) -> torch.Tensor:
    """`run_plan` without the record (also what `eager_graphs` captures)."""
    with _launches(plan):
        return _launch_plan(plan, *operands, used_rows=used_rows)


def _rows_walked(plan: Plan, rows_in_use: torch.Tensor, used_rows: int | None) -> int:
    """The layout rows a plan with `rows_on_host` gives its GEMMs: the rows in use, `used_rows`
    when the caller read them earlier, else one host read (the static bound while a graph is being
    captured, where no read may happen)."""
    if used_rows is not None:
        return min(used_rows, plan.num_rows)
    if rows_in_use.is_cuda and torch.cuda.is_current_stream_capturing():
        return plan.num_rows
    return int(rows_in_use.item())


def _launch_plan(
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
    *,
    used_rows: int | None = None,
) -> torch.Tensor:
    num_experts, two_i, _ = w13_fp8.shape
    hidden = w2_fp8.shape[1]
    dev = x.device
    if plan.layout == "masked":
        layout = ops.build_masked_layout(topk_ids, num_experts, expert_start=expert_start, max_m=plan.num_rows)
        a_fp8, a_scale, _ = _layout_activations(plan, x, x_scale, layout.src_token, ue8m0)
        y = torch.empty(num_experts, plan.num_rows, hidden, dtype=torch.bfloat16, device=dev)
        _execute_masked(
            plan, a_fp8, a_scale, w13_fp8, w13_scale_inv, w2_fp8, w2_scale_inv, layout.masked_m, y, None, ue8m0
        )
    else:
        layout = ops.build_contiguous_layout(topk_ids, num_experts, expert_start=expert_start, alignment=plan.alignment)
        rows_in_use = layout.expert_offsets[num_experts:]  # int32 [1] on the device
        # Read before any launch (a host read then waits least). Buffers keep the static bound, so a
        # wrong used_rows gives wrong rows, never an access past them.
        walked = _rows_walked(plan, rows_in_use, used_rows) if plan.rows_on_host else None
        a_fp8, a_scale, a_rows = _layout_activations(plan, x, x_scale, layout.src_token, ue8m0, rows_in_use)
        ids = layout.expert_ids
        # GEMMs split over K write f32 partial sums and, in `splits[i]`, how many slices they cut.
        split1, split2 = plan.gemm1.split_k > 1, plan.gemm2.split_k > 1
        splits = torch.empty(2, dtype=torch.int32, device=dev) if split1 or split2 else None
        # Token rows read through a_rows are not layout rows: only the layout's tensors are cut.
        a1, s1 = (a_fp8, a_scale) if a_rows is not None else _first_rows(walked, a_fp8, a_scale)
        silu_a = None
        if plan.silu_in_gemm1:  # GEMM1 stores SiLU*up quant itself: no bf16 h, no kernel between
            act_fp8 = torch.empty(plan.num_rows, two_i // 2, dtype=FP8_DTYPE, device=dev)
            act_scale = torch.empty(plan.num_rows, two_i // 2 // GROUP, dtype=torch.float32, device=dev)
            ids1, out1, act_scale1 = _first_rows(walked, ids, act_fp8, act_scale)
        else:
            h = _gemm_output(plan.gemm1, plan.num_rows, dev)
            (ids1, out1), act_scale1 = _first_rows(walked, ids, h), None
        run_contiguous_gemm(
            plan.gemm1, a1, s1, w13_fp8, w13_scale_inv, ids1, out1, num_experts, rows_in_use, a_rows,
            splits[0:1] if split1 else None, act_scale=act_scale1, ue8m0=ue8m0,
        )  # fmt: skip
        if plan.silu_in_gemm2:  # GEMM2 computes SiLU*up quant from h itself (the plan: not with silu_in_gemm1)
            act_fp8, act_scale = h, h
            silu_a = dict(
                a_splits=plan.gemm1.split_k if split1 else 0, a_count=splits[0:1] if split1 else None, ue8m0=ue8m0
            )
        elif not plan.silu_in_gemm1:
            act_fp8, act_scale = ops.silu_mul_quant(
                h, GROUP, ue8m0, expert_ids=ids, used_rows=rows_in_use, partials=split1,
                num_partials=splits[0:1] if split1 else None,
            )  # fmt: skip
        y = _gemm_output(plan.gemm2, plan.num_rows, dev)
        direct = None
        if plan.direct_rows:  # single-slot tokens' rows go from GEMM2 straight into out
            from moe_backend.kernels._launch_utils import check_kernel_tensor
            from moe_backend.kernels.direct_rows import direct_rows

            if out is None:
                out = torch.empty(x.shape[0], hidden, dtype=torch.bfloat16, device=dev)
            else:  # GEMM2 writes it by row pitch: the combine's check, before the GEMM's stores
                check_kernel_tensor("out", out, dev, dtypes=(torch.bfloat16,), shape=(x.shape[0], hidden))
            pairs = direct_rows(layout.row_of_slot, topk_weights, plan.num_rows)
            direct = (_first_rows(walked, pairs)[0], out)
        a2, s2, ids2, y2 = _first_rows(walked, act_fp8, act_scale, ids, y)
        run_contiguous_gemm(
            plan.gemm2, a2, s2, w2_fp8, w2_scale_inv, ids2, y2, num_experts, rows_in_use, None,
            splits[1:2] if split2 else None, silu_a, direct=direct,
        )  # fmt: skip
        return ops.unpermute_combine(
            y, layout.row_of_slot, topk_weights, out, partials=split2, num_partials=splits[1:2] if split2 else None,
            branch_on_slots=plan.combine_branch, skip_single=plan.direct_rows,
        )  # fmt: skip
    return ops.unpermute_combine(y, layout.row_of_slot, topk_weights, out, branch_on_slots=plan.combine_branch)


def _first_rows(rows: int | None, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Row-major layout tensors cut to their first `rows` (None: as they are)."""
    return tensors if rows is None else tuple(t[:rows] for t in tensors)


def _gemm_output(g: GemmPlan, rows: int, dev) -> torch.Tensor:
    """A contiguous-layout GEMM's output: bf16 `[rows, n]`, or f32 `[split_k, rows, n]` partial sums
    for a GEMM split over K (its consumer adds the slabs the kernel wrote)."""
    if g.split_k > 1:
        return torch.empty(g.split_k, rows, g.n, dtype=torch.float32, device=dev)
    return torch.empty(rows, g.n, dtype=torch.bfloat16, device=dev)
