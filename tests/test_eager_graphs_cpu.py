"""`moe_backend.eager_graphs`' bookkeeping on the CPU: the static buffers shared by every layer, the
padding tokens of a bucket (ids back to -1 after a larger call), the graph keys (a plan, weights,
expert offset, scale format), and the eager first call of a plan. A CUDA graph cannot run here, so
`_capture` is replaced by a stand-in whose replay runs the bucket plan on the static buffers as
they are at replay time, which is what a replayed graph reads. Every call is checked against the
same plan run without graphs; calls follow a history of the kind the GPU property run had (several
layers, token counts on both sides of a bucket, kept and freed weights, int32 and int64 ids)."""

import pytest
import torch

from moe_backend import eager_graphs
from moe_backend.dispatch import plan as plan_mod
from moe_backend.plan_execution import _execute_plan
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group

CAPACITY = 64


class _ReplayedPlan:
    """Stands in for a captured graph: replay() executes the plan on the static buffers."""

    def __init__(self, execute, args):
        self.execute, self.args, self.replays = execute, args, 0

    def replay(self):
        self.replays += 1
        self.execute(*self.args)


class _Stream:
    cuda_stream = 7


@pytest.fixture
def emulated(monkeypatch):
    captured = []

    def capture(plan, execute, io, bucket, w13, w13_s, w2, w2_s, expert_start, ue8m0, stream):
        args = eager_graphs.bucket_args(plan, io, bucket, w13, w13_s, w2, w2_s, expert_start=expert_start, ue8m0=ue8m0)
        captured.append(_ReplayedPlan(execute, args))
        return captured[-1]

    monkeypatch.setattr(eager_graphs, "_capture", capture)
    monkeypatch.setattr(eager_graphs.torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(eager_graphs, "_stream_id", lambda device: _Stream.cuda_stream)
    eager_graphs.clear()
    yield captured
    eager_graphs.clear()


def _plans(tokens: int, topk: int, num_experts: int, hidden: int, inter: int):
    """(plan, its bucket plan) as `make_plan` builds them on a CUDA device, here on the CPU."""
    bucket = plan_mod.token_bucket(tokens, CAPACITY)
    expected = max(1, -(-tokens * topk // num_experts))
    bucket_expected = max(1, -(-bucket * topk // num_experts))
    args = (False, "contiguous", "decode", tokens, topk, num_experts, hidden, inter, ("cpu", None), True, expected)
    plan = plan_mod._make_plan(*args)
    bucket_plan = plan_mod._make_plan(False, "contiguous", "decode", bucket, *args[4:10], bucket_expected)
    return plan_mod.replace(plan, graph_plan=bucket_plan)


def _weights(num_experts: int, hidden: int, inter: int, ue8m0: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    return (*quantize_fp8_blockwise(w13, 128, ue8m0), *quantize_fp8_blockwise(w2, 128, ue8m0))


def _call(plans: dict, weights, tokens: int, topk: int, expert_start: int, ue8m0: bool, ids_dtype, seed: int):
    num_experts, _, hidden = weights[0].shape
    inter = weights[2].shape[2]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    x_fp8, x_scale = quantize_fp8_per_token_group(x, 128, ue8m0)
    ids = torch.rand(tokens, num_experts + expert_start + 2, generator=gen).argsort(dim=1)[:, :topk] - 1
    ids = ids.to(ids_dtype)  # global ids: -1, other ranks' and local ones
    w = torch.rand(tokens, topk, generator=gen)
    key = (tokens, topk, num_experts, hidden, inter)
    plan = plans.setdefault(key, _plans(*key))  # one plan object per shape, as the lru cache keeps it
    args = (x_fp8, x_scale, *weights, w, ids, expert_start, ue8m0)
    want = _execute_plan(plan, *args, None)
    got = eager_graphs.run_graphed(plan, _execute_plan, CAPACITY, *args, None)
    if got is None:  # the first call of a plan runs eagerly
        got = _execute_plan(plan, *args, None)
    assert torch.equal(got, want), f"T={tokens} k={topk} E={num_experts} start={expert_start} ue8m0={ue8m0}"


def _padding_ids_are_dropped() -> bool:
    """Every static buffer's ids past the last call's tokens are -1 (they route nowhere)."""
    return all(
        bool((io.ids[io.dirty_rows :] == -1).all()) and io.dirty_rows <= CAPACITY
        for io in eager_graphs._static.values()
    )


def test_bucket_padding_and_keys_over_a_history(emulated):
    plans: dict = {}
    shared = _weights(8, 128, 128, False, 0)
    # The same weights at two expert offsets and both scale formats: each is its own graph.
    layers = [(shared, 0, False), (shared, 4, False), (shared, 0, True), (_weights(4, 128, 128, True, 1), 4, True)]
    step = 0
    for tokens in (40, 3, 4, 3, 1, 64, 5, 3):
        for weights, start, ue8m0 in layers:
            for ids_dtype in (torch.int32, torch.int64):
                step += 1
                _call(plans, weights, tokens, 4, start, ue8m0, ids_dtype, step)
                assert _padding_ids_are_dropped(), f"T={tokens}: ids of padding tokens left routed"
        step += 1  # weights freed and allocated again every call, other shapes in between
        _call(plans, _weights(8, 128, 128, False, 100 + step), tokens, 4, 0, False, torch.int32, step)
        _call(plans, _weights(2, 256, 128, False, 200 + step), tokens, 2, 0, False, torch.int32, step)
    assert emulated and all(g.replays for g in emulated)
    assert eager_graphs.cache_sizes()["static_buffers"] >= 2
