"""Inputs at the edges of what a float tensor holds, for the quantizers' no-overflow checks
(tests/kernels/_interpret_cases.py on CPU, tests/kernels/test_quant_extremes_gpu.py on the device)."""

from __future__ import annotations

import torch

SUBNORMAL_ROW = 3  # `extreme_rows`' smallest-subnormal row (a GPU may flush it to zero)
SCALE_CEIL = 2.0**119  # moe_backend.quant.SCALE_CEIL, restated: the test pins the value


def extreme_rows(dtype: torch.dtype, cols: int) -> torch.Tensor:
    """9 rows of `cols` values: +max, -max, min normal, smallest subnormal, zero, alternating
    +-max, one max among ordinary values, ordinary values times max/8, ordinary values."""
    info = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(11)
    ordinary = torch.randn(cols, generator=gen)
    rows = [torch.full((cols,), v) for v in (info.max, -info.max, info.tiny, info.tiny / 2**7, 0.0)]
    alternating = torch.full((cols,), info.max)
    alternating[1::2] = -info.max
    rows.append(alternating)
    spike = ordinary.clone()
    spike[3] = info.max
    rows += [spike, ordinary * (info.max / 8), ordinary]
    return torch.stack(rows).to(dtype)


def gate_up_pairs(dtype: torch.dtype, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """h `[81, 2 * group]`: every (gate row, up row) pair of `extreme_rows`, and a mask of the
    pairs that hold no subnormal."""
    rows = extreme_rows(dtype, group)
    pairs = torch.cartesian_prod(torch.arange(len(rows)), torch.arange(len(rows)))
    h = torch.cat([rows[pairs[:, 0]], rows[pairs[:, 1]]], dim=-1)
    return h, (pairs != SUBNORMAL_ROW).all(dim=1)


def check_no_overflow(q: torch.Tensor, s: torch.Tensor) -> None:
    """Scales finite, positive and capped; fp8 values not NaN; every dequantized value finite."""
    assert torch.isfinite(s).all() and (s > 0).all(), "a scale is not finite and positive"
    assert (s <= SCALE_CEIL).all(), "a scale exceeds the cap"
    assert torch.isfinite(q.float()).all(), "an fp8 value is NaN"
    dequant = q.float() * s.repeat_interleave(q.shape[-1] // s.shape[-1], dim=-1)
    assert torch.isfinite(dequant).all(), "a dequantized value overflows fp32"
