"""Shared by the lab's whole-pipeline experiments (prefill_gather_a, sweep_small_batch): a slice's
plan for one batch, and plan variants timed side by side as CUDA-graph replays of `run_plan`."""

from __future__ import annotations

HIDDEN, GLOBAL_EXPERTS, TOPK = 7168, 256, 8
SLICES = {"ep8": (32, 2048), "tp8": (256, 256)}  # local experts, intermediate


def slice_plan(slice_name: str, tokens: int, phase: str, device, policy=None):
    """The policy's plan (default `Policy()`) for `tokens` tokens on a DeepSeek-V3 slice."""
    from moe_backend.dispatch import Policy
    from moe_backend.dispatch.plan import make_plan

    num_local, inter = SLICES[slice_name]
    return make_plan(
        policy or Policy(),
        num_tokens=tokens,
        topk=TOPK,
        num_experts=num_local,
        num_global_experts=GLOBAL_EXPERTS,
        hidden=HIDDEN,
        intermediate=inter,
        device=device,
        phase=phase,
    )


def slice_weights(slice_name: str) -> tuple:
    """(w13, w13_scale, w2, w2_scale): random FP8 expert weights of the slice, on the GPU."""
    from moe_backend.testing import random_fp8_weights

    num_local, inter = SLICES[slice_name]
    return (*random_fp8_weights(num_local, 2 * inter, HIDDEN), *random_fp8_weights(num_local, HIDDEN, inter))


def cell_inputs(tokens: int, zipf: float, device) -> tuple:
    """(x bf16 `[T, H]`, topk_weights, topk_ids) of one cell: top-8 of 256 under Zipf-like
    popularity `zipf` (0: uniform), seeded by the token count."""
    import torch

    from moe_backend.testing import random_topk

    x = torch.randn(tokens, HIDDEN, device=device, dtype=torch.bfloat16)
    return (x, *random_topk(tokens, GLOBAL_EXPERTS, TOPK, zipf, seed=tokens, device=device))


def time_plans(
    plans: dict, operands: tuple, *, rep_ms: int = 40, warmup_ms: int = 10, rounds: int = 3
) -> tuple[dict, dict]:
    """Each plan's routed pipeline on the same operands `(x, w13, w13_s, w2, w2_s, topk_weights,
    topk_ids)` (bf16 x, expert offset 0, fp32 scales): run once for its output (fp32), captured in
    a CUDA graph, then all replays timed in interleaved rounds. Returns ({name: times}, {name: out})."""

    from moe_backend.plan_execution import run_plan
    from moe_backend.testing import capture_graph, interleaved_us

    x, w13, w13_s, w2, w2_s, tw, ti = operands
    outs, fns = {}, {}
    for name, plan in plans.items():

        def fn(plan=plan):
            return run_plan(plan, x, None, w13, w13_s, w2, w2_s, tw, ti, 0, False)

        outs[name] = fn().float()
        fns[name] = capture_graph(fn)[0]
    return interleaved_us(fns, rounds=rounds, warmup_ms=warmup_ms, rep_ms=rep_ms), outs
