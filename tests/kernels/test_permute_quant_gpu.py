"""permute_quant (per-token-group FP8 quant fused with the permute) on the GPU, DeepSeek-V3 shapes:
byte-exact against the unfused kernels (per_token_group_quant, then permute), equal to the torch
twin (both divide exactly), and routed_experts' bf16 path against the pre-quantized one
and the reference. Run on the device: `pytest -m gpu tests/kernels/test_permute_quant_gpu.py`."""

from __future__ import annotations

import pytest
import torch

from moe_backend import ops, reference
from moe_backend.dispatch import KERNELS
from moe_backend.experts import routed_experts
from moe_backend.reference import layouts
from moe_backend.testing import random_fp8_weights

pytestmark = pytest.mark.gpu

HIDDEN, GLOBAL_EXPERTS, TOPK, TOKENS = 7168, 256, 8, 300
# The layer's bf16 path against the reference (FP8 rounding of the SiLU*up product, whose exp is
# the GPU's, and of GEMM outputs); the quant itself is exact against the twin.
TOL = {"layer": 1e-2}
# name -> (local experts, first local expert, layout)
LAYOUTS = {
    "ep8_contiguous": (32, 64, "contiguous"),
    "tp8_contiguous": (256, 0, "contiguous"),
    "ep8_contiguous_graph_safe": (32, 224, "static"),  # shape-only size: a long all-padding tail
    "ep8_masked": (32, 64, "masked"),
}


def _topk_ids(num_tokens: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.rand(num_tokens, GLOBAL_EXPERTS, device="cuda", generator=gen).topk(TOPK, dim=-1).indices


def _layout(name: str, topk_ids: torch.Tensor):
    num_local, start, kind = LAYOUTS[name]
    if kind == "masked":
        return layouts.build_masked_layout(topk_ids, num_local, expert_start=start)
    return layouts.build_contiguous_layout(
        topk_ids, num_local, expert_start=start, alignment=128, exact_size=kind != "static"
    )


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_permute_quant(name: str, ue8m0: bool) -> None:
    from moe_backend.kernels.per_token_group_quant import per_token_group_quant
    from moe_backend.kernels.permute_quant import permute_quant

    gen = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(TOKENS, HIDDEN, device="cuda", generator=gen) * 3).bfloat16()
    layout = _layout(name, _topk_ids(TOKENS))
    src = layout.src_token
    out = (
        torch.full((*src.shape, HIDDEN), 0x7F, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn),
        torch.full((*src.shape, HIDDEN // 128), float("nan"), device="cuda"),
    )
    q, s = permute_quant(x, src, 128, ue8m0, out=out)
    assert q.shape == (*src.shape, HIDDEN) and s.shape == (*src.shape, HIDDEN // 128)
    real = src >= 0  # padding rows (src_token -1) are never written: still poisoned
    assert bool((q[~real].view(torch.uint8) == 0x7F).all()) and bool(s[~real].isnan().all())
    q, s = q[real], s[real]

    uq, us = per_token_group_quant(x, 128, ue8m0)
    assert torch.equal(q.view(torch.uint8), layouts.permute(uq, layout)[real].view(torch.uint8)), (
        "differs from per_token_group_quant + permute"
    )
    assert torch.equal(s, layouts.permute(us, layout)[real])

    # The twin on the CPU (IEEE divisions, as the kernel's), byte for byte: the GPU's e4m3 cast
    # keeps the sign of values that round to zero, as torch's does.
    rq, rs = (t[real.cpu()] for t in layouts.permute_quant(x.cpu(), src.cpu(), 128, ue8m0))
    assert torch.equal(s.cpu(), rs), (
        f"scales differ from the twin: max rel {float(((s.cpu() - rs).abs() / rs).max()):.2e}"
    )
    mismatch = int((q.view(torch.uint8).cpu() != rq.view(torch.uint8)).sum())
    assert mismatch == 0, f"{mismatch} fp8 bytes differ from the twin"


def test_permute_quant_cuda_graph() -> None:
    """Captured once on a graph-safe layout, replayed with new tokens and new routing."""
    from moe_backend.kernels.permute_quant import permute_quant

    x = torch.randn(64, HIDDEN, device="cuda").bfloat16()
    src = _layout("ep8_contiguous_graph_safe", _topk_ids(64)).src_token
    permute_quant(x, src)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, s = permute_quant(x, src)
    for seed in (1, 2):
        x.copy_(torch.randn_like(x))
        src.copy_(_layout("ep8_contiguous_graph_safe", _topk_ids(64, seed)).src_token)
        graph.replay()
        rq, rs = ops.per_token_group_quant(x)
        real = src >= 0
        assert torch.equal(q[real].view(torch.uint8), rq[src[real]].view(torch.uint8))
        assert torch.equal(s[real], rs[src[real]])


@pytest.fixture(scope="module")
def ep8_weights():
    inter = 256
    return (*random_fp8_weights(32, 2 * inter, HIDDEN), *random_fp8_weights(32, HIDDEN, inter))


@pytest.mark.parametrize("kernel", ["contiguous", "triton_contiguous", "masked", "triton"])
def test_routed_experts_bf16_x(ep8_weights, kernel: str) -> None:
    """bf16 x (fused quant + permute) == x quantized first by the kernel (gathered with its scales),
    bit for bit; and within the layer tolerance of the reference."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(TOKENS, HIDDEN, device="cuda", generator=gen).bfloat16()
    topk_ids = _topk_ids(TOKENS, seed=4)
    topk_weights = torch.rand(TOKENS, TOPK, device="cuda", generator=gen)
    args = (*ep8_weights, topk_weights, topk_ids)
    fused = routed_experts(x, *args, expert_start=64, kernel=KERNELS[kernel])
    x_fp8, x_scale = ops.per_token_group_quant(x)
    unfused = routed_experts(x_fp8, *args, x_scale=x_scale, expert_start=64, kernel=KERNELS[kernel])
    assert torch.equal(fused, unfused)
    local_ids = torch.where((topk_ids >= 64) & (topk_ids < 96), topk_ids - 64, -1)
    ref = reference.routed_experts(x, *ep8_weights, topk_weights, local_ids)
    err = float((fused.double() - ref.double()).norm() / ref.double().norm())
    assert torch.isfinite(fused.float()).all() and err < TOL["layer"], err
