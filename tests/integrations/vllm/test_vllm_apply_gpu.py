"""What the vLLM experts' `apply` runs, on the GPU with our kernels, eagerly and under CUDA-graph
capture + replay (vLLM captures decode batches), against the reference. No vLLM needed: the math
lives in `moe_backend_integrations.vllm._apply`. Run on the device: `pytest -m gpu tests/...`."""

from __future__ import annotations

import pytest
import torch

from moe_backend import reference
from moe_backend.dispatch import Policy
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group
from tests.helpers.tolerances import LAYER_SAME_QUANT

pytestmark = pytest.mark.gpu

HIDDEN, INTER, TOPK = 1024, 512, 8
LOCAL_EXPERTS, GLOBAL_EXPERTS = 8, 32  # EP: this rank holds global experts 8..15
FIRST_LOCAL = 8
MAX_M = 128  # DeepEP low-latency's default rows per expert


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator(device="cuda").manual_seed(0)
    w13, s13 = quantize_fp8_blockwise(torch.randn(LOCAL_EXPERTS, 2 * INTER, HIDDEN, device="cuda", generator=g) / 32)
    w2, s2 = quantize_fp8_blockwise(torch.randn(LOCAL_EXPERTS, HIDDEN, INTER, device="cuda", generator=g) / 32)
    return w13, s13, w2, s2


def _routing(num_tokens, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(num_tokens, GLOBAL_EXPERTS, device="cuda", generator=g)
    scores[:, FIRST_LOCAL + 3] = -1  # one local expert gets no token
    topk_weights, topk_ids = scores.topk(TOPK, dim=-1)
    return topk_weights.float(), topk_ids.to(torch.int32)


def _expert_map():
    expert_map = torch.full((GLOBAL_EXPERTS,), -1, dtype=torch.int32, device="cuda")
    expert_map[FIRST_LOCAL : FIRST_LOCAL + LOCAL_EXPERTS] = torch.arange(
        LOCAL_EXPERTS, dtype=torch.int32, device="cuda"
    )
    return expert_map


def _local_ids(topk_ids):
    local = topk_ids - FIRST_LOCAL
    return torch.where((local >= 0) & (local < LOCAL_EXPERTS), local, -1)


@pytest.mark.parametrize("num_tokens", [1, 7, 33, 300])
def test_standard_eager(weights, num_tokens):
    from moe_backend_integrations.vllm._apply import apply_standard

    w13, s13, w2, s2 = weights
    x = torch.randn(num_tokens, HIDDEN, device="cuda").to(torch.bfloat16)
    x_fp8, x_scale = quantize_fp8_per_token_group(x)
    topk_weights, topk_ids = _routing(num_tokens, seed=num_tokens)
    out = torch.empty(num_tokens, HIDDEN, dtype=torch.bfloat16, device="cuda")
    apply_standard(out, x_fp8, x_scale, w13, s13, w2, s2, topk_weights, topk_ids, _expert_map(), False, Policy())
    want = reference.routed_experts(x, w13, s13, w2, s2, topk_weights, _local_ids(topk_ids))
    assert _rel(out, want) <= LAYER_SAME_QUANT


def test_standard_cuda_graph(weights):
    """Captured once, replayed with new tokens and routing: the decode kernel is shape-static."""
    from moe_backend_integrations.vllm._apply import apply_standard

    w13, s13, w2, s2 = weights
    num_tokens = 64
    x_fp8 = torch.zeros(num_tokens, HIDDEN, dtype=torch.float8_e4m3fn, device="cuda")
    x_scale = torch.ones(num_tokens, HIDDEN // 128, device="cuda")
    topk_weights, topk_ids = _routing(num_tokens, seed=1)
    expert_map, out = _expert_map(), torch.empty(num_tokens, HIDDEN, dtype=torch.bfloat16, device="cuda")
    policy = Policy()
    run = lambda: apply_standard(
        out,
        x_fp8,
        x_scale,
        w13,
        s13,
        w2,
        s2,
        topk_weights,  # noqa: E731
        topk_ids,
        expert_map,
        False,
        policy,
    )
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for seed in (2, 3):
        x = torch.randn(num_tokens, HIDDEN, device="cuda").to(torch.bfloat16)
        new_fp8, new_scale = quantize_fp8_per_token_group(x)
        new_weights, new_ids = _routing(num_tokens, seed=seed)
        x_fp8.copy_(new_fp8), x_scale.copy_(new_scale)
        topk_weights.copy_(new_weights), topk_ids.copy_(new_ids)
        graph.replay()
        want = reference.routed_experts(x, w13, s13, w2, s2, new_weights, _local_ids(new_ids))
        assert _rel(out, want) <= LAYER_SAME_QUANT


def _masked_problem(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    counts = torch.randint(1, MAX_M + 1, (LOCAL_EXPERTS,), device="cuda", generator=g, dtype=torch.int32)
    counts[3] = 0
    counts[5] = MAX_M
    x = torch.randn(LOCAL_EXPERTS, MAX_M, HIDDEN, device="cuda", generator=g)
    x_fp8, x_scale = quantize_fp8_per_token_group(x)
    return counts, x_fp8, x_scale


def _check_masked(out, counts, x_fp8, x_scale, weights):
    w13, s13, w2, s2 = weights
    h = reference.grouped_gemm_masked(x_fp8, x_scale, w13, s13, counts)
    a_fp8, a_scale = reference.silu_mul_quant(h)
    want = reference.grouped_gemm_masked(a_fp8, a_scale, w2, s2, counts)
    for e, m in enumerate(counts.tolist()):
        if m:
            assert torch.isfinite(out[e, :m].float()).all()
            assert _rel(out[e, :m], want[e, :m]) <= LAYER_SAME_QUANT, e


@pytest.mark.parametrize("expected_m", [None, 32])
def test_batched_cuda_graph(weights, expected_m):
    """Stale (NaN) workspace, counts only on the device, captured once and replayed."""
    from moe_backend_integrations.vllm._apply import apply_batched

    w13, s13, w2, s2 = weights
    counts, x_fp8, x_scale = _masked_problem(seed=0)
    # vLLM's naive batched prepare sizes the counts by global experts: only the first E are read.
    counts_global = torch.full((GLOBAL_EXPERTS,), 7, dtype=torch.int32, device="cuda")
    counts_global[:LOCAL_EXPERTS] = counts
    workspace = torch.full((LOCAL_EXPERTS, MAX_M, 2 * INTER), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = torch.full((LOCAL_EXPERTS, MAX_M, HIDDEN), float("nan"), dtype=torch.bfloat16, device="cuda")
    run = lambda: apply_batched(
        out,
        x_fp8,
        x_scale,
        w13,
        s13,
        w2,
        s2,
        counts_global,  # noqa: E731
        workspace,
        expected_m,
    )
    run()
    _check_masked(out, counts, x_fp8, x_scale, weights)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for seed in (1, 2):
        new_counts, new_fp8, new_scale = _masked_problem(seed)
        counts_global[:LOCAL_EXPERTS].copy_(new_counts)
        x_fp8.copy_(new_fp8), x_scale.copy_(new_scale)
        graph.replay()
        _check_masked(out, new_counts, new_fp8, new_scale, weights)
