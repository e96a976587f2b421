"""permute_rows (fp8 token rows and scales gathered into a layout's rows) on the GPU at DeepSeek-V3
shapes: byte-exact against torch's index_select on every row holding a token, padding rows and the
rows past `used_rows` never written (poisoned outputs), every launch config alike, and a CUDA graph
replayed with new routing. Run on the device: `pytest -m gpu tests/kernels/test_permute_rows_gpu.py`."""

from __future__ import annotations

import pytest
import torch

from moe_backend import ops

pytestmark = pytest.mark.gpu

HIDDEN, GLOBAL_EXPERTS, TOPK = 7168, 256, 8
POISON_BYTE = 0x7F  # e4m3 NaN
# name -> (local experts, first local expert, layout)
LAYOUTS = {
    "tp8_contiguous": (256, 0, "contiguous"),
    "ep8_contiguous": (32, 64, "contiguous"),
    "ep8_masked": (32, 64, "masked"),
}


def _topk_ids(num_tokens: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.rand(num_tokens, GLOBAL_EXPERTS, device="cuda", generator=gen).topk(TOPK, dim=-1).indices


def _layout(name: str, topk_ids: torch.Tensor):
    """(src_token, used_rows or None): the kernel-built layout on its static row bound."""
    num_local, start, kind = LAYOUTS[name]
    if kind == "masked":
        return ops.build_masked_layout(topk_ids, num_local, expert_start=start).src_token, None
    layout = ops.build_contiguous_layout(topk_ids, num_local, expert_start=start, alignment=128)
    return layout.src_token, layout.expert_offsets[num_local:]


def _quantized_tokens(num_tokens: int, seed: int = 1):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(num_tokens, HIDDEN, device="cuda", generator=gen) * 3).bfloat16()
    return ops.per_token_group_quant(x)


def _poisoned(src: torch.Tensor):
    return (
        torch.full((*src.shape, HIDDEN), POISON_BYTE, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn),
        torch.full((*src.shape, HIDDEN // 128), float("nan"), device="cuda"),
    )


def _check(q, s, x_fp8, x_scale, src, used_rows) -> None:
    below = torch.arange(src.numel(), device="cuda").view(src.shape) < (src.numel() if used_rows is None else used_rows)
    real = (src >= 0) & below
    assert bool((q[~real].view(torch.uint8) == POISON_BYTE).all()), "padding rows were written"
    assert bool(s[~real].isnan().all()), "padding scales were written"
    rows = src[real]
    assert torch.equal(q[real].view(torch.uint8), x_fp8.index_select(0, rows).view(torch.uint8)), "rows differ"
    assert torch.equal(s[real], x_scale.index_select(0, rows)), "scales differ"


@pytest.mark.parametrize("num_tokens", [1, 300, 4096])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_permute_rows(name: str, num_tokens: int) -> None:
    from moe_backend.kernels.permute_rows import GatherLaunchConfig, permute_rows

    x_fp8, x_scale = _quantized_tokens(num_tokens)
    src, used_rows = _layout(name, _topk_ids(num_tokens))
    for cfg in (None, GatherLaunchConfig(1, 2), GatherLaunchConfig(4, 4), GatherLaunchConfig(16, 8)):
        out = _poisoned(src)
        q, s = permute_rows(x_fp8, x_scale, src, out=out, used_rows=used_rows, config=cfg)
        assert q is out[0] and s is out[1]
        _check(q, s, x_fp8, x_scale, src, used_rows)


def test_used_rows_cut_short_and_zero() -> None:
    """Real rows at and past the count are not visited either (the count decides, not src_token)."""
    from moe_backend.kernels.permute_rows import permute_rows

    x_fp8, x_scale = _quantized_tokens(512)
    src, used_rows = _layout("tp8_contiguous", _topk_ids(512))
    for bound in (used_rows // 2, torch.zeros_like(used_rows)):
        q, s = permute_rows(x_fp8, x_scale, src, out=_poisoned(src), used_rows=bound)
        _check(q, s, x_fp8, x_scale, src, bound)


def test_ops_front_door_cuda_graph() -> None:
    """ops.permute_rows captured once on a static layout, replayed with new tokens and new routing."""
    num_tokens, num_local = 256, 256
    x_fp8, x_scale = _quantized_tokens(num_tokens)
    layout = ops.build_contiguous_layout(_topk_ids(num_tokens), num_local, alignment=128)
    used_rows = layout.expert_offsets[num_local:]
    ops.permute_rows(x_fp8, x_scale, layout.src_token, used_rows=used_rows)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, s = ops.permute_rows(x_fp8, x_scale, layout.src_token, used_rows=used_rows)
    for seed in (2, 3):
        new_x, new_scale = _quantized_tokens(num_tokens, seed)
        x_fp8.copy_(new_x)
        x_scale.copy_(new_scale)
        new = ops.build_contiguous_layout(_topk_ids(num_tokens, seed), num_local, alignment=128)
        layout.src_token.copy_(new.src_token)
        layout.expert_offsets.copy_(new.expert_offsets)
        graph.replay()
        real = (layout.src_token >= 0) & (torch.arange(q.shape[0], device="cuda") < used_rows)
        rows = layout.src_token[real]
        assert torch.equal(q[real].view(torch.uint8), x_fp8[rows].view(torch.uint8))
        assert torch.equal(s[real], x_scale[rows])
