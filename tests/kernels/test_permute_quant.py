"""permute_quant (per-token-group FP8 quant fused with the permute into a layout) on CPU: its torch
twin, the ops front door, routed_experts' bf16 path, and the kernel's argument checks. The kernel's
numerics run under the interpreter (_interpret_cases.py: permute_quant*) and on the GPU
(tests/kernels/test_permute_quant_gpu.py)."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch

from moe_backend import ops
from moe_backend.dispatch import KERNELS
from moe_backend.experts import routed_experts
from moe_backend.quant import quantize_fp8_blockwise, quantize_fp8_per_token_group
from moe_backend.reference import layouts

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
SIGNATURE = "(x, src_token, group=128, ue8m0=False, *, out=None, used_rows=None)"


def _plain(fn) -> str:
    sig = inspect.signature(fn)
    return str(
        sig.replace(
            parameters=[p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()],
            return_annotation=inspect.Signature.empty,
        )
    )


def _layouts(num_tokens=11, topk=4, num_local=6, expert_start=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Global ids -1..13: slots of other ranks and unrouted slots (-1) among the local ones.
    topk_ids = torch.stack([torch.randperm(15, generator=gen)[:topk] for _ in range(num_tokens)]) - 1
    return (
        layouts.build_contiguous_layout(topk_ids, num_local, expert_start=expert_start, alignment=8),
        layouts.build_masked_layout(topk_ids, num_local, expert_start=expert_start),
    )


@needs_triton
def test_signatures() -> None:
    from moe_backend.kernels import permute_quant as kernel_mod

    assert "permute_quant" in kernel_mod.__all__ and "permute_quant" in ops.__all__
    assert "permute_quant" in layouts.__all__
    for fn in (kernel_mod.permute_quant, ops.permute_quant, layouts.permute_quant):
        assert _plain(fn) == SIGNATURE, fn


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("kind", ["contiguous", "masked"])
def test_twin_is_quant_then_permute(kind: str, ue8m0: bool) -> None:
    """Byte-exact: the CPU path of routed_experts did exactly this before the fused op."""
    layout = _layouts()[kind == "masked"]
    x = (torch.randn(11, 512) * 3).bfloat16()
    q, s = layouts.permute_quant(x, layout.src_token, 128, ue8m0)
    x_fp8, x_scale = quantize_fp8_per_token_group(x, 128, ue8m0)
    assert torch.equal(q.view(torch.uint8), layouts.permute(x_fp8, layout).view(torch.uint8))
    assert torch.equal(s, layouts.permute(x_scale, layout))
    oq, os_ = ops.permute_quant(x, layout.src_token, 128, ue8m0)  # CPU: the twin
    assert torch.equal(oq.view(torch.uint8), q.view(torch.uint8)) and torch.equal(os_, s)


def test_twin_empty() -> None:
    x = torch.randn(0, 256)
    q, s = layouts.permute_quant(x, torch.full((3,), -1))  # no tokens: every row is padding, zeros
    assert q.shape == (3, 256) and s.shape == (3, 2) and not q.float().any() and not s.any()
    q, s = layouts.permute_quant(torch.randn(4, 256), torch.zeros(2, 0, dtype=torch.int64))
    assert q.shape == (2, 0, 256) and s.shape == (2, 0, 2)


def test_twin_padding_rows_and_out() -> None:
    """Padding rows (src_token -1) come out zero from the twin, the real rows as quant + gather;
    `out` is written in place and returned."""
    x = (torch.randn(5, 256) * 2).bfloat16()
    src = torch.tensor([[3, -1, 0], [-1, -1, 4]])
    q, s = layouts.permute_quant(x, src)
    x_fp8, x_scale = quantize_fp8_per_token_group(x)
    real = src >= 0
    assert torch.equal(q[real].view(torch.uint8), x_fp8[src[real]].view(torch.uint8))
    assert torch.equal(s[real], x_scale[src[real]])
    assert not q[~real].float().any() and not s[~real].any()
    out = (torch.empty_like(q), torch.full_like(s, float("nan")))
    oq, os_ = ops.permute_quant(x, src, out=out)
    assert oq is out[0] and os_ is out[1] and torch.equal(os_, s)
    with pytest.raises(ValueError, match=r"out\[1\]"):
        layouts.permute_quant(x, src, out=(out[0], out[1][:1]))
    with pytest.raises(TypeError, match="out: expected a pair"):
        layouts.permute_quant(x, src, out=out[0])
    # used_rows: flat rows at and past it count as padding (here the last three).
    uq, us = ops.permute_quant(x, src, used_rows=torch.tensor([3], dtype=torch.int32))
    assert torch.equal(us.view(-1, 2)[:3], s.view(-1, 2)[:3]) and not us.view(-1, 2)[3:].any()


def test_fused_path_is_chosen_by_bytes_moved() -> None:
    from moe_backend.dispatch.plan import fused_permute_quant_pays

    # The measured crossover, rows in use < 3 x tokens.
    assert fused_permute_quant_pays(2048, 4096)  # EP8, 2048 tokens: measured 1.24x faster fused
    assert not fused_permute_quant_pays(128, 4096)  # measured 0.70x
    assert not fused_permute_quant_pays(8192, 81280)  # TP8: ~10 layout rows per token
    assert fused_permute_quant_pays(100, 299) and not fused_permute_quant_pays(100, 300)
    # The gather, like the fused kernel, skips padding rows: only the rows in use count.
    assert fused_permute_quant_pays(1, 2) and not fused_permute_quant_pays(1, 8)  # decode, 1 token


@pytest.mark.parametrize("fused_pays", [True, False])
@pytest.mark.parametrize("kernel", ["contiguous", "masked", "triton", "reference"])
def test_routed_experts_bf16_x_matches_prequantized(kernel: str, fused_pays: bool, monkeypatch) -> None:
    """bf16 x (fused quant + permute, or quant then gather: both forced) and x quantized beforehand
    (gathered with its scales) agree bit for bit on every CPU path."""
    from moe_backend.dispatch import plan as plan_mod

    monkeypatch.setattr(plan_mod, "fused_permute_quant_pays", lambda *args: fused_pays)
    plan_mod.clear_plan_cache()  # plans are cached: resolve them again under the patched rule
    gen = torch.Generator().manual_seed(1)
    num_tokens, hidden, inter, num_local, expert_start = 19, 256, 128, 8, 4
    w13, w13_s = quantize_fp8_blockwise(torch.randn(num_local, 2 * inter, hidden, generator=gen) * 0.05)
    w2, w2_s = quantize_fp8_blockwise(torch.randn(num_local, hidden, inter, generator=gen) * 0.05)
    topk_ids = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(num_tokens)])
    topk_weights = torch.rand(num_tokens, 4, generator=gen)
    x = torch.randn(num_tokens, hidden, generator=gen).bfloat16()
    args = (w13, w13_s, w2, w2_s, topk_weights, topk_ids)
    fused = routed_experts(x, *args, expert_start=expert_start, kernel=KERNELS[kernel])
    x_fp8, x_scale = quantize_fp8_per_token_group(x)
    unfused = routed_experts(x_fp8, *args, x_scale=x_scale, expert_start=expert_start, kernel=KERNELS[kernel])
    assert torch.equal(fused, unfused) and fused.float().abs().sum() > 0
    plan_mod.clear_plan_cache()


def _bad_cases():
    x = torch.randn(4, 256).bfloat16()
    src = torch.tensor([0, 3, 3, 1])
    return [  # (id, x, src_token, kwargs, error, match)
        ("x_int", x.int(), src, {}, TypeError, "x"),
        ("x_fp8", x.to(torch.float8_e4m3fn), src, {}, TypeError, "x"),
        ("x_3d", x.view(2, 2, 256), src, {}, ValueError, "x"),
        ("x_list", x.tolist(), src, {}, TypeError, "x"),
        ("hidden_200", torch.randn(4, 200).bfloat16(), src, {}, ValueError, "x: last dim"),
        ("group_100", x, src, dict(group=100), ValueError, "group"),
        ("x_strided", torch.randn(4, 512).bfloat16()[:, ::2], src, {}, ValueError, "x: expected a contiguous"),
        ("src_int32", x, src.int(), {}, TypeError, "src_token"),
        ("src_float", x, src.float(), {}, TypeError, "src_token"),
        ("src_list", x, [0, 1], {}, TypeError, "src_token"),
        ("src_strided", x, torch.arange(8)[::2], {}, ValueError, "src_token: expected a contiguous"),
        ("src_other_device", x, src.to("meta"), {}, ValueError, "src_token: expected a tensor on cpu"),
        (
            "out_shape",
            x,
            src,
            dict(out=(torch.empty(3, 256, dtype=torch.float8_e4m3fn), torch.empty(4, 2))),
            ValueError,
            r"out\[0\]: expected shape",
        ),
        (
            "out_dtype",
            x,
            src,
            dict(out=(torch.empty(4, 256, dtype=torch.float8_e4m3fn), torch.empty(4, 2).half())),
            TypeError,
            r"out\[1\]: expected dtype",
        ),
        ("used_rows_int64", x, src, dict(used_rows=torch.tensor([2])), TypeError, "used_rows: expected dtype"),
        (
            "used_rows_shape",
            x,
            src,
            dict(used_rows=torch.tensor([2, 3], dtype=torch.int32)),
            ValueError,
            "used_rows: expected shape",
        ),
    ]


@needs_triton
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_kernel_bad_inputs(case, monkeypatch) -> None:
    """Each bad argument raises before any launch, naming the argument. The interpreter switch lets
    CPU tensors past the CUDA check (read per call), so the device-mismatch case runs here too."""
    from moe_backend.kernels.permute_quant import permute_quant

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _, x, src, kwargs, error, match = case
    with pytest.raises(error, match=match):
        permute_quant(x, src, **kwargs)


@needs_triton
def test_kernel_refuses_cpu_tensors(monkeypatch) -> None:
    from moe_backend.kernels.permute_quant import permute_quant

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="x: the Triton kernels need a CUDA tensor"):
        permute_quant(torch.randn(4, 256).bfloat16(), torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in _bad_cases()
        if c[0] in ("x_int", "x_3d", "hidden_200", "src_int32", "src_other_device", "used_rows_int64")
    ],
    ids=lambda c: c[0],
)
def test_twin_bad_inputs(case) -> None:
    _, x, src, kwargs, error, match = case
    with pytest.raises(error, match=match):
        layouts.permute_quant(x, src, **kwargs)
