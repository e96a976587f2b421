"""A plan against a variant of it that must give the same bits (GPU tests): eagerly, then over
CUDA-graph replays of the plan with new routing and tokens written into its captured inputs, each
replay checked against the variant run eagerly on the same inputs."""

from __future__ import annotations

from typing import Callable

import torch


def assert_same_bits_over_replays(
    plan, variant, weights: tuple, x: torch.Tensor, routing: Callable[[int], tuple], replays: int, check_eager
) -> None:
    """weights: (w13, w13_s, w2, w2_s) of the plan's local experts (expert offset 0, bf16 x);
    routing(seed) -> (topk_weights, topk_ids); check_eager(out, topk_weights, topk_ids) asserts
    what the eager output must be (e.g. close to the reference)."""
    from moe_backend.plan_execution import run_plan

    w, ids = routing(0)
    args = (x, None, *weights, w, ids, 0, False)
    out = run_plan(plan, *args)
    assert torch.equal(out, run_plan(variant, *args))
    check_eager(out, w, ids)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = run_plan(plan, *args)
    for seed in range(1, replays + 1):
        new_w, new_ids = routing(seed)
        w.copy_(new_w)
        ids.copy_(new_ids)
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(replayed, run_plan(variant, *args)), seed
