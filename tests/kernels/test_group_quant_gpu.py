"""The flat-item quant kernel (`_group_quant_core`: per_token_group_quant, silu_mul_quant) on the
GPU at DeepSeek-V3 shapes: every launch config the sweep tries gives the default's bytes exactly
(the rounding code is one function; only the cut of the work changes), invalid rows and the rows
past `used_rows` are never written (poisoned outputs), x quant equals the CPU reference exactly
(IEEE divisions on both sides), and SiLU*up quant matches it to the GPU's exp error. Run on the device:
`pytest -m gpu tests/kernels/test_group_quant_gpu.py`."""

from __future__ import annotations

import itertools

import pytest
import torch

from moe_backend import ops, reference
from moe_backend.quant import quantize_fp8_per_token_group

pytestmark = pytest.mark.gpu

HIDDEN, GLOBAL_EXPERTS, TOPK = 7168, 256, 8
POISON_BYTE = 0x7F  # e4m3 NaN
# SiLU*up quant, as test_kernels_gpu.py: the GPU's exp is within 2 ulp of torch's, so a scale may
# differ by an ulp and a value on an fp8 rounding midpoint may round the other way.
TOL = {"scale_rtol": 1e-6, "fp8_mismatch": 1e-3}
SWEEP = list(itertools.product((8, 16, 32, 64), (2, 4, 8)))  # (items per program, warps): lab's sweep


def _core():
    from moe_backend.kernels import _group_quant_core

    return _group_quant_core


def _launch(x2d, cols, silu_mul, cfg, **validity):
    rows = x2d.shape[0]
    q = torch.full((rows, cols), POISON_BYTE, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    s = torch.full((rows, cols // 128), float("nan"), device="cuda")
    _core().launch(x2d, q, s, cols=cols, silu_mul=silu_mul, ue8m0=False, group=128, config=cfg, **validity)
    return q, s


def _assert_bytes_equal(got, want, what: str) -> None:
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)), f"{what}: fp8 bytes differ"
    assert torch.equal(got[1].view(torch.int32), want[1].view(torch.int32)), f"{what}: scale bits differ"


def _assert_exact(got, want) -> None:
    # Bytes: the GPU's e4m3 cast keeps the sign of values that round to zero, as torch's does.
    (q, s), (rq, rs) = (tuple(t.cpu() for t in pair) for pair in (got, want))
    assert torch.equal(s.view(torch.int32), rs.view(torch.int32)), "scale bits differ from the reference"
    mismatch = int((q.view(torch.uint8) != rq.view(torch.uint8)).sum())
    assert mismatch == 0, f"{mismatch} fp8 bytes differ from the reference"


def _assert_close(got, want) -> None:
    (q, s), (rq, rs) = got, want
    assert torch.allclose(s, rs, rtol=TOL["scale_rtol"], atol=0)
    assert (q.float() != rq.float()).float().mean().item() <= TOL["fp8_mismatch"]


@pytest.mark.parametrize("num_tokens", [1, 128, 2048])
def test_x_quant_every_config_alike(num_tokens: int) -> None:
    x = (torch.randn(num_tokens, HIDDEN, device="cuda") * 3).bfloat16()
    default = _launch(x, HIDDEN, False, None)
    # bf16 rows put many x * 448 / amax exactly on an e4m3 midpoint: a scale one ulp off flips them.
    _assert_exact(default, quantize_fp8_per_token_group(x.cpu()))
    for items, warps in SWEEP:
        _assert_bytes_equal(
            _launch(x, HIDDEN, False, _core().QuantLaunchConfig(items, warps)), default, f"{items}x{warps}"
        )


@pytest.mark.parametrize("num_local,inter", [(256, 256), (32, 2048)])  # TP8, EP8 slices
def test_silu_mul_quant_contiguous_layout(num_local: int, inter: int) -> None:
    """GEMM1's output on the static row bound: rows holding a token below used_rows computed,
    padding and the tail never written, every config alike."""
    num_tokens = 2048
    topk_ids = torch.rand(num_tokens, GLOBAL_EXPERTS, device="cuda").topk(TOPK, dim=-1).indices
    layout = ops.build_contiguous_layout(topk_ids, num_local, alignment=128)
    ids, used_rows = layout.expert_ids, layout.expert_offsets[num_local:]
    h = (torch.randn(layout.num_rows, 2 * inter, device="cuda") * 4).bfloat16()
    real = (ids >= 0) & (torch.arange(layout.num_rows, device="cuda") < used_rows)
    assert bool((~real).any()), "the case needs padding rows"
    h[~real] = float("nan")  # padding rows of GEMM1's output hold anything
    default = _launch(h, inter, True, None, expert_ids=ids, used_rows=used_rows)
    assert bool((default[0][~real].view(torch.uint8) == POISON_BYTE).all()) and bool(default[1][~real].isnan().all())
    want = reference.silu_mul_quant(h[real], 128, False)
    _assert_close((default[0][real], default[1][real]), want)
    for items, warps in SWEEP:
        cfg = _core().QuantLaunchConfig(items, warps)
        _assert_bytes_equal(
            _launch(h, inter, True, cfg, expert_ids=ids, used_rows=used_rows), default, f"{items}x{warps}"
        )


def test_silu_mul_quant_masked_layout() -> None:
    num_local, max_m, inter = 32, 96, 2048
    masked_m = torch.randint(0, max_m + 1, (num_local,), dtype=torch.int32, device="cuda")
    masked_m[0], masked_m[1] = 0, max_m  # an empty and a full expert
    h = (torch.randn(num_local, max_m, 2 * inter, device="cuda") * 4).bfloat16()
    valid = torch.arange(max_m, device="cuda")[None, :] < masked_m[:, None]
    out = (
        torch.full((num_local, max_m, inter), POISON_BYTE, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn),
        torch.full((num_local, max_m, inter // 128), float("nan"), device="cuda"),
    )
    q, s = ops.silu_mul_quant(h, masked_m=masked_m, out=out)
    assert bool((q[~valid].view(torch.uint8) == POISON_BYTE).all()) and bool(s[~valid].isnan().all())
    _assert_close((q[valid], s[valid]), reference.silu_mul_quant(h[valid], 128, False))
