"""No growth on the GPU: 10,000 eager layer calls with varying token counts, then 10,000 CUDA-graph
replays of decode batches, leave device memory (allocated and reserved), the in-process caches
(tests/helpers/cache_sizes.py) and the Triton kernels' compiled specializations at their warm-up sizes.
Prints the figures. Run on the device:
`python -m pytest tests/test_no_growth_gpu.py -q -s`."""

from __future__ import annotations

import gc

import pytest
import torch

from moe_backend.dispatch import Policy
from moe_backend.experts import routed_experts
from moe_backend.layers import DeepseekV3MoE
from moe_backend.layers.router import noaux_tc_route
from moe_backend.testing import random_moe_weights
from tests.helpers.cache_sizes import cache_sizes, triton_kernel_variants
from tests.helpers.configs import SMALL_V3
from tests.helpers.tolerances import LAYER_SAME_QUANT

pytestmark = pytest.mark.gpu

CONFIG = SMALL_V3
CALLS = 10_000
REPLAYS = 10_000
TOKEN_COUNTS = [*range(1, 65), 100, 128, 200, 255, 256, 257, 300, 512, 1000, 2048]
GRAPH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]


def _snapshot() -> dict:
    torch.cuda.synchronize()
    gc.collect()
    return dict(
        allocated=torch.cuda.memory_allocated(),
        reserved=torch.cuda.memory_reserved(),
        caches=cache_sizes(),
        triton=triton_kernel_variants(),
    )


def _report(label: str, before: dict, after: dict) -> None:
    mib = 2**20
    print(
        f"\n{label}: allocated {before['allocated'] / mib:.1f} -> {after['allocated'] / mib:.1f} MiB, "
        f"reserved {before['reserved'] / mib:.1f} -> {after['reserved'] / mib:.1f} MiB, "
        f"caches {sum(v[0] for v in before['caches'].values())} -> "
        f"{sum(v[0] for v in after['caches'].values())} entries, Triton specializations "
        f"{sum(before['triton'].values())} -> {sum(after['triton'].values())}"
    )
    print("  caches: " + ", ".join(f"{k.removeprefix('moe_backend.')}={v[0]}" for k, v in after["caches"].items()))


def _assert_no_growth(before: dict, after: dict) -> None:
    assert after["allocated"] <= before["allocated"], "device memory still allocated after the calls"
    assert after["reserved"] <= before["reserved"], "the caching allocator reserved more"
    assert after["caches"] == before["caches"], {
        k: (before["caches"].get(k), v) for k, v in after["caches"].items() if before["caches"].get(k) != v
    }
    assert after["triton"] == before["triton"], "a Triton kernel compiled new specializations"


@pytest.fixture(scope="module")
def layer():
    m = DeepseekV3MoE(CONFIG, device="cuda")
    m.load_weights(random_moe_weights(CONFIG, seed=0, device="cuda"))
    return m


def test_eager_calls_with_varying_tokens(layer):
    layer.policy = Policy()
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = {t: torch.randn(t, CONFIG.hidden_size, generator=gen, device="cuda").bfloat16() for t in TOKEN_COUNTS}
    for _ in range(2):  # warm-up: every kernel specialization, allocator bucket and eager-call graph
        for t in TOKEN_COUNTS:  # (a plan's first call runs eagerly, its second captures the graph)
            layer(inputs[t])
    before = _snapshot()
    for i in range(CALLS):
        layer(inputs[TOKEN_COUNTS[i % len(TOKEN_COUNTS)]])
    after = _snapshot()
    _report(f"{CALLS} eager layer calls, {len(TOKEN_COUNTS)} token counts 1..{TOKEN_COUNTS[-1]}", before, after)
    _assert_no_growth(before, after)


@pytest.mark.parametrize("kernel", ["masked", "triton"])
def test_graph_replays_of_decode_batches(layer, kernel):
    choice = Policy(decode_kernel=kernel).choose(1, "decode")
    args = (layer.w13_fp8, layer.w13_scale_inv, layer.w2_fp8, layer.w2_scale_inv)
    graphs = []
    pool = torch.cuda.graph_pool_handle()
    for tokens in GRAPH_SIZES:
        x = torch.randn(tokens, CONFIG.hidden_size, device="cuda").bfloat16()
        w, ids = noaux_tc_route(x, layer.gate_weight, layer.e_score_correction_bias, CONFIG)
        routed_experts(x, *args, w, ids, kernel=choice)  # JIT outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = routed_experts(x, *args, w, ids, kernel=choice)
        # The graph reads x, w and ids where they lay at capture: all three stay alive with it (a
        # freed routing's memory, reused by the next size's tensors, would feed it garbage).
        graphs.append((graph, x, w, ids, out))
    for graph, *_ in graphs:
        graph.replay()
    before = _snapshot()
    for i in range(REPLAYS):
        graph, x, *_ = graphs[i % len(graphs)]
        if i % 997 == 0:
            x.normal_()  # new tokens in the captured buffer now and then
        graph.replay()
    after = _snapshot()
    _report(f"{REPLAYS} CUDA-graph replays ({kernel}), batch sizes {GRAPH_SIZES}", before, after)
    _assert_no_growth(before, after)
    for graph, *_ in graphs:  # in capture order: a graph's out may lie in a pool block an earlier one reuses
        graph.replay()
    for _, x, w, ids, out in graphs:  # the last replay of each size against the reference
        ref = routed_experts(x, *args, w, ids, kernel="reference").float()
        assert torch.isfinite(out.float()).all()
        assert (out.float() - ref).norm() <= LAYER_SAME_QUANT * ref.norm(), f"{x.shape[0]} tokens"
