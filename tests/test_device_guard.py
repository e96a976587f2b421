"""Calls whose tensors live on a GPU other than the current one (a model spread over GPUs by
transformers' `device_map`) run with that GPU current (`moe_backend._device`): Triton launches on
the current device. CPU: the guard's choice with the current device patched,
and every public entry that launches kernels wrapped by it. GPU (two or more): the layer's routed
experts and the ops on cuda:1 while cuda:0 is current, against the reference."""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

from moe_backend import _device, ops
from moe_backend.experts import routed_experts

# the public entries whose first argument is the tensor whose GPU the kernels must run on
GUARDED = [
    ops.grouped_gemm_contiguous,
    ops.grouped_gemm_masked,
    ops.silu_mul_quant,
    ops.per_token_group_quant,
    ops.permute_quant,
    ops.permute_rows,
    ops.unpermute_combine,
    ops.build_contiguous_layout,
    ops.build_masked_layout,
    routed_experts,
]


class _OnGpu(torch.Tensor):
    """A CPU tensor that reports living on cuda:1 (the guard reads only is_cuda and device)."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_guard_makes_the_tensors_gpu_current(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())
    on_gpu1 = torch.Tensor._make_subclass(_OnGpu, torch.empty(2))
    with _device.on_device_of(on_gpu1):
        pass
    assert entered == [torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # already current: nothing to switch
    with _device.on_device_of(on_gpu1):
        pass
    with _device.on_device_of(torch.empty(2)), _device.on_device_of(None), _device.on_device_of(3):
        pass
    assert entered == [torch.device("cuda", 1)]

    calls = []

    @_device.runs_on_first_tensor_device
    def op(x, *, scale=1):
        calls.append((x, scale))
        return "done"

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert op(on_gpu1, scale=2) == "done" and calls == [(on_gpu1, 2)]
    assert entered == [torch.device("cuda", 1)] * 2


@pytest.mark.parametrize("fn", GUARDED, ids=lambda f: f.__name__)
def test_public_entries_run_on_their_tensors_gpu(fn):
    assert getattr(fn, "__wrapped__", None) is not None, f"{fn.__name__} is not wrapped by runs_on_first_tensor_device"
    assert fn.__code__ is _device.runs_on_first_tensor_device(lambda: None).__code__
    assert inspect.signature(fn) == inspect.signature(fn.__wrapped__)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_layer_and_ops_on_the_second_gpu_while_the_first_is_current():
    from moe_backend import reference
    from moe_backend.quant import quantize_fp8_per_token_group
    from moe_backend.testing import random_fp8_weights
    from tests.helpers.tolerances import LAYER_SAME_QUANT

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    experts, hidden, inter, tokens = 8, 1024, 256, 64
    w13, w13_s = random_fp8_weights(experts, 2 * inter, hidden, device=dev)
    w2, w2_s = random_fp8_weights(experts, hidden, inter, device=dev)
    x = torch.randn(tokens, hidden, device=dev).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(experts, device=dev)[:4] for _ in range(tokens)]).int()
    w = torch.rand(tokens, 4, device=dev).softmax(-1)
    assert torch.cuda.current_device() == 0
    got = routed_experts(x, w13, w13_s, w2, w2_s, w, ids)
    want = reference.routed_experts(x, w13, w13_s, w2, w2_s, w, ids)
    err = float((got.double() - want.double()).norm() / want.double().norm())
    assert got.device == dev and err <= LAYER_SAME_QUANT, f"rel err {err:.2e}"
    q, s = ops.per_token_group_quant(x)
    q_ref, s_ref = quantize_fp8_per_token_group(x)
    assert q.device == dev and torch.allclose(s, s_ref, rtol=1e-6, atol=0)
    assert (q.float() == q_ref.float()).float().mean().item() >= 0.999  # as the kernels' quant tests
    assert torch.cuda.current_device() == 0
