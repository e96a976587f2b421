"""token_experts (the layout-free decode path) on the GPU at the DeepSeek-V3 EP8 and TP8 slices:
against the reference's routed_experts with the same quantized x, every row written (poisoned
output), tokens of no local expert zero, x prequantized or bf16, a CUDA graph replayed with new
routing, and the plan choosing it for small decode batches.
Run on the device: `pytest -m gpu tests/kernels/test_token_experts_gpu.py`."""

from __future__ import annotations

import pytest
import torch

from moe_backend import reference
from moe_backend.quant import quantize_fp8_per_token_group
from tests.helpers.tolerances import layer_same_quant

pytestmark = pytest.mark.gpu

HIDDEN, GLOBAL_EXPERTS, TOPK = 7168, 256, 8
SLICES = {"ep8": (32, 2048, 64), "tp8": (256, 256, 0)}  # local experts, intermediate, first local expert


@pytest.fixture(scope="module")
def weights():
    from moe_backend.testing import random_fp8_weights

    out = {}
    for name, (e, inter, _) in SLICES.items():
        torch.manual_seed(len(name) + e)
        out[name] = (*random_fp8_weights(e, 2 * inter, HIDDEN), *random_fp8_weights(e, HIDDEN, inter))
    return out


def _routing(num_tokens: int, start: int, num_local: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.rand(num_tokens, GLOBAL_EXPERTS, device="cuda", generator=gen).topk(TOPK, dim=-1).indices
    if num_tokens > 1:  # a slot of graph padding; under EP8 a token of no local expert
        ids[-1, -1] = -1
        if num_local < GLOBAL_EXPERTS:
            local = (ids[0] >= start) & (ids[0] < start + num_local)
            ids[0] = torch.where(local, (start + num_local + torch.arange(TOPK, device="cuda")) % 256, ids[0])
    weights = torch.rand(num_tokens, TOPK, device="cuda", generator=gen) + 0.1
    return weights, ids.to(torch.int32)


def _reference(x, x_scale, w, topk_weights, topk_ids, start, num_local):
    local = topk_ids.long().cpu() - start
    local = torch.where((local >= 0) & (local < num_local), local, -1)
    cpu_w = [t.cpu() for t in w]
    x_scale = None if x_scale is None else x_scale.cpu()
    ref = reference.routed_experts(x.cpu(), *cpu_w, topk_weights.cpu(), local, x_scale=x_scale).float()
    return ref, int((local >= 0).sum())


@pytest.mark.parametrize("slice_name", list(SLICES))
@pytest.mark.parametrize("num_tokens", [1, 3, 8])
@pytest.mark.parametrize("prequantized", [True, False])
def test_token_experts_matches_reference(weights, slice_name, num_tokens, prequantized):
    from moe_backend.kernels.token_experts import token_experts

    e, _, start = SLICES[slice_name]
    w = weights[slice_name]
    x = torch.randn(num_tokens, HIDDEN, device="cuda").bfloat16()
    x_in, x_scale = quantize_fp8_per_token_group(x) if prequantized else (x, None)
    topk_weights, topk_ids = _routing(num_tokens, start, e, seed=num_tokens)
    out = torch.full((num_tokens, HIDDEN), float("nan"), device="cuda", dtype=torch.bfloat16)
    token_experts(x_in, x_scale, *w, topk_weights, topk_ids, start, False, out)
    ref, pairs = _reference(x_in, x_scale, w, topk_weights, topk_ids, start, e)
    assert torch.isfinite(out).all()
    got = out.float().cpu()
    no_local = ref.abs().sum(dim=1) == 0
    assert (got[no_local] == 0).all()
    if pairs:
        err = float((got - ref).norm() / ref.norm())
        assert err < layer_same_quant(pairs), err


def test_token_experts_graph_replays_new_routing(weights):
    """Captured once, replayed with new ids, weights and x: the replay matches the reference."""
    from moe_backend.kernels.token_experts import token_experts

    e, _, start = SLICES["tp8"]
    w = weights["tp8"]
    x = torch.randn(4, HIDDEN, device="cuda").bfloat16()
    topk_weights, topk_ids = _routing(4, start, e, seed=1)
    token_experts(x, None, *w, topk_weights, topk_ids, start, False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = token_experts(x, None, *w, topk_weights, topk_ids, start, False)
    new_weights, new_ids = _routing(4, start, e, seed=2)
    x.copy_(torch.randn(4, HIDDEN, device="cuda").bfloat16())
    topk_weights.copy_(new_weights)
    topk_ids.copy_(new_ids)
    graph.replay()
    ref, pairs = _reference(x, None, w, topk_weights, topk_ids, start, e)
    err = float((out.float().cpu() - ref).norm() / ref.norm())
    assert err < layer_same_quant(pairs), err


def test_plan_runs_token_experts_for_small_decode_batches(weights):
    """routed_experts at T=1 runs the token plan (recorded), matching the contiguous plan's output."""
    from moe_backend.dispatch.policy import KERNELS
    from moe_backend.experts import routed_experts
    from moe_backend.plan_execution import recorded_plans

    e, _, start = SLICES["ep8"]
    w = weights["ep8"]
    x = torch.randn(2, HIDDEN, device="cuda").bfloat16()
    topk_weights, topk_ids = _routing(2, start, e, seed=3)
    topk_weights = topk_weights.float()
    with recorded_plans() as plans:
        out = routed_experts(x, *w, topk_weights, topk_ids, expert_start=start, num_global_experts=GLOBAL_EXPERTS)
    assert plans and plans[0].layout == "tokens", [p.describe() for p in plans]
    contiguous = routed_experts(
        x, *w, topk_weights, topk_ids, expert_start=start, num_global_experts=GLOBAL_EXPERTS, kernel=KERNELS["triton"]
    )
    ref, pairs = _reference(x, None, w, topk_weights, topk_ids, start, e)
    for got in (out, contiguous):
        assert float((got.float().cpu() - ref).norm() / ref.norm()) < layer_same_quant(pairs)
