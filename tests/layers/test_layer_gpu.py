"""The whole layer on the GPU (our kernels through the policy) against the reference path, and the
decode path under CUDA-graph capture. Run on the device: `pytest -m gpu tests/layers`."""

import pytest
import torch

from moe_backend import reference
from moe_backend.dispatch import Policy
from moe_backend.experts import routed_experts
from moe_backend.layers import DeepseekV3MoE
from moe_backend.layers.router import noaux_tc_route
from moe_backend.testing import random_moe_weights
from tests.helpers.configs import SMALL_V3

pytestmark = pytest.mark.gpu

CONFIG = SMALL_V3
# Kernel vs reference: each FP8 GEMM within 2e-3, plus bf16 roundings of the intermediate.
LAYER_KERNEL_VS_REFERENCE = 1e-2


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def layer():
    m = DeepseekV3MoE(CONFIG, device="cuda")
    m.load_weights(random_moe_weights(CONFIG, seed=0, device="cuda"))
    return m


def _reference_forward(layer, x):
    w, ids = noaux_tc_route(x, layer.gate_weight, layer.e_score_correction_bias, CONFIG)
    routed = reference.routed_experts(x, layer.w13_fp8, layer.w13_scale_inv, layer.w2_fp8, layer.w2_scale_inv, w, ids)
    return routed.float() + layer.shared_expert(x).float()


PREFILL_KERNELS = ("contiguous", "cuda_contiguous", "triton_contiguous")


@pytest.mark.parametrize("kernel", PREFILL_KERNELS + ("masked", "triton"))
@pytest.mark.parametrize("tokens", [1, 8, 33, 300])
def test_layer_kernels_match_reference(layer, kernel, tokens):
    if kernel in PREFILL_KERNELS:  # every batch is prefill
        layer.policy = Policy(prefill_kernel=kernel, decode_max_tokens=0)
    else:  # every batch is decode
        layer.policy = Policy(decode_kernel=kernel, decode_max_tokens=1 << 20)
    x = torch.randn(tokens, CONFIG.hidden_size, device="cuda").to(torch.bfloat16)
    out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    assert _rel(out, _reference_forward(layer, x)) < LAYER_KERNEL_VS_REFERENCE


def test_ep_slice_on_gpu():
    part = DeepseekV3MoE(CONFIG, expert_range=(16, 32), with_shared_experts=False, device="cuda")
    part.load_weights(random_moe_weights(CONFIG, seed=0, device="cuda"))
    x = torch.randn(40, CONFIG.hidden_size, device="cuda").to(torch.bfloat16)
    w, ids = noaux_tc_route(x, part.gate_weight, part.e_score_correction_bias, CONFIG)
    want = reference.routed_experts(x, part.w13_fp8, part.w13_scale_inv, part.w2_fp8, part.w2_scale_inv, w, ids - 16)
    assert _rel(part(x), want) < LAYER_KERNEL_VS_REFERENCE


@pytest.mark.parametrize("kernel", ["masked", "triton"])
def test_decode_path_is_cuda_graph_capturable(layer, kernel):
    tokens = 16
    choice = Policy(decode_kernel=kernel).choose(tokens, "decode")
    x = torch.randn(tokens, CONFIG.hidden_size, device="cuda").to(torch.bfloat16)
    w, ids = noaux_tc_route(x, layer.gate_weight, layer.e_score_correction_bias, CONFIG)
    args = (layer.w13_fp8, layer.w13_scale_inv, layer.w2_fp8, layer.w2_scale_inv)
    routed_experts(x, *args, w, ids, kernel=choice)  # warm-up: JIT outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = routed_experts(x, *args, w, ids, kernel=choice)
    for seed in range(3):  # new tokens and new routing, same buffers
        g = torch.Generator(device="cuda").manual_seed(seed)
        x.copy_(torch.randn(x.shape, generator=g, device="cuda"))
        new_w, new_ids = noaux_tc_route(x, layer.gate_weight, layer.e_score_correction_bias, CONFIG)
        w.copy_(new_w)
        ids.copy_(new_ids)
        graph.replay()
        want = reference.routed_experts(x, *args, w, ids)
        assert _rel(out, want) < LAYER_KERNEL_VS_REFERENCE


def test_deepgemm_provider_if_installed(layer):
    pytest.importorskip("deep_gemm")
    layer.policy = Policy(prefill_kernel="deepgemm_contiguous", decode_kernel="deepgemm_masked")
    for tokens in (4, 600):
        x = torch.randn(tokens, CONFIG.hidden_size, device="cuda").to(torch.bfloat16)
        assert _rel(layer(x), _reference_forward(layer, x)) < LAYER_KERNEL_VS_REFERENCE
